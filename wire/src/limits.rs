//! The upper bounds a decoder enforces. A peer's counts and lengths are never trusted: every
//! one is checked against these (and against the bytes actually left in the payload) before
//! anything is allocated for it, so decoding a frame never allocates much more than the frame.

/// Upper bounds a decoder enforces before allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload a frame header may announce, in bytes.
    pub max_frame: u32,
    /// Most rows of a tensor (tokens of one request).
    pub max_rows: u32,
    /// Most columns of a tensor (the hidden size).
    pub max_cols: u32,
    /// Most (expert, weight) pairs of one routed row.
    pub max_experts_per_row: u32,
    /// Largest expert id (inclusive); also bounds `HelloAck::num_experts` to `max_expert_id + 1`.
    pub max_expert_id: u32,
    /// Layer indices must be below this; `HelloAck::num_layers` may not exceed it.
    pub max_layers: u32,
    /// Longest string (client and node names, error messages), in UTF-8 bytes.
    pub max_text: u32,
    /// Most tokens a sequence state may cover ([`crate::StateBegin::position`]); also bounds
    /// the KV block indices of a [`crate::StateChunk`], since every block holds a token.
    pub max_state_tokens: u64,
    /// Largest single dimension of a layer's state shape (heads, head sizes, conv rows and
    /// width, tokens per KV block), so that no product of them can overflow.
    pub max_state_dim: u32,
}

impl Default for Limits {
    /// Far above the models Myriad serves (hundreds of experts, top-10, hidden sizes in the
    /// thousands, tens of layers) while keeping the worst-case frame (256 MiB) affordable.
    /// Sequence states: 2 Mi tokens (the 1M-token contexts Myriad targets, with room), and
    /// dimensions up to 65536 (head sizes are hundreds, conv widths thousands).
    fn default() -> Self {
        Limits {
            max_frame: 256 << 20,
            max_rows: 65536,
            max_cols: 65536,
            max_experts_per_row: 64,
            max_expert_id: 1 << 20,
            max_layers: 4096,
            max_text: 4096,
            max_state_tokens: 1 << 21,
            max_state_dim: 65536,
        }
    }
}
