//! One sequence's paged KV cache for one attention layer on the CPU: a block table of
//! fixed-size blocks, each holding `block_tokens` tokens of keys `[block_tokens, kv_heads,
//! head_dim]` followed by values of the same shape, in the spec's element type with one key
//! and one value scale per block (see [`crate::kv`]).
//!
//! Blocks are taken as the sequence grows and given back when it is truncated or dropped;
//! the backend's [`BlockCounter`] counts the blocks alive across all caches, so the engine's
//! accounting can be checked against what is really held.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::bf16;

use crate::kv::{E4M3_TO_F32, FP8_E4M3_MAX, KvCacheSpec, KvDtype, f32_to_e4m3, fp8_scale_for};
use crate::{AttentionDims, KvBlockHost, KvBlocksHost, KvCacheHost};

/// Blocks alive across every cache of one backend.
#[derive(Clone, Debug, Default)]
pub struct BlockCounter(Arc<AtomicUsize>);

impl BlockCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The elements of one block: keys in the first half, values in the second.
enum BlockData {
    F32(Box<[f32]>),
    BF16(Box<[bf16]>),
    Fp8(Box<[u8]>),
}

struct Block {
    data: BlockData,
    /// Stored value × scale = actual value (1 except for fp8).
    key_scale: f32,
    value_scale: f32,
}

/// One sequence's KV cache for one layer.
pub struct CpuKvCache {
    pub(crate) dims: AttentionDims,
    spec: KvCacheSpec,
    pub(crate) len: usize,
    blocks: Vec<Block>,
    counter: BlockCounter,
}

/// Which half of a block.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    Keys,
    Values,
}

impl CpuKvCache {
    pub(crate) fn new(dims: &AttentionDims, spec: &KvCacheSpec, counter: BlockCounter) -> Self {
        assert!(spec.block_tokens > 0, "KV blocks hold at least one token");
        CpuKvCache {
            dims: *dims,
            spec: *spec,
            len: 0,
            blocks: Vec::new(),
            counter,
        }
    }

    /// Values per token per half (`num_kv_heads × head_dim`).
    pub(crate) fn row(&self) -> usize {
        self.dims.num_kv_heads * self.dims.head_dim
    }

    pub(crate) fn block_tokens(&self) -> usize {
        self.spec.block_tokens
    }

    pub fn spec(&self) -> KvCacheSpec {
        self.spec
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether rows can be read in place as f32 (no decoding).
    pub(crate) fn is_f32(&self) -> bool {
        self.spec.dtype == KvDtype::F32
    }

    fn half_len(&self) -> usize {
        self.spec.block_tokens * self.row()
    }

    fn new_block(&self) -> Block {
        let n = 2 * self.half_len();
        let data = match self.spec.dtype {
            KvDtype::F32 => BlockData::F32(vec![0.0; n].into_boxed_slice()),
            KvDtype::BF16 => BlockData::BF16(vec![bf16::ZERO; n].into_boxed_slice()),
            KvDtype::Fp8E4M3 => BlockData::Fp8(vec![0; n].into_boxed_slice()),
        };
        self.counter.add(1);
        Block {
            data,
            key_scale: 1.0,
            value_scale: 1.0,
        }
    }

    /// Appends `n` tokens: `keys` and `values` are `[n, kv_heads, head_dim]`.
    pub(crate) fn append(&mut self, keys: &[f32], values: &[f32]) {
        let row = self.row();
        debug_assert_eq!(keys.len(), values.len());
        let n = keys.len() / row;
        let bt = self.spec.block_tokens;
        let mut t = 0;
        while t < n {
            let (b, slot) = (self.len / bt, self.len % bt);
            if b == self.blocks.len() {
                let block = self.new_block();
                self.blocks.push(block);
            }
            let take = (bt - slot).min(n - t);
            let half = self.half_len();
            let block = &mut self.blocks[b];
            let at = slot * row;
            let (k, v) = (
                &keys[t * row..(t + take) * row],
                &values[t * row..(t + take) * row],
            );
            match &mut block.data {
                BlockData::F32(d) => {
                    d[at..at + k.len()].copy_from_slice(k);
                    d[half + at..half + at + v.len()].copy_from_slice(v);
                }
                BlockData::BF16(d) => {
                    for (o, x) in d[at..at + k.len()].iter_mut().zip(k) {
                        *o = bf16::from_f32(*x);
                    }
                    for (o, x) in d[half + at..half + at + v.len()].iter_mut().zip(v) {
                        *o = bf16::from_f32(*x);
                    }
                }
                BlockData::Fp8(d) => {
                    let used = at;
                    let (dk, dv) = d.split_at_mut(half);
                    block.key_scale =
                        append_fp8(&mut dk[..used + k.len()], used, k, block.key_scale);
                    block.value_scale =
                        append_fp8(&mut dv[..used + v.len()], used, v, block.value_scale);
                }
            }
            self.len += take;
            t += take;
        }
    }

    /// Rows `from..to` (within block `b`) of one half, for kv head `g`, as f32: a slice into
    /// the block with its row stride and the head's offset (f32 blocks), or decoded into
    /// `scratch` (`[to - from, head_dim]`, stride `head_dim`, offset 0).
    #[inline(always)]
    pub(crate) fn head_rows<'a>(
        &'a self,
        b: usize,
        half: Half,
        g: usize,
        from: usize,
        to: usize,
        scratch: &'a mut Vec<f32>,
    ) -> (&'a [f32], usize, usize) {
        let (row, hd) = (self.row(), self.dims.head_dim);
        let block = &self.blocks[b];
        let base = match half {
            Half::Keys => 0,
            Half::Values => self.half_len(),
        };
        match &block.data {
            BlockData::F32(d) => (&d[base + from * row..base + to * row], row, g * hd),
            BlockData::BF16(d) => {
                scratch.clear();
                for t in from..to {
                    let src = &d[base + t * row + g * hd..base + t * row + (g + 1) * hd];
                    scratch.extend(src.iter().map(|x| x.to_f32()));
                }
                (&scratch[..], hd, 0)
            }
            BlockData::Fp8(d) => {
                let scale = match half {
                    Half::Keys => block.key_scale,
                    Half::Values => block.value_scale,
                };
                scratch.clear();
                for t in from..to {
                    let src = &d[base + t * row + g * hd..base + t * row + (g + 1) * hd];
                    scratch.extend(src.iter().map(|&c| E4M3_TO_F32[c as usize] * scale));
                }
                (&scratch[..], hd, 0)
            }
        }
    }

