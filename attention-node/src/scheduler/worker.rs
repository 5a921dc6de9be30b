//! The scheduler thread: intake of jobs, cancellation, admission by KV blocks, hand-off
//! states arriving, one engine step at a time, streaming what each step produced, and
//! shutdown.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};

use myriad_kernels::Backend;

use super::handoff::{JobKind, NoState};
use super::pool::Pool;
use super::{Counters, Event, IDLE_POLL, Job, Msg, SHUTTING_DOWN, Shared};
use crate::engine::{Active, Engine};

/// The scheduler thread: owns the queue and the running batch.
pub(super) struct Worker<B: Backend> {
    pub(super) engine: Arc<Engine<B>>,
    pub(super) jobs: Receiver<Msg>,
    pub(super) shared: Arc<Shared>,
    pub(super) pool: Pool,
    /// Received, not yet admitted, in arrival order.
    pub(super) waiting: VecDeque<Job>,
    pub(super) active: Vec<Active<B, Job>>,
    pub(super) counters: Counters,
}

impl<B: Backend> Worker<B> {
    pub(super) fn run(mut self) {
        let mut idle = false;
        while self.intake(idle) {
            // Before admission and the step, so that a request whose client has gone neither
            // takes memory nor gets prefilled.
            self.drop_cancelled();
            self.admit();
            self.receive_states();
            // Before the step too: a step can take long, and admissions and cancellations
            // should show in the stats without waiting for it.
            self.publish();
            idle = !self.step();
            self.emit();
            self.publish();
        }
        self.shutdown();
    }

