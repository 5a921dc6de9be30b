//! A sequence's state in the versioned wire format (`myriad_wire::SequenceStateImage`), and
//! back: what a prefill node hands a decode node, and what a prefix cache or a live migration
//! will store later.
//!
//! The image carries the model's fingerprint and each layer's exact shape (KV block size and
//! element type included), so a node refuses a state of another model or another KV layout
//! with an error that names both, before it allocates anything for it. KV blocks travel as
//! stored (no decoding, no re-rounding), so a handed-off sequence continues bit for bit.

use myriad_engine_api::{FinishReason, PositionLogprobs};
use myriad_kernels::{Backend, DeltaStateHost, KvBlockHost, KvBlocksHost, KvCacheSpec, KvDtype};
use myriad_model::config::LayerKind;
use myriad_wire::seq_state::{
    KvBlock, KvDtype as WireDtype, LayerImage, LayerShape, STATE_FORMAT_VERSION,
    SequenceStateImage, StateBegin,
};

use crate::error::EngineError;
use crate::forward::Model;
use crate::state::{LayerState, SequenceState};
use crate::weights::{attention_dims, deltanet_dims};

/// What a prefill node produced for a request besides its state: the prompt's
/// log-probabilities (with `echo`), the first generated token and its log-probabilities, and
/// whether the request already ended there.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefillOutput {
    /// One entry per prompt position (the first `None`), with `echo` and `logprobs`.
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    /// The first generated token (none when `max_tokens` is 0).
    pub first_token: Option<u32>,
    pub first_logprobs: Option<PositionLogprobs>,
    /// Set when the request ended with its first token (or has `max_tokens` 0).
    pub finished: Option<FinishReason>,
}

/// A prefilled request: its state after the prompt (the first generated token not yet fed
/// back; the sampler's state after choosing it) and its outputs so far.
#[derive(Clone, Debug)]
pub struct Prefilled {
    pub image: SequenceStateImage,
    pub output: PrefillOutput,
}

fn wire_dtype(d: KvDtype) -> WireDtype {
    match d {
        KvDtype::F32 => WireDtype::F32,
        KvDtype::BF16 => WireDtype::Bf16,
        KvDtype::Fp8E4M3 => WireDtype::Fp8E4M3,
    }
}

fn kernel_dtype(d: WireDtype) -> KvDtype {
    match d {
        WireDtype::F32 => KvDtype::F32,
        WireDtype::Bf16 => KvDtype::BF16,
        WireDtype::Fp8E4M3 => KvDtype::Fp8E4M3,
    }
}

fn describe(shape: &LayerShape) -> String {
    match *shape {
        LayerShape::DeltaNet {
            conv_rows,
            conv_dim,
            v_heads,
            k_head_dim,
            v_head_dim,
        } => format!(
            "DeltaNet (conv {conv_rows}×{conv_dim}, recurrent {v_heads}×{k_head_dim}×{v_head_dim})"
        ),
        LayerShape::Attention {
            kv_heads,
            head_dim,
            block_tokens,
            dtype,
        } => format!(
            "attention ({kv_heads} KV heads × {head_dim}, blocks of {block_tokens} tokens of {})",
            kernel_dtype(dtype).name()
        ),
    }
}

