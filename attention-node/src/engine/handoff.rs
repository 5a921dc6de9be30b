//! The engine's side of prefill/decode disaggregation: a sequence that stops after its first
//! token to be handed off, its state and outputs as a [`Prefilled`], and a sequence that
//! continues one; [`Engine::prefill`] and [`Engine::generate_from`] run both ends alone.

use std::borrow::Borrow;

use myriad_kernels::Backend;

use super::{Active, Completion, Engine, Request, empty_completion};
use crate::error::EngineError;
use crate::handoff::{PrefillOutput, Prefilled};
use crate::rng::Rng;

impl<B: Backend> Engine<B> {
    /// Like [`Self::start`], for a sequence prefilled here and handed off: it stops after
    /// its first generated token ([`Self::handoff_of`] then gives its state and outputs).
    pub(crate) fn start_handoff<Q: Borrow<Request>>(
        &self,
        index: usize,
        request: Q,
    ) -> Active<B, Q> {
        let mut a = self.start(index, request);
        a.handoff = true;
        a
    }

    /// The state and outputs of a sequence started with [`Self::start_handoff`] once it is
    /// `done` (paused for the hand-off, or ended with its first token).
    pub(crate) fn handoff_of<Q: Borrow<Request>>(&self, a: &mut Active<B, Q>) -> Prefilled {
        let r: &Request = a.request.borrow();
        let echo = r.echo && r.logprobs.is_some();
        let mut logprobs = a.out.logprobs.take();
        let prompt_logprobs = match (&mut logprobs, echo) {
            (Some(v), true) => Some(v.drain(..r.prompt.len().min(v.len())).collect()),
            _ => None,
        };
        let first_logprobs = logprobs.and_then(|v| v.into_iter().next().flatten());
        let tokens: Vec<u32> = (0..a.state.len()).map(|i| a.token(i)).collect();
        let image = self.model.export_state(&a.state, &tokens, 0, a.rng.state());
        Prefilled {
            image,
            output: PrefillOutput {
                prompt_logprobs,
                first_token: a.out.token_ids.first().copied(),
                first_logprobs,
                finished: (!a.paused).then_some(a.out.finish_reason),
            },
        }
    }

    /// Turns `a` (started for `a.request`, not yet run) into the continuation of `prefilled`,
    /// a hand-off of that request from a prefill node: its state is imported, its outputs so
    /// far count as produced here. On an error `a` is unchanged.
    pub(crate) fn resume_into<Q: Borrow<Request>>(
        &self,
        a: &mut Active<B, Q>,
        prefilled: &Prefilled,
    ) -> Result<(), EngineError> {
        let r: &Request = a.request.borrow();
        let begin = &prefilled.image.begin;
        if begin.tokens != r.prompt || begin.generated != 0 {
            return Err(EngineError::State(format!(
                "the state covers {} tokens that are not this request's prompt of {}",
                begin.tokens.len(),
                r.prompt.len()
            )));
        }
        let o = &prefilled.output;
        if o.finished.is_none() && o.first_token.is_none() {
            return Err(EngineError::State(
                "the hand-off has neither a first token nor an end".into(),
            ));
        }
        let state = self.model.import_state(&prefilled.image)?;
        a.state = state;
        a.rng = Rng::from_state(begin.rng);
        a.prefilled = a.request.borrow().prompt.len();
        a.prompt_logged = a.prefilled;
        a.awaiting = false;
        a.reserved = 0;
        if let Some(v) = a.out.logprobs.as_mut() {
            v.clear();
            v.extend(o.prompt_logprobs.iter().flatten().cloned());
            if o.first_token.is_some() {
                v.push(o.first_logprobs.clone());
            }
        }
        a.out.token_ids.clear();
        a.out.token_ids.extend(o.first_token);
        if let Some(reason) = o.finished {
            a.out.finish_reason = reason;
            a.done = true;
        } else {
            a.done = false;
        }
        Ok(())
    }

    /// Prefills `r` alone, samples its first token, and returns its state and outputs (what a
    /// prefill node sends a decode node).
    pub fn prefill(&self, r: &Request) -> Result<Prefilled, EngineError> {
        self.validate(r)
            .map_err(|message| EngineError::BadRequest { index: 0, message })?;
        let mut active = vec![self.start_handoff(0, r)];
        self.run_alone(&mut active)?;
        Ok(self.handoff_of(&mut active[0]))
    }

    /// Generates the rest of `r` from its hand-off `prefilled` (what a decode node does); the
    /// result is the whole completion, as [`Self::generate`] gives it.
    pub fn generate_from(
        &self,
        r: &Request,
        prefilled: &Prefilled,
    ) -> Result<Completion, EngineError> {
        self.validate(r)
            .map_err(|message| EngineError::BadRequest { index: 0, message })?;
        let mut active = vec![self.start(0, r)];
        self.resume_into(&mut active[0], prefilled)?;
        self.run_alone(&mut active)?;
        Ok(std::mem::replace(&mut active[0].out, empty_completion()))
    }

    /// Steps one sequence until it is done.
    fn run_alone(&self, active: &mut [Active<B, &Request>]) -> Result<(), EngineError> {
        while !active[0].done {
            let shares = self.plan(active, self.config.kv_blocks);
            if shares.is_empty() {
                return Err(EngineError::Batch(
                    "the KV block pool cannot hold the sequence".into(),
                ));
            }
            self.run(active, &shares)?;
        }
        Ok(())
    }
}
