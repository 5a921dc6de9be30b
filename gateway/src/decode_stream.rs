//! Incremental detokenization for streaming: feed generated ids one at a time and get back the
//! text they complete.
//!
//! Decoding token by token and concatenating does not work: a byte-level token can hold half of
//! a UTF-8 character, and decoders may treat a token differently depending on its neighbours.
//! So each step decodes a short window of recent ids twice (with and without the new id) and
//! emits the difference, holding text back while it ends in an incomplete character (U+FFFD,
//! the replacement the decoder substitutes for dangling bytes). This is the algorithm of
//! `tokenizers::DecodeStream` (and vLLM); it is reimplemented here so that `finish` can hand
//! out text still held back when the stream ends.

use crate::tokenizer::{Tokenizer, TokenizerError};

const REPLACEMENT: char = '\u{FFFD}';

/// Streaming decoder state; create it with [`Tokenizer::decode_stream`].
#[derive(Debug)]
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    state: DecodeState,
}

impl<'a> DecodeStream<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        DecodeStream {
            tokenizer,
            state: DecodeState::new(skip_special_tokens),
        }
    }

    /// Adds `id` and returns the text it completes, or `None` when it completes nothing yet
    /// (the middle of a multi-byte character, or a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.state.step(self.tokenizer, id)
    }

    /// Ends the stream and returns the text still held back (empty when there is none).
    /// Dangling bytes of an unfinished character come out as U+FFFD, as in a full decode.
    pub fn finish(mut self) -> Result<String, TokenizerError> {
        self.state.finish(self.tokenizer)
    }
}

/// The state of a [`DecodeStream`] without the borrow of its tokenizer, for holders that
/// cannot borrow (a response stream that owns an `Arc` of the tokenizer's owner); the
/// tokenizer is passed to each call instead and must be the same one every time.
#[derive(Debug, Clone)]
pub struct DecodeState {
    skip_special_tokens: bool,
    /// Recent ids: `ids[..read]` have been emitted, `ids[read..]` are pending, and the emitted
    /// ones are kept as left context for the next decode.
    ids: Vec<u32>,
    read: usize,
}

impl DecodeState {
    pub fn new(skip_special_tokens: bool) -> Self {
        DecodeState {
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// [`DecodeStream::step`].
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
    ) -> Result<Option<String>, TokenizerError> {
        // Validate before touching the state, so a bad id leaves the stream usable.
        tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let emitted = tokenizer.decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if full.len() <= emitted.len() || full.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let delta = new_suffix(&emitted, &full).to_string();
        // The ids just emitted become the context window for the next step.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(delta))
    }

    /// [`DecodeStream::finish`]; afterwards the state is empty and may be reused.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let emitted = tokenizer.decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        self.ids.clear();
        self.read = 0;
        Ok(new_suffix(&emitted, &full).to_string())
    }
}

/// The part of `full` after `prefix`. Byte-level decoding always extends the earlier text;
/// should a decoder not, the longest common prefix is skipped instead.
fn new_suffix<'s>(prefix: &str, full: &'s str) -> &'s str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    full.get(common..).unwrap_or_default()
}