    /// One half of kv head `g` for every token, decoded: `[len, head_dim]`.
    pub(crate) fn head_f32(&self, half: Half, g: usize) -> Vec<f32> {
        let hd = self.dims.head_dim;
        let bt = self.spec.block_tokens;
        let mut out = Vec::with_capacity(self.len * hd);
        let mut scratch = Vec::new();
        for b in 0..self.blocks.len() {
            let to = bt.min(self.len - b * bt);
            let (rows, stride, off) = self.head_rows(b, half, g, 0, to, &mut scratch);
            for t in 0..to {
                out.extend_from_slice(&rows[t * stride + off..t * stride + off + hd]);
            }
        }
        out
    }

    /// Key or value row of token `t`, kv head `g`, in place (f32 caches only).
    #[inline(always)]
    pub(crate) fn f32_row(&self, half: Half, t: usize, g: usize) -> &[f32] {
        let (row, hd, bt) = (self.row(), self.dims.head_dim, self.spec.block_tokens);
        let BlockData::F32(d) = &self.blocks[t / bt].data else {
            panic!("f32_row on a {} cache", self.spec.dtype.name());
        };
        let base = match half {
            Half::Keys => 0,
            Half::Values => self.half_len(),
        };
        let at = base + (t % bt) * row + g * hd;
        &d[at..at + hd]
    }

    /// Every key and value, decoded, as `[len, kv_heads, head_dim]` each.
    pub fn to_host(&self) -> KvCacheHost {
        let (nkv, hd) = (self.dims.num_kv_heads, self.dims.head_dim);
        let mut keys = vec![0f32; self.len * nkv * hd];
        let mut values = vec![0f32; self.len * nkv * hd];
        for (half, out) in [(Half::Keys, &mut keys), (Half::Values, &mut values)] {
            for g in 0..nkv {
                let head = self.head_f32(half, g);
                for t in 0..self.len {
                    out[(t * nkv + g) * hd..(t * nkv + g + 1) * hd]
                        .copy_from_slice(&head[t * hd..(t + 1) * hd]);
                }
            }
        }
        KvCacheHost {
            len: self.len,
            keys,
            values,
        }
    }

