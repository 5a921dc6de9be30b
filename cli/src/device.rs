//! The one place that chooses the compute backend every role of this binary runs on. Today
//! that is the CPU backend; a `--device` flag (CUDA) lands here, and no other file of the CLI
//! names a backend type: they say [`Device`].

use std::sync::Arc;

use crate::local::LocalOptions;

/// The backend the engine, the expert shards and the router run on.
pub type Device = myriad_kernels::cpu::CpuBackend;

/// The backend for `opts`: its threads, instruction set (the best available unless restricted)
/// and matmul precision.
pub fn backend(opts: &LocalOptions) -> Arc<Device> {
    let device = match opts.isa {
        Some(isa) => Device::with_isa(opts.threads, isa),
        None => Device::new(opts.threads),
    };
    Arc::new(device.with_precision(opts.precision))
}
