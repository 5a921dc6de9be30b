//! Assembles the single-process engine: the CPU backend, the dense weights on the attention
//! side and every routed expert in an in-process [`ExpertShard`], wired through the same
//! `ExpertExecutor` contract the router implements over the network.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use myriad_attention::{Engine, EngineConfig, Model};
use myriad_expert::{ExpertSet, ExpertShard};
use myriad_kernels::cpu::{CpuBackend, Isa, Precision};
use myriad_model::{Checkpoint, GenerationConfig, ModelConfig};

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
}

/// A loaded single-process engine and what it was built from.
pub struct LocalEngine {
    pub engine: Engine<CpuBackend>,
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    pub backend: Arc<CpuBackend>,
    pub experts: Arc<ExpertShard<CpuBackend>>,
    pub load_seconds: f64,
}

/// Loads the model in `dir` with all roles in this process.
pub fn load(dir: &Path, opts: &LocalOptions) -> Result<LocalEngine> {
    let t0 = Instant::now();
    let config = ModelConfig::from_dir(dir)?;
    let generation = GenerationConfig::from_dir(dir, &config)?;
    let ckpt = Checkpoint::open(dir, &config)
        .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let backend = Arc::new(
        match opts.isa {
            Some(isa) => CpuBackend::with_isa(opts.threads, isa),
            None => CpuBackend::new(opts.threads),
        }
        .with_precision(opts.precision),
    );
    let set = ExpertSet::all(config.num_experts);
    let experts = Arc::new(
        ExpertShard::load(backend.clone(), &config, &ckpt, &set)
            .context("loading routed experts")?,
    );
    let model = Model::load(config.clone(), backend.clone(), &ckpt, experts.clone())
        .context("loading dense weights")?;
    let engine = Engine::new(model, opts.engine.clone(), generation.eos_token_ids.clone());
    Ok(LocalEngine {
        engine,
        config,
        generation,
        backend,
        experts,
        load_seconds: t0.elapsed().as_secs_f64(),
    })
}
