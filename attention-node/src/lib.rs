//! The attention role: everything dense in the model and all per-sequence state.
//!
//! - [`weights`]: the dense weights (embeddings, mixers, norms, router gate, shared expert,
//!   `lm_head`) prepared on a backend, with projections fused at load.
//! - [`forward`]: [`Model`], one forward step over a packed batch; routed experts are reached
//!   through `myriad_model::moe::ExpertExecutor` only.
//! - [`state`]: per-sequence KV caches and DeltaNet states; [`handoff`]: a sequence's state in
//!   the versioned wire format, for a prefill node to hand to a decode node.
//! - [`engine`]: batched generation with chunked prefill, sampling, stop rules, log-probabilities.
//! - [`scheduler`]: continuous batching for a server: requests join and leave between steps,
//!   tokens streamed as they come, admission by memory, cancellation.
//! - [`sampling`], [`rng`]: token choice and the seeded generator behind it.
//! - [`trace`]: observation points for golden tests.

pub mod engine;
pub mod error;
pub mod forward;
pub mod handoff;
pub mod rng;
pub mod sampling;
pub mod scheduler;
pub mod state;
pub mod trace;
pub mod weights;

pub use engine::{Completion, Engine, EngineConfig, FinishReason, PositionLogprobs, Request};
pub use error::EngineError;
pub use forward::{Batch, Model};
pub use handoff::{PrefillOutput, Prefilled};
pub use sampling::{SamplingParams, TokenLogprob};
pub use scheduler::{
    Event, Generate, PrefillTicket, Scheduler, SchedulerConfig, SchedulerStats, ServePath,
    StateSlot, Submission, SubmitError, sequence_bytes,
};
pub use state::{LayerState, SequenceState};
pub use trace::Trace;
