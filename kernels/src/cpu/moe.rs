//! Routing and grouped routed experts on the CPU (spec §2.5).
//!
//! Routing: softmax over all experts in f32, top-k, optional renormalisation. Experts: the
//! (row, expert) pairs are grouped by expert so that all rows routed to one expert are one GEMM
//! against its gate/up weight and one against its down weight; each pair's output lands in its
//! own row of a scratch buffer, and the combine then sums every row's pairs in route order, so
//! the result is the same whatever order tasks finish in.

use super::gemm::{Precision, gemm};
use super::isa::{Isa, multiversion};
use super::packed::PackedMatrix;
use super::pool::{Pool, SharedMut};
use super::vmath;
use crate::{KernelError, Routes};

/// Rows of one expert handled by one task (larger groups are split).
const ROWS_PER_TASK: usize = 128;

/// Softmax + top-k (+ renormalisation) per row of `logits [rows, experts]`.
pub fn route(logits: &[f32], experts: usize, k: usize, renormalize: bool) -> Routes {
    let rows = logits.len() / experts;
    let k = k.min(experts);
    let mut routes = Routes::with_capacity(rows, rows * k);
    let mut ids: Vec<u32> = Vec::with_capacity(k + 1);
    let mut weights = vec![0f32; k];
    for row in logits.chunks_exact(experts) {
        // Top-k by logit (softmax is monotonic); ties keep the lower expert id first.
        ids.clear();
        for (e, &x) in row.iter().enumerate() {
            if ids.len() == k && x <= row[ids[k - 1] as usize] {
                continue;
            }
            let pos = ids
                .iter()
                .position(|&i| x > row[i as usize])
                .unwrap_or(ids.len());
            ids.insert(pos, e as u32);
            ids.truncate(k);
        }
        let m = row[ids[0] as usize];
        let total: f64 = if renormalize {
            ids.iter()
                .map(|&i| f64::from((row[i as usize] - m).exp()))
                .sum()
        } else {
            row.iter().map(|&x| f64::from((x - m).exp())).sum()
        };
        for (w, &i) in weights.iter_mut().zip(&ids) {
            *w = ((row[i as usize] - m).exp() as f64 / total) as f32;
        }
        routes.push_row(&ids, &weights);
    }
    routes
}

/// One expert's packed weights.
pub struct CpuExpert<'a> {
    pub gate_up: &'a PackedMatrix,
    pub down: &'a PackedMatrix,
}

multiversion! {
    /// `out[r] = Σ_j w_j · y[slot[p_j]]` for a block of rows, over each row's pairs `p_j` in
    /// route order (`offsets[r]..offsets[r+1]` index `weights` and `slots`).
    fn combine_rows(y: &[f32], h: usize, offsets: &[usize], weights: &[f32], slots: &[usize], out: &mut [f32]) {
        for (r, o) in out.chunks_exact_mut(h).enumerate() {
            o.fill(0.0);
            for p in offsets[r]..offsets[r + 1] {
                let s = slots[p];
                vmath::axpy(o, weights[p], &y[s * h..(s + 1) * h]);
            }
        }
    }
}

/// `out[r] = Σ w · Expert(x[r])` over each row's routed pairs. `x` and `out` are `[rows, h]`.
///
/// Pairs are ordered by expert (row order within an expert), so each task's outputs are one
/// contiguous block of the scratch buffer that its down-projection writes directly.
pub fn experts<'w>(
    pool: &Pool,
    isa: Isa,
    precision: Precision,
    x: &[f32],
    h: usize,
    routes: &Routes,
    lookup: &(dyn Fn(u32) -> Option<CpuExpert<'w>> + Sync),
    out: &mut [f32],
) -> Result<(), KernelError> {
    let rows = routes.rows();
    assert_eq!(x.len(), rows * h, "expert input shape");
    assert_eq!(out.len(), rows * h, "expert output shape");
    if rows == 0 {
        return Ok(());
    }
    let experts = routes.experts();
    // order[slot] = pair index, sorted by expert; slots[pair] = its slot.
    let mut order: Vec<usize> = (0..routes.pairs()).collect();
    order.sort_by_key(|&p| experts[p]);
    let mut slots = vec![0usize; order.len()];
    for (slot, &p) in order.iter().enumerate() {
        slots[p] = slot;
    }
    let mut pair_row = vec![0usize; routes.pairs()];
    for r in 0..rows {
        for p in routes.row_range(r) {
            pair_row[p] = r;
        }
    }
    // Tasks: runs of one expert's slots, at most ROWS_PER_TASK long.
    let mut tasks: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let e = experts[order[start]];
        if lookup(e).is_none() {
            return Err(KernelError::MissingExpert { expert: e });
        }
        let mut end = start;
        while end < order.len() && experts[order[end]] == e && end - start < ROWS_PER_TASK {
            end += 1;
        }
        tasks.push((e, start..end));
        start = end;
    }
    // Heaviest tasks first so the tail of the parallel loop is short.
    tasks.sort_by_key(|(_, r)| std::cmp::Reverse(r.len()));
    let mut y = vec![0f32; routes.pairs() * h];
    let y_ptr = SharedMut::new(&mut y);
    pool.for_each(tasks.len(), |t| {
        let (e, range) = &tasks[t];
        let Some(w) = lookup(*e) else { return };
        let m = range.len();
        let inter = w.down.k;
        let mut xs = vec![0f32; m * h];
        for (i, &p) in order[range.clone()].iter().enumerate() {
            let r = pair_row[p];
            xs[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut gu = vec![0f32; m * 2 * inter];
        gemm(
            isa,
            precision,
            m,
            &xs,
            h,
            w.gate_up.view(),
            &mut gu,
            2 * inter,
            false,
        );
        let mut act = vec![0f32; m * inter];
        super::ops::swiglu_rows(isa, &gu, 2 * inter, inter, &mut act);
        // SAFETY: slots `range` of `y` belong to this task alone.
        let ys = unsafe { y_ptr.slice(range.start * h, m * h) };
        gemm(isa, precision, m, &act, inter, w.down.view(), ys, h, false);
    });
    let out_ptr = SharedMut::new(out);
    super::ops::for_row_blocks(pool, rows, h, |r0, n| {
        // Pairs of rows r0..r0+n are contiguous: routes.row_range(r0).start.. .
        let first = routes.row_range(r0).start;
        let last = routes.row_range(r0 + n - 1).end;
        let offsets: Vec<usize> = (r0..r0 + n)
            .map(|r| routes.row_range(r).start - first)
            .chain([last - first])
            .collect();
        // SAFETY: disjoint row blocks of `out`.
        let o = unsafe { out_ptr.slice(r0 * h, n * h) };
        combine_rows(
            isa,
            &y,
            h,
            &offsets,
            &routes.weights()[first..last],
            &slots[first..last],
            o,
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_largest_and_renormalises() {
        let logits = vec![0.1, 2.0, -1.0, 1.5, 0.0, 2.0];
        let r = route(&logits, 6, 3, true);
        let (ids, w) = r.row(0);
        assert_eq!(ids, &[1, 5, 3]);
        let s: f32 = w.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!((w[0] - w[1]).abs() < 1e-7 && w[2] < w[0]);
        let r = route(&logits, 6, 2, false);
        let z: f32 = logits.iter().map(|x| (x - 2.0f32).exp()).sum();
        assert!((r.row(0).1[0] - 1.0 / z).abs() < 1e-6);
    }
}
