//! AVX-512 register tiles: up to 12 rows × 32 columns held in 24 zmm accumulators.
//!
//! f32 activations: per k-pair the kernel loads one 128-byte line of the panel (32 columns ×
//! (even, odd) bf16 weights), widens it exactly with one shift (even k) and one mask (odd k) per
//! 16 columns, broadcasts two elements of each A row and issues four FMAs per row, in k order.
//! At 12 rows that is 48 FMAs per line, compute-bound for prefill; at one row the panel streams
//! at memory speed for decode.
//!
//! bf16 activations ([`tile_dpbf16`]): A is pre-rounded to bf16 pairs and each row costs two
//! `vdpbf16ps` per k-pair (32 multiply-adds each): twice the arithmetic per instruction.

use std::arch::x86_64::*;

use super::gemm::Tile;
use crate::WeightDtype;

macro_rules! store_tile {
    ($t:expr, $c0:expr, $c1:expr, $mr:expr) => {{
        let t = $t;
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
        for i in 0..$mr {
            let p0 = t.c.wrapping_add(i * t.ldc);
            let p1 = p0.wrapping_add(16);
            let (mut v0, mut v1) = ($c0[i], $c1[i]);
            // SAFETY: masked lanes cover exactly the tile's valid columns; masked-off lanes are
            // never accessed.
            unsafe {
                if t.accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p0));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p1));
                }
                _mm512_mask_storeu_ps(p0, m0, v0);
                _mm512_mask_storeu_ps(p1, m1, v1);
            }
        }
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn tile_f32<const MR: usize>(t: &Tile) {
    let a = t.a.cast::<f32>();
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    for kk in 0..t.k {
        let p = t.b.cast::<f32>().wrapping_add(kk * 32);
        // SAFETY: kk < k keeps the loads inside the panel.
        let (w0, w1) = unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) };
        for i in 0..MR {
            // SAFETY: row i < mr and column kk < k lie inside A.
            let av = _mm512_set1_ps(unsafe { *a.add(i * t.lda + kk) });
            c0[i] = _mm512_fmadd_ps(av, w0, c0[i]);
            c1[i] = _mm512_fmadd_ps(av, w1, c1[i]);
        }
    }
    store_tile!(t, c0, c1, MR);
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn tile_bf16<const MR: usize>(t: &Tile) {
    let a = t.a.cast::<f32>();
    let b = t.b.cast::<__m512i>();
    let hi = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    let pairs = t.k / 2;
    for q in 0..pairs {
        // SAFETY: pair q < k/2 lies inside the panel (two 64-byte vectors per pair).
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_si512(b.add(2 * q)),
                _mm512_loadu_si512(b.add(2 * q + 1)),
            )
        };
        let e0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0));
        let o0 = _mm512_castsi512_ps(_mm512_and_si512(v0, hi));
        let e1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1));
        let o1 = _mm512_castsi512_ps(_mm512_and_si512(v1, hi));
        for i in 0..MR {
            // SAFETY: columns 2q and 2q+1 < k of row i lie inside A.
            let (x0, x1) = unsafe { (*a.add(i * t.lda + 2 * q), *a.add(i * t.lda + 2 * q + 1)) };
            let (a0, a1) = (_mm512_set1_ps(x0), _mm512_set1_ps(x1));
            c0[i] = _mm512_fmadd_ps(a0, e0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a0, e1, c1[i]);
            c0[i] = _mm512_fmadd_ps(a1, o0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a1, o1, c1[i]);
        }
    }
    if t.k % 2 == 1 {
        // The last column pairs with the zero padding; A has no column k to read.
        // SAFETY: the padded pair is part of the panel.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_si512(b.add(2 * pairs)),
                _mm512_loadu_si512(b.add(2 * pairs + 1)),
            )
        };
        let e0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0));
        let e1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1));
        for i in 0..MR {
            // SAFETY: column k-1 of row i lies inside A.
            let a0 = _mm512_set1_ps(unsafe { *a.add(i * t.lda + t.k - 1) });
            c0[i] = _mm512_fmadd_ps(a0, e0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a0, e1, c1[i]);
        }
    }
    store_tile!(t, c0, c1, MR);
}

