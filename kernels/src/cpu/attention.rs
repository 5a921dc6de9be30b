//! The gated full-attention mixer on the CPU (spec §2.4), up to `o_proj`.
//!
//! 1. Per token: split the fused projection, zero-centred RMSNorm on each q and k head, partial
//!    RoPE on both; keys and values are appended to each sequence's cache.
//! 2. Per (sequence, head): causal softmax attention over the cache. A few new tokens (decode)
//!    use direct dot products; longer spans (prefill) use blocked GEMMs against the packed keys
//!    and transposed values with an online softmax, so cost stays at GEMM speed and memory at
//!    one block of scores per task.
//! 3. The output of each head is scaled by `sigmoid(gate)` of the same head.

use super::gemm::{Precision, gemm};
use super::isa::{Isa, multiversion};
use super::kv_cache::{CpuKvCache, Half};
use super::packed::PackedMatrix;
use super::pool::{Pool, SharedMut};
use super::{rope, vmath};
use crate::{AttentionDims, SeqSpan, WeightDtype};

/// Spans up to this many tokens attend with direct dot products.
const DIRECT_MAX: usize = 8;
/// Query positions per prefill task.
const BLOCK_Q: usize = 64;
/// Keys per online-softmax step (a multiple of the panel width).
const BLOCK_K: usize = 256;
/// Keys per flash-decoding split: a direct query's attention over a longer cache runs as one
/// task per chunk of this many keys, merged by their softmax statistics, so one sequence at a
/// long context keeps every worker busy. Chunks are fixed by key position, so results never
/// depend on the thread count, the batch or the block size.
const KV_SPLIT: usize = 2048;

/// Everything one call needs besides the projections.
pub struct AttentionArgs<'a> {
    pub dims: AttentionDims,
    /// `1 + q_norm.weight`, `[head_dim]`.
    pub q_norm: &'a [f32],
    /// `1 + k_norm.weight`, `[head_dim]`.
    pub k_norm: &'a [f32],
    /// Rounding of the prefill attention GEMM inputs (q·kᵀ and p·v).
    pub precision: Precision,
}

multiversion! {
    /// Normalises, rotates and splits a block of projected rows into `q [rows, nh, hd]`,
    /// `k [rows, nkv, hd]`, `v [rows, nkv, hd]`. `positions[i]` is row i's position.
    fn prepare_rows(
        dims: &AttentionDims,
        q_norm: &[f32],
        k_norm: &[f32],
        inv_freq: &[f32],
        rope_scale: f32,
        proj: &[f32],
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
    ) {
        let (nh, nkv, hd) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
        let pw = dims.proj_dim();
        let half = inv_freq.len();
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (i, &pos) in positions.iter().enumerate() {
            let row = &proj[i * pw..(i + 1) * pw];
            rope::angles(pos, inv_freq, rope_scale, &mut cos, &mut sin);
            for h in 0..nh {
                let dst = &mut q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
                norm_into(&row[h * 2 * hd..h * 2 * hd + hd], q_norm, dims.norm_eps, dst);
                rope::apply(dst, &cos, &sin);
            }
            let k0 = 2 * nh * hd;
            let v0 = k0 + nkv * hd;
            for g in 0..nkv {
                let dst = &mut k[(i * nkv + g) * hd..(i * nkv + g + 1) * hd];
                norm_into(&row[k0 + g * hd..k0 + (g + 1) * hd], k_norm, dims.norm_eps, dst);
                rope::apply(dst, &cos, &sin);
            }
            v[i * nkv * hd..(i + 1) * nkv * hd].copy_from_slice(&row[v0..v0 + nkv * hd]);
        }
    }
}

#[inline(always)]
fn norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (vmath::sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * inv * wv;
    }
}

