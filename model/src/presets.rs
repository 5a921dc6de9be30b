//! The named model shapes (`tiny`, `mini512`, `bench`) of the fixtures README, and the
//! special-token convention of the fixtures' tokenizers.
//!
//! `tiny` and `mini512` reproduce the fixtures' `config.json` exactly (tests check it), so a
//! synthetic model of those presets is interchangeable with the fixture in shape.

use crate::config::{Family, LayerKind, ModelConfig};

/// A named model shape; the same numbers for both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// 4 layers, 64 experts of width 8, H = 64: the unit-test model.
    Tiny,
    /// 4 layers, 512 experts top-10 (as the large releases), H = 128.
    Mini512,
    /// 8 layers, 512 experts, H = 1024: 3.3 G parameters, for throughput measurements.
    Bench,
}

const COMMON_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const VISION_SPECIALS: [&str; 4] = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];
const TAG_SPECIALS: [&str; 6] = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
];

const QWEN3_NEXT_SPECIALS: [&str; 9] = concat_specials::<9>(&[&COMMON_SPECIALS, &TAG_SPECIALS]);
const QWEN3_5_SPECIALS: [&str; 13] =
    concat_specials::<13>(&[&COMMON_SPECIALS, &VISION_SPECIALS, &TAG_SPECIALS]);

const fn concat_specials<const N: usize>(parts: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut n = 0;
    let mut p = 0;
    while p < parts.len() {
        let mut i = 0;
        while i < parts[p].len() {
            out[n] = parts[p][i];
            n += 1;
            i += 1;
        }
        p += 1;
    }
    assert!(n == N, "special-token list length");
    out
}

/// The special tokens of `family`, in id order; they occupy the last ids of the vocabulary.
pub fn special_tokens(family: Family) -> &'static [&'static str] {
    match family {
        Family::Qwen3Next => &QWEN3_NEXT_SPECIALS,
        Family::Qwen35Moe => &QWEN3_5_SPECIALS,
    }
}

/// The id of special `token` in a vocabulary of `vocab_size` laid out by this convention.
pub fn special_token_id(family: Family, vocab_size: usize, token: &str) -> Option<u32> {
    let specials = special_tokens(family);
    let pos = specials.iter().position(|&t| t == token)?;
    let first = vocab_size.checked_sub(specials.len())?;
    u32::try_from(first + pos).ok()
}

struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: (usize, usize, usize, usize),
    deltanet: (usize, usize, usize, usize),
    experts: (usize, usize, usize, usize),
    rope_theta: f64,
    max_positions: usize,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Tiny, Preset::Mini512, Preset::Bench];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Mini512 => "mini512",
            Preset::Bench => "bench",
        }
    }

    pub fn parse(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    fn shape(self) -> Shape {
        match self {
            Preset::Tiny => Shape {
                vocab: 1024,
                hidden: 64,
                layers: 4,
                heads: (4, 2, 32, 8),
                deltanet: (2, 4, 16, 16),
                experts: (64, 4, 8, 32),
                rope_theta: 1e4,
                max_positions: 4096,
            },
            Preset::Mini512 => Shape {
                vocab: 2048,
                hidden: 128,
                layers: 4,
                heads: (4, 2, 64, 16),
                deltanet: (2, 4, 32, 32),
                experts: (512, 10, 8, 64),
                rope_theta: 1e7,
                max_positions: 4096,
            },
            Preset::Bench => Shape {
                vocab: 32768,
                hidden: 1024,
                layers: 8,
                heads: (8, 2, 128, 32),
                deltanet: (8, 16, 64, 64),
                experts: (512, 10, 256, 256),
                rope_theta: 1e7,
                max_positions: 32768,
            },
        }
    }

    /// The preset's configuration for `family`, with the fixtures' token ids
    /// (bos = `<|endoftext|>`, eos = `<|im_end|>`, as in their `config.json`).
    pub fn config(self, family: Family) -> ModelConfig {
        let s = self.shape();
        let id = |token: &str| special_token_id(family, s.vocab, token);
        let (nh, nkv, hd, rot) = s.heads;
        let (nk, nv, dk, dv) = s.deltanet;
        let (e, k, i, is) = s.experts;
        ModelConfig {
            family,
            vocab_size: s.vocab,
            hidden_size: s.hidden,
            num_layers: s.layers,
            layer_kinds: (0..s.layers)
                .map(|l| {
                    if (l + 1) % 4 == 0 {
                        LayerKind::FullAttention
                    } else {
                        LayerKind::LinearAttention
                    }
                })
                .collect(),
            num_attention_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            rotary_dim: rot,
            rope_theta: s.rope_theta,
            yarn: None,
            linear_num_key_heads: nk,
            linear_num_value_heads: nv,
            linear_key_head_dim: dk,
            linear_value_head_dim: dv,
            linear_conv_kernel: 4,
            num_experts: e,
            num_experts_per_tok: k,
            moe_intermediate_size: i,
            shared_expert_intermediate_size: is,
            norm_topk_prob: true,
            rms_norm_eps: 1e-6,
            max_position_embeddings: s.max_positions,
            tie_word_embeddings: false,
            bos_token_id: id("<|endoftext|>"),
            eos_token_ids: id("<|im_end|>").into_iter().collect(),
        }
    }
}
