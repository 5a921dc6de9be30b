//! AVX2 register tiles: up to 6 rows × 16 columns (12 ymm accumulators), run twice per 32-wide
//! panel. Same arithmetic as the AVX-512 tiles, for CPUs without AVX-512.

use std::arch::x86_64::*;

use super::gemm::Tile;
use crate::WeightDtype;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16(b: *const u8, kk: usize, col0: usize) -> (__m256, __m256) {
    // SAFETY: the caller keeps kk within the panel and col0 ∈ {0, 16}.
    let w = unsafe { _mm256_loadu_si256(b.cast::<u16>().add(kk * 32 + col0).cast()) };
    let lo = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)));
    let hi = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(w)));
    (_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_f32(b: *const u8, kk: usize, col0: usize) -> (__m256, __m256) {
    let p = b.cast::<f32>().wrapping_add(kk * 32 + col0);
    // SAFETY: as above.
    unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
}

macro_rules! kernel {
    ($name:ident, $load:ident) => {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name<const MR: usize>(t: &Tile) {
            for col0 in [0usize, 16] {
                if col0 >= t.ncols {
                    break;
                }
                let mut c0 = [_mm256_setzero_ps(); MR];
                let mut c1 = [_mm256_setzero_ps(); MR];
                for kk in 0..t.k {
                    // SAFETY: kk < t.k.
                    let (w0, w1) = unsafe { $load(t.b, kk, col0) };
                    for i in 0..MR {
                        // SAFETY: inside A.
                        let av = _mm256_set1_ps(unsafe { *t.a.add(i * t.lda + kk) });
                        c0[i] = _mm256_fmadd_ps(av, w0, c0[i]);
                        c1[i] = _mm256_fmadd_ps(av, w1, c1[i]);
                    }
                }
                let cols = 16.min(t.ncols - col0);
                for i in 0..MR {
                    let mut buf = [0f32; 16];
                    // SAFETY: buf has 16 slots.
                    unsafe {
                        _mm256_storeu_ps(buf.as_mut_ptr(), c0[i]);
                        _mm256_storeu_ps(buf.as_mut_ptr().add(8), c1[i]);
                    }
                    let row = t.c.wrapping_add(i * t.ldc + col0);
                    for (j, v) in buf.iter().enumerate().take(cols) {
                        // SAFETY: column col0 + j < ncols lies inside C.
                        unsafe {
                            let p = row.add(j);
                            *p = if t.accumulate { *p + v } else { *v };
                        }
                    }
                }
            }
        }
    };
}

kernel!(tile_bf16, load_bf16);
kernel!(tile_f32, load_f32);

/// Runs one tile of `mr ≤ 6` rows.
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
                    5 => $f::<5>(t),
                    6 => $f::<6>(t),
                    _ => unreachable!("tile height {mr} > 6"),
                }
            }
        };
    }
    match dtype {
        WeightDtype::BF16 => by_rows!(tile_bf16),
        WeightDtype::F32 => by_rows!(tile_f32),
    }
}
