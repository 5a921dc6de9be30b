//! Qwen3-Next's key-head-grouped DeltaNet input projections → the Qwen3.5 row order
//! (spec §2.3 a'), done once at load so that only one layout exists downstream.
//!
//! `in_proj_qkvz` is `nk` groups of rows `[q_g (dk) | k_g (dk) | v (r·dv) | z (r·dv)]` where the
//! v/z blocks belong to value heads `g·r … g·r+r−1`; `in_proj_ba` is `nk` groups of
//! `[b (r) | a (r)]`. The functions work on whole rows of any element size.

/// DeltaNet head counts and sizes, as in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaNetHeads {
    pub key_heads: usize,
    pub key_head_dim: usize,
    pub value_heads: usize,
    pub value_head_dim: usize,
}

impl DeltaNetHeads {
    fn ratio(&self) -> Option<usize> {
        (self.key_heads > 0 && self.value_heads.is_multiple_of(self.key_heads))
            .then(|| self.value_heads / self.key_heads)
    }
}

/// Splits grouped `in_proj_qkvz` rows into `(in_proj_qkv, in_proj_z)` rows in the Qwen3.5
/// order `[all q | all k | all v]` and `[all z]`. `None` if the sizes do not fit.
pub fn split_qkvz(data: &[u8], row_bytes: usize, h: DeltaNetHeads) -> Option<(Vec<u8>, Vec<u8>)> {
    let r = h.ratio()?;
    let (dk, vblock) = (h.key_head_dim, r * h.value_head_dim);
    let group_rows = 2 * dk + 2 * vblock;
    if data.len() != h.key_heads * group_rows * row_bytes {
        return None;
    }
    let rows = |g: usize, offset: usize, n: usize| {
        let start = (g * group_rows + offset) * row_bytes;
        &data[start..start + n * row_bytes]
    };
    let key_heads = 0..h.key_heads;
    let mut qkv = Vec::with_capacity((2 * h.key_heads * dk + h.key_heads * vblock) * row_bytes);
    key_heads
        .clone()
        .for_each(|g| qkv.extend_from_slice(rows(g, 0, dk)));
    key_heads
        .clone()
        .for_each(|g| qkv.extend_from_slice(rows(g, dk, dk)));
    key_heads
        .clone()
        .for_each(|g| qkv.extend_from_slice(rows(g, 2 * dk, vblock)));
    let mut z = Vec::with_capacity(h.key_heads * vblock * row_bytes);
    key_heads.for_each(|g| z.extend_from_slice(rows(g, 2 * dk + vblock, vblock)));
    Some((qkv, z))
}

/// Splits grouped `in_proj_ba` rows into `(in_proj_b, in_proj_a)` rows in value-head order.
pub fn split_ba(data: &[u8], row_bytes: usize, h: DeltaNetHeads) -> Option<(Vec<u8>, Vec<u8>)> {
    let r = h.ratio()?;
    if data.len() != 2 * h.value_heads * row_bytes {
        return None;
    }
    let mut b = Vec::with_capacity(h.value_heads * row_bytes);
    let mut a = Vec::with_capacity(h.value_heads * row_bytes);
    for group in data.chunks_exact(2 * r * row_bytes) {
        let (gb, ga) = group.split_at(r * row_bytes);
        b.extend_from_slice(gb);
        a.extend_from_slice(ga);
    }
    Some((b, a))
}
