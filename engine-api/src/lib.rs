//! The contract between a front end (the OpenAI gateway) and an engine that streams (the
//! attention node's scheduler today; a remote attention node or a prefill/decode pair later):
//!
//! - [`request`]: one generation [`Request`] with its [`SamplingParams`], and what comes back
//!   per position ([`PositionLogprobs`], [`TokenLogprob`]) and at the end ([`FinishReason`]).
//! - [`generate`]: the [`Generate`] trait, the [`Event`]s a running request hears, why a
//!   request is refused ([`SubmitError`]) and the engine's counters ([`SchedulerStats`]).
//!
//! It depends on no compute backend and no model code, so the gateway reaches the engine
//! without linking either.

pub mod generate;
pub mod request;

pub use generate::{Event, Generate, SchedulerStats, ServePath, Submission, SubmitError};
pub use request::{FinishReason, PositionLogprobs, Request, SamplingParams, TokenLogprob};
