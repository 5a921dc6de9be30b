//! The CPU backend's fused operations against naive float64 references, through the public
//! `Backend` interface: grouped experts with arbitrary routes, and attention whose prefill
//! (blocked, online softmax) and decode (direct) paths must agree with plain causal softmax.

#![allow(clippy::unwrap_used)]

use half::bf16;
use myriad_kernels::cpu::{CpuBackend, CpuMatrix, Isa};
use myriad_kernels::{
    AttentionDims, AttentionLayer, Backend, ExpertMatrices, HostMatrix, KernelError, MatrixUse,
    Routes, SeqSpan, WeightDtype,
};

fn pseudo(i: usize, salt: u32) -> f32 {
    let x = (i as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(salt.wrapping_mul(40503))
        ^ 0x5bd1_e995;
    ((x >> 8) as f32 / (1u32 << 24) as f32) - 0.5
}

fn bf16_matrix(b: &CpuBackend, rows: usize, cols: usize, salt: u32) -> (CpuMatrix, Vec<f32>) {
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| bf16::from_f32(pseudo(i, salt)).to_f32())
        .collect();
    let bytes: Vec<u8> = vals
        .iter()
        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
        .collect();
    (
        b.matrix(
            HostMatrix::new(WeightDtype::BF16, rows, cols, &bytes).unwrap(),
            MatrixUse::Linear,
        )
        .unwrap(),
        vals,
    )
}

