//! The scheduler's side of prefill/decode disaggregation: a prefill job runs a prompt, samples
//! the first token and hands back the state ([`PrefillTicket`]); a hand-off job is admitted
//! (its prompt's KV blocks reserved) before its state exists, and runs once a
//! [`StateSlot`] delivers it.
//!
//! Both are ordinary jobs of the scheduler thread, so they share its admission, preemption and
//! cancellation: dropping a ticket cancels the prefill (its blocks are given back at the next
//! step), dropping a slot without delivering fails the awaiting request, and dropping the
//! submission of an awaiting request frees its reservation.

use std::sync::mpsc::Sender;

use tokio::sync::oneshot;

use super::Msg;
use crate::handoff::Prefilled;
use myriad_engine_api::SubmitError;

/// Why a hand-off brought no state.
#[derive(Debug)]
pub(super) enum NoState {
    /// The prefill failed: the request fails (a 500).
    Failed(String),
    /// No node could prefill it: the request fails as unavailable (a 503).
    Unavailable(String),
}

/// What a job is for.
pub(super) enum JobKind {
    /// Generate and stream events (every ordinary request).
    Stream,
    /// Prefill here, stop after the first token, send the state and outputs.
    Prefill(oneshot::Sender<Result<Prefilled, String>>),
    /// Continue a state prefilled elsewhere; streams events once it arrives.
    Resume {
        state: oneshot::Receiver<Result<Prefilled, NoState>>,
        /// Told once the job is admitted (its blocks reserved).
        admitted: Option<oneshot::Sender<()>>,
    },
}

/// The outcome of a prefill job: wait on it, or drop it to cancel the prefill.
#[derive(Debug)]
pub struct PrefillTicket {
    pub(super) result: oneshot::Receiver<Result<Prefilled, String>>,
}

impl PrefillTicket {
    /// The state and outputs once the prompt is prefilled and the first token sampled, or why
    /// not (the step failed, the scheduler stopped).
    pub async fn wait(self) -> Result<Prefilled, String> {
        self.result
            .await
            .unwrap_or_else(|_| Err("the prefill was dropped by the engine".into()))
    }
}

/// Where the state of an awaiting request is delivered (on the decode side).
#[derive(Debug)]
pub struct StateSlot {
    pub(super) admitted: Option<oneshot::Receiver<()>>,
    pub(super) state: Option<oneshot::Sender<Result<Prefilled, NoState>>>,
    pub(super) wake: Sender<Msg>,
}

impl StateSlot {
    /// Waits until the request is admitted, its prompt's KV blocks reserved: only then should
    /// the prefill start. Fails if the request was dropped first (its client went away, or the
    /// scheduler stopped).
    pub async fn admitted(&mut self) -> Result<(), SubmitError> {
        match self.admitted.take() {
            Some(rx) => rx.await.map_err(|_| SubmitError::Stopped),
            None => Ok(()),
        }
    }

    /// Whether the request is gone (cancelled or failed): the prefill can be abandoned.
    pub fn is_abandoned(&self) -> bool {
        self.state.as_ref().is_none_or(|s| s.is_closed())
    }

    /// Hands the state (or why there is none: the request then fails with that message) to
    /// the waiting request.
    pub fn deliver(self, state: Result<Prefilled, String>) {
        self.send(state.map_err(NoState::Failed));
    }

    /// Tells the waiting request that no node could prefill it (every prefill node failed
    /// or is gone): it fails as unavailable, which the HTTP API answers with a 503.
    pub fn unavailable(self, message: String) {
        self.send(Err(NoState::Unavailable(message)));
    }

    fn send(mut self, state: Result<Prefilled, NoState>) {
        if let Some(tx) = self.state.take() {
            // A request that is gone needs no state.
            let _ = tx.send(state);
        }
    }
}

impl Drop for StateSlot {
    fn drop(&mut self) {
        // Delivered or abandoned: either way the scheduler thread has something to look at.
        let _ = self.wake.send(Msg::Wake);
    }
}