impl<B: Backend> Model<B> {
    /// Every layer's state shape on this model with its KV layout.
    pub fn state_shapes(&self) -> Vec<LayerShape> {
        let c = self.config();
        let (d, a) = (deltanet_dims(c), attention_dims(c));
        let spec = self.kv_spec();
        c.layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::LinearAttention => LayerShape::DeltaNet {
                    conv_rows: d.conv_kernel.saturating_sub(1) as u32,
                    conv_dim: d.conv_dim() as u32,
                    v_heads: d.num_v_heads as u32,
                    k_head_dim: d.k_head_dim as u32,
                    v_head_dim: d.v_head_dim as u32,
                },
                LayerKind::FullAttention => LayerShape::Attention {
                    kv_heads: a.num_kv_heads as u32,
                    head_dim: a.head_dim as u32,
                    block_tokens: spec.block_tokens as u32,
                    dtype: wire_dtype(spec.dtype),
                },
            })
            .collect()
    }

    /// The image of `seq`, which holds `tokens` (prompt, then any generated tokens already
    /// fed), `generated` of them generated; `rng` is the sampler's state.
    pub fn export_state(
        &self,
        seq: &SequenceState<B>,
        tokens: &[u32],
        generated: u32,
        rng: [u64; 4],
    ) -> SequenceStateImage {
        assert_eq!(tokens.len(), seq.len(), "the tokens a state covers");
        let b = &**self.backend();
        let layers = seq
            .layers()
            .iter()
            .map(|l| match l {
                LayerState::DeltaNet(s) => {
                    let DeltaStateHost { conv, recurrent } = b.delta_state_to_host(s);
                    LayerImage::DeltaNet { conv, recurrent }
                }
                LayerState::Attention(c) => LayerImage::Attention {
                    blocks: b
                        .kv_cache_export(c)
                        .blocks
                        .into_iter()
                        .map(|k| KvBlock {
                            key_scale: k.key_scale,
                            value_scale: k.value_scale,
                            data: k.data,
                        })
                        .collect(),
                },
            })
            .collect();
        SequenceStateImage {
            begin: StateBegin {
                transfer_id: 0,
                state_version: STATE_FORMAT_VERSION,
                model_fingerprint: self.config().fingerprint(),
                position: seq.len() as u64,
                tokens: tokens.to_vec(),
                rng,
                generated,
                layers: self.state_shapes(),
            },
            layers,
        }
    }

    /// Checks that `begin` describes a state of this model with this node's KV layout.
    pub fn check_state_header(&self, begin: &StateBegin) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::State(m));
        if begin.model_fingerprint != self.config().fingerprint() {
            return bad(format!(
                "the state is of another model (fingerprint {:#x}, this node serves {:#x})",
                begin.model_fingerprint,
                self.config().fingerprint()
            ));
        }
        let mine = self.state_shapes();
        if begin.layers.len() != mine.len() {
            return bad(format!(
                "the state has {} layers, this model {}",
                begin.layers.len(),
                mine.len()
            ));
        }
        for (l, (theirs, ours)) in begin.layers.iter().zip(&mine).enumerate() {
            if theirs != ours {
                return bad(format!(
                    "layer {l} of the state is {}, this node keeps {} (start both nodes with \
                     the same --kv-cache-dtype and --kv-block-tokens)",
                    describe(theirs),
                    describe(ours)
                ));
            }
        }
        if begin.position as usize > self.config().max_position_embeddings {
            return bad(format!(
                "the state covers {} tokens, more than the model's context of {}",
                begin.position,
                self.config().max_position_embeddings
            ));
        }
        Ok(())
    }

    /// A sequence holding `image`'s state (checked against this model first).
    pub fn import_state(
        &self,
        image: &SequenceStateImage,
    ) -> Result<SequenceState<B>, EngineError> {
        let begin = &image.begin;
        self.check_state_header(begin)?;
        if image.layers.len() != begin.layers.len() {
            return Err(EngineError::State(format!(
                "the state announces {} layers and holds {}",
                begin.layers.len(),
                image.layers.len()
            )));
        }
        let b = &**self.backend();
        let c = self.config();
        let (d, a) = (deltanet_dims(c), attention_dims(c));
        let spec: KvCacheSpec = self.kv_spec();
        let len = begin.position as usize;
        let mut layers = Vec::with_capacity(image.layers.len());
        for (l, layer) in image.layers.iter().enumerate() {
            let state = match (layer, c.layer_kinds[l]) {
                (LayerImage::DeltaNet { conv, recurrent }, LayerKind::LinearAttention) => {
                    let host = DeltaStateHost {
                        conv: conv.clone(),
                        recurrent: recurrent.clone(),
                    };
                    LayerState::DeltaNet(
                        b.delta_state_from_host(&d, &host)
                            .map_err(|e| EngineError::State(format!("layer {l}: {e}")))?,
                    )
                }
                (LayerImage::Attention { blocks }, LayerKind::FullAttention) => {
                    let host = KvBlocksHost {
                        spec,
                        len,
                        blocks: blocks
                            .iter()
                            .map(|k| KvBlockHost {
                                key_scale: k.key_scale,
                                value_scale: k.value_scale,
                                data: k.data.clone(),
                            })
                            .collect(),
                    };
                    LayerState::Attention(
                        b.kv_cache_import(&a, &host)
                            .map_err(|e| EngineError::State(format!("layer {l}: {e}")))?,
                    )
                }
                _ => {
                    return Err(EngineError::State(format!(
                        "layer {l} of the state is of the wrong kind"
                    )));
                }
            };
            layers.push(state);
        }
        Ok(SequenceState { layers, len })
    }
}
