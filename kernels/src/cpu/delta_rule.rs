//! The gated delta rule for one value head (spec §2.3 f and h), in f32.
//!
//! State `S [dk, dv]` (rows: key dim). Per token: `S ← α·S`; `u = β(v − Sᵀk)`; `S ← S + k uᵀ`;
//! `o = Sᵀq`. [`recurrent`] applies that token by token (decode); [`chunked`] processes chunks of
//! [`CHUNK`] tokens with the WY/UT form (prefill), which is the same map up to rounding: the
//! property tests below hold the two to each other.

use super::vmath;

/// Tokens per chunk in the chunked form (as FLA and transformers use).
pub const CHUNK: usize = 64;

/// Strided inputs and outputs of one head over `len` tokens: element `t` of stream `x` starts
/// at `x[t * x_stride]`.
pub struct HeadIo<'a> {
    pub len: usize,
    pub q: &'a [f32],
    pub q_stride: usize,
    pub k: &'a [f32],
    pub k_stride: usize,
    pub v: &'a [f32],
    pub v_stride: usize,
    pub beta: &'a [f32],
    pub g: &'a [f32],
    pub gate_stride: usize,
    /// Output rows `[len, dv]`, contiguous.
    pub out: &'a mut [f32],
}

/// Token-by-token recurrence; `s` is `[dk, dv]`, advanced in place.
#[inline(always)]
pub fn recurrent(s: &mut [f32], dk: usize, dv: usize, io: HeadIo<'_>) {
    let mut kv = vec![0f32; dv];
    for t in 0..io.len {
        let q = &io.q[t * io.q_stride..t * io.q_stride + dk];
        let k = &io.k[t * io.k_stride..t * io.k_stride + dk];
        let v = &io.v[t * io.v_stride..t * io.v_stride + dv];
        let beta = io.beta[t * io.gate_stride];
        let alpha = io.g[t * io.gate_stride].exp();
        vmath::scale(s, alpha);
        kv.fill(0.0);
        vmath::accumulate_rows(&mut kv, k, s, dv);
        for (u, vv) in kv.iter_mut().zip(v) {
            *u = beta * (vv - *u);
        }
        for (i, row) in s.chunks_exact_mut(dv).enumerate() {
            vmath::axpy(row, k[i], &kv);
        }
        let o = &mut io.out[t * dv..(t + 1) * dv];
        o.fill(0.0);
        vmath::accumulate_rows(o, q, s, dv);
    }
}

