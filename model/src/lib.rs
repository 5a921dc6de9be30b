//! Model configuration, checkpoint loading and the contracts shared by every Myriad role.
//!
//! - [`config`]: `config.json` / `generation_config.json` of the Qwen3-Next and Qwen3.5-MoE
//!   families, validated into one [`ModelConfig`] (plus [`GenerationConfig`]), and written back
//!   in the Hugging Face style.
//! - [`checkpoint`]: memory-mapped safetensors (single or lazily mapped shards) with dtype
//!   conversion (BF16/F32 zero-copy, F16, block-scaled FP8) and both tensor naming schemes,
//!   giving tensors in one canonical layout; [`checkpoint::regroup`] holds the Qwen3-Next
//!   DeltaNet row regrouping.
//! - [`presets`]: the `tiny`, `mini512` and `bench` shapes and the special-token convention.
//! - [`synth`]: writes a random-weight model in the Hugging Face layout, streaming to disk.
//! - [`moe`]: the expert-executor contract between attention and expert roles.
//!
//! Node-to-node contracts (the wire protocol, routes, expert sets, placements) live in
//! `myriad-wire`; [`ExpertSet`] is re-exported here because checkpoints load by it.

pub mod checkpoint;
pub mod config;
pub mod moe;
pub mod presets;
pub mod synth;

pub use checkpoint::{
    Checkpoint, CheckpointError, ExpertTensors, FullAttnTensors, HostTensor, LayerTensors,
    LinearAttnTensors, MixerTensors,
};
pub use config::{ConfigError, Family, GenerationConfig, LayerKind, ModelConfig, Yarn};
pub use myriad_wire::{ExpertSet, ExpertSetError};
pub use presets::Preset;
pub use synth::{SynthError, SynthReport, SynthSpec, write_random_model};
