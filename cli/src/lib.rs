//! The `myriad` binary's subcommands, as a library so integration tests can drive them.
//!
//! - [`adapters`]: the control plane's traits for the router and the expert shard.
//! - [`local`]: the attention side on this machine, its experts local or remote.
//! - [`cluster`]: where routed experts run (in-process, an in-process cluster, QUIC nodes).
//! - [`builtin`]: the built-in model made on first use when no `--model` is given.
//! - [`device`]: the one place that chooses the compute backend.
//! - [`disagg`]: prefill/decode disaggregation between attention nodes (roles, the state
//!   transfer, the decode side's engine).
//! - [`lifecycle`]: the `ready` line and the stop signals every long-running role shares.
//! - [`control`]: the control-plane flags and the attention node's control-plane tasks.
//! - [`cmd`]: `generate`, `make-model`, `bench`.
//! - [`runtime`]: flags shared by every subcommand that runs the model.

pub mod adapters;
pub mod builtin;
pub mod cluster;
pub mod cmd;
pub mod control;
pub mod device;
pub mod disagg;
pub mod lifecycle;
pub mod local;
pub mod metrics;
pub mod runtime;
