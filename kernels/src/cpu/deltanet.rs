//! The Gated DeltaNet mixer on the CPU (spec §2.3), up to `out_proj`.
//!
//! Input rows are the fused projection `[q | k | v | z | b | a]`. Four phases, each parallel:
//! 1. causal depthwise conv over `[q | k | v]` with the carried `K-1` raw inputs, then SiLU
//!    (per sequence × channel block; the state is updated in the same pass);
//! 2. per token: L2-normalise q and k per key head (q also scaled by `dk^-½`), gates
//!    `β = σ(b)`, `g = −exp(A_log)·softplus(a + dt_bias)`;
//! 3. per (sequence, value head): the delta rule, recurrent for one token and chunked for more;
//! 4. per token and head: gated RMSNorm `norm(o) · w · silu(z)`.

use super::delta_rule::{self, HeadIo};
use super::isa::{Isa, multiversion};
use super::pool::{Pool, SharedMut};
use super::vmath;
use crate::{DeltaNetDims, DeltaStateHost, KernelError, SeqSpan};

/// Conv channels per task.
const CONV_BLOCK: usize = 512;
/// Epsilon of the q/k L2 norm (fixed in the reference, not `rms_norm_eps`).
const L2_EPS: f32 = 1e-6;

/// One sequence's state for one DeltaNet layer.
pub struct CpuDeltaState {
    pub(crate) dims: DeltaNetDims,
    /// Last `K-1` raw conv inputs, oldest first: `[K-1, conv_dim]`.
    pub(crate) conv: Vec<f32>,
    /// `[nv, dk, dv]`.
    pub(crate) recurrent: Vec<f32>,
}

impl CpuDeltaState {
    pub fn new(dims: &DeltaNetDims) -> Self {
        CpuDeltaState {
            dims: *dims,
            conv: vec![0.0; (dims.conv_kernel - 1) * dims.conv_dim()],
            recurrent: vec![0.0; dims.num_v_heads * dims.k_head_dim * dims.v_head_dim],
        }
    }

    pub fn to_host(&self) -> DeltaStateHost {
        DeltaStateHost {
            conv: self.conv.clone(),
            recurrent: self.recurrent.clone(),
        }
    }

    pub fn from_host(dims: &DeltaNetDims, host: &DeltaStateHost) -> Result<Self, KernelError> {
        let s = CpuDeltaState::new(dims);
        if host.conv.len() != s.conv.len() || host.recurrent.len() != s.recurrent.len() {
            return Err(KernelError::StateShape(format!(
                "DeltaNet state needs {} conv and {} recurrent values, got {} and {}",
                s.conv.len(),
                s.recurrent.len(),
                host.conv.len(),
                host.recurrent.len()
            )));
        }
        Ok(CpuDeltaState {
            dims: *dims,
            conv: host.conv.clone(),
            recurrent: host.recurrent.clone(),
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.conv.len() + self.recurrent.len()) * 4
    }
}

/// The layer's small parameters, as host slices.
pub struct DeltaNetArgs<'a> {
    pub dims: DeltaNetDims,
    /// `[K, conv_dim]`, tap-major.
    pub conv_weight: &'a [f32],
    pub a_log: &'a [f32],
    pub dt_bias: &'a [f32],
    pub norm_weight: &'a [f32],
}

multiversion! {
    /// Conv + SiLU over one channel block: `window` is `[K-1+len, cw]` raw inputs (carried
    /// state first), `taps` is `[K, cw]`; writes `out [len, cw]`.
    fn conv_window(taps: &[f32], kernel: usize, cw: usize, window: &[f32], len: usize, out: &mut [f32]) {
        let mut acc = vec![0f32; cw];
        for t in 0..len {
            acc.fill(0.0);
            for j in 0..kernel {
                let (w, x) = (&taps[j * cw..(j + 1) * cw], &window[(t + j) * cw..(t + j + 1) * cw]);
                for ((a, wv), xv) in acc.iter_mut().zip(w).zip(x) {
                    *a = wv.mul_add(*xv, *a);
                }
            }
            for (o, a) in out[t * cw..(t + 1) * cw].iter_mut().zip(&acc) {
                *o = vmath::silu(*a);
            }
        }
    }
}

