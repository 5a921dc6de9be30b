//! Weights packed for the GEMM kernels: panels of [`NR`] output rows, stored k-major.
//!
//! A matrix `W [n, k]` (a linear layer's `[out, in]`) becomes `ceil(n / NR)` panels, so a GEMV
//! streams memory strictly forward and a GEMM needs no repacking of B. Rows past `n` in the last
//! panel are zero.
//!
//! - f32: panel `p` holds `W[p·NR + j][kk]` at element `(p·k + kk)·NR + j` (128 bytes per k).
//! - bf16: k is taken in pairs (padded with a zero column when odd); panel `p` holds
//!   `W[p·NR + j][2q + t]` at element `((p·⌈k/2⌉ + q)·NR + j)·2 + t`. Each 32-bit word is one
//!   column's (even, odd) pair: the operand layout of `vdpbf16ps`, and widening to f32 is a
//!   single shift (even) or mask (odd) per 16 values.

use half::bf16;

use super::arena::{Region, WeightArena};
use crate::{HostMatrix, WeightDtype};

/// Output rows per panel.
pub const NR: usize = 32;

/// A weight matrix in panel layout.
pub struct PackedMatrix {
    pub dtype: WeightDtype,
    /// Output features (rows of `W`).
    pub n: usize,
    /// Input features (columns of `W`).
    pub k: usize,
    buf: Region,
}

impl PackedMatrix {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Elements stored per panel (k padded to even for bf16).
    fn panel_elems(dtype: WeightDtype, k: usize) -> usize {
        match dtype {
            WeightDtype::F32 => k * NR,
            WeightDtype::BF16 => k.div_ceil(2) * 2 * NR,
        }
    }

    /// Element index of `(row j of a panel, column c)` within the panel.
    fn index_in_panel(dtype: WeightDtype, j: usize, c: usize) -> usize {
        match dtype {
            WeightDtype::F32 => c * NR + j,
            WeightDtype::BF16 => ((c / 2) * NR + j) * 2 + c % 2,
        }
    }

    /// Packs a host matrix into memory from `arena`, splitting the work over rayon's pool.
    pub fn from_host(m: &HostMatrix<'_>, arena: &WeightArena) -> PackedMatrix {
        let (n, k, es) = (m.rows, m.cols, m.dtype.size());
        let panels = n.div_ceil(NR);
        let per_panel = Self::panel_elems(m.dtype, k);
        let mut buf = arena.alloc(panels * per_panel * es);
        use rayon::prelude::*;
        let dst = buf.as_mut_slice::<u8>();
        dst.par_chunks_mut((per_panel * es).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = NR.min(n - p * NR);
                for j in 0..rows {
                    let src = &m.data[(p * NR + j) * k * es..(p * NR + j + 1) * k * es];
                    for c in 0..k {
                        let d = Self::index_in_panel(m.dtype, j, c) * es;
                        panel[d..d + es].copy_from_slice(&src[c * es..(c + 1) * es]);
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

    /// Packs an f32 matrix whose row `r` (length `k`) is `row(r)`, stored as `dtype` (bf16
    /// rounds to nearest even).
    pub fn from_f32_rows<'a>(
        n: usize,
        k: usize,
        dtype: WeightDtype,
        row: impl Fn(usize) -> &'a [f32],
    ) -> PackedMatrix {
        let mut m = PackedMatrix::zeroed(n, k, dtype);
        let per_panel = Self::panel_elems(dtype, k);
        for r in 0..n {
            let src = row(r);
            debug_assert_eq!(src.len(), k);
            let base = (r / NR) * per_panel;
            for (c, v) in src.iter().enumerate() {
                m.put(base + Self::index_in_panel(dtype, r % NR, c), *v);
            }
        }
        m
    }

    /// Packs the transpose of an f32 matrix `X [k, n]` whose row `i` (length `n`) is `row(i)`:
    /// the result is `W = Xᵀ [n, k]`, stored as `dtype`.
    pub fn from_f32_transposed<'a>(
        n: usize,
        k: usize,
        dtype: WeightDtype,
        row: impl Fn(usize) -> &'a [f32],
    ) -> PackedMatrix {
        let mut m = PackedMatrix::zeroed(n, k, dtype);
        let per_panel = Self::panel_elems(dtype, k);
        for i in 0..k {
            let src = row(i);
            debug_assert_eq!(src.len(), n);
            for (r, v) in src.iter().enumerate() {
                m.put(
                    (r / NR) * per_panel + Self::index_in_panel(dtype, r % NR, i),
                    *v,
                );
            }
        }
        m
    }

    fn zeroed(n: usize, k: usize, dtype: WeightDtype) -> PackedMatrix {
        let bytes = n.div_ceil(NR) * Self::panel_elems(dtype, k) * dtype.size();
        PackedMatrix {
            dtype,
            n,
            k,
            buf: Region::standalone(bytes),
        }
    }

    #[inline]
    fn put(&mut self, idx: usize, v: f32) {
        match self.dtype {
            WeightDtype::F32 => self.buf.as_mut_slice::<f32>()[idx] = v,
            WeightDtype::BF16 => self.buf.as_mut_slice::<u16>()[idx] = bf16::from_f32(v).to_bits(),
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
        let idx = (r / NR) * Self::panel_elems(self.dtype, self.k)
            + Self::index_in_panel(self.dtype, r % NR, c);
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

    /// Input columns `[c0, c0 + k)` of this window (`c0` even for bf16, which stores pairs).
    pub fn cols(&self, c0: usize, k: usize) -> PackedView<'a> {
        assert!(c0 + k <= self.k, "column window {c0}+{k} of {}", self.k);
        assert!(
            self.m.dtype == WeightDtype::F32 || (self.k0 + c0).is_multiple_of(2),
            "bf16 windows start at even columns"
        );
        PackedView {
            k0: self.k0 + c0,
            k,
            ..*self
        }
    }

    /// Pointer to k-step 0 of panel `p` (relative to the window).
    pub fn panel_ptr(&self, p: usize) -> *const u8 {
        let es = self.m.dtype.size();
        // A bf16 window starts at an even column, so k0·NR elements skip k0/2 pairs of NR·2.
        let elem =
            (self.panel0 + p) * PackedMatrix::panel_elems(self.m.dtype, self.m.k) + self.k0 * NR;
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
        assert_eq!(
            PackedMatrix::index_in_panel(WeightDtype::BF16, 3, 5),
            ((2 * NR) + 3) * 2 + 1
        );
        let vals: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 7.0).collect();
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let host = HostMatrix::new(WeightDtype::BF16, n, k, &bytes).expect("sizes match");
        let p = PackedMatrix::from_host(&host, &WeightArena::new());
        assert_eq!(p.panels(), 3);
        for r in 0..n {
            for c in 0..k {
                assert_eq!(p.get(r, c), host.get(r, c));
            }
        }
        let q = PackedMatrix::from_f32_rows(n, k, WeightDtype::F32, |r| &vals[r * k..(r + 1) * k]);
        let t = PackedMatrix::from_f32_transposed(k, n, WeightDtype::F32, |r| {
            &vals[r * k..(r + 1) * k]
        });
        let tb = PackedMatrix::from_f32_transposed(k, n, WeightDtype::BF16, |r| {
            &vals[r * k..(r + 1) * k]
        });
        for r in 0..n {
            for c in 0..k {
                assert_eq!(q.get(r, c), vals[r * k + c]);
                assert_eq!(t.get(c, r), vals[r * k + c]);
                assert_eq!(tb.get(c, r), bf16::from_f32(vals[r * k + c]).to_f32());
            }
        }
    }
}
