//! Assembles the attention side of the engine on this machine: the backend, the dense
//! weights, and the routed experts wherever `cluster` puts them (by default every expert in an
//! in-process [`myriad_expert::ExpertShard`]), wired through the `ExpertExecutor` contract.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use myriad_attention::{Engine, EngineConfig, Model};
use myriad_kernels::cpu::{Isa, Precision};
use myriad_model::{Checkpoint, GenerationConfig, ModelConfig};

use crate::cluster::{ClusterArgs, ExpertsHandle, TlsArgs, experts};
use crate::device::Device;

/// How to run the local engine.
#[derive(Clone, Debug, Default)]
pub struct LocalOptions {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Restrict kernels to this instruction set (None: the best available).
    pub isa: Option<Isa>,
    /// Rounding of weight-matmul inputs.
    pub precision: Precision,
    pub engine: EngineConfig,
    /// How sequences store their KV caches.
    pub kv: myriad_kernels::KvCacheSpec,
}

/// A loaded engine and what it was built from.
pub struct LocalEngine {
    /// Shared so a server's scheduler thread can own a handle while this value keeps the
    /// experts (and their runtime) alive.
    pub engine: Arc<Engine<Device>>,
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    pub backend: Arc<Device>,
    pub experts: ExpertsHandle,
    pub load_seconds: f64,
}

/// Loads the model in `dir` with every role in this process.
pub fn load(dir: &Path, opts: &LocalOptions) -> Result<LocalEngine> {
    load_with(dir, opts, &ClusterArgs::default(), &TlsArgs::default())
}

/// Loads the attention side of the model in `dir`, its routed experts placed by `cluster`.
pub fn load_with(
    dir: &Path,
    opts: &LocalOptions,
    cluster: &ClusterArgs,
    tls: &TlsArgs,
) -> Result<LocalEngine> {
    let t0 = Instant::now();
    let config = ModelConfig::from_dir(dir)?;
    let generation = GenerationConfig::from_dir(dir, &config)?;
    let ckpt = Checkpoint::open(dir, &config)
        .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let backend = crate::device::backend(opts);
    let experts = experts(dir, &backend, &config, &ckpt, cluster, tls)?;
    let model = Model::load(
        config.clone(),
        backend.clone(),
        &ckpt,
        experts.executor.clone(),
    )
    .context("loading dense weights")?
    .with_kv_spec(opts.kv);
    let mut engine_config = opts.engine.clone();
    engine_config.ping_pong |= cluster.ping_pong;
    let engine = Arc::new(Engine::new(
        model,
        engine_config,
        generation.eos_token_ids.clone(),
    ));
    Ok(LocalEngine {
        engine,
        config,
        generation,
        backend,
        experts,
        load_seconds: t0.elapsed().as_secs_f64(),
    })
}