multiversion! {
    /// L2-normalises q and k heads in place and computes the gates for a block of rows.
    fn norm_and_gates(
        dims: &DeltaNetDims,
        conv: &mut [f32],
        proj: &[f32],
        a_log: &[f32],
        dt_bias: &[f32],
        beta: &mut [f32],
        g: &mut [f32],
    ) {
        let (nk, dk, nv) = (dims.num_k_heads, dims.k_head_dim, dims.num_v_heads);
        let (cd, pw) = (dims.conv_dim(), dims.proj_dim());
        let q_scale = 1.0 / (dk as f32).sqrt();
        let b0 = cd + dims.value_dim();
        let rows = conv.len() / cd;
        for t in 0..rows {
            let row = &mut conv[t * cd..(t + 1) * cd];
            for h in 0..2 * nk {
                let x = &mut row[h * dk..(h + 1) * dk];
                let mut inv = 1.0 / (vmath::sum_squares(x) + L2_EPS).sqrt();
                if h < nk {
                    inv *= q_scale;
                }
                vmath::scale(x, inv);
            }
            let p = &proj[t * pw..(t + 1) * pw];
            for j in 0..nv {
                beta[t * nv + j] = 1.0 / (1.0 + (-p[b0 + j]).exp());
                g[t * nv + j] = -a_log[j].exp() * vmath::softplus(p[b0 + nv + j] + dt_bias[j]);
            }
        }
    }
}

multiversion! {
    /// The delta rule for one value head of one sequence.
    fn head(s: &mut [f32], dk: usize, dv: usize, io: HeadIo<'_>) {
        if io.len == 1 {
            delta_rule::recurrent(s, dk, dv, io)
        } else {
            delta_rule::chunked(s, dk, dv, io)
        }
    }
}

multiversion! {
    /// Gated RMSNorm of each head of a block of rows, in place: `o ← norm(o)·w·silu(z)`.
    fn gated_norm(o: &mut [f32], vd: usize, dv: usize, eps: f32, w: &[f32], proj: &[f32], pw: usize, z0: usize) {
        for (t, row) in o.chunks_exact_mut(vd).enumerate() {
            let z = &proj[t * pw + z0..t * pw + z0 + vd];
            for (oh, zh) in row.chunks_exact_mut(dv).zip(z.chunks_exact(dv)) {
                let inv = 1.0 / (vmath::sum_squares(oh) / dv as f32 + eps).sqrt();
                for ((x, wv), zv) in oh.iter_mut().zip(w).zip(zh) {
                    *x = *x * inv * wv * vmath::silu(*zv);
                }
            }
        }
    }
}

