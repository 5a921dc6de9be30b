//! The CPU backend's fused operations against naive float64 references, through the public
//! `Backend` interface: grouped experts with arbitrary routes, and attention whose prefill
//! (blocked, online softmax) and decode (direct) paths must agree with plain causal softmax.

#![allow(clippy::unwrap_used)]

use half::bf16;
use myriad_kernels::cpu::{CpuBackend, CpuMatrix, Isa};
use myriad_kernels::{
    AttentionDims, AttentionLayer, Backend, ExpertMatrices, HostMatrix, KernelError, KvCacheSpec,
    KvDtype, MatrixUse, Routes, SeqSpan, WeightDtype,
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

fn small_attention_dims() -> AttentionDims {
    AttentionDims {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rotary_dim: 8,
        rope_theta: 10_000.0,
        yarn: None,
        norm_eps: 1e-6,
    }
}

/// Runs `proj` through one sequence's attention in the given `(start, len)` pieces on a cache
/// of `spec`; returns the outputs in order and the cache.
fn run_attention_pieces(
    b: &CpuBackend,
    d: &AttentionDims,
    spec: &KvCacheSpec,
    proj: &[f32],
    pieces: &[(usize, usize)],
) -> (Vec<f32>, <CpuBackend as Backend>::KvCache) {
    let layer = AttentionLayer::<CpuBackend> {
        dims: *d,
        q_norm: b.upload(1, d.head_dim, &vec![1.0; d.head_dim]).unwrap(),
        k_norm: b.upload(1, d.head_dim, &vec![1.0; d.head_dim]).unwrap(),
    };
    let mut cache = b.new_kv_cache(d, spec);
    let mut got = Vec::new();
    for &(start, len) in pieces {
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
    (got, cache)
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn attention_prefill_and_decode_match_plain_causal_softmax() {
    let d = small_attention_dims();
    let n = 300; // crosses the 64-query and 256-key blocks of the prefill path
    let proj: Vec<f32> = (0..n * d.proj_dim()).map(|i| 2.0 * pseudo(i, 9)).collect();
    let want = naive_attention(&d, &proj, n);
    // Prefill 200 tokens, one decode step, a short multi-token step (direct path), then a
    // chunk of 96: every path is exercised.
    let pieces = [(0usize, 200usize), (200, 1), (201, 3), (204, 96)];
    for isa in Isa::available() {
        let b = CpuBackend::with_isa(2, isa);
        let (got, cache) = run_attention_pieces(&b, &d, &KvCacheSpec::default(), &proj, &pieces);
        assert_eq!(b.kv_cache_len(&cache), n);
        let worst = max_difference(&got, &want);
        assert!(worst < 2e-5, "{isa:?}: max difference {worst}");
    }
}

/// f32 blocks of any size give bit-for-bit the same result (one block of 4096 tokens is the
/// old contiguous cache), and blocks are taken as the cache grows and given back.
#[test]
fn paged_attention_is_independent_of_the_block_size() {
    let d = small_attention_dims();
    let n = 300;
    let proj: Vec<f32> = (0..n * d.proj_dim()).map(|i| 2.0 * pseudo(i, 5)).collect();
    let pieces = [
        (0usize, 37usize),
        (37, 1),
        (38, 1),
        (39, 200),
        (239, 5),
        (244, 56),
    ];
    let b = CpuBackend::new(2);
    let spec = |block_tokens| KvCacheSpec {
        block_tokens,
        dtype: KvDtype::F32,
    };
    let (want, _) = run_attention_pieces(&b, &d, &spec(4096), &proj, &pieces);
    for bt in [1usize, 7, 16, 32, 300, 301] {
        let (got, mut cache) = run_attention_pieces(&b, &d, &spec(bt), &proj, &pieces);
        assert_eq!(got, want, "blocks of {bt} tokens");
        assert_eq!(b.kv_cache_blocks(&cache), n.div_ceil(bt));
        assert_eq!(b.kv_blocks_live(), n.div_ceil(bt));
        b.kv_cache_truncate(&mut cache, 10);
        assert_eq!(b.kv_cache_blocks(&cache), 10usize.div_ceil(bt));
        assert_eq!(b.kv_blocks_live(), 10usize.div_ceil(bt));
        drop(cache);
        assert_eq!(b.kv_blocks_live(), 0);
    }
}

/// bf16 and fp8 blocks stay within their rounding of the exact result, through prefill and
/// decode, with blocks that fill and rescale as tokens arrive one by one.
#[test]
fn low_precision_kv_stays_close_to_f32() {
    let d = small_attention_dims();
    let n = 120;
    // Later tokens are larger, so fp8 blocks must widen their scale as they fill.
    let proj: Vec<f32> = (0..n * d.proj_dim())
        .map(|i| (1.0 + 3.0 * (i / d.proj_dim()) as f32 / n as f32) * pseudo(i, 3))
        .collect();
    let want = naive_attention(&d, &proj, n);
    let mut pieces: Vec<(usize, usize)> = vec![(0, 50)];
    pieces.extend((50..n).map(|t| (t, 1)));
    let b = CpuBackend::new(2);
    for (dtype, tolerance) in [(KvDtype::BF16, 5e-3), (KvDtype::Fp8E4M3, 6e-2)] {
        let spec = KvCacheSpec {
            block_tokens: 16,
            dtype,
        };
        let (got, cache) = run_attention_pieces(&b, &d, &spec, &proj, &pieces);
        let worst = max_difference(&got, &want);
        eprintln!("{}: max difference {worst}", dtype.name());
        assert!(
            worst < tolerance,
            "{}: max difference {worst}",
            dtype.name()
        );
        // Stored bytes: the dtype's size per value, plus two scales per block.
        let stored = b.kv_cache_export(&cache);
        let row = d.num_kv_heads * d.head_dim;
        assert!(
            stored
                .blocks
                .iter()
                .all(|blk| blk.data.len() == 2 * 16 * row * dtype.size())
        );
        // What is exported imports to the same values.
        let again = b.kv_cache_import(&d, &stored).unwrap();
        assert_eq!(b.kv_cache_to_host(&again), b.kv_cache_to_host(&cache));
    }
}

/// A single query over a cache longer than one flash-decoding split is computed as partial
/// softmaxes over chunks merged afterwards; it matches the exact result.
#[test]
fn split_decode_over_a_long_cache_matches_plain_softmax() {
    let d = AttentionDims {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        ..small_attention_dims()
    };
    let n = 4500; // three splits of 2048 keys for the decode steps
    let proj: Vec<f32> = (0..n * d.proj_dim()).map(|i| 2.0 * pseudo(i, 11)).collect();
    let want = naive_attention(&d, &proj, n);
    let b = CpuBackend::new(2);
    let pieces = [(0usize, 4490usize), (4490, 1), (4491, 1), (4492, 8)];
    let (got, _) = run_attention_pieces(&b, &d, &KvCacheSpec::default(), &proj, &pieces);
    let tail = 10 * d.out_dim();
    let worst = max_difference(&got[got.len() - tail..], &want[want.len() - tail..]);
    assert!(worst < 2e-5, "max difference {worst}");
}