/// Chunked (parallel) form; same contract as [`recurrent`].
///
/// Every product is written as an axpy along a contiguous row (no horizontal reductions):
/// key·key and query·key rows come from a transposed copy of the chunk's keys, and the decays
/// `exp(γ_r − γ_s)` are formed once per chunk.
#[inline(always)]
pub fn chunked(s: &mut [f32], dk: usize, dv: usize, io: HeadIo<'_>) {
    let mut gam = [0f32; CHUNK];
    let mut beta = [0f32; CHUNK];
    let mut kc = vec![0f32; CHUNK * dk];
    let mut kt = vec![0f32; dk * CHUNK];
    let mut qc = vec![0f32; CHUNK * dk];
    // decay[r][s] = exp(γ_r − γ_s) for s ≤ r (the exponent is only formed there: the full
    // matrix overflows f32, since γ can drop below −88 within a chunk).
    let mut decay = vec![0f32; CHUNK * CHUNK];
    let mut a = vec![0f32; CHUNK * CHUNK];
    let mut row = [0f32; CHUNK];
    let mut neg = vec![0f32; CHUNK.max(dk)];
    let mut u = vec![0f32; CHUNK * dv];
    let mut w = vec![0f32; CHUNK * dk];
    let mut c0 = 0;
    while c0 < io.len {
        let c = CHUNK.min(io.len - c0);
        let mut acc = 0f32;
        for r in 0..c {
            let t = c0 + r;
            acc += io.g[t * io.gate_stride];
            gam[r] = acc;
            beta[r] = io.beta[t * io.gate_stride];
            let k = &io.k[t * io.k_stride..t * io.k_stride + dk];
            kc[r * dk..(r + 1) * dk].copy_from_slice(k);
            for (i, v) in k.iter().enumerate() {
                kt[i * CHUNK + r] = *v;
            }
            qc[r * dk..(r + 1) * dk].copy_from_slice(&io.q[t * io.q_stride..t * io.q_stride + dk]);
        }
        for r in 0..c {
            for s_ in 0..=r {
                decay[r * CHUNK + s_] = vmath::exp(gam[r] - gam[s_]);
            }
        }
        // A[r][s] = β_r · decay[r][s] · (k_r · k_s) for s < r.
        for r in 1..c {
            let kr = &kc[r * dk..(r + 1) * dk];
            let dst = &mut row[..r];
            dst.fill(0.0);
            vmath::accumulate_rows(dst, kr, &kt, CHUNK);
            for (s_, v) in dst.iter().enumerate() {
                a[r * CHUNK + s_] = beta[r] * decay[r * CHUNK + s_] * v;
            }
        }
        // Forward substitution solves (I + A) U₀ = β⊙V and (I + A) W = β⊙Γ⊙K.
        for r in 0..c {
            let t = c0 + r;
            let v = &io.v[t * io.v_stride..t * io.v_stride + dv];
            let (done_u, rest_u) = u.split_at_mut(r * dv);
            let ur = &mut rest_u[..dv];
            for (x, vv) in ur.iter_mut().zip(v) {
                *x = beta[r] * vv;
            }
            let (done_w, rest_w) = w.split_at_mut(r * dk);
            let wr = &mut rest_w[..dk];
            let bg = beta[r] * vmath::exp(gam[r]);
            for (x, kv) in wr.iter_mut().zip(&kc[r * dk..(r + 1) * dk]) {
                *x = bg * kv;
            }
            for (n, v) in neg[..r].iter_mut().zip(&a[r * CHUNK..r * CHUNK + r]) {
                *n = -v;
            }
            vmath::accumulate_rows(ur, &neg[..r], done_u, dv);
            vmath::accumulate_rows(wr, &neg[..r], done_w, dk);
        }
        // U = U₀ − W·S_in (the values each step actually writes, given the incoming state).
        for r in 0..c {
            let ur = &mut u[r * dv..(r + 1) * dv];
            for (n, v) in neg[..dk].iter_mut().zip(&w[r * dk..(r + 1) * dk]) {
                *n = -v;
            }
            vmath::accumulate_rows(ur, &neg[..dk], s, dv);
        }
        // O_r = Γ_r · q_rᵀ S_in + Σ_{s ≤ r} (q_r · k_s) · decay[r][s] · U_s.
        for r in 0..c {
            let qr = &qc[r * dk..(r + 1) * dk];
            let dots = &mut row[..=r];
            dots.fill(0.0);
            vmath::accumulate_rows(dots, qr, &kt, CHUNK);
            for (d, dec) in dots.iter_mut().zip(&decay[r * CHUNK..r * CHUNK + r + 1]) {
                *d *= dec;
            }
            let o = &mut io.out[(c0 + r) * dv..(c0 + r + 1) * dv];
            o.fill(0.0);
            vmath::accumulate_rows(o, qr, s, dv);
            vmath::scale(o, vmath::exp(gam[r]));
            vmath::accumulate_rows(o, dots, &u, dv);
        }
        // S_out = Γ_c S_in + Σ_s exp(γ_c − γ_s) k_s ⊗ U_s; the decays are row c-1 of `decay`.
        let last = c - 1;
        vmath::scale(s, vmath::exp(gam[last]));
        for s_ in 0..c {
            let d = decay[last * CHUNK + s_];
            vmath::scale(&mut u[s_ * dv..(s_ + 1) * dv], d);
        }
        for i in 0..dk {
            let srow = &mut s[i * dv..(i + 1) * dv];
            vmath::accumulate_rows(srow, &kt[i * CHUNK..i * CHUNK + c], &u, dv);
        }
        c0 += c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Case {
        len: usize,
        dk: usize,
        dv: usize,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        beta: Vec<f32>,
        g: Vec<f32>,
        s0: Vec<f32>,
    }

    fn unit(v: &mut [f32]) {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-6;
        v.iter_mut().for_each(|x| *x /= n);
    }

    fn case(len: usize, dk: usize, dv: usize, seed: u64, decay_scale: f32) -> Case {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut q: Vec<f32> = (0..len * dk).map(|_| next()).collect();
        let mut k: Vec<f32> = (0..len * dk).map(|_| next()).collect();
        for t in 0..len {
            unit(&mut q[t * dk..(t + 1) * dk]);
            unit(&mut k[t * dk..(t + 1) * dk]);
        }
        let v = (0..len * dv).map(|_| 2.0 * next()).collect();
        let beta = (0..len).map(|_| next() + 0.5).collect();
        let g = (0..len).map(|_| -(next() + 0.5) * decay_scale).collect();
        let s0 = (0..dk * dv).map(|_| next()).collect();
        Case {
            len,
            dk,
            dv,
            q,
            k,
            v,
            beta,
            g,
            s0,
        }
    }

    fn run(c: &Case, chunk: bool) -> (Vec<f32>, Vec<f32>) {
        let mut s = c.s0.clone();
        let mut out = vec![0f32; c.len * c.dv];
        let io = HeadIo {
            len: c.len,
            q: &c.q,
            q_stride: c.dk,
            k: &c.k,
            k_stride: c.dk,
            v: &c.v,
            v_stride: c.dv,
            beta: &c.beta,
            g: &c.g,
            gate_stride: 1,
            out: &mut out,
        };
        if chunk {
            chunked(&mut s, c.dk, c.dv, io)
        } else {
            recurrent(&mut s, c.dk, c.dv, io)
        }
        (out, s)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Chunked and recurrent forms agree on outputs and final state, across chunk
        /// boundaries, with strong and weak decay (γ far below −88 inside a chunk).
        #[test]
        fn chunked_matches_recurrent(len in 1usize..200, dk in 1usize..40, dv in 1usize..40, seed in any::<u64>(), strong in any::<bool>()) {
            let c = case(len, dk, dv, seed, if strong { 6.0 } else { 0.05 });
            let (o1, s1) = run(&c, false);
            let (o2, s2) = run(&c, true);
            prop_assert!(o1.iter().chain(&s1).all(|v| v.is_finite()));
            prop_assert!(max_diff(&o1, &o2) < 2e-4, "outputs differ by {}", max_diff(&o1, &o2));
            prop_assert!(max_diff(&s1, &s2) < 2e-4, "states differ by {}", max_diff(&s1, &s2));
        }
    }

    /// Splitting a sequence and carrying the state gives what one pass gives.
    #[test]
    fn carried_state_equals_one_pass() {
        let c = case(150, 16, 24, 7, 0.3);
        let (full, s_full) = run(&c, true);
        let cut = 70;
        let mut s = c.s0.clone();
        let mut out = vec![0f32; c.len * c.dv];
        for (lo, hi) in [(0, cut), (cut, c.len)] {
            let io = HeadIo {
                len: hi - lo,
                q: &c.q[lo * c.dk..],
                q_stride: c.dk,
                k: &c.k[lo * c.dk..],
                k_stride: c.dk,
                v: &c.v[lo * c.dv..],
                v_stride: c.dv,
                beta: &c.beta[lo..],
                g: &c.g[lo..],
                gate_stride: 1,
                out: &mut out[lo * c.dv..hi * c.dv],
            };
            chunked(&mut s, c.dk, c.dv, io);
        }
        assert!(max_diff(&full, &out) < 1e-4);
        assert!(max_diff(&s_full, &s) < 1e-4);
    }
}