#[test]
fn grouped_experts_match_a_naive_sum_on_every_isa() {
    let (h, inter, experts) = (40, 12, 7);
    for isa in Isa::available() {
        let b = CpuBackend::with_isa(2, isa);
        let mut table: Vec<Option<std::sync::Arc<ExpertMatrices<CpuBackend>>>> = Vec::new();
        let mut naive_w = Vec::new();
        for e in 0..experts {
            if e == 5 {
                table.push(None);
                naive_w.push(None);
                continue;
            }
            let (gu, guv) = bf16_matrix(&b, 2 * inter, h, 10 + e as u32);
            let (dn, dnv) = bf16_matrix(&b, h, inter, 20 + e as u32);
            table.push(Some(std::sync::Arc::new(ExpertMatrices {
                gate_up: gu,
                down: dn,
            })));
            naive_w.push(Some((guv, dnv)));
        }
        // Rows with 0..4 pairs, repeated experts across rows, one expert with many rows.
        let rows = 300;
        let mut routes = Routes::new();
        for r in 0..rows {
            let n = r % 4;
            let ids: Vec<u32> = (0..n)
                .map(|j| {
                    if j == 0 {
                        2
                    } else {
                        ((r * 7 + j * 3) % experts) as u32
                    }
                })
                .filter(|e| *e != 5)
                .collect();
            let ws: Vec<f32> = ids
                .iter()
                .enumerate()
                .map(|(j, _)| 0.25 + 0.1 * j as f32)
                .collect();
            routes.push_row(&ids, &ws);
        }
        let x: Vec<f32> = (0..rows * h).map(|i| pseudo(i, 3)).collect();
        let xt = b.upload(rows, h, &x).unwrap();
        let mut out = b.zeros(rows, h);
        b.moe_experts(&xt, &routes, &table, &mut out).unwrap();
        let got = b.download(&out);
        for r in 0..rows {
            let (ids, ws) = routes.row(r);
            let xr = &x[r * h..(r + 1) * h];
            let mut want = vec![0f64; h];
            for (e, w) in ids.iter().zip(ws) {
                let (gu, dn) = naive_w[*e as usize].as_ref().unwrap();
                let act: Vec<f64> = (0..inter)
                    .map(|i| {
                        let g: f64 = (0..h)
                            .map(|k| f64::from(gu[i * h + k]) * f64::from(xr[k]))
                            .sum();
                        let u: f64 = (0..h)
                            .map(|k| f64::from(gu[(inter + i) * h + k]) * f64::from(xr[k]))
                            .sum();
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for o in 0..h {
                    want[o] += f64::from(*w)
                        * (0..inter)
                            .map(|i| f64::from(dn[o * inter + i]) * act[i])
                            .sum::<f64>();
                }
            }
            for o in 0..h {
                assert!(
                    (f64::from(got[r * h + o]) - want[o]).abs() < 1e-4,
                    "{isa:?} row {r} col {o}"
                );
            }
        }
        // Routing to an expert this table does not hold is an error naming it.
        let mut bad = Routes::new();
        bad.push_row(&[5], &[1.0]);
        let x1 = b.upload(1, h, &x[..h]).unwrap();
        let mut o1 = b.zeros(1, h);
        assert!(matches!(
            b.moe_experts(&x1, &bad, &table, &mut o1),
            Err(KernelError::MissingExpert { expert: 5 })
        ));
    }
}

/// Plain causal GQA softmax attention with q/k RMSNorm (weights 1), partial RoPE and the
/// sigmoid output gate, in f64, for one sequence.
fn naive_attention(d: &AttentionDims, proj: &[f32], n: usize) -> Vec<f32> {
    let (nh, nkv, hd, rot) = (d.num_heads, d.num_kv_heads, d.head_dim, d.rotary_dim);
    let pw = d.proj_dim();
    let norm = |x: &[f32]| -> Vec<f64> {
        let ms: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
        x.iter()
            .map(|v| f64::from(*v) / (ms + f64::from(d.norm_eps)).sqrt())
            .collect()
    };
    let rope = |x: &mut Vec<f64>, pos: usize| {
        let half = rot / 2;
        for i in 0..half {
            let f = 1.0 / f64::from(d.rope_theta).powf(2.0 * i as f64 / rot as f64);
            let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    };
    let mut out = vec![0f32; n * nh * hd];
    for h in 0..nh {
        let g = h / (nh / nkv);
        for t in 0..n {
            let mut q = norm(&proj[t * pw + h * 2 * hd..t * pw + h * 2 * hd + hd]);
            rope(&mut q, t);
            let scores: Vec<f64> = (0..=t)
                .map(|j| {
                    let k0 = j * pw + 2 * nh * hd + g * hd;
                    let mut k = norm(&proj[k0..k0 + hd]);
                    rope(&mut k, j);
                    q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for c in 0..hd {
                let v: f64 = (0..=t)
                    .map(|j| {
                        (scores[j] - m).exp() / z
                            * f64::from(proj[j * pw + 2 * nh * hd + nkv * hd + g * hd + c])
                    })
                    .sum();
                let gate = f64::from(proj[t * pw + h * 2 * hd + hd + c]);
                out[t * nh * hd + h * hd + c] = (v / (1.0 + (-gate).exp())) as f32;
            }
        }
    }
    out
}

#[test]
fn attention_prefill_and_decode_match_plain_causal_softmax() {
    let d = AttentionDims {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rotary_dim: 8,
        rope_theta: 10_000.0,
        yarn: None,
        norm_eps: 1e-6,
    };
    let n = 300; // crosses the 64-query and 256-key blocks of the prefill path
    let proj: Vec<f32> = (0..n * d.proj_dim()).map(|i| 2.0 * pseudo(i, 9)).collect();
    let want = naive_attention(&d, &proj, n);
    for isa in Isa::available() {
        let b = CpuBackend::with_isa(2, isa);
        let layer = AttentionLayer::<CpuBackend> {
            dims: d,
            q_norm: b.upload(1, d.head_dim, &vec![1.0; d.head_dim]).unwrap(),
            k_norm: b.upload(1, d.head_dim, &vec![1.0; d.head_dim]).unwrap(),
        };
        // Prefill 200 tokens, one decode step, then a chunk of 99: every path is exercised.
        let mut cache = b.new_kv_cache(&d);
        let mut got = Vec::new();
        for (start, len) in [(0usize, 200usize), (200, 1), (201, 99)] {
            let p = b
                .upload(
                    len,
                    d.proj_dim(),
                    &proj[start * d.proj_dim()..(start + len) * d.proj_dim()],
                )
                .unwrap();
            let mut o = b.zeros(len, d.out_dim());
            b.gated_attention(
                &layer,
                &p,
                &[SeqSpan {
                    start: 0,
                    len,
                    past: start,
                }],
                &mut [&mut cache],
                &mut o,
            );
            got.extend(b.download(&o));
        }
        assert_eq!(b.kv_cache_len(&cache), n);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 2e-5, "{isa:?}: max difference {worst}");
    }
}
