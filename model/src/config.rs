//! The model configuration: one [`ModelConfig`] for both families, read from a Hugging Face
//! `config.json` (spec §1), checked for consistency, and written back in the fixtures' style.
//!
//! Reading lives in `config/parse.rs`, writing in `config/hf_json.rs`, the sampling defaults of
//! `generation_config.json` in `config/generation.rs`. This file owns the types, the derived
//! sizes every role needs, and the consistency rules.

mod error;
mod generation;
mod hf_json;
pub(crate) mod json;
mod parse;

use std::path::Path;

pub use error::ConfigError;
pub use generation::GenerationConfig;

/// Which released checkpoint family a configuration (and its tensor naming) follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `qwen3_next`: flat config, grouped `in_proj_qkvz` / `in_proj_ba`, per-expert tensors.
    Qwen3Next,
    /// `qwen3_5_moe` (image-text release, nested `text_config`) or `qwen3_5_moe_text`.
    Qwen35Moe,
}

impl Family {
    /// The `model_type` this family is written with (top level).
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Next => "qwen3_next",
            Family::Qwen35Moe => "qwen3_5_moe",
        }
    }

    /// Recognises a `model_type` value (top level or `text_config`).
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "qwen3_next" => Some(Family::Qwen3Next),
            "qwen3_5_moe" | "qwen3_5_moe_text" => Some(Family::Qwen35Moe),
            _ => None,
        }
    }

    /// Both families, for tests and CLI listings.
    pub const ALL: [Family; 2] = [Family::Qwen3Next, Family::Qwen35Moe];
}

/// The token mixer of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Gated DeltaNet (`linear_attention`).
    LinearAttention,
    /// Gated softmax attention with a KV cache (`full_attention`).
    FullAttention,
}

impl LayerKind {
    /// The `layer_types` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::LinearAttention => "linear_attention",
            LayerKind::FullAttention => "full_attention",
        }
    }
}

