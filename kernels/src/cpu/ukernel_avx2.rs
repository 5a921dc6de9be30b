//! AVX2 register tiles: up to 4 rows × 16 columns (8 ymm accumulators), run twice per 32-wide
//! panel. Same arithmetic and summation order as the AVX-512 tiles, for CPUs without AVX-512.

use std::arch::x86_64::*;

use super::gemm::Tile;
use crate::WeightDtype;

/// Writes `c0`/`c1` (columns `col0..col0+16` of each row) honouring `ncols` and `accumulate`.
#[target_feature(enable = "avx2,fma")]
unsafe fn store_half(t: &Tile, col0: usize, c0: &[__m256], c1: &[__m256]) {
    let cols = 16.min(t.ncols - col0);
    for (i, (a, b)) in c0.iter().zip(c1).enumerate() {
        let mut buf = [0f32; 16];
        // SAFETY: buf has 16 slots.
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), *a);
            _mm256_storeu_ps(buf.as_mut_ptr().add(8), *b);
        }
        let row = t.c.wrapping_add(i * t.ldc + col0);
        for (j, v) in buf.iter().enumerate().take(cols) {
            // SAFETY: column col0 + j < ncols of row i lies inside C.
            unsafe {
                let p = row.add(j);
                *p = if t.accumulate { *p + v } else { *v };
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_f32<const MR: usize>(t: &Tile) {
    let a = t.a.cast::<f32>();
    for col0 in [0usize, 16] {
        if col0 >= t.ncols {
            break;
        }
        let mut c0 = [_mm256_setzero_ps(); MR];
        let mut c1 = [_mm256_setzero_ps(); MR];
        for kk in 0..t.k {
            let p = t.b.cast::<f32>().wrapping_add(kk * 32 + col0);
            // SAFETY: kk < k keeps the loads inside the panel.
            let (w0, w1) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
            for i in 0..MR {
                // SAFETY: inside A.
                let av = _mm256_set1_ps(unsafe { *a.add(i * t.lda + kk) });
                c0[i] = _mm256_fmadd_ps(av, w0, c0[i]);
                c1[i] = _mm256_fmadd_ps(av, w1, c1[i]);
            }
        }
        // SAFETY: the tile lies inside C (caller).
        unsafe { store_half(t, col0, &c0, &c1) };
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_bf16<const MR: usize>(t: &Tile) {
    let a = t.a.cast::<f32>();
    let hi = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
    let pairs = t.k.div_ceil(2);
    for col0 in [0usize, 16] {
        if col0 >= t.ncols {
            break;
        }
        let mut c0 = [_mm256_setzero_ps(); MR];
        let mut c1 = [_mm256_setzero_ps(); MR];
        for q in 0..pairs {
            // Pair q: 32 columns × 2 bf16; this half's 16 columns start at u16 offset 2·col0.
            let p = t.b.cast::<u16>().wrapping_add(q * 64 + 2 * col0);
            // SAFETY: pair q lies inside the (padded) panel.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(16).cast()),
                )
            };
            let ea = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(va));
            let eb = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(vb));
            let odd = 2 * q + 1 < t.k;
            let oa = _mm256_castsi256_ps(_mm256_and_si256(va, hi));
            let ob = _mm256_castsi256_ps(_mm256_and_si256(vb, hi));
            for i in 0..MR {
                // SAFETY: column 2q < k of row i lies inside A.
                let a0 = _mm256_set1_ps(unsafe { *a.add(i * t.lda + 2 * q) });
                c0[i] = _mm256_fmadd_ps(a0, ea, c0[i]);
                c1[i] = _mm256_fmadd_ps(a0, eb, c1[i]);
                if odd {
                    // SAFETY: column 2q+1 < k of row i lies inside A.
                    let a1 = _mm256_set1_ps(unsafe { *a.add(i * t.lda + 2 * q + 1) });
                    c0[i] = _mm256_fmadd_ps(a1, oa, c0[i]);
                    c1[i] = _mm256_fmadd_ps(a1, ob, c1[i]);
                }
            }
        }
        // SAFETY: the tile lies inside C (caller).
        unsafe { store_half(t, col0, &c0, &c1) };
    }
}

/// Runs one tile of `mr ≤ 4` rows.
///
/// # Safety
/// AVX2 and FMA must be available and the tile must lie inside valid memory.
pub(crate) unsafe fn tile(dtype: WeightDtype, mr: usize, t: &Tile) {
    macro_rules! by_rows {
        ($f:ident) => {
            // SAFETY: forwarded from the caller.
            unsafe {
                match mr {
                    1 => $f::<1>(t),
                    2 => $f::<2>(t),
                    3 => $f::<3>(t),
                    4 => $f::<4>(t),
                    _ => unreachable!("tile height {mr} > 4"),
                }
            }
        };
    }
    match dtype {
        WeightDtype::BF16 => by_rows!(tile_bf16),
        WeightDtype::F32 => by_rows!(tile_f32),
    }
}
