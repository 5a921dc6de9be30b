//! Single-threaded GEMM against a packed matrix: `C (+)= A · Wᵀ`.
//!
//! `A` is row-major f32 with any row stride (so views of fused projections need no copy), `W`
//! is a [`PackedView`], `C` is row-major f32 with any row stride. The driver walks row blocks
//! that fit in L2, then panels, then register tiles of up to `MR` rows × [`NR`] columns, handing
//! each tile to the microkernel of the chosen ISA. Threading is the caller's business
//! (`matmul.rs` splits rows and panels into disjoint tiles).

use super::isa::Isa;
use super::packed::{NR, PackedView};
use crate::WeightDtype;

/// How the inputs of a weight matmul are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 activations times widened weights: the float32 reference up to summation order.
    #[default]
    F32,
    /// Activations rounded to bf16 before multiplying bf16 weights (f32 accumulation), as
    /// transformers' and llama.cpp's bf16 modes do: `vdpbf16ps` doubles the arithmetic rate.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// Whether this CPU has the AVX-512 BF16 dot product.
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            Isa::detect() == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One register tile: `C[0..mr, 0..ncols] (+)= A[0..mr, 0..k] · panelᵀ`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub k: usize,
    /// Row-major A: f32, or bf16 pairs for the bf16-activation kernel.
    pub a: *const u8,
    /// Row stride of A in its own elements.
    pub lda: usize,
    /// k-step 0 of the panel (elements of the view's dtype, NR per k-step).
    pub b: *const u8,
    pub c: *mut f32,
    pub ldc: usize,
    /// Valid output columns in this panel (≤ NR).
    pub ncols: usize,
    pub accumulate: bool,
}

/// Largest register tile height per ISA.
pub fn max_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 12,
        Isa::Avx2 => 4,
        Isa::Portable => 8,
    }
}

/// `C (+)= A · Wᵀ` over rows `0..m`.
///
/// # Safety
/// `a` must be readable for `m` rows of `w.k()` floats at stride `lda`; `c` writable for `m`
/// rows of `w.n()` floats at stride `ldc`; the two must not overlap; `isa ≤ Isa::detect()`.
pub unsafe fn gemm_raw(
    isa: Isa,
    precision: Precision,
    m: usize,
    a: *const f32,
    lda: usize,
    w: PackedView<'_>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let k = w.k();
    if m == 0 || w.n() == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..w.n() {
                    // SAFETY: within the rows/columns the caller vouched for.
                    unsafe { *c.add(i * ldc + j) = 0.0 };
                }
            }
        }
        return;
    }
    let mr_max = max_rows(isa);
    // Keep one row block of A (mc · k floats) within ~256 KiB of L2 while panels stream past.
    let mc = ((256 * 1024 / (4 * k)) / mr_max).max(1) * mr_max;
    let dtype = w.dtype();
    let rounded = precision == Precision::Bf16 && dtype == WeightDtype::BF16;
    let dot = rounded && has_bf16_dot() && isa == Isa::Avx512;
    let mut scratch_bf16: Vec<u16> = Vec::new();
    let mut scratch_f32: Vec<f32> = Vec::new();
    let kp = k.div_ceil(2) * 2;
    let mut r0 = 0;
    while r0 < m {
        let rows = mc.min(m - r0);
        // The block's A as the kernels will read it.
        let (a_blk, lda_blk): (*const u8, usize) = if !rounded {
            (a.wrapping_add(r0 * lda).cast(), lda)
        } else {
            // SAFETY: rows r0..r0+rows of A are readable (caller).
            let src = |i: usize| unsafe { std::slice::from_raw_parts(a.add((r0 + i) * lda), k) };
            if dot {
                scratch_bf16.clear();
                scratch_bf16.resize(rows * kp, 0);
                for i in 0..rows {
                    for (d, v) in scratch_bf16[i * kp..i * kp + k].iter_mut().zip(src(i)) {
                        *d = half::bf16::from_f32(*v).to_bits();
                    }
                }
                (scratch_bf16.as_ptr().cast(), kp)
            } else {
                scratch_f32.clear();
                scratch_f32.resize(rows * k, 0.0);
                for i in 0..rows {
                    for (d, v) in scratch_f32[i * k..(i + 1) * k].iter_mut().zip(src(i)) {
                        *d = half::bf16::from_f32(*v).to_f32();
                    }
                }
                (scratch_f32.as_ptr().cast(), k)
            }
        };
        let a_elem = if dot { 2 } else { 4 };
        let tile_at = |p: usize, i: usize| Tile {
            k,
            a: a_blk.wrapping_add(i * lda_blk * a_elem),
            lda: lda_blk,
            b: w.panel_ptr(p),
            c: c.wrapping_add((r0 + i) * ldc + p * NR),
            ldc,
            ncols: NR.min(w.n() - p * NR),
            accumulate,
        };
        // Few rows are memory-bound: stream two panels at once (same arithmetic per output).
        let paired =
            !dot && rows <= PAIRED_ROWS && dtype == WeightDtype::BF16 && isa == Isa::Avx512;
        let mut p = 0;
        while p < w.panels() {
            if paired && p + 1 < w.panels() {
                // SAFETY: both tiles lie inside the region the caller vouched for.
                unsafe { run_tile_pair(rows, &tile_at(p, 0), &tile_at(p + 1, 0)) };
                p += 2;
                continue;
            }
            let mut i = 0;
            while i < rows {
                let mr = mr_max.min(rows - i);
                let tile = tile_at(p, i);
                // SAFETY: the tile lies inside the region the caller vouched for.
                unsafe {
                    if dot {
                        run_tile_bf16_activations(mr, &tile)
                    } else {
                        run_tile(isa, dtype, mr, &tile)
                    }
                };
                i += mr;
            }
            p += 1;
        }
        r0 += rows;
    }
}

