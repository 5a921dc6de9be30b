//! Threaded `out = x · Wᵀ`: splits the product into disjoint (row block × panel range) tiles
//! and runs the single-threaded GEMM on each.
//!
//! Decode (a handful of rows) splits the panels, so both cores stream different parts of the
//! weight; prefill splits rows into blocks that keep their slice of `x` in L2 while the whole
//! weight streams past.

use super::gemm::{Precision, gemm_raw, max_rows};
use super::isa::Isa;
use super::packed::{NR, PackedView};
use super::pool::{Pool, SharedMut};

/// Rows per task when rows are split (a multiple of every ISA's tile height).
const ROW_TASK: usize = 96;
/// Below this many multiply-adds a product runs on the calling thread.
const SERIAL_MACS: usize = 1 << 16;

/// `out[m, n] = x[m, k] · wᵀ` (or `+=` with `accumulate`), rows of `x` at stride `lda`, rows
/// of `out` at stride `ldc`.
pub fn matmul(
    pool: &Pool,
    isa: Isa,
    precision: Precision,
    m: usize,
    x: &[f32],
    lda: usize,
    w: PackedView<'_>,
    out: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (n, k) = (w.n(), w.k());
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        isa <= Isa::detect(),
        "ISA {isa:?} not supported by this CPU"
    );
    assert!(
        lda >= k && x.len() >= (m - 1) * lda + k,
        "x too small for {m}x{k}"
    );
    assert!(
        ldc >= n && out.len() >= (m - 1) * ldc + n,
        "out too small for {m}x{n}"
    );
    let threads = pool.threads();
    if threads == 1 || m * n * k < SERIAL_MACS {
        // SAFETY: bounds checked above.
        unsafe {
            gemm_raw(
                isa,
                precision,
                m,
                x.as_ptr(),
                lda,
                w,
                out.as_mut_ptr(),
                ldc,
                accumulate,
            )
        };
        return;
    }
    let row_blocks = if m <= 4 * max_rows(isa) {
        1
    } else {
        m.div_ceil(ROW_TASK)
    };
    let panels = w.panels();
    let panel_blocks = (4 * threads).div_ceil(row_blocks).clamp(1, panels);
    let rows_per = if row_blocks == 1 { m } else { ROW_TASK };
    let panels_per = panels.div_ceil(panel_blocks);
    let panel_blocks = panels.div_ceil(panels_per);
    let x_ptr = x.as_ptr() as usize;
    let out_ptr = SharedMut::new(out);
    pool.for_each(row_blocks * panel_blocks, |t| {
        let (rb, pb) = (t / panel_blocks, t % panel_blocks);
        let r0 = rb * rows_per;
        let rows = rows_per.min(m - r0);
        let p0 = pb * panels_per;
        let cols = (panels_per * NR).min(n - p0 * NR);
        let sub = w.rows(p0 * NR, cols);
        // SAFETY: tile (rows r0.., columns p0·NR..) is inside x/out (checked above) and
        // disjoint from every other task's tile.
        unsafe {
            gemm_raw(
                isa,
                precision,
                rows,
                (x_ptr as *const f32).add(r0 * lda),
                lda,
                sub,
                out_ptr.ptr().add(r0 * ldc + p0 * NR),
                ldc,
                accumulate,
            )
        };
    });
}
