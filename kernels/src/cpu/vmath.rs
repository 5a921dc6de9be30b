//! Element-wise and reduction helpers written so LLVM vectorises them for whatever target
//! features the calling kernel was compiled with (see `isa::multiversion!`).
//!
//! Reductions keep [`LANES`] independent partial sums: the summation order is fixed by the code,
//! not by the compiler, so results are reproducible for a given ISA.

/// Independent accumulators per reduction (one AVX-512 register of f32).
pub const LANES: usize = 16;

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut half = [0f32; 8];
    for j in 0..8 {
        half[j] = acc[j] + acc[j + 8];
    }
    let q = [
        half[0] + half[4],
        half[1] + half[5],
        half[2] + half[6],
        half[3] + half[7],
    ];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `Σ a[i]·b[i]`.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = reduce(acc);
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `Σ a[i]²`.
#[inline(always)]
pub fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

/// `Σ a[i]`.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let r = ca.remainder();
    for x in ca {
        for j in 0..LANES {
            acc[j] += x[j];
        }
    }
    let mut s = reduce(acc);
    for x in r {
        s += x;
    }
    s
}

/// `max a[i]` (−∞ for an empty slice).
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let ca = a.chunks_exact(LANES);
    let r = ca.remainder();
    for x in ca {
        for j in 0..LANES {
            acc[j] = acc[j].max(x[j]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for x in r {
        m = m.max(*x);
    }
    m
}

/// `y[i] += a·x[i]`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = a.mul_add(*xv, *yv);
    }
}

/// `y += Σ_s c[s] · x[s·stride .. s·stride + y.len()]`: a transposed GEMV over row-major
/// rows. The destination is held in registers across all rows (loop interchange), so there is
/// no load–FMA–store chain through memory per source row; four independent 16-lane blocks keep
/// the FMA pipes busy.
#[inline(always)]
pub fn accumulate_rows(y: &mut [f32], c: &[f32], x: &[f32], stride: usize) {
    const BLOCK: usize = 4 * LANES;
    let n = y.len();
    let mut j = 0;
    while j + BLOCK <= n {
        let mut acc = [0f32; BLOCK];
        acc.copy_from_slice(&y[j..j + BLOCK]);
        for (s, cv) in c.iter().enumerate() {
            let xr = &x[s * stride + j..s * stride + j + BLOCK];
            for l in 0..BLOCK {
                acc[l] = cv.mul_add(xr[l], acc[l]);
            }
        }
        y[j..j + BLOCK].copy_from_slice(&acc);
        j += BLOCK;
    }
    while j + LANES <= n {
        let mut acc = [0f32; LANES];
        acc.copy_from_slice(&y[j..j + LANES]);
        for (s, cv) in c.iter().enumerate() {
            let xr = &x[s * stride + j..s * stride + j + LANES];
            for l in 0..LANES {
                acc[l] = cv.mul_add(xr[l], acc[l]);
            }
        }
        y[j..j + LANES].copy_from_slice(&acc);
        j += LANES;
    }
    for jj in j..n {
        let mut acc = y[jj];
        for (s, cv) in c.iter().enumerate() {
            acc = cv.mul_add(x[s * stride + jj], acc);
        }
        y[jj] = acc;
    }
}

/// `y[i] *= a`.
#[inline(always)]
pub fn scale(y: &mut [f32], a: f32) {
    for v in y {
        *v *= a;
    }
}

/// `y[i] += x[i]`.
#[inline(always)]
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += *xv;
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 · 2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `eˣ` to about 2 ulp, branch-free so it vectorises; exact 0 below −87.3 (including −∞) and
/// saturates at `f32::MAX`-ish above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients).
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_66);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e * scale;
    if x < -87.3 { 0.0 } else { y }
}

/// `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `x · σ(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `ln(1 + eˣ)`, returning `x` above 20 as PyTorch does.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { (1.0 + x.exp()).ln() }
}

/// `y[i] = exp(x[i])` in place.
#[inline(always)]
pub fn exp_in_place(y: &mut [f32]) {
    for v in y {
        *v = exp(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn accumulate_rows_is_a_transposed_gemv() {
        for n in [1usize, 15, 16, 17, 64, 70, 130] {
            let rows = 5;
            let stride = n + 3;
            let x: Vec<f32> = (0..rows * stride)
                .map(|i| (i as f32 * 0.31).sin())
                .collect();
            let c: Vec<f32> = (0..rows).map(|i| i as f32 - 1.5).collect();
            let mut y: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let want: Vec<f32> = (0..n)
                .map(|j| j as f32 + (0..rows).map(|s| c[s] * x[s * stride + j]).sum::<f32>())
                .collect();
            accumulate_rows(&mut y, &c, &x, stride);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn reductions_agree_with_naive_sums() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-5);
        assert!((sum(&a) - a.iter().sum::<f32>()).abs() < 1e-5);
        assert_eq!(max(&a), a.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
    }
}
