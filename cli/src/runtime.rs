//! Flags shared by every subcommand that runs the model on this machine.

use clap::Args;
use myriad_attention::EngineConfig;
use myriad_kernels::cpu::{Isa, Precision};
use myriad_kernels::{KvCacheSpec, KvDtype};

use crate::local::LocalOptions;

#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Worker threads for the CPU kernels (0: one per core).
    #[arg(long, default_value_t = 0, env = "MYRIAD_THREADS")]
    pub threads: usize,
    /// Restrict kernels to an instruction set: avx512, avx2 or portable (default: the best).
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
    /// Inputs of weight matmuls: f32 (matches the float32 reference) or bf16 (activations
    /// rounded to bf16 as transformers' bf16 mode does; faster prefill on AVX512-BF16 CPUs).
    #[arg(long, value_parser = parse_precision, default_value = "f32")]
    pub precision: Precision,
    /// Most tokens in one forward step; longer prompts are prefilled in chunks of this size.
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 256)]
    pub max_seqs: usize,
    /// Element type of stored keys and values: f32, bf16 or fp8_e4m3 (with a scale per
    /// block). Default: follows --precision (f32 stays exact against the reference).
    #[arg(long, value_parser = parse_kv_dtype)]
    pub kv_cache_dtype: Option<KvDtype>,
    /// Tokens per KV block: a sequence takes blocks of this many tokens as it grows.
    #[arg(long, default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub kv_block_tokens: u32,
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    KvDtype::parse(s)
        .ok_or_else(|| format!("unknown KV cache dtype {s:?}: use f32, bf16 or fp8_e4m3"))
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("unknown precision {s:?}: use f32 or bf16"))
}

fn parse_isa(s: &str) -> Result<Isa, String> {
    Isa::parse(s)
        .ok_or_else(|| format!("unknown instruction set {s:?}: use avx512, avx2 or portable"))
}

impl RuntimeArgs {
    pub fn options(&self) -> LocalOptions {
        LocalOptions {
            threads: self.threads,
            isa: self.isa,
            precision: self.precision,
            engine: EngineConfig {
                max_batch_tokens: self.max_batch_tokens.max(1),
                max_seqs: self.max_seqs.max(1),
                ping_pong: false,
                kv_blocks: None,
            },
            kv: KvCacheSpec {
                block_tokens: self.kv_block_tokens as usize,
                dtype: self.kv_cache_dtype.unwrap_or(match self.precision {
                    Precision::F32 => KvDtype::F32,
                    Precision::Bf16 => KvDtype::BF16,
                }),
            },
        }
    }
}