    /// Takes new submissions, blocking while there is nothing to run (an idle scheduler
    /// sleeps in `recv`, it never spins; while requests await states it wakes when one is
    /// delivered, and every `IDLE_POLL` to notice cancellations). False once the scheduler
    /// handle is dropped.
    fn intake(&mut self, idle: bool) -> bool {
        // False on `Stop`.
        let take = |m: Msg, waiting: &mut VecDeque<Job>| match m {
            Msg::Job(job) => {
                waiting.push_back(job);
                true
            }
            Msg::Wake => true,
            Msg::Stop => false,
        };
        if self.active.is_empty() && self.waiting.is_empty() {
            match self.jobs.recv() {
                Ok(m) => {
                    if !take(m, &mut self.waiting) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        } else if idle {
            match self.jobs.recv_timeout(IDLE_POLL) {
                Ok(m) => {
                    if !take(m, &mut self.waiting) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        loop {
            match self.jobs.try_recv() {
                Ok(m) => {
                    if !take(m, &mut self.waiting) {
                        return false;
                    }
                }
                Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Starts the awaiting requests whose states arrived; fails those whose prefill failed
    /// or was abandoned, or whose state does not fit this node.
    fn receive_states(&mut self) {
        let mut failed: Vec<(usize, NoState)> = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            if !a.awaiting {
                continue;
            }
            let JobKind::Resume { state, .. } = &mut a.request.kind else {
                continue;
            };
            let prefilled = match state.try_recv() {
                Ok(Ok(p)) => p,
                Ok(Err(why)) => {
                    failed.push((i, why));
                    continue;
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    failed.push((i, NoState::Failed("the prefill was abandoned".into())));
                    continue;
                }
            };
            match self.engine.resume_into(a, &prefilled) {
                // The prompt was prefilled and counted on the prefill node.
                Ok(()) => a.request.counted_prompt = a.request.request.prompt.len(),
                Err(e) => failed.push((i, NoState::Failed(e.to_string()))),
            }
        }
        for (i, why) in failed.into_iter().rev() {
            let a = self.active.remove(i);
            match why {
                NoState::Failed(m) => a.request.fail(m),
                NoState::Unavailable(m) => a.request.unavailable(m),
            }
        }
    }

    /// Forgets requests whose event receiver was dropped, waiting or running.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.cancelled());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.waiting.fetch_sub(gone, Ordering::AcqRel);
            self.counters.cancelled += gone as u64;
        }
        let counters = &mut self.counters;
        self.active.retain(|a| {
            let keep = !a.request.cancelled();
            if !keep {
                counters.cancelled += 1;
            }
            keep
        });
    }

    /// Starts waiting requests in arrival order while sequences and blocks allow: the blocks
    /// the running sequences need to reach their next token, plus those of the front
    /// request's prompt, plus the headroom, must fit the pool (with nothing running, the
    /// request alone must). The queue is strictly FIFO: a large request at its head is not
    /// overtaken by smaller ones, so it cannot starve.
    fn admit(&mut self) {
        let max_seqs = self.engine.config().max_seqs.max(1);
        let committed: usize = self
            .active
            .iter()
            .map(|a| {
                self.pool
                    .blocks_for(a.request.request.prompt.len() + a.out.token_ids.len())
            })
            .sum();
        let mut committed = committed;
        while self.active.len() < max_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = self.pool.blocks_for(front.request.prompt.len() + 1);
            let headroom = if self.active.is_empty() {
                0
            } else {
                self.pool.headroom
            };
            if committed + need + headroom > self.pool.blocks {
                break;
            }
            let Some(mut job) = self.waiting.pop_front() else {
                break;
            };
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            committed += need;
            // The index is `generate`'s name for a sequence; jobs carry their own channel.
            let a = match &mut job.kind {
                JobKind::Stream => self.engine.start(0, job),
                JobKind::Prefill(_) => self.engine.start_handoff(0, job),
                JobKind::Resume { admitted, .. } => {
                    if let Some(tx) = admitted.take() {
                        // A slot that is gone finds out from the dropped state instead.
                        let _ = tx.send(());
                    }
                    let mut a = self.engine.start(0, job);
                    a.awaiting = true;
                    a.reserved = need;
                    a
                }
            };
            self.active.push(a);
        }
    }

    /// One forward step (the engine's own planning: decodes first, prefill chunks within the
    /// token budget). If it fails, its sequences are failed and dropped (their state may be
    /// half-updated); sequences outside it are untouched and go on.
    /// Returns whether a step ran.
    fn step(&mut self) -> bool {
        let before: u64 = self.active.iter().map(|a| u64::from(a.preemptions)).sum();
        let shares = self.engine.plan(&mut self.active, Some(self.pool.blocks));
        let after: u64 = self.active.iter().map(|a| u64::from(a.preemptions)).sum();
        self.counters.preemptions += after - before;
        if shares.is_empty() {
            return false;
        }
        self.counters.steps += 1;
        let engine = &self.engine;
        let active = &mut self.active;
        // A panic in the model (a bug) fails this step's requests, not the whole server.
        let failure = match catch_unwind(AssertUnwindSafe(|| engine.run(active, &shares))) {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic_message(panic.as_ref()),
        };
        let mut failed = vec![false; self.active.len()];
        for &(ai, _) in &shares {
            failed[ai] = true;
        }
        let mut kept = Vec::with_capacity(self.active.len());
        for (a, failed) in std::mem::take(&mut self.active).into_iter().zip(failed) {
            if failed {
                a.request
                    .fail(format!("the forward step failed: {failure}"));
            } else {
                kept.push(a);
            }
        }
        self.active = kept;
        true
    }

    /// Streams what every running request produced since the last step and retires the
    /// finished and the cancelled.
    fn emit(&mut self) {
        let counters = &mut self.counters;
        let engine = &self.engine;
        self.active.retain_mut(|a| {
            if a.awaiting {
                return true;
            }
            if let JobKind::Prefill(_) = a.request.kind {
                counters.prompt_tokens += (a.prefilled - a.request.counted_prompt) as u64;
                a.request.counted_prompt = a.prefilled;
                if !a.done {
                    return true;
                }
                let handed = engine.handoff_of(a);
                if let JobKind::Prefill(tx) =
                    std::mem::replace(&mut a.request.kind, JobKind::Stream)
                    && tx.send(Ok(handed)).is_err()
                {
                    counters.cancelled += 1;
                }
                return false;
            }
            let delivered = send_new(a, counters);
            if !delivered {
                counters.cancelled += 1;
            }
            delivered && !a.done
        });
    }

    fn publish(&mut self) {
        self.counters.running = self.active.len();
        // Reservations for states on their way count: they are not free for others.
        self.counters.kv_blocks = self
            .active
            .iter()
            .map(|a| self.engine.blocks_held(a) + a.reserved)
            .sum();
        *self.shared.counters() = self.counters;
    }

    /// Fails everything still waiting or running, then publishes empty counters.
    fn shutdown(mut self) {
        let waiting = self.waiting.len();
        for job in self.waiting.drain(..) {
            job.fail(SHUTTING_DOWN.into());
        }
        self.shared.waiting.fetch_sub(waiting, Ordering::AcqRel);
        for a in self.active.drain(..) {
            a.request.fail(SHUTTING_DOWN.into());
        }
        self.publish();
    }
}

/// Sends the events `a` has produced since the last call: its prompt log-probabilities once
/// prefilled, each new token, and `Finished` when done. False if the receiver is gone.
fn send_new<B: Backend>(a: &mut Active<B, Job>, counters: &mut Counters) -> bool {
    let job = &mut a.request;
    counters.prompt_tokens += (a.prefilled - job.counted_prompt) as u64;
    job.counted_prompt = a.prefilled;
    let r = &job.request;
    let prompt_len = r.prompt.len();
    let echo_logprobs = r.echo && r.logprobs.is_some();
    // With echo, the engine's log-probabilities hold one entry per prompt position first.
    let offset = if echo_logprobs { prompt_len } else { 0 };
    if echo_logprobs && !job.sent_prompt_logprobs && a.prefilled == prompt_len {
        job.sent_prompt_logprobs = true;
        // Taken rather than cloned: each entry is sent once and not needed again.
        let prompt = a
            .out
            .logprobs
            .as_mut()
            .map(|v| v.iter_mut().take(offset).map(Option::take).collect())
            .unwrap_or_default();
        if job.events.send(Event::PromptLogprobs(prompt)).is_err() {
            return false;
        }
    }
    while job.sent_tokens < a.out.token_ids.len() {
        let i = job.sent_tokens;
        job.sent_tokens += 1;
        counters.generated_tokens += 1;
        let logprobs = a
            .out
            .logprobs
            .as_mut()
            .and_then(|v| v.get_mut(offset + i))
            .and_then(Option::take);
        let token = Event::Token {
            id: a.out.token_ids[i],
            logprobs,
        };
        if job.events.send(token).is_err() {
            return false;
        }
    }
    if a.done {
        let finished = Event::Finished {
            reason: a.out.finish_reason,
            prompt_tokens: prompt_len,
            completion_tokens: a.out.token_ids.len(),
        };
        return job.events.send(finished).is_ok();
    }
    true
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}