/// Runs the mixer for a packed batch: `proj [n, proj_dim]` → `out [n, value_dim]`.
pub fn gated_deltanet(
    pool: &Pool,
    isa: Isa,
    args: &DeltaNetArgs<'_>,
    proj: &[f32],
    spans: &[SeqSpan],
    states: &mut [&mut CpuDeltaState],
    out: &mut [f32],
) {
    let d = args.dims;
    let (cd, pw, nv, dk, dv) = (
        d.conv_dim(),
        d.proj_dim(),
        d.num_v_heads,
        d.k_head_dim,
        d.v_head_dim,
    );
    let n = proj.len() / pw;
    assert_eq!(spans.len(), states.len(), "one state per span");
    assert_eq!(out.len(), n * d.value_dim(), "DeltaNet output shape");
    for st in states.iter() {
        assert_eq!(st.dims, d, "DeltaNet state belongs to another layer shape");
    }

    // 1. Causal conv + SiLU. Each task owns one channel block of one sequence: it gathers
    // that block's carried inputs and new rows, and scatters its outputs and new state.
    let mut conv = vec![0f32; n * cd];
    let blocks = cd.div_ceil(CONV_BLOCK);
    let hist = d.conv_kernel - 1;
    {
        let conv_out = SharedMut::new(&mut conv);
        let state_ptrs: Vec<SharedMut<f32>> = states
            .iter_mut()
            .map(|s| SharedMut::new(&mut s.conv))
            .collect();
        pool.for_each(spans.len() * blocks, |t| {
            let (si, b) = (t / blocks, t % blocks);
            let s = spans[si];
            let c0 = b * CONV_BLOCK;
            let cw = CONV_BLOCK.min(cd - c0);
            let mut taps = vec![0f32; d.conv_kernel * cw];
            for j in 0..d.conv_kernel {
                taps[j * cw..(j + 1) * cw]
                    .copy_from_slice(&args.conv_weight[j * cd + c0..j * cd + c0 + cw]);
            }
            let mut window = vec![0f32; (hist + s.len) * cw];
            let st = state_ptrs[si].ptr();
            for r in 0..hist {
                // SAFETY: row r, channels c0..c0+cw of this sequence's state: only this task
                // reads or writes them.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        st.add(r * cd + c0),
                        window.as_mut_ptr().add(r * cw),
                        cw,
                    )
                };
            }
            for i in 0..s.len {
                let src = &proj[(s.start + i) * pw + c0..(s.start + i) * pw + c0 + cw];
                window[(hist + i) * cw..(hist + i + 1) * cw].copy_from_slice(src);
            }
            let mut o = vec![0f32; s.len * cw];
            conv_window(isa, &taps, d.conv_kernel, cw, &window, s.len, &mut o);
            for i in 0..s.len {
                // SAFETY: row s.start+i, channels c0..c0+cw of `conv`: this task's alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        o.as_ptr().add(i * cw),
                        conv_out.ptr().add((s.start + i) * cd + c0),
                        cw,
                    )
                };
            }
            for r in 0..hist {
                // SAFETY: as for the gather above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        window.as_ptr().add((s.len + r) * cw),
                        st.add(r * cd + c0),
                        cw,
                    )
                };
            }
        });
    }

    // 2. q/k L2 norm and gates.
    let mut beta = vec![0f32; n * nv];
    let mut g = vec![0f32; n * nv];
    {
        let (cp, bp, gp) = (
            SharedMut::new(&mut conv),
            SharedMut::new(&mut beta),
            SharedMut::new(&mut g),
        );
        super::ops::for_row_blocks(pool, n, cd, |r0, rows| {
            // SAFETY: disjoint row blocks.
            let (c, b, gg) = unsafe {
                (
                    cp.slice(r0 * cd, rows * cd),
                    bp.slice(r0 * nv, rows * nv),
                    gp.slice(r0 * nv, rows * nv),
                )
            };
            norm_and_gates(
                isa,
                &d,
                c,
                &proj[r0 * pw..(r0 + rows) * pw],
                args.a_log,
                args.dt_bias,
                b,
                gg,
            );
        });
    }

    // 3. The delta rule per (sequence, value head).
    let r = d.heads_per_key();
    let (k_off, v_off) = (d.key_dim(), 2 * d.key_dim());
    let state_ptrs: Vec<SharedMut<f32>> = states
        .iter_mut()
        .map(|s| SharedMut::new(&mut s.recurrent))
        .collect();
    let out_ptr = SharedMut::new(out);
    pool.for_each(spans.len() * nv, |t| {
        let (si, j) = (t / nv, t % nv);
        let s = spans[si];
        if s.len == 0 {
            return;
        }
        let kh = j / r;
        let mut o = vec![0f32; s.len * dv];
        // SAFETY: head j's block of sequence si's recurrent state belongs to this task alone.
        let st = unsafe { state_ptrs[si].slice(j * dk * dv, dk * dv) };
        let rows = &conv[s.start * cd..];
        let io = HeadIo {
            len: s.len,
            q: &rows[kh * dk..],
            q_stride: cd,
            k: &rows[k_off + kh * dk..],
            k_stride: cd,
            v: &rows[v_off + j * dv..],
            v_stride: cd,
            beta: &beta[s.start * nv + j..],
            g: &g[s.start * nv + j..],
            gate_stride: nv,
            out: &mut o,
        };
        head(isa, st, dk, dv, io);
        for (i, row) in o.chunks_exact(dv).enumerate() {
            // SAFETY: row s.start+i, columns of head j: written by this task only.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    out_ptr.ptr().add((s.start + i) * nv * dv + j * dv),
                    dv,
                )
            };
        }
    });

    // 4. Gated RMSNorm.
    let vd = d.value_dim();
    super::ops::for_row_blocks(pool, n, vd, |r0, rows| {
        // SAFETY: disjoint row blocks of `out`.
        let o = unsafe { out_ptr.slice(r0 * vd, rows * vd) };
        gated_norm(
            isa,
            o,
            vd,
            dv,
            d.norm_eps,
            args.norm_weight,
            &proj[r0 * pw..(r0 + rows) * pw],
            pw,
            cd,
        );
    });
}
