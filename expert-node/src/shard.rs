//! An expert node's weights: the routed experts it holds, for every MoE layer, prepared on a
//! backend. Only the held experts are read from the checkpoint.

use std::sync::Arc;

use myriad_kernels::{Backend, ExpertMatrices, HostMatrix, KernelError, MatrixUse, Routes};
use myriad_model::checkpoint::{Checkpoint, CheckpointError, HostTensor};
use myriad_model::config::ModelConfig;
use myriad_model::moe::{ExpertError, ExpertExecutor};
use thiserror::Error;

use myriad_model::ExpertSet;

#[derive(Debug, Error)]
pub enum ShardError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("expert {expert} of layer {layer} ({tensor}): {source}")]
    Kernel {
        layer: usize,
        expert: usize,
        tensor: String,
        source: KernelError,
    },
    #[error(
        "expert {expert} of layer {layer}: gate {gate} and up {up} projections disagree in shape or dtype"
    )]
    GateUp {
        layer: usize,
        expert: usize,
        gate: String,
        up: String,
    },
}

/// The experts one node holds, per layer, with a local executor over them.
pub struct ExpertShard<B: Backend> {
    backend: Arc<B>,
    set: ExpertSet,
    layers: Vec<Vec<Option<ExpertMatrices<B>>>>,
    expert_bytes: usize,
}

impl<B: Backend> ExpertShard<B> {
    /// Loads `set` for every layer of the model.
    pub fn load(
        backend: Arc<B>,
        config: &ModelConfig,
        ckpt: &Checkpoint,
        set: &ExpertSet,
    ) -> Result<Self, ShardError> {
        let mut layers = Vec::with_capacity(config.num_layers);
        let mut expert_bytes = 0;
        for l in 0..config.num_layers {
            let mut held: Vec<Option<ExpertMatrices<B>>> =
                (0..config.num_experts).map(|_| None).collect();
            for e in set.iter() {
                let t = ckpt.expert(l, e)?;
                let gate_up = gate_up_matrix(&*backend, l, e, &t.gate_proj, &t.up_proj)?;
                let down = backend
                    .matrix(t.down_proj.matrix(), MatrixUse::Linear)
                    .map_err(|source| ShardError::Kernel {
                        layer: l,
                        expert: e,
                        tensor: t.down_proj.name.clone(),
                        source,
                    })?;
                expert_bytes = backend.matrix_bytes(&gate_up) + backend.matrix_bytes(&down);
                held[e] = Some(ExpertMatrices { gate_up, down });
            }
            layers.push(held);
        }
        Ok(ExpertShard {
            backend,
            set: set.clone(),
            layers,
            expert_bytes,
        })
    }

    pub fn experts(&self) -> &ExpertSet {
        &self.set
    }

    /// Bytes one expert of one layer occupies (what a token routed to it reads).
    pub fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
}

/// The gate and up projections stacked into one `[2I, H]` matrix (gate rows first).
fn gate_up_matrix<B: Backend>(
    backend: &B,
    layer: usize,
    expert: usize,
    gate: &HostTensor<'_>,
    up: &HostTensor<'_>,
) -> Result<B::Matrix, ShardError> {
    let (g, u) = (gate.matrix(), up.matrix());
    if g.dtype != u.dtype || g.cols != u.cols || g.rows != u.rows {
        return Err(ShardError::GateUp {
            layer,
            expert,
            gate: gate.name.clone(),
            up: up.name.clone(),
        });
    }
    let mut bytes = Vec::with_capacity(g.data.len() + u.data.len());
    bytes.extend_from_slice(g.data);
    bytes.extend_from_slice(u.data);
    let kernel = |source| ShardError::Kernel {
        layer,
        expert,
        tensor: gate.name.clone(),
        source,
    };
    let host = HostMatrix::new(g.dtype, 2 * g.rows, g.cols, &bytes).map_err(kernel)?;
    backend.matrix(host, MatrixUse::Linear).map_err(kernel)
}

impl<B: Backend> ExpertExecutor<B> for ExpertShard<B> {
    fn run(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        out: &mut B::Tensor,
    ) -> Result<(), ExpertError> {
        let held = self.layers.get(layer).ok_or(ExpertError::NoSuchLayer {
            layer,
            layers: self.layers.len(),
        })?;
        self.backend
            .moe_experts(x, routes, held, out)
            .map_err(|e| match e {
                KernelError::MissingExpert { expert } => ExpertError::Unavailable {
                    layer,
                    expert,
                    reason: format!("not held by this shard (holds {})", self.set),
                },
                other => ExpertError::Kernel(other),
            })
    }
}
