//! AVX-512 register tiles: up to 12 rows × 32 columns held in 24 zmm accumulators.
//!
//! Per k-step the kernel loads one 32-wide line of the panel (widening bf16 by a zero-extend
//! and a shift, which is exact), broadcasts one element of each A row, and issues two FMAs per
//! row. At 12 rows that is 24 FMAs per 64-byte line: compute-bound for prefill, while at one
//! row it streams the panel at memory speed for decode.

use std::arch::x86_64::*;

use super::gemm::Tile;
use crate::WeightDtype;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn load_bf16(b: *const u8, kk: usize) -> (__m512, __m512) {
    // SAFETY: the caller keeps kk within the panel.
    let w = unsafe { _mm512_loadu_si512(b.cast::<u16>().add(kk * 32).cast()) };
    let lo = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)));
    let hi = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(w)));
    (_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn load_f32(b: *const u8, kk: usize) -> (__m512, __m512) {
    let p = b.cast::<f32>().wrapping_add(kk * 32);
    // SAFETY: the caller keeps kk within the panel.
    unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) }
}

macro_rules! kernel {
    ($name:ident, $load:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
        unsafe fn $name<const MR: usize>(t: &Tile) {
            let mut c0 = [_mm512_setzero_ps(); MR];
            let mut c1 = [_mm512_setzero_ps(); MR];
            for kk in 0..t.k {
                // SAFETY: kk < t.k, the panel length.
                let (w0, w1) = unsafe { $load(t.b, kk) };
                for i in 0..MR {
                    // SAFETY: row i < mr and column kk < k lie inside A.
                    let av = _mm512_set1_ps(unsafe { *t.a.add(i * t.lda + kk) });
                    c0[i] = _mm512_fmadd_ps(av, w0, c0[i]);
                    c1[i] = _mm512_fmadd_ps(av, w1, c1[i]);
                }
            }
            let m0: __mmask16 = if t.ncols >= 16 {
                0xFFFF
            } else {
                ((1u32 << t.ncols) - 1) as u16
            };
            let m1: __mmask16 = if t.ncols >= 32 {
                0xFFFF
            } else if t.ncols > 16 {
                ((1u32 << (t.ncols - 16)) - 1) as u16
            } else {
                0
            };
            for i in 0..MR {
                let p0 = t.c.wrapping_add(i * t.ldc);
                let p1 = p0.wrapping_add(16);
                let (mut v0, mut v1) = (c0[i], c1[i]);
                // SAFETY: masked lanes cover exactly the tile's valid columns; masked-off
                // lanes are never accessed.
                unsafe {
                    if t.accumulate {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p0));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p1));
                    }
                    _mm512_mask_storeu_ps(p0, m0, v0);
                    _mm512_mask_storeu_ps(p1, m1, v1);
                }
            }
        }
    };
}

kernel!(tile_bf16, load_bf16);
kernel!(tile_f32, load_f32);

/// Runs one tile of `mr ≤ 12` rows.
///
/// # Safety
/// AVX-512 must be available and the tile must lie inside valid memory.
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
                    7 => $f::<7>(t),
                    8 => $f::<8>(t),
                    9 => $f::<9>(t),
                    10 => $f::<10>(t),
                    11 => $f::<11>(t),
                    12 => $f::<12>(t),
                    _ => unreachable!("tile height {mr} > 12"),
                }
            }
        };
    }
    match dtype {
        WeightDtype::BF16 => by_rows!(tile_bf16),
        WeightDtype::F32 => by_rows!(tile_f32),
    }
}