    /// The blocks as stored (element bytes little-endian, unused slots zero).
    pub fn export_blocks(&self) -> KvBlocksHost {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let data = match &b.data {
                    BlockData::F32(d) => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    BlockData::BF16(d) => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    BlockData::Fp8(d) => d.to_vec(),
                };
                KvBlockHost {
                    key_scale: b.key_scale,
                    value_scale: b.value_scale,
                    data,
                }
            })
            .collect();
        KvBlocksHost {
            spec: self.spec,
            len: self.len,
            blocks,
        }
    }

    /// A cache holding `host`'s blocks, which must match `dims` and `spec` exactly.
    pub(crate) fn import_blocks(
        dims: &AttentionDims,
        host: &KvBlocksHost,
        counter: BlockCounter,
    ) -> Result<Self, String> {
        let spec = host.spec;
        if spec.block_tokens == 0 {
            return Err("blocks of 0 tokens".into());
        }
        let mut c = CpuKvCache::new(dims, &spec, counter);
        let want_blocks = spec.blocks_for(host.len);
        if host.blocks.len() != want_blocks {
            return Err(format!(
                "{} tokens in blocks of {} need {want_blocks} blocks, got {}",
                host.len,
                spec.block_tokens,
                host.blocks.len()
            ));
        }
        let elems = 2 * c.half_len();
        let want_bytes = elems * spec.dtype.size();
        for (i, b) in host.blocks.iter().enumerate() {
            if b.data.len() != want_bytes {
                return Err(format!(
                    "block {i} has {} bytes, a {} block of {} tokens × {} values has {want_bytes}",
                    b.data.len(),
                    spec.dtype.name(),
                    spec.block_tokens,
                    2 * c.row()
                ));
            }
            if !(b.key_scale.is_finite() && b.value_scale.is_finite()) {
                return Err(format!("block {i} has a non-finite scale"));
            }
            let data = match spec.dtype {
                KvDtype::F32 => BlockData::F32(
                    b.data
                        .chunks_exact(4)
                        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                        .collect(),
                ),
                KvDtype::BF16 => BlockData::BF16(
                    b.data
                        .chunks_exact(2)
                        .map(|x| bf16::from_le_bytes([x[0], x[1]]))
                        .collect(),
                ),
                KvDtype::Fp8E4M3 => BlockData::Fp8(b.data.clone().into_boxed_slice()),
            };
            c.counter.add(1);
            c.blocks.push(Block {
                data,
                key_scale: b.key_scale,
                value_scale: b.value_scale,
            });
        }
        c.len = host.len;
        Ok(c)
    }

    /// Drops tokens past `len`, giving back blocks no longer needed.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        let keep = self.spec.blocks_for(len);
        let freed = self.blocks.len() - keep;
        self.blocks.truncate(keep);
        self.counter.sub(freed);
        // Slots past the end of the last block are zeroed so a later append sees a clean block.
        let (row, half) = (self.row(), self.half_len());
        if let Some(last) = self.blocks.last_mut() {
            let from = len % self.spec.block_tokens;
            if from > 0 {
                match &mut last.data {
                    BlockData::F32(d) => {
                        d[from * row..half].fill(0.0);
                        d[half + from * row..].fill(0.0);
                    }
                    BlockData::BF16(d) => {
                        d[from * row..half].fill(bf16::ZERO);
                        d[half + from * row..].fill(bf16::ZERO);
                    }
                    BlockData::Fp8(d) => {
                        d[from * row..half].fill(0);
                        d[half + from * row..].fill(0);
                    }
                }
            }
        }
        self.len = len;
    }

    /// Bytes of the blocks held.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.spec.block_bytes(self.row())
    }
}

impl Drop for CpuKvCache {
    fn drop(&mut self) {
        self.counter.sub(self.blocks.len());
    }
}

/// Appends `new` to an fp8 half whose first `used` codes are filled (`d` ends after the new
/// codes), re-encoding the old codes first if `new` needs a larger scale; returns the scale.
fn append_fp8(d: &mut [u8], used: usize, new: &[f32], scale: f32) -> f32 {
    let amax = new.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut scale = scale;
    if used == 0 {
        scale = fp8_scale_for(amax);
    } else if amax / scale > FP8_E4M3_MAX {
        let wider = fp8_scale_for(amax);
        for c in d[..used].iter_mut() {
            *c = f32_to_e4m3(E4M3_TO_F32[*c as usize] * scale / wider);
        }
        scale = wider;
    }
    let inv = 1.0 / scale;
    for (o, x) in d[used..].iter_mut().zip(new) {
        *o = f32_to_e4m3(x * inv);
    }
    scale
}
