//! The decode side's engine: a `Generate` over the node's scheduler that prefills long prompts
//! on prefill nodes, so the HTTP layer (which knows only `Arc<dyn Generate>`) is unchanged.
//!
//! A prompt shorter than `--disagg-min-prompt-tokens` is submitted directly. A longer one is
//! submitted as a hand-off (admitted, its prompt's KV blocks reserved, before its state
//! exists) and a task on the node's runtime fetches its state: once admitted, it reads the
//! prefill nodes' loads, and per node, least loaded first, registers a fresh transfer with the
//! state receiver, asks the node to prefill (`POST /internal/prefill`) and waits for both its
//! answer and the state, within a deadline that grows with the prompt. The first node that
//! delivers both wins; a node that cannot be reached, answers an error, breaks off the transfer
//! or misses the deadline is skipped for the next; with none left the request fails naming
//! every node and why. A client that goes away stops the task within [`ABANDON_POLL`]: the
//! HTTP call is dropped (the prefill node cancels the prefill) and the transfer unregistered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use myriad_attention::{
    Generate, PrefillOutput, Prefilled, Request, Scheduler, SchedulerStats, StateSlot, Submission,
    SubmitError,
};
use myriad_wire::SequenceStateImage;
use tokio::runtime::Handle;
use tokio::time::timeout;

use super::loads::{Candidate, PrefillNodes, state_addr_for};
use super::protocol::{PrefillCall, prefill_deadline};
use super::receiver::StateReceiver;

/// How often a hand-off looks whether its client is still there: the slot only says so when
/// asked, and 20 ms is nothing next to a prefill worth handing off.
const ABANDON_POLL: Duration = Duration::from_millis(20);

/// A decode (or mixed) node's engine (see the module docs).
pub struct DisaggEngine {
    scheduler: Arc<Scheduler>,
    runtime: Handle,
    shared: Arc<Shared>,
    min_prompt_tokens: usize,
}

/// What every hand-off task uses.
struct Shared {
    nodes: PrefillNodes,
    receiver: StateReceiver,
    /// Transfer ids, unique on this node for its life (the receiver's table is keyed by them).
    next_transfer: AtomicU64,
}

impl DisaggEngine {
    pub fn new(
        scheduler: Arc<Scheduler>,
        runtime: Handle,
        nodes: PrefillNodes,
        receiver: StateReceiver,
        min_prompt_tokens: usize,
    ) -> Self {
        DisaggEngine {
            scheduler,
            runtime,
            shared: Arc::new(Shared {
                nodes,
                receiver,
                next_transfer: AtomicU64::new(1),
            }),
            min_prompt_tokens,
        }
    }
}

impl Generate for DisaggEngine {
    fn submit(&self, request: Request) -> Result<Submission, SubmitError> {
        if self.shared.nodes.is_empty() || request.prompt.len() < self.min_prompt_tokens {
            return self.scheduler.submit(request);
        }
        let (submission, slot) = self.scheduler.submit_handoff(request.clone())?;
        // The task ends when the state is delivered or the request is gone; it holds the slot,
        // not the submission, so a client that leaves is seen through the slot.
        self.runtime
            .spawn(hand_off(self.shared.clone(), request, slot));
        Ok(submission)
    }

    fn stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }

    fn max_context(&self) -> usize {
        self.scheduler.max_context()
    }
}

/// Fetches `request`'s state for `slot` (see the module docs).
async fn hand_off(shared: Arc<Shared>, request: Request, mut slot: StateSlot) {
    // Fails only if the request is gone (client left, scheduler stopped): nothing to do then.
    if slot.admitted().await.is_err() {
        return;
    }
    let outcome = {
        let attempt = prefill_anywhere(&shared, &request);
        tokio::pin!(attempt);
        let mut poll = tokio::time::interval(ABANDON_POLL);
        loop {
            tokio::select! {
                outcome = &mut attempt => break Some(outcome),
                _ = poll.tick() => if slot.is_abandoned() {
                    // Dropping `attempt` drops the HTTP call (the prefill node cancels) and
                    // the expected transfer (unregistered).
                    break None;
                },
            }
        }
    };
    match outcome {
        Some(Ok(state)) => slot.deliver(Ok(state)),
        // Every prefill node was tried: the client gets a 503, as when no node can serve.
        Some(Err(why)) => slot.unavailable(why),
        None => drop(slot),
    }
}

/// Tries the prefill nodes by load until one prefills `request` and sends its state.
async fn prefill_anywhere(shared: &Shared, request: &Request) -> Result<Prefilled, String> {
    let candidates = shared.nodes.by_load().await;
    let mut failures = Vec::new();
    for c in &candidates {
        match prefill_on(shared, c, request).await {
            Ok(p) => return Ok(p),
            Err(why) => {
                let load = match &c.load {
                    Ok(_) => String::new(),
                    Err(e) => format!(" (its load could not be read either: {e})"),
                };
                failures.push(format!("{}: {why}{load}", c.url.root()));
            }
        }
    }
    Err(format!(
        "no prefill node could prefill the request: {}",
        failures.join("; ")
    ))
}

/// One attempt on one node, under the prompt's deadline.
async fn prefill_on(
    shared: &Shared,
    candidate: &Candidate,
    request: &Request,
) -> Result<Prefilled, String> {
    let transfer_id = shared.next_transfer.fetch_add(1, Ordering::Relaxed);
    // Registered before the call, unregistered when this attempt ends however it ends.
    let mut expected = shared.receiver.expect(transfer_id, request.prompt.len());
    let call = PrefillCall {
        request: request.clone(),
        transfer_id,
        state_addr: state_addr_for(shared.receiver.local_addr(), &candidate.url),
        server_name: Some(shared.nodes.server_name.clone()),
    };
    let deadline = prefill_deadline(request.prompt.len());
    let both = async {
        let answer = shared.nodes.prefill(&candidate.url, &call);
        let state = expected.arrival();
        tokio::pin!(answer, state);
        // Whichever fails first says why; the state always completes before a 200 (the prefill
        // node answers only once StateEnd is acknowledged).
        let mut output: Option<PrefillOutput> = None;
        let mut image: Option<SequenceStateImage> = None;
        loop {
            tokio::select! {
                r = &mut answer, if output.is_none() => output = Some(r?),
                r = &mut state, if image.is_none() => image = Some(r?),
            }
            if let (Some(_), Some(_)) = (&output, &image) {
                break;
            }
        }
        match (output, image) {
            (Some(output), Some(image)) => Ok(Prefilled { image, output }),
            _ => Err("the hand-off ended without its state".to_string()),
        }
    };
    timeout(deadline, both)
        .await
        .unwrap_or_else(|_| Err(format!("no prefill and state within {deadline:?}")))
}
