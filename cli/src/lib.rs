//! The `myriad` binary's subcommands, as a library so integration tests can drive them.
//!
//! - [`local`]: the single-process engine (all roles in one process).
//! - [`builtin`]: the built-in model made on first use when no `--model` is given.
//! - [`cmd`]: `generate`, `make-model`, `bench`.
//! - [`runtime`]: flags shared by every subcommand that runs the model.

pub mod builtin;
pub mod cmd;
pub mod local;
pub mod runtime;