multiversion! {
    /// One query row of one head against keys `k0..k1` of kv head `g`: writes the
    /// unnormalised `Σ exp(s_j − m) v_j` into `acc` and returns `(m, Σ exp(s_j − m))`.
    fn attend_partial(
        q: &[f32],
        cache: &CpuKvCache,
        g: usize,
        k0: usize,
        k1: usize,
        scale: f32,
        acc: &mut [f32],
    ) -> (f32, f32) {
        let hd = q.len();
        let bt = cache.block_tokens();
        let mut scores = vec![0f32; k1 - k0];
        let mut scratch = Vec::new();
        let mut t = k0;
        while t < k1 {
            let (b, from) = (t / bt, t % bt);
            let to = bt.min(from + (k1 - t));
            let (rows, stride, off) = cache.head_rows(b, Half::Keys, g, from, to, &mut scratch);
            for (j, s) in scores[t - k0..t - k0 + (to - from)].iter_mut().enumerate() {
                *s = vmath::dot(q, &rows[j * stride + off..j * stride + off + hd]) * scale;
            }
            t += to - from;
        }
        let m = vmath::max(&scores);
        for s in scores.iter_mut() {
            *s = vmath::exp(*s - m);
        }
        let l = vmath::sum(&scores);
        acc.fill(0.0);
        let mut t = k0;
        while t < k1 {
            let (b, from) = (t / bt, t % bt);
            let to = bt.min(from + (k1 - t));
            let (rows, stride, off) = cache.head_rows(b, Half::Values, g, from, to, &mut scratch);
            vmath::accumulate_rows(acc, &scores[t - k0..t - k0 + (to - from)], &rows[off..], stride);
            t += to - from;
        }
        (m, l)
    }
}

multiversion! {
    /// One online-softmax step for a query block: `s` holds raw scores `[rows, width]` (row
    /// stride `ld`) against keys starting at `k0`; rescales running maxima `m`, sums `l` and
    /// accumulators `acc [rows, hd]`, and turns `s` into probabilities in place.
    fn softmax_step(
        s: &mut [f32],
        ld: usize,
        rows: usize,
        width: usize,
        k0: usize,
        first_pos: usize,
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        hd: usize,
    ) {
        for r in 0..rows {
            let row = &mut s[r * ld..r * ld + width];
            // Keys past this query's position are masked out.
            let visible = (first_pos + r + 1).saturating_sub(k0).min(width);
            for v in row[..visible].iter_mut() {
                *v *= scale;
            }
            let bm = vmath::max(&row[..visible]);
            let m_new = m[r].max(bm);
            let corr = vmath::exp(m[r] - m_new);
            for v in row[..visible].iter_mut() {
                *v = vmath::exp(*v - m_new);
            }
            row[visible..].fill(0.0);
            l[r] = l[r] * corr + vmath::sum(&row[..visible]);
            m[r] = m_new;
            vmath::scale(&mut acc[r * hd..(r + 1) * hd], corr);
        }
    }
}

multiversion! {
    /// `out = sigmoid(gate) ⊙ acc / l` for a block of rows.
    fn finish_rows(
        acc: &[f32],
        l: &[f32],
        hd: usize,
        gate: &[f32],
        gate_stride: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for (r, lr) in l.iter().enumerate() {
            let inv = 1.0 / lr;
            let g = &gate[r * gate_stride..r * gate_stride + hd];
            let o = &mut out[r * out_stride..r * out_stride + hd];
            for ((ov, av), gv) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]).zip(g) {
                *ov = av * inv * vmath::sigmoid(*gv);
            }
        }
    }
}

