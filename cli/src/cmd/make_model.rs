//! `myriad make-model`: a random-weight model in the Hugging Face layout, with a BPE
//! tokenizer trained here and a chat template, so everything runs with nothing downloaded.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use myriad_gateway::{TokenizerSpec, train_tokenizer};
use myriad_kernels::WeightDtype;
use myriad_model::presets::special_tokens;
use myriad_model::{Family, Preset, SynthReport, SynthSpec, write_random_model};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PresetArg {
    Tiny,
    Mini512,
    Bench,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FamilyArg {
    /// Qwen3.5-MoE layout (fused experts under model.language_model.).
    #[value(name = "qwen3_5_moe")]
    Qwen35Moe,
    /// Qwen3-Next layout (per-expert tensors, interleaved DeltaNet projections).
    #[value(name = "qwen3_next")]
    Qwen3Next,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F32,
}

#[derive(Args, Debug)]
pub struct MakeModelArgs {
    /// Shape: tiny, mini512 (the fixtures' shapes) or bench (3.3 G parameters, 6.7 GB).
    #[arg(long, value_enum)]
    pub preset: PresetArg,
    /// Output directory (created; an existing model there is replaced).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "qwen3_5_moe")]
    pub family: FamilyArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeArg,
    /// Largest shard file in MiB (0: a single model.safetensors).
    #[arg(long, default_value_t = 1024)]
    pub shard_mb: u64,
    /// The model's context (`max_position_embeddings`) instead of the preset's, e.g. 1048576
    /// for long-context tests and benchmarks (RoPE works at any position; the weights are
    /// random anyway).
    #[arg(long)]
    pub max_positions: Option<usize>,
}

impl PresetArg {
    pub fn preset(self) -> Preset {
        match self {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Mini512 => Preset::Mini512,
            PresetArg::Bench => Preset::Bench,
        }
    }
}

impl FamilyArg {
    pub fn family(self) -> Family {
        match self {
            FamilyArg::Qwen35Moe => Family::Qwen35Moe,
            FamilyArg::Qwen3Next => Family::Qwen3Next,
        }
    }
}

/// Writes the model and its tokenizer into `out`.
pub fn make_model(
    preset: Preset,
    family: Family,
    out: &Path,
    seed: u64,
    dtype: WeightDtype,
    shard_bytes: u64,
    max_positions: Option<usize>,
) -> Result<SynthReport> {
    let mut config = preset.config(family);
    if let Some(n) = max_positions {
        anyhow::ensure!(n > 0, "--max-positions must be at least 1");
        config.max_position_embeddings = n;
    }
    let report = write_random_model(
        out,
        &SynthSpec {
            config: config.clone(),
            seed,
            dtype,
            shard_bytes,
        },
    )
    .with_context(|| format!("writing weights to {}", out.display()))?;
    let mut spec = match family {
        Family::Qwen3Next => TokenizerSpec::qwen3_next(config.vocab_size, special_tokens(family)),
        Family::Qwen35Moe => TokenizerSpec::qwen3_5_moe(config.vocab_size, special_tokens(family)),
    };
    spec.model_max_length = config.max_position_embeddings;
    let files = train_tokenizer(&spec).context("training the tokenizer")?;
    files
        .write_to(out)
        .with_context(|| format!("writing the tokenizer to {}", out.display()))?;
    Ok(report)
}

pub fn run(args: &MakeModelArgs) -> Result<()> {
    let dtype = match args.dtype {
        DtypeArg::Bf16 => WeightDtype::BF16,
        DtypeArg::F32 => WeightDtype::F32,
    };
    let t0 = std::time::Instant::now();
    let r = make_model(
        args.preset.preset(),
        args.family.family(),
        &args.out,
        args.seed,
        dtype,
        args.shard_mb * (1 << 20),
        args.max_positions,
    )?;
    eprintln!(
        "wrote {} ({} parameters, {:.2} GB of weights in {} files) in {:.1} s",
        args.out.display(),
        r.num_parameters,
        r.weight_bytes as f64 / 1e9,
        r.files.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
