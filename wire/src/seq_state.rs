//! One sequence's state on the wire: everything an attention node keeps for a sequence so that
//! it (or another node) can continue it. Per layer either a Gated DeltaNet state (conv and
//! recurrent state, f32) or a full-attention paged KV cache (fixed-size blocks of keys and
//! values in f32, bf16 or fp8 e4m3 with a key and a value scale per block), plus the position,
//! the token ids covered and the sampler state.
//!
//! It moves a finished prefill from a prefill node to a decode node, streamed layer by layer
//! while later layers are still computing, and is meant for host/disk prefix caches and live
//! migration too; so it describes itself completely, is versioned apart from the protocol
//! ([`STATE_FORMAT_VERSION`]: a stored state outlives connections) and knows no transport.
//!
//! A transfer is three kinds of frame:
//!
//! ```text
//! StateBegin    the header: every layer's shape, position, tokens, sampler; from it alone the
//!               receiver knows the exact size of the state (StateBegin::state_bytes)
//! StateChunk …  layer by layer, in order: one chunk per DeltaNet layer, one or more runs of
//!               contiguous KV blocks per attention layer (none for a layer of zero blocks)
//! StateEnd      how many chunks were sent and a checksum of their payloads
//! ```
//!
//! Layers arrive in order, every chunk of layer `l` before any of layer `l + 1`: that is what
//! lets a prefill node send layer `l` while it still computes the next ones. The receiver's
//! [`Assembler`] checks each chunk against the header as it arrives, and refuses a state over
//! its [`StateLimits`] before allocating anything for it; the sender's [`ChunkWriter`] runs
//! the same checks on what it writes, so a transfer it completes is one the receiver accepts.
//!
//! Payloads (integers little-endian, `f32` as its IEEE bits):
//!
//! ```text
//! StateBegin  state_version u16 (= 1) | transfer_id u64 | model_fingerprint u64
//!             | position u64 (≤ max_state_tokens) | generated u32 (≤ position) | rng 4 × u64
//!             | token_count u64 (= position) | token_count × token u32
//!             | layer_count u32 (≤ max_layers) | layer_count × layer
//! layer       kind u8 = 0 (DeltaNet)  | conv_rows u32 | conv_dim u32 | v_heads u32
//!                                     | k_head_dim u32 | v_head_dim u32      (each ≤ max_state_dim)
//!             kind u8 = 1 (attention) | kv_heads u32 | head_dim u32 | block_tokens u32
//!                                     | dtype u8 (0 f32, 1 bf16, 2 fp8 e4m3) (each 1..=max_state_dim)
//! StateChunk  transfer_id u64 | layer u32 (< max_layers) | kind u8 | body
//!   kind 0    conv_count u32 | conv_count × f32 | recurrent_count u32 | recurrent_count × f32
//!   kind 1    first_block u64 | block_tokens u32 | kv_heads u32 | head_dim u32 | dtype u8
//!             | block_count u32 (first_block + block_count ≤ max_state_tokens)
//!             | block_count × (key_scale f32 | value_scale f32 | keys | values)
//! StateEnd    transfer_id u64 | chunks u32 | checksum u64
//! ```
//!
//! A DeltaNet chunk holds the row-major conv state `[conv_rows, conv_dim]` and recurrent state
//! `[v_heads, k_head_dim, v_head_dim]`, every value finite. A KV block holds `block_tokens`
//! tokens: keys `[block_tokens, kv_heads, head_dim]`, then values of the same shape, as raw
//! little-endian elements; its scales are finite, and exactly 1.0 unless the dtype is fp8. Block
//! `b` holds tokens `b × block_tokens ..`; the last block of a layer may be partly filled, and
//! its unused token slots are zero bytes (so a state has exactly one encoding). The checksum is
//! [`Checksum`] (XXH64, seed 0) over every chunk payload in order: it catches a peer or store
//! that reorders, drops or corrupts chunks, not an attacker.
//!
//! Everything is checked as in the rest of the protocol: every count against [`Limits`] and
//! the bytes left before anything is allocated, errors naming the field, payloads consumed
//! exactly and encoded canonically.
//!
//! [`Limits`]: crate::Limits

mod assemble;
mod begin;
mod check;
mod checksum;
mod chunk;
mod send;

pub use assemble::{Assembler, LayerImage, SequenceStateImage, StateLimits};
pub use begin::{KvDtype, LayerShape, STATE_FORMAT_VERSION, StateBegin};
pub use checksum::Checksum;
pub use chunk::{ChunkBody, KvBlock, StateChunk, StateEnd};
pub use send::{ChunkWriter, layer_chunks};

/// The layer kind byte of a [`LayerShape`] and of a [`StateChunk`]'s body.
const KIND_DELTANET: u8 = 0;
const KIND_ATTENTION: u8 = 1;