/// Runs the mixer for a packed batch. `proj` is `[n, dims.proj_dim()]`, `out` is
/// `[n, nh · hd]`.
pub fn gated_attention(
    pool: &Pool,
    isa: Isa,
    args: &AttentionArgs<'_>,
    proj: &[f32],
    spans: &[SeqSpan],
    caches: &mut [&mut CpuKvCache],
    out: &mut [f32],
) {
    let dims = args.dims;
    let (nh, nkv, hd) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
    let n = proj.len() / dims.proj_dim();
    assert_eq!(spans.len(), caches.len(), "one cache per span");
    assert_eq!(out.len(), n * nh * hd, "attention output shape");

    // 1. q/k norm + RoPE, split into q, k, v.
    let mut positions = vec![0usize; n];
    for (s, c) in spans.iter().zip(caches.iter()) {
        assert_eq!(
            c.len, s.past,
            "KV cache length must equal the span's past tokens"
        );
        for i in 0..s.len {
            positions[s.start + i] = s.past + i;
        }
    }
    let (inv_freq, rope_scale) =
        crate::rope::frequencies(dims.rotary_dim, dims.rope_theta, dims.yarn.as_ref());
    let mut q = vec![0f32; n * nh * hd];
    let mut k = vec![0f32; n * nkv * hd];
    let mut v = vec![0f32; n * nkv * hd];
    {
        let (qp, kp, vp) = (
            SharedMut::new(&mut q),
            SharedMut::new(&mut k),
            SharedMut::new(&mut v),
        );
        super::ops::for_row_blocks(pool, n, dims.proj_dim(), |r0, rows| {
            // SAFETY: disjoint row blocks of q, k, v.
            let (qs, ks, vs) = unsafe {
                (
                    qp.slice(r0 * nh * hd, rows * nh * hd),
                    kp.slice(r0 * nkv * hd, rows * nkv * hd),
                    vp.slice(r0 * nkv * hd, rows * nkv * hd),
                )
            };
            prepare_rows(
                isa,
                &dims,
                args.q_norm,
                args.k_norm,
                &inv_freq,
                rope_scale,
                &proj[r0 * dims.proj_dim()..(r0 + rows) * dims.proj_dim()],
                &positions[r0..r0 + rows],
                qs,
                ks,
                vs,
            );
        });
    }

    // 2. Append to the caches.
    for (s, c) in spans.iter().zip(caches.iter_mut()) {
        let row = nkv * hd;
        c.append(
            &k[s.start * row..(s.start + s.len) * row],
            &v[s.start * row..(s.start + s.len) * row],
        );
    }

    // 3. Attention.
    let group = nh / nkv;
    let pw = dims.proj_dim();
    let out_ptr = SharedMut::new(out);
    let caches: Vec<&CpuKvCache> = caches.iter().map(|c| &**c).collect();
    let scale = 1.0 / (hd as f32).sqrt();

    // Direct spans (decode): one task per (span, head, query row, chunk of keys); each
    // writes its softmax statistics and unnormalised sum, then one task per (span, head, row)
    // merges its chunks in order.
    let mut items: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
    let mut groups: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (si, s) in spans.iter().enumerate() {
        if s.len > DIRECT_MAX {
            continue;
        }
        for h in 0..nh {
            for i in 0..s.len {
                let n = s.past + i + 1;
                groups.push((si, h, i, items.len()));
                for k0 in (0..n).step_by(KV_SPLIT) {
                    items.push((si, h, i, k0, (k0 + KV_SPLIT).min(n)));
                }
            }
        }
    }
    let stride = hd + 2;
    let mut partials = vec![0f32; items.len() * stride];
    {
        let parts = SharedMut::new(&mut partials);
        pool.for_each(items.len(), |t| {
            let (si, h, i, k0, k1) = items[t];
            let row = spans[si].start + i;
            // SAFETY: one region per item.
            let p = unsafe { parts.slice(t * stride, stride) };
            let (acc, ml) = p.split_at_mut(hd);
            let (m, l) = attend_partial(
                isa,
                &q[(row * nh + h) * hd..(row * nh + h + 1) * hd],
                caches[si],
                h / group,
                k0,
                k1,
                scale,
                acc,
            );
            ml[0] = m;
            ml[1] = l;
        });
    }
    pool.for_each(groups.len(), |t| {
        let (si, h, i, first) = groups[t];
        let end = groups.get(t + 1).map_or(items.len(), |g| g.3);
        let row = spans[si].start + i;
        let mut o = vec![0f32; hd];
        let l = merge_partials(&partials[first * stride..end * stride], hd, &mut o);
        let inv = 1.0 / l;
        let gate = &proj[row * pw + h * 2 * hd + hd..row * pw + h * 2 * hd + 2 * hd];
        for (ov, gv) in o.iter_mut().zip(gate) {
            *ov *= inv * vmath::sigmoid(*gv);
        }
        // SAFETY: row `row`, columns of head h: disjoint across tasks.
        unsafe { scatter_rows(out_ptr, row, nh * hd, h * hd, &o, hd) };
    });

    // Prefill spans: pack keys and transposed values per (span, kv head), then one task per
    // (span, head, query block).
    let blocked: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].len > DIRECT_MAX)
        .collect();
    if blocked.is_empty() {
        return;
    }
    let dtype = match args.precision {
        Precision::F32 => WeightDtype::F32,
        Precision::Bf16 => WeightDtype::BF16,
    };
    let mut packed: Vec<Option<(PackedMatrix, PackedMatrix)>> = Vec::new();
    packed.resize_with(blocked.len() * nkv, || None);
    {
        let slots = SharedMut::new(&mut packed);
        pool.for_each(blocked.len() * nkv, |t| {
            let (bi, g) = (t / nkv, t % nkv);
            let c = caches[blocked[bi]];
            let (kp, vt) = if c.is_f32() {
                let key = |j: usize| c.f32_row(Half::Keys, j, g);
                let val = |j: usize| c.f32_row(Half::Values, j, g);
                (
                    PackedMatrix::from_f32_rows(c.len, hd, dtype, key),
                    PackedMatrix::from_f32_transposed(hd, c.len, dtype, val),
                )
            } else {
                let (keys, values) = (c.head_f32(Half::Keys, g), c.head_f32(Half::Values, g));
                let key = |j: usize| &keys[j * hd..(j + 1) * hd];
                let val = |j: usize| &values[j * hd..(j + 1) * hd];
                (
                    PackedMatrix::from_f32_rows(c.len, hd, dtype, key),
                    PackedMatrix::from_f32_transposed(hd, c.len, dtype, val),
                )
            };
            // SAFETY: one slot per task.
            unsafe { slots.slice(t, 1)[0] = Some((kp, vt)) };
        });
    }
    let mut tasks = Vec::new();
    for (bi, &si) in blocked.iter().enumerate() {
        for h in 0..nh {
            for b0 in (0..spans[si].len).step_by(BLOCK_Q) {
                tasks.push((bi, si, h, b0));
            }
        }
    }
    pool.for_each(tasks.len(), |t| {
        let (bi, si, h, b0) = tasks[t];
        let s = spans[si];
        let Some((kp, vt)) = &packed[bi * nkv + h / group] else {
            return;
        };
        let rows = BLOCK_Q.min(s.len - b0);
        let first_pos = s.past + b0;
        let kmax = first_pos + rows;
        let mut scores = vec![0f32; rows * BLOCK_K];
        let mut acc = vec![0f32; rows * hd];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let q_rows = &q[((s.start + b0) * nh + h) * hd..];
        let mut k0 = 0;
        while k0 < kmax {
            let width = BLOCK_K.min(kmax - k0);
            gemm(
                isa,
                args.precision,
                rows,
                q_rows,
                nh * hd,
                kp.view().rows(k0, width),
                &mut scores,
                BLOCK_K,
                false,
            );
            softmax_step(
                isa,
                &mut scores,
                BLOCK_K,
                rows,
                width,
                k0,
                first_pos,
                scale,
                &mut m,
                &mut l,
                &mut acc,
                hd,
            );
            gemm(
                isa,
                args.precision,
                rows,
                &scores,
                BLOCK_K,
                vt.view().cols(k0, width),
                &mut acc,
                hd,
                true,
            );
            k0 += width;
        }
        let row0 = s.start + b0;
        let mut o = vec![0f32; rows * hd];
        finish_rows(
            isa,
            &acc,
            &l,
            hd,
            &proj[row0 * pw + h * 2 * hd + hd..],
            pw,
            &mut o,
            hd,
        );
        // SAFETY: rows of this query block, columns of head h: disjoint across tasks.
        unsafe { scatter_rows(out_ptr, row0, nh * hd, h * hd, &o, hd) };
    });
}

