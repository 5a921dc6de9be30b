//! Weights packed for the GEMM kernels: panels of [`NR`] output rows, stored k-major.
//!
//! A matrix `W [n, k]` (a linear layer's `[out, in]`) becomes `ceil(n / NR)` panels; panel `p`
//! holds `W[p·NR + j][kk]` at element `(p·k + kk)·NR + j`. One k-step of a panel is one
//! contiguous 64-byte (bf16) or 128-byte (f32) line, so a GEMV streams memory strictly forward
//! and a GEMM needs no repacking of B. Rows past `n` in the last panel are zero.

use half::bf16;

use crate::{HostMatrix, WeightDtype};

/// Output rows per panel.
pub const NR: usize = 32;

/// A 64-byte aligned, zero-initialised byte buffer.
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.lines.as_ptr().cast()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr().cast()
    }

    /// The buffer as a slice of `T` (which must be plain data with alignment ≤ 64).
    pub fn as_slice<T: bytemuck_like::Pod>(&self) -> &[T] {
        // SAFETY: the buffer is 64-byte aligned, holds `len` initialised bytes, and `T` is one
        // of the plain-data element types below.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.len / size_of::<T>()) }
    }

    pub fn as_mut_slice<T: bytemuck_like::Pod>(&mut self) -> &mut [T] {
        // SAFETY: as for `as_slice`, and we hold the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(self.as_mut_ptr().cast(), self.len / size_of::<T>())
        }
    }
}

/// The element types a packed buffer may be viewed as.
pub mod bytemuck_like {
    /// Plain data: any bit pattern is valid and alignment is at most 64.
    ///
    /// # Safety
    /// Implement only for integer and float primitives.
    pub unsafe trait Pod: Copy {}
    // SAFETY: primitives with no invalid bit patterns.
    unsafe impl Pod for u16 {}
    // SAFETY: as above.
    unsafe impl Pod for f32 {}
    // SAFETY: as above.
    unsafe impl Pod for u8 {}
}

/// A weight matrix in panel layout.
pub struct PackedMatrix {
    pub dtype: WeightDtype,
    /// Output features (rows of `W`).
    pub n: usize,
    /// Input features (columns of `W`).
    pub k: usize,
    buf: AlignedBuf,
}

impl PackedMatrix {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Packs a host matrix, splitting the work over rayon's current pool.
    pub fn from_host(m: &HostMatrix<'_>) -> PackedMatrix {
        let (n, k, es) = (m.rows, m.cols, m.dtype.size());
        let panels = n.div_ceil(NR);
        let mut buf = AlignedBuf::zeroed(panels * k * NR * es);
        let panel_bytes = k * NR * es;
        use rayon::prelude::*;
        let dst = buf.as_mut_slice::<u8>();
        dst.par_chunks_mut(panel_bytes.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = NR.min(n - p * NR);
                for j in 0..rows {
                    let src = &m.data[(p * NR + j) * k * es..(p * NR + j + 1) * k * es];
                    for kk in 0..k {
                        let d = (kk * NR + j) * es;
                        panel[d..d + es].copy_from_slice(&src[kk * es..(kk + 1) * es]);
                    }
                }
            });
        PackedMatrix {
            dtype: m.dtype,
            n,
            k,
            buf,
        }
    }

    /// Packs an f32 matrix whose row `r` (length `k`) is `row(r)`.
    pub fn from_f32_rows<'a>(n: usize, k: usize, row: impl Fn(usize) -> &'a [f32]) -> PackedMatrix {
        let panels = n.div_ceil(NR);
        let mut buf = AlignedBuf::zeroed(panels * k * NR * 4);
        let dst = buf.as_mut_slice::<f32>();
        for r in 0..n {
            let (p, j) = (r / NR, r % NR);
            let src = row(r);
            debug_assert_eq!(src.len(), k);
            let base = p * k * NR + j;
            for (kk, v) in src.iter().enumerate() {
                dst[base + kk * NR] = *v;
            }
        }
        PackedMatrix {
            dtype: WeightDtype::F32,
            n,
            k,
            buf,
        }
    }

    /// Packs the transpose of an f32 matrix `X [k, n]` whose row `i` (length `n`) is `row(i)`:
    /// the result is `W = Xᵀ [n, k]`. Each row of `X` lands as contiguous runs in the panels.
    pub fn from_f32_transposed<'a>(
        n: usize,
        k: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> PackedMatrix {
        let panels = n.div_ceil(NR);
        let mut buf = AlignedBuf::zeroed(panels * k * NR * 4);
        let dst = buf.as_mut_slice::<f32>();
        for i in 0..k {
            let src = row(i);
            debug_assert_eq!(src.len(), n);
            for p in 0..panels {
                let w = NR.min(n - p * NR);
                let d = (p * k + i) * NR;
                dst[d..d + w].copy_from_slice(&src[p * NR..p * NR + w]);
            }
        }
        PackedMatrix {
            dtype: WeightDtype::F32,
            n,
            k,
            buf,
        }
    }

    /// The whole matrix as a view.
    pub fn view(&self) -> PackedView<'_> {
        PackedView {
            m: self,
            panel0: 0,
            n: self.n,
            k0: 0,
            k: self.k,
        }
    }

    /// Element `(r, c)` of the original matrix, widened to f32 (tests, debugging).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let idx = ((r / NR) * self.k + c) * NR + r % NR;
        match self.dtype {
            WeightDtype::F32 => self.buf.as_slice::<f32>()[idx],
            WeightDtype::BF16 => bf16::from_bits(self.buf.as_slice::<u16>()[idx]).to_f32(),
        }
    }

    fn ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }
}

