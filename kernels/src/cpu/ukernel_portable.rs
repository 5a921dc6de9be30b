//! Portable register tiles in plain Rust (auto-vectorised for the build target): the fallback
//! on CPUs without AVX2 and on other architectures.

use super::gemm::Tile;
use super::packed::NR;
use crate::WeightDtype;

const MR_MAX: usize = 8;

/// Runs one tile of `mr ≤ 8` rows.
///
/// # Safety
/// The tile must lie inside valid memory.
pub(crate) unsafe fn tile(dtype: WeightDtype, mr: usize, t: &Tile) {
    assert!(mr <= MR_MAX);
    let mut acc = [[0f32; NR]; MR_MAX];
    let mut w = [0f32; NR];
    for kk in 0..t.k {
        match dtype {
            WeightDtype::BF16 => {
                // Pair layout: column j's (even, odd) weights for k-pair kk/2 are adjacent.
                let p = t.b.cast::<u16>().wrapping_add((kk / 2) * NR * 2 + kk % 2);
                for (j, v) in w.iter_mut().enumerate() {
                    // SAFETY: kk < k and j < NR stay inside the panel.
                    *v = f32::from_bits(u32::from(unsafe { *p.add(2 * j) }) << 16);
                }
            }
            WeightDtype::F32 => {
                let p = t.b.cast::<f32>().wrapping_add(kk * NR);
                for (j, v) in w.iter_mut().enumerate() {
                    // SAFETY: as above.
                    *v = unsafe { *p.add(j) };
                }
            }
        }
        for (i, row) in acc.iter_mut().enumerate().take(mr) {
            // SAFETY: row i < mr, column kk < k.
            let av = unsafe { *t.a.cast::<f32>().add(i * t.lda + kk) };
            for j in 0..NR {
                row[j] = av.mul_add(w[j], row[j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (j, v) in row.iter().enumerate().take(t.ncols) {
            // SAFETY: j < ncols columns of row i lie inside C.
            unsafe {
                let p = t.c.add(i * t.ldc + j);
                *p = if t.accumulate { *p + v } else { *v };
            }
        }
    }
}