/// Two panels at once for few rows: `t.b` and `t2.b` are adjacent panels of the same rows (t2's
/// tile is to the right of t's). Each output's arithmetic is exactly [`tile_bf16`]'s; the second
/// panel only adds independent dependency chains, so a one-row GEMV keeps more loads in flight.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn tile_bf16_x2<const MR: usize>(t: &Tile, t2: &Tile) {
    let a = t.a.cast::<f32>();
    let (b, b2) = (t.b.cast::<__m512i>(), t2.b.cast::<__m512i>());
    let hi = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    let mut d0 = [_mm512_setzero_ps(); MR];
    let mut d1 = [_mm512_setzero_ps(); MR];
    let pairs = t.k / 2;
    for q in 0..pairs {
        // SAFETY: pair q < k/2 lies inside both panels.
        let (v0, v1, u0, u1) = unsafe {
            (
                _mm512_loadu_si512(b.add(2 * q)),
                _mm512_loadu_si512(b.add(2 * q + 1)),
                _mm512_loadu_si512(b2.add(2 * q)),
                _mm512_loadu_si512(b2.add(2 * q + 1)),
            )
        };
        let (e0, o0) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)),
            _mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
        );
        let (e1, o1) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)),
            _mm512_castsi512_ps(_mm512_and_si512(v1, hi)),
        );
        let (f0, p0) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(u0)),
            _mm512_castsi512_ps(_mm512_and_si512(u0, hi)),
        );
        let (f1, p1) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(u1)),
            _mm512_castsi512_ps(_mm512_and_si512(u1, hi)),
        );
        for i in 0..MR {
            // SAFETY: columns 2q and 2q+1 < k of row i lie inside A.
            let (x0, x1) = unsafe { (*a.add(i * t.lda + 2 * q), *a.add(i * t.lda + 2 * q + 1)) };
            let (a0, a1) = (_mm512_set1_ps(x0), _mm512_set1_ps(x1));
            c0[i] = _mm512_fmadd_ps(a0, e0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a0, e1, c1[i]);
            d0[i] = _mm512_fmadd_ps(a0, f0, d0[i]);
            d1[i] = _mm512_fmadd_ps(a0, f1, d1[i]);
            c0[i] = _mm512_fmadd_ps(a1, o0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a1, o1, c1[i]);
            d0[i] = _mm512_fmadd_ps(a1, p0, d0[i]);
            d1[i] = _mm512_fmadd_ps(a1, p1, d1[i]);
        }
    }
    if t.k % 2 == 1 {
        // SAFETY: the padded pair is part of both panels.
        let (v0, v1, u0, u1) = unsafe {
            (
                _mm512_loadu_si512(b.add(2 * pairs)),
                _mm512_loadu_si512(b.add(2 * pairs + 1)),
                _mm512_loadu_si512(b2.add(2 * pairs)),
                _mm512_loadu_si512(b2.add(2 * pairs + 1)),
            )
        };
        let (e0, e1) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)),
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)),
        );
        let (f0, f1) = (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(u0)),
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(u1)),
        );
        for i in 0..MR {
            // SAFETY: column k-1 of row i lies inside A.
            let a0 = _mm512_set1_ps(unsafe { *a.add(i * t.lda + t.k - 1) });
            c0[i] = _mm512_fmadd_ps(a0, e0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a0, e1, c1[i]);
            d0[i] = _mm512_fmadd_ps(a0, f0, d0[i]);
            d1[i] = _mm512_fmadd_ps(a0, f1, d1[i]);
        }
    }
    store_tile!(t, c0, c1, MR);
    store_tile!(t2, d0, d1, MR);
}

/// bf16 × bf16 products accumulated in f32. `t.a` points at bf16 pairs (row stride `t.lda`
/// in bf16 elements, k padded with a zero to even).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn tile_dpbf16<const MR: usize>(t: &Tile) {
    let a = t.a.cast::<u32>();
    let b = t.b.cast::<__m512i>();
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    for q in 0..t.k.div_ceil(2) {
        // SAFETY: pair q lies inside the (padded) panel.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_si512(b.add(2 * q)),
                _mm512_loadu_si512(b.add(2 * q + 1)),
            )
        };
        // SAFETY: same-size plain vector types.
        let (w0, w1): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(v0),
                std::mem::transmute::<__m512i, __m512bh>(v1),
            )
        };
        for i in 0..MR {
            // SAFETY: pair q of row i lies inside the padded bf16 copy of A.
            let pair = unsafe { *a.add(i * t.lda / 2 + q) };
            // SAFETY: as above.
            let ap =
                unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
            c0[i] = _mm512_dpbf16_ps(c0[i], ap, w0);
            c1[i] = _mm512_dpbf16_ps(c1[i], ap, w1);
        }
    }
    store_tile!(t, c0, c1, MR);
}

macro_rules! by_rows {
    ($f:ident, $mr:expr, $t:expr) => {
        // SAFETY: forwarded from the caller.
        unsafe {
            match $mr {
                1 => $f::<1>($t),
                2 => $f::<2>($t),
                3 => $f::<3>($t),
                4 => $f::<4>($t),
                5 => $f::<5>($t),
                6 => $f::<6>($t),
                7 => $f::<7>($t),
                8 => $f::<8>($t),
                9 => $f::<9>($t),
                10 => $f::<10>($t),
                11 => $f::<11>($t),
                12 => $f::<12>($t),
                _ => unreachable!("tile height {} > 12", $mr),
            }
        }
    };
}

/// Runs one tile of `mr ≤ 12` rows with f32 activations.
///
/// # Safety
/// AVX-512 must be available and the tile must lie inside valid memory.
pub(crate) unsafe fn tile(dtype: WeightDtype, mr: usize, t: &Tile) {
    match dtype {
        WeightDtype::BF16 => by_rows!(tile_bf16, mr, t),
        WeightDtype::F32 => by_rows!(tile_f32, mr, t),
    }
}

/// Runs two adjacent bf16 panels for `mr ≤ 4` rows of f32 activations (see [`tile_bf16_x2`]).
///
/// # Safety
/// AVX-512 must be available and both tiles must lie inside valid memory.
pub(crate) unsafe fn tile_pair_bf16(mr: usize, t: &Tile, t2: &Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match mr {
            1 => tile_bf16_x2::<1>(t, t2),
            2 => tile_bf16_x2::<2>(t, t2),
            3 => tile_bf16_x2::<3>(t, t2),
            4 => tile_bf16_x2::<4>(t, t2),
            _ => unreachable!("paired tiles take at most 4 rows"),
        }
    }
}

/// Runs one tile of `mr ≤ 12` rows with bf16 activation pairs against a bf16 panel.
///
/// # Safety
/// AVX-512 BF16 must be available and the tile must lie inside valid memory.
pub(crate) unsafe fn tile_bf16_activations(mr: usize, t: &Tile) {
    by_rows!(tile_dpbf16, mr, t)
}
