//! Streaming responses: a [`Generation`] read as server-sent events, framed as OpenAI frames
//! them (`data: {chunk}\n\n` per chunk, `data: [DONE]\n\n` at the end).
//!
//! The stream is pulled by the HTTP body: each poll reads the next engine events and turns them
//! into chunks through an endpoint's [`ChunkSink`] (chat and completions shape chunks
//! differently). It owns the generation, so when the client disconnects and hyper drops the
//! body, the submissions are dropped with it and the engine cancels the sequences. A sequence
//! that fails mid-stream sends the error object as an event, then `[DONE]`, as vLLM does.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_core::Stream;

use super::generation::{Generation, Step};

/// Turns one endpoint's steps into chunk JSON texts.
pub(crate) trait ChunkSink: Send + Unpin + 'static {
    /// Chunks for steps of sequence `index` (never [`Step::Failed`]; the stream handles that).
    fn steps(&mut self, index: usize, steps: Vec<Step>, out: &mut Vec<String>);
    /// Chunks after every sequence ended (the usage chunk).
    fn end(&mut self, out: &mut Vec<String>);
}

pub(crate) struct SseStream<S: ChunkSink> {
    generation: Option<Generation>,
    sink: S,
    queue: VecDeque<String>,
}

impl<S: ChunkSink> SseStream<S> {
    /// `first`: chunks to send before any engine output (chat's role chunks).
    pub(crate) fn new(generation: Generation, sink: S, first: Vec<String>) -> Self {
        SseStream {
            generation: Some(generation),
            sink,
            queue: first.into(),
        }
    }

    /// The HTTP response; `keep_alive` sends comment lines while the engine is silent (a long
    /// prefill), which clients ignore and proxies take as a live connection.
    pub(crate) fn into_response(self, keep_alive: Option<Duration>) -> Response {
        let sse = Sse::new(self);
        match keep_alive {
            Some(interval) => sse
                .keep_alive(KeepAlive::new().interval(interval))
                .into_response(),
            None => sse.into_response(),
        }
    }
}

impl<S: ChunkSink> Stream for SseStream<S> {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Event::default().data(data))));
            }
            let Some(generation) = this.generation.as_mut() else {
                return Poll::Ready(None);
            };
            let mut out = Vec::new();
            match generation.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some((index, steps))) => {
                    let failed = steps.iter().find_map(|s| match s {
                        Step::Failed(e) => Some(e.clone()),
                        _ => None,
                    });
                    match failed {
                        Some(error) => {
                            // Drop the other sequences too: the response cannot complete.
                            this.generation = None;
                            out.push(error.body().to_string());
                            out.push("[DONE]".into());
                        }
                        None => this.sink.steps(index, steps, &mut out),
                    }
                }
                Poll::Ready(None) => {
                    this.generation = None;
                    this.sink.end(&mut out);
                    out.push("[DONE]".into());
                }
            }
            this.queue.extend(out);
        }
    }
}
