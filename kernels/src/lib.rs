//! Compute kernels for Myriad, behind one narrow interface.
//!
//! Model code is written against [`Backend`]: a small set of fused, model-level operations
//! (matmul against a prepared weight, the norms, a whole Gated DeltaNet mixer, a whole gated
//! attention mixer, routing, grouped experts) over device tensors it never looks inside. The
//! CPU backend ([`cpu::CpuBackend`]) is always built; a CUDA backend implements the same trait
//! behind a cargo feature, so model code never branches on the device.
//!
//! Numerics follow `shared/spec/model.md`: activations, norms, gates, softmaxes and recurrent
//! state are f32; weights stay in their checkpoint dtype (bf16 or f32) and are widened in
//! registers, so a bf16 checkpoint runs the float32 reference model exactly up to summation order.

pub mod backend;
pub mod cpu;
mod error;
pub mod kv;
pub mod probe;
pub mod rope;

pub use backend::{
    AttentionDims, AttentionLayer, Backend, DeltaNetDims, DeltaNetLayer, DeltaStateHost,
    ExpertMatrices, HostMatrix, KvBlockHost, KvBlocksHost, KvCacheHost, MatrixUse, SeqSpan,
    WeightDtype, YarnScaling,
};
pub use error::KernelError;
pub use kv::{KvCacheSpec, KvDtype};
/// Routes are a node-to-node contract: defined in `myriad-wire`, the kernels consume them.
pub use myriad_wire::Routes;