/// Merges the partial results of one query's key chunks (each `[acc (hd) | m | l]`, in key
/// order) into `out` and returns the merged softmax denominator. One chunk is taken as it is,
/// so a short cache gives exactly the unsplit result.
fn merge_partials(parts: &[f32], hd: usize, out: &mut [f32]) -> f32 {
    let stride = hd + 2;
    if parts.len() == stride {
        out.copy_from_slice(&parts[..hd]);
        return parts[hd + 1];
    }
    let m = parts
        .chunks_exact(stride)
        .fold(f32::NEG_INFINITY, |m, p| m.max(p[hd]));
    let mut l = 0.0;
    out.fill(0.0);
    for p in parts.chunks_exact(stride) {
        let w = (p[hd] - m).exp();
        l += p[hd + 1] * w;
        for (o, a) in out.iter_mut().zip(&p[..hd]) {
            *o += a * w;
        }
    }
    l
}

/// Copies `src` (rows of `width`) into rows `row0..` of `dst` (row stride `stride`) at
/// column `col0`.
///
/// # Safety
/// The destination cells must be inside the buffer and written by no other task.
unsafe fn scatter_rows(
    dst: SharedMut<f32>,
    row0: usize,
    stride: usize,
    col0: usize,
    src: &[f32],
    width: usize,
) {
    for (i, r) in src.chunks_exact(width).enumerate() {
        // SAFETY: forwarded from the caller.
        unsafe {
            std::ptr::copy_nonoverlapping(
                r.as_ptr(),
                dst.ptr().add((row0 + i) * stride + col0),
                width,
            )
        };
    }
}