/// A window of a packed matrix: output rows `[panel0·NR, panel0·NR + n)` and input columns
/// `[k0, k0 + k)`.
#[derive(Clone, Copy)]
pub struct PackedView<'a> {
    m: &'a PackedMatrix,
    panel0: usize,
    n: usize,
    k0: usize,
    k: usize,
}

impl<'a> PackedView<'a> {
    pub fn dtype(&self) -> WeightDtype {
        self.m.dtype
    }

    /// Output rows in the window.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input columns in the window.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Output rows `[r0, r0 + n)` of this window; `r0` must be a multiple of [`NR`].
    pub fn rows(&self, r0: usize, n: usize) -> PackedView<'a> {
        assert!(
            r0.is_multiple_of(NR) && r0 + n <= self.n,
            "row window {r0}+{n} of {}",
            self.n
        );
        PackedView {
            panel0: self.panel0 + r0 / NR,
            n,
            ..*self
        }
    }

    /// Input columns `[c0, c0 + k)` of this window.
    pub fn cols(&self, c0: usize, k: usize) -> PackedView<'a> {
        assert!(c0 + k <= self.k, "column window {c0}+{k} of {}", self.k);
        PackedView {
            k0: self.k0 + c0,
            k,
            ..*self
        }
    }

    /// Pointer to k-step 0 of panel `p` (relative to the window).
    pub fn panel_ptr(&self, p: usize) -> *const u8 {
        let es = self.m.dtype.size();
        let elem = ((self.panel0 + p) * self.m.k + self.k0) * NR;
        // SAFETY (of the arithmetic): within the buffer because panel0 + p < panels and
        // k0 + k ≤ m.k; callers read at most k·NR elements from here.
        self.m.ptr().wrapping_add(elem * es)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_every_element() {
        let (n, k) = (70, 9);
        let vals: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 7.0).collect();
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let host = HostMatrix::new(WeightDtype::BF16, n, k, &bytes).expect("sizes match");
        let p = PackedMatrix::from_host(&host);
        assert_eq!(p.panels(), 3);
        for r in 0..n {
            for c in 0..k {
                assert_eq!(p.get(r, c), host.get(r, c));
            }
        }
        let q = PackedMatrix::from_f32_rows(n, k, |r| &vals[r * k..(r + 1) * k]);
        let t = PackedMatrix::from_f32_transposed(k, n, |r| &vals[r * k..(r + 1) * k]);
        for r in 0..n {
            for c in 0..k {
                assert_eq!(q.get(r, c), vals[r * k + c]);
                assert_eq!(t.get(c, r), vals[r * k + c]);
            }
        }
    }
}
