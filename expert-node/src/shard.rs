//! An expert node's weights: the routed experts it holds, for every MoE layer, prepared on a
//! backend. Only the held experts are read from the checkpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
    #[error(
        "this shard was loaded without its checkpoint, so it cannot add experts ({wanted} wanted, {held} held)"
    )]
    CannotGrow { wanted: String, held: String },
}

/// The experts one node holds at one moment, per layer.
struct Holdings<B: Backend> {
    set: ExpertSet,
    layers: Vec<Vec<Option<Arc<ExpertMatrices<B>>>>>,
}

/// The experts one node holds, per layer, with a local executor over them. The set can change
/// while the node serves (the control plane moves experts): a change builds a new table that
/// shares the matrices of the experts it keeps and is swapped in whole, so a request in flight
/// always sees one consistent set.
pub struct ExpertShard<B: Backend> {
    backend: Arc<B>,
    config: ModelConfig,
    /// Where more experts come from; `None` for a shard that cannot grow.
    source: Option<Arc<Checkpoint>>,
    holdings: RwLock<Arc<Holdings<B>>>,
    /// Serialises changes so two of them never load the same expert twice.
    changing: Mutex<()>,
    expert_bytes: AtomicUsize,
}

impl<B: Backend> ExpertShard<B> {
    /// Loads `set` for every layer of the model; the shard cannot grow later.
    pub fn load(
        backend: Arc<B>,
        config: &ModelConfig,
        ckpt: &Checkpoint,
        set: &ExpertSet,
    ) -> Result<Self, ShardError> {
        let shard = ExpertShard::empty(backend, config, None);
        shard.add_from(ckpt, set, 1.0)?;
        Ok(shard)
    }

    /// Loads `set` and keeps `ckpt` so that experts can be added later ([`Self::set_experts`]).
    pub fn load_growable(
        backend: Arc<B>,
        config: &ModelConfig,
        ckpt: Arc<Checkpoint>,
        set: &ExpertSet,
    ) -> Result<Self, ShardError> {
        let shard = ExpertShard::empty(backend, config, Some(ckpt.clone()));
        shard.add_from(&ckpt, set, 1.0)?;
        Ok(shard)
    }

    fn empty(backend: Arc<B>, config: &ModelConfig, source: Option<Arc<Checkpoint>>) -> Self {
        let none = ExpertSet::none(config.num_experts);
        let layers = (0..config.num_layers)
            .map(|_| (0..config.num_experts).map(|_| None).collect())
            .collect();
        ExpertShard {
            backend,
            config: config.clone(),
            source,
            holdings: RwLock::new(Arc::new(Holdings { set: none, layers })),
            changing: Mutex::new(()),
            expert_bytes: AtomicUsize::new(0),
        }
    }

    fn current(&self) -> Arc<Holdings<B>> {
        self.holdings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the experts of `add` not yet held (every layer), then swaps them in. With `duty`
    /// below 1 the loading pauses so that it keeps at most that fraction of one core (and of
    /// its memory traffic): a rebalance then takes longer but leaves serving alone.
    fn add_from(&self, ckpt: &Checkpoint, add: &ExpertSet, duty: f64) -> Result<usize, ShardError> {
        let mut pace = Pace::new(duty);
        let _guard = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current();
        let missing: Vec<usize> = add.iter().filter(|&e| !cur.set.contains(e)).collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut layers = cur.layers.clone();
        for (l, held) in layers.iter_mut().enumerate() {
            for &e in &missing {
                let t = ckpt.expert(l, e)?;
                let gate_up = gate_up_matrix(&*self.backend, l, e, &t.gate_proj, &t.up_proj)?;
                let down = self
                    .backend
                    .matrix(t.down_proj.matrix(), MatrixUse::Linear)
                    .map_err(|source| ShardError::Kernel {
                        layer: l,
                        expert: e,
                        tensor: t.down_proj.name.clone(),
                        source,
                    })?;
                self.expert_bytes.store(
                    self.backend.matrix_bytes(&gate_up) + self.backend.matrix_bytes(&down),
                    Ordering::Relaxed,
                );
                held[e] = Some(Arc::new(ExpertMatrices { gate_up, down }));
                pace.rest();
            }
        }
        let set = cur.set.union(add);
        *self.holdings.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Holdings { set, layers });
        Ok(missing.len())
    }