/// Everything about the text model's shape that loading and running it needs.
/// YaRN rope scaling (spec §2.4): frequencies interpolated by `factor` below the correction
/// range, kept above it, ramped between; cos and sin scaled by the attention factor. Static: it
/// applies at every position, short prompts included.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    /// The context the model was trained on (`L₀`).
    pub original_max_position_embeddings: usize,
    /// Rotations at the fast and slow ends of the correction range (32 and 1 by default).
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Multiplier of cos and sin; default `0.1 · ln(factor) + 1`.
    pub attention_factor: f64,
    /// Round the correction range outward to whole dims (transformers' default).
    pub truncate: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `head_dim * partial_rotary_factor`.
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// YaRN context extension (`rope_type: "yarn"`, spec §2.4); `None`: plain RoPE.
    pub yarn: Option<Yarn>,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_conv_kernel: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    /// Renormalise the top-k router weights. Always true for Qwen3.5 (the key does not exist).
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` of `config.json` (one id or a list there).
    pub eos_token_ids: Vec<u32>,
}

/// Far above any real model (2^50 ≈ 1.1e15 parameters); keeps all size arithmetic in range.
const MAX_PARAMETERS: f64 = (1u64 << 50) as f64;

/// Stands in for a file name when an in-memory config is validated.
const IN_MEMORY: &str = "<in-memory config>";

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses and validates config JSON; `origin` is only used in error messages.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        parse::parse(text, origin)
    }

    /// `config.json` in the fixtures' (transformers 5) style for `self.family`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        hf_json::to_hf_json(self)
    }

    /// Checks that the sizes are usable and agree with each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at(Path::new(IN_MEMORY), "")
    }

    /// [`validate`](Self::validate) with errors naming `origin` and keys under `key_prefix`.
    pub(crate) fn validate_at(&self, origin: &Path, key_prefix: &str) -> Result<(), ConfigError> {
        let inconsistent = |keys: &[&str], reason: String| ConfigError::Inconsistent {
            path: origin.to_path_buf(),
            keys: keys
                .iter()
                .map(|k| format!("{key_prefix}{k}"))
                .collect::<Vec<_>>()
                .join("`, `"),
            reason,
        };
        let invalid = |key: &str, reason: String| ConfigError::InvalidValue {
            path: origin.to_path_buf(),
            key: format!("{key_prefix}{key}"),
            reason,
        };

        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel),
            ("num_experts", self.num_experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
            ),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in sizes {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        // Bounding the total bounds every tensor size, so no size arithmetic can overflow.
        let estimate = self.parameter_formula(|n| n as f64);
        if estimate > MAX_PARAMETERS {
            return Err(inconsistent(
                &[
                    "hidden_size",
                    "num_experts",
                    "moe_intermediate_size",
                    "vocab_size",
                ],
                format!("the sizes give about {estimate:.3e} parameters, more than any real model"),
            ));
        }
        if self.layer_kinds.len() != self.num_layers {
            return Err(inconsistent(
                &["layer_types", "num_hidden_layers"],
                format!(
                    "{} layer types for {} layers",
                    self.layer_kinds.len(),
                    self.num_layers
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads) {
            return Err(inconsistent(
                &["num_attention_heads", "num_key_value_heads"],
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_attention_heads, self.num_kv_heads
                ),
            ));
        }
        if !self
            .linear_num_value_heads
            .is_multiple_of(self.linear_num_key_heads)
        {
            return Err(inconsistent(
                &["linear_num_value_heads", "linear_num_key_heads"],
                format!(
                    "{} value heads are not a multiple of {} key heads",
                    self.linear_num_value_heads, self.linear_num_key_heads
                ),
            ));
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
            return Err(inconsistent(
                &["num_experts_per_tok", "num_experts"],
                format!(
                    "top-k {} must be between 1 and the {} experts",
                    self.num_experts_per_tok, self.num_experts
                ),
            ));
        }
        if self.rotary_dim == 0
            || !self.rotary_dim.is_multiple_of(2)
            || self.rotary_dim > self.head_dim
        {
            return Err(inconsistent(
                &["partial_rotary_factor", "head_dim"],
                format!(
                    "rotary dims {} must be even, non-zero and at most head_dim {}",
                    self.rotary_dim, self.head_dim
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                format!("must be positive, found {}", self.rope_theta),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be positive, found {}", self.rms_norm_eps),
            ));
        }
        let vocab = self.vocab_size;
        if let Some(bos) = self.bos_token_id.filter(|&id| id as usize >= vocab) {
            return Err(inconsistent(
                &["bos_token_id", "vocab_size"],
                format!("token id {bos} is outside the vocabulary of {vocab}"),
            ));
        }
        if let Some(eos) = self.eos_token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(inconsistent(
                &["eos_token_id", "vocab_size"],
                format!("token id {eos} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }

    /// `nk * dk`: width of the DeltaNet q (and k) projection.
    pub fn key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }

    /// `nv * dv`: width of the DeltaNet v and z projections and of `out_proj`'s input.
    pub fn value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// `2 * nk * dk + nv * dv`: conv channels, rows of `in_proj_qkv`.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// `r = nv / nk`: DeltaNet value heads per key head.
    pub fn value_heads_per_key_head(&self) -> usize {
        self.linear_num_value_heads / self.linear_num_key_heads.max(1)
    }

    /// `G = nh / nkv`: query heads per KV head.
    pub fn query_heads_per_kv_head(&self) -> usize {
        self.num_attention_heads / self.num_kv_heads.max(1)
    }

    /// `2 * nh * hd`: rows of `q_proj` (query and gate interleaved per head).
    pub fn q_proj_rows(&self) -> usize {
        2 * self.num_attention_heads * self.head_dim
    }

    /// `nkv * hd`: rows of `k_proj` / `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `nh * hd`: columns of `o_proj`.
    pub fn attn_output_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn layer_kind(&self, layer: usize) -> Option<LayerKind> {
        self.layer_kinds.get(layer).copied()
    }

    pub fn num_linear_layers(&self) -> usize {
        self.count(LayerKind::LinearAttention)
    }

    pub fn num_full_layers(&self) -> usize {
        self.count(LayerKind::FullAttention)
    }

    fn count(&self, kind: LayerKind) -> usize {
        self.layer_kinds.iter().filter(|&&k| k == kind).count()
    }

    /// Position of `layer` among the layers of its kind (its DeltaNet-state or KV-cache slot).
    pub fn ordinal_in_kind(&self, layer: usize) -> Option<usize> {
        let kind = self.layer_kind(layer)?;
        Some(
            self.layer_kinds[..layer]
                .iter()
                .filter(|&&k| k == kind)
                .count(),
        )
    }

    /// The `full_attention_interval` that reproduces `layer_kinds`, if there is one.
    pub fn full_attention_interval(&self) -> Option<usize> {
        (1..=self.num_layers.max(1)).find(|&k| {
            self.layer_kinds.iter().enumerate().all(|(i, &kind)| {
                let full = (i + 1) % k == 0;
                (kind == LayerKind::FullAttention) == full
            })
        })
    }

    /// Parameters of one routed expert: `3 * H * I`.
    pub fn expert_parameters(&self) -> usize {
        3 * self.hidden_size * self.moe_intermediate_size
    }

    /// Text-model parameters (embedding, lm_head unless tied, all layers; no MTP, no vision).
    pub fn num_parameters(&self) -> usize {
        self.parameter_formula(|n| n)
    }

    /// A stable 64-bit identity of the model shape that an attention node and an expert node
    /// must agree on (exchanged in the wire handshake): FNV-1a over a version tag, the family,
    /// and the hidden, layer, expert, top-k, expert-width and vocabulary sizes, each as a
    /// little-endian `u64`. Deterministic across processes, machines and builds (no `std`
    /// hasher, whose keys are random); fields only the attention side uses are left out.
    pub fn fingerprint(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(PRIME);
            }
            h
        }
        // The tag versions the scheme; the family is length-prefixed so no two field lists
        // hash the same bytes.
        let family = self.family.model_type().as_bytes();
        let mut h = fnv1a(OFFSET, b"myriad-model-fingerprint-v1");
        h = fnv1a(h, &(family.len() as u64).to_le_bytes());
        h = fnv1a(h, family);
        for v in [
            self.hidden_size,
            self.num_layers,
            self.num_experts,
            self.num_experts_per_tok,
            self.moe_intermediate_size,
            self.vocab_size,
        ] {
            h = fnv1a(h, &(v as u64).to_le_bytes());
        }
        h
    }

    /// The parameter count written once for any number type: `usize` for the count, `f64` for
    /// the overflow guard in [`validate`](Self::validate).
    fn parameter_formula<T>(&self, n: impl Fn(usize) -> T) -> T
    where
        T: Copy + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
    {
        let h = n(self.hidden_size);
        let (nk, dk) = (n(self.linear_num_key_heads), n(self.linear_key_head_dim));
        let (nv, dv) = (
            n(self.linear_num_value_heads),
            n(self.linear_value_head_dim),
        );
        let two = n(2);
        let value_dim = nv * dv;
        let conv_dim = two * nk * dk + value_dim;
        let linear = conv_dim * h
            + value_dim * h
            + two * nv * h
            + conv_dim * n(self.linear_conv_kernel)
            + two * nv
            + dv
            + h * value_dim;
        let (nh, nkv, hd) = (
            n(self.num_attention_heads),
            n(self.num_kv_heads),
            n(self.head_dim),
        );
        let full = two * nh * hd * h + two * nkv * hd * h + h * nh * hd + two * hd;
        let e = n(self.num_experts);
        let moe = e * h
            + e * n(3) * h * n(self.moe_intermediate_size)
            + n(3) * h * n(self.shared_expert_intermediate_size)
            + h;
        let per_layer_common = moe + two * h;
        let embeddings = n(self.vocab_size) * h * n(if self.tie_word_embeddings { 1 } else { 2 });
        embeddings
            + h
            + n(self.num_linear_layers()) * (linear + per_layer_common)
            + n(self.num_full_layers()) * (full + per_layer_common)
    }
}