/// Safe wrapper over [`gemm_raw`] for contiguous slices: `a` is `[m, w.k()]` with stride
/// `lda`, `c` is `[m, w.n()]` with stride `ldc`.
pub fn gemm(
    isa: Isa,
    precision: Precision,
    m: usize,
    a: &[f32],
    lda: usize,
    w: PackedView<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        isa <= Isa::detect(),
        "ISA {isa:?} not supported by this CPU"
    );
    if m > 0 {
        assert!(
            lda >= w.k() && a.len() >= (m - 1) * lda + w.k(),
            "A too small"
        );
        assert!(
            ldc >= w.n() && c.len() >= (m - 1) * ldc + w.n(),
            "C too small"
        );
    }
    // SAFETY: bounds checked above; `a` and `c` are distinct borrows.
    unsafe {
        gemm_raw(
            isa,
            precision,
            m,
            a.as_ptr(),
            lda,
            w,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// Row blocks up to this height use paired-panel tiles.
const PAIRED_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
unsafe fn run_tile_pair(mr: usize, t: &Tile, t2: &Tile) {
    // SAFETY: only called with `Isa::Avx512`; the tiles are in bounds (caller).
    unsafe { super::ukernel_avx512::tile_pair_bf16(mr, t, t2) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile_pair(_mr: usize, _t: &Tile, _t2: &Tile) {
    unreachable!("paired tiles are AVX-512 only")
}

#[cfg(target_arch = "x86_64")]
unsafe fn run_tile_bf16_activations(mr: usize, t: &Tile) {
    // SAFETY: only called when `has_bf16_dot()`; the tile is in bounds (caller).
    unsafe { super::ukernel_avx512::tile_bf16_activations(mr, t) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile_bf16_activations(_mr: usize, _t: &Tile) {
    unreachable!("no bf16 dot product on this architecture")
}

unsafe fn run_tile(isa: Isa, dtype: WeightDtype, mr: usize, t: &Tile) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa was detected; the tile is in bounds (caller).
        Isa::Avx512 => unsafe { super::ukernel_avx512::tile(dtype, mr, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::ukernel_avx2::tile(dtype, mr, t) },
        // SAFETY: as above.
        _ => unsafe { super::ukernel_portable::tile(dtype, mr, t) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostMatrix;
    use crate::cpu::packed::PackedMatrix;
    use half::bf16;

    fn naive(a: &[f32], m: usize, k: usize, w: &PackedMatrix) -> Vec<f32> {
        let n = w.n;
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    c[i * n + j] += f64::from(a[i * k + kk]) * f64::from(w.get(j, kk));
                }
            }
        }
        c.into_iter().map(|v| v as f32).collect()
    }

    fn pseudo(i: usize, salt: u32) -> f32 {
        let x = (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(salt.wrapping_mul(40503));
        ((x >> 8) as f32 / (1u32 << 24) as f32) - 0.5
    }

    #[test]
    fn every_isa_and_shape_matches_a_naive_product() {
        for isa in Isa::available() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (1, 33, 7),
                (3, 64, 16),
                (13, 70, 35),
                (25, 97, 130),
                (40, 32, 1),
            ] {
                for dtype in [WeightDtype::BF16, WeightDtype::F32] {
                    let a: Vec<f32> = (0..m * k).map(|i| pseudo(i, 1)).collect();
                    let wv: Vec<f32> = (0..n * k).map(|i| pseudo(i, 2)).collect();
                    let bytes: Vec<u8> = match dtype {
                        WeightDtype::BF16 => wv
                            .iter()
                            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                            .collect(),
                        WeightDtype::F32 => wv.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    };
                    let host = HostMatrix::new(dtype, n, k, &bytes).expect("sizes");
                    let w = PackedMatrix::from_host(&host, &crate::cpu::arena::WeightArena::new());
                    let want = naive(&a, m, k, &w);
                    let mut c = vec![1.0f32; m * n];
                    gemm(isa, Precision::F32, m, &a, k, w.view(), &mut c, n, false);
                    for (x, y) in c.iter().zip(&want) {
                        assert!(
                            (x - y).abs() < 1e-4,
                            "{isa:?} {dtype:?} {m}x{n}x{k}: {x} vs {y}"
                        );
                    }
                    // Accumulate adds onto what is there.
                    gemm(isa, Precision::F32, m, &a, k, w.view(), &mut c, n, true);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - 2.0 * y).abs() < 2e-4, "{isa:?} accumulate");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_precision_multiplies_rounded_activations() {
        for isa in Isa::available() {
            for &(m, n, k) in &[(1, 40, 9), (13, 70, 64), (30, 33, 131)] {
                let a: Vec<f32> = (0..m * k).map(|i| pseudo(i, 5) * 3.0).collect();
                let wv: Vec<f32> = (0..n * k).map(|i| pseudo(i, 6)).collect();
                let bytes: Vec<u8> = wv
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect();
                let w = PackedMatrix::from_host(
                    &HostMatrix::new(WeightDtype::BF16, n, k, &bytes).expect("sizes"),
                    &crate::cpu::arena::WeightArena::new(),
                );
                let rounded: Vec<f32> = a.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
                let want = naive(&rounded, m, k, &w);
                let exact = naive(&a, m, k, &w);
                let mut c = vec![0f32; m * n];
                gemm(isa, Precision::Bf16, m, &a, k, w.view(), &mut c, n, false);
                let d = c
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(d < 1e-4, "{isa:?} {m}x{n}x{k}: {d}");
                // And the rounding is real: f32 inputs would give something else.
                let e = c
                    .iter()
                    .zip(&exact)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(e > 1e-4, "{isa:?}: bf16 mode did not round the activations");
            }
        }
    }

    #[test]
    fn windows_select_rows_and_columns() {
        let (n, k) = (96, 40);
        let wv: Vec<f32> = (0..n * k).map(|i| pseudo(i, 3)).collect();
        let w = PackedMatrix::from_f32_rows(n, k, WeightDtype::F32, |r| &wv[r * k..(r + 1) * k]);
        let a: Vec<f32> = (0..2 * 10).map(|i| pseudo(i, 4)).collect();
        let view = w.view().rows(32, 50).cols(7, 10);
        let mut c = vec![0f32; 2 * 50];
        gemm(
            Isa::detect(),
            Precision::F32,
            2,
            &a,
            10,
            view,
            &mut c,
            50,
            false,
        );
        for i in 0..2 {
            for j in 0..50 {
                let want: f32 = (0..10)
                    .map(|kk| a[i * 10 + kk] * wv[(32 + j) * k + 7 + kk])
                    .sum();
                assert!((c[i * 50 + j] - want).abs() < 1e-5);
            }
        }
    }
}