    /// Makes the shard hold exactly `target`: loads what is missing from the checkpoint first,
    /// then drops what is no longer wanted. Returns (loaded, dropped) expert counts. Requests
    /// in flight keep the table they started with.
    pub fn set_experts(&self, target: &ExpertSet) -> Result<(usize, usize), ShardError> {
        self.set_experts_paced(target, 1.0)
    }

    /// [`Self::set_experts`], loading at most `duty` of one core's time (see `add_from`).
    pub fn set_experts_paced(
        &self,
        target: &ExpertSet,
        duty: f64,
    ) -> Result<(usize, usize), ShardError> {
        let cur = self.current();
        let needs_loading = target.iter().any(|e| !cur.set.contains(e));
        let loaded = match (&self.source, needs_loading) {
            (_, false) => 0,
            (Some(ckpt), true) => self.add_from(ckpt, target, duty)?,
            (None, true) => {
                return Err(ShardError::CannotGrow {
                    wanted: target.to_string(),
                    held: cur.set.to_string(),
                });
            }
        };
        let _guard = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current();
        let drop: Vec<usize> = cur.set.iter().filter(|&e| !target.contains(e)).collect();
        if !drop.is_empty() {
            let mut layers = cur.layers.clone();
            for held in layers.iter_mut() {
                for &e in &drop {
                    held[e] = None;
                }
            }
            *self.holdings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Holdings {
                set: target.clone(),
                layers,
            });
        }
        Ok((loaded, drop.len()))
    }

    /// The experts held now.
    pub fn experts(&self) -> ExpertSet {
        self.current().set.clone()
    }

    /// Bytes one expert of one layer occupies (what a token routed to it reads).
    pub fn expert_bytes(&self) -> usize {
        self.expert_bytes.load(Ordering::Relaxed)
    }

    /// Bytes one expert occupies over every layer (what holding it costs).
    pub fn expert_bytes_all_layers(&self) -> usize {
        self.expert_bytes() * self.config.num_layers
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
}

/// Pauses work so that it runs at most `duty` of the wall time.
struct Pace {
    duty: f64,
    since: std::time::Instant,
    worked: std::time::Duration,
}

impl Pace {
    fn new(duty: f64) -> Self {
        Pace {
            duty: if duty.is_finite() {
                duty.clamp(0.01, 1.0)
            } else {
                1.0
            },
            since: std::time::Instant::now(),
            worked: std::time::Duration::ZERO,
        }
    }

    /// Call after each unit of work.
    fn rest(&mut self) {
        if self.duty >= 1.0 {
            return;
        }
        let now = std::time::Instant::now();
        self.worked += now - self.since;
        // Sleep off the debt in slices of at least 2 ms (shorter sleeps cost more than they save).
        let owed = self.worked.mul_f64(1.0 / self.duty - 1.0);
        if owed >= std::time::Duration::from_millis(2) {
            std::thread::sleep(owed);
            self.worked = std::time::Duration::ZERO;
        }
        self.since = std::time::Instant::now();
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
        let now = self.current();
        let held = now.layers.get(layer).ok_or(ExpertError::NoSuchLayer {
            layer,
            layers: now.layers.len(),
        })?;
        self.backend
            .moe_experts(x, routes, held, out)
            .map_err(|e| match e {
                KernelError::MissingExpert { expert } => ExpertError::Unavailable {
                    layer,
                    expert,
                    reason: format!("not held by this shard (holds {})", now.set),
                },
                other => ExpertError::Kernel(other),
            })
    }
}
