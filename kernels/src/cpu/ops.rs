//! Row-wise and element-wise kernels: RMSNorm (plain and fused with the residual add),
//! residual add, SwiGLU, the sigmoid-gated add of the shared expert.
//!
//! Each kernel is written once for a block of rows and run per ISA; large inputs are split
//! into row blocks across the pool.

use super::isa::{Isa, multiversion};
use super::pool::{Pool, SharedMut};
use super::vmath;

/// Element count above which row-wise kernels split rows across threads.
const PARALLEL_ELEMS: usize = 1 << 15;

/// Runs `f(first_row, rows)` over blocks of rows, in parallel when the tensor is large.
pub fn for_row_blocks(
    pool: &Pool,
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) + Sync + Send,
) {
    if rows * cols < PARALLEL_ELEMS || rows < 2 {
        f(0, rows);
        return;
    }
    let blocks = (pool.threads() * 4).min(rows);
    let per = rows.div_ceil(blocks);
    pool.for_each(rows.div_ceil(per), |b| {
        let r0 = b * per;
        f(r0, per.min(rows - r0));
    });
}

multiversion! {
    /// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) * w` for each row of a block.
    pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let cols = w.len();
        for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            let inv = 1.0 / (vmath::sum_squares(xr) / cols as f32 + eps).sqrt();
            for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
                *o = xv * inv * wv;
            }
        }
    }
}

multiversion! {
    /// `h[r] += d[r]; out[r] = rms_norm(h[r])` for each row of a block.
    pub fn add_rms_norm_rows(h: &mut [f32], d: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let cols = w.len();
        for ((hr, dr), or) in h.chunks_exact_mut(cols).zip(d.chunks_exact(cols)).zip(out.chunks_exact_mut(cols)) {
            vmath::add_assign(hr, dr);
            let inv = 1.0 / (vmath::sum_squares(hr) / cols as f32 + eps).sqrt();
            for ((o, xv), wv) in or.iter_mut().zip(hr.iter()).zip(w) {
                *o = xv * inv * wv;
            }
        }
    }
}

multiversion! {
    /// `out[r, j] = silu(gu[r, j]) * gu[r, inter + j]` for a block of rows.
    pub fn swiglu_rows(gu: &[f32], gu_cols: usize, inter: usize, out: &mut [f32]) {
        for (g, o) in gu.chunks_exact(gu_cols).zip(out.chunks_exact_mut(inter)) {
            let (gate, rest) = g.split_at(inter);
            for ((ov, gv), uv) in o.iter_mut().zip(gate).zip(&rest[..inter]) {
                *ov = vmath::silu(*gv) * uv;
            }
        }
    }
}

multiversion! {
    /// `y += x` element-wise.
    pub fn add_slices(y: &mut [f32], x: &[f32]) {
        vmath::add_assign(y, x);
    }
}

/// Row-parallel RMSNorm.
pub fn rms_norm(pool: &Pool, isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let cols = w.len();
    let rows = x.len() / cols;
    let o = SharedMut::new(out);
    for_row_blocks(pool, rows, cols, |r0, n| {
        // SAFETY: row blocks are disjoint and inside `out`.
        let dst = unsafe { o.slice(r0 * cols, n * cols) };
        rms_norm_rows(isa, &x[r0 * cols..(r0 + n) * cols], w, eps, dst);
    });
}

/// Row-parallel fused residual add + RMSNorm.
pub fn add_rms_norm(
    pool: &Pool,
    isa: Isa,
    h: &mut [f32],
    d: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let cols = w.len();
    let rows = h.len() / cols;
    let (hp, o) = (SharedMut::new(h), SharedMut::new(out));
    for_row_blocks(pool, rows, cols, |r0, n| {
        // SAFETY: row blocks are disjoint and inside `h` and `out`.
        let (hs, os) = unsafe { (hp.slice(r0 * cols, n * cols), o.slice(r0 * cols, n * cols)) };
        add_rms_norm_rows(isa, hs, &d[r0 * cols..(r0 + n) * cols], w, eps, os);
    });
}

/// Row-parallel SwiGLU over the first `2·inter` columns of `gu`.
pub fn swiglu(pool: &Pool, isa: Isa, gu: &[f32], gu_cols: usize, inter: usize, out: &mut [f32]) {
    let rows = out.len() / inter;
    let o = SharedMut::new(out);
    for_row_blocks(pool, rows, gu_cols, |r0, n| {
        // SAFETY: row blocks are disjoint and inside `out`.
        let dst = unsafe { o.slice(r0 * inter, n * inter) };
        swiglu_rows(
            isa,
            &gu[r0 * gu_cols..(r0 + n) * gu_cols],
            gu_cols,
            inter,
            dst,
        );
    });
}

/// `acc[r] += sigmoid(gate[r * gate_cols + gate_col]) * x[r]`.
pub fn add_sigmoid_gated(
    acc: &mut [f32],
    x: &[f32],
    cols: usize,
    gate: &[f32],
    gate_cols: usize,
    gate_col: usize,
) {
    for (r, (ar, xr)) in acc
        .chunks_exact_mut(cols)
        .zip(x.chunks_exact(cols))
        .enumerate()
    {
        let s = 1.0 / (1.0 + (-gate[r * gate_cols + gate_col]).exp());
        for (a, v) in ar.iter_mut().zip(xr) {
            *a += s * v;
        }
    }
}
