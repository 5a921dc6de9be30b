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

/// `Σ a[i]·b[i]` for attention scores: two 8-wide accumulators, summed in a fixed order.
/// On x86-64 with AVX2 it is written with intrinsics: LLVM vectorises a generic dot only two
/// lanes wide inside the decode loop (its cost model pairs up keys instead), which made decode
/// attention at long contexts compute-bound at a fraction of the memory roofline.
#[inline(always)]
fn score_dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa::Avx2` and above are handed out only after runtime detection of AVX2
        // and FMA (`Isa::detect`); both slices hold at least `n` elements.
        return unsafe { dot_avx2(&a[..n], &b[..n]) };
    }
    let _ = isa;
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut i = 0;
    while i + 16 <= n {
        for l in 0..16 {
            acc[l] = a[i + l].mul_add(b[i + l], acc[l]);
        }
        i += 16;
    }
    let mut t = [0f32; 8];
    for l in 0..8 {
        t[l] = acc[l] + acc[8 + l];
    }
    let mut s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for j in i..n {
        s = a[j].mul_add(b[j], s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, the length of both slices.
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
        }
        i += 16;
    }
    let mut t = [0f32; 8];
    // SAFETY: `t` holds 8 floats.
    unsafe { _mm256_storeu_ps(t.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    let mut s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for j in i..n {
        s = a[j].mul_add(b[j], s);
    }
    s
}

#[inline(always)]
fn norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (vmath::sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * inv * wv;
    }
}

multiversion! {
    /// One query row of every head (`q` is `[num_heads, hd]`) against keys `k0..k1`, block
    /// by block: each block is read once for all heads (its kv heads in turn, each for the
    /// query heads of its GQA group), so the KV streams through the cache once. For head `h`,
    /// writes `[Σ exp(s_j − m) v_j (hd) | m | Σ exp(s_j − m)]` into `out[h·(hd+2) ..]`.
    fn attend_partial(
        isa: Isa,
        q: &[f32],
        hd: usize,
        cache: &CpuKvCache,
        k0: usize,
        k1: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let heads = q.len() / hd;
        let nkv = cache.dims.num_kv_heads;
        let group = heads / nkv;
        let n = k1 - k0;
        let bt = cache.block_tokens();
        let mut scores = vec![0f32; heads * n];
        let mut scratch = Vec::new();
        let mut t = k0;
        while t < k1 {
            let (b, from) = (t / bt, t % bt);
            let to = bt.min(from + (k1 - t));
            for g in 0..nkv {
                let (rows, stride, off) =
                    cache.head_rows(b, Half::Keys, g, from, to, &mut scratch);
                // Heads outer: the block's keys stay in L1 across the group's heads.
                for h in g * group..(g + 1) * group {
                    let qh = &q[h * hd..(h + 1) * hd];
                    let dst = &mut scores[h * n + t - k0..h * n + t - k0 + (to - from)];
                    for (j, sc) in dst.iter_mut().enumerate() {
                        let key = &rows[j * stride + off..j * stride + off + hd];
                        *sc = score_dot(isa, qh, key) * scale;
                    }
                }
            }
            t += to - from;
        }
        let w = hd + 2;
        for h in 0..heads {
            let s = &mut scores[h * n..(h + 1) * n];
            let m = vmath::max(s);
            for v in s.iter_mut() {
                *v = vmath::exp(*v - m);
            }
            out[h * w + hd] = m;
            out[h * w + hd + 1] = vmath::sum(s);
            out[h * w..h * w + hd].fill(0.0);
        }
        let mut t = k0;
        while t < k1 {
            let (b, from) = (t / bt, t % bt);
            let to = bt.min(from + (k1 - t));
            for g in 0..nkv {
                let (rows, stride, off) =
                    cache.head_rows(b, Half::Values, g, from, to, &mut scratch);
                for h in g * group..(g + 1) * group {
                    let c = &scores[h * n + t - k0..h * n + t - k0 + (to - from)];
                    vmath::accumulate_rows(&mut out[h * w..h * w + hd], c, &rows[off..], stride);
                }
            }
            t += to - from;
        }
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

    // Direct spans (decode): one task per (span, query row, chunk of keys) for every head
    // (the chunk's keys and values are read once, not once per head); each writes its
    // softmax statistics and unnormalised sums, then one task per (span, row, head) merges
    // its chunks in order.
    let mut items: Vec<(usize, usize, usize, usize)> = Vec::new();
    // (span, row, first item, items)
    let mut rows_of: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (si, s) in spans.iter().enumerate() {
        if s.len > DIRECT_MAX {
            continue;
        }
        for i in 0..s.len {
            let n = s.past + i + 1;
            let first = items.len();
            for k0 in (0..n).step_by(KV_SPLIT) {
                items.push((si, i, k0, (k0 + KV_SPLIT).min(n)));
            }
            rows_of.push((si, i, first, items.len() - first));
        }
    }
    let w = hd + 2;
    let per_item = nh * w;
    let mut partials = vec![0f32; items.len() * per_item];
    {
        let parts = SharedMut::new(&mut partials);
        pool.for_each(items.len(), |t| {
            let (si, i, k0, k1) = items[t];
            let row = spans[si].start + i;
            // SAFETY: one region per item.
            let p = unsafe { parts.slice(t * per_item, per_item) };
            attend_partial(
                isa,
                isa,
                &q[row * nh * hd..(row + 1) * nh * hd],
                hd,
                caches[si],
                k0,
                k1,
                scale,
                p,
            );
        });
    }
    pool.for_each(rows_of.len() * nh, |t| {
        let (si, i, first, count) = rows_of[t / nh];
        let h = t % nh;
        let row = spans[si].start + i;
        let mut o = vec![0f32; hd];
        let chunks = (first..first + count).map(|it| {
            let at = it * per_item + h * w;
            &partials[at..at + w]
        });
        let l = merge_partials(chunks, hd, &mut o);
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
fn merge_partials<'a>(
    parts: impl ExactSizeIterator<Item = &'a [f32]> + Clone,
    hd: usize,
    out: &mut [f32],
) -> f32 {
    if parts.len() == 1 {
        let p = parts.clone().next().unwrap_or(&[]);
        out.copy_from_slice(&p[..hd]);
        return p[hd + 1];
    }
    let m = parts.clone().fold(f32::NEG_INFINITY, |m, p| m.max(p[hd]));
    let mut l = 0.0;
    out.fill(0.0);
    for p in parts {
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
