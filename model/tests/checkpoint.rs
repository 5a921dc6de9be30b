//! Checkpoint loading: the fixtures, expert slicing, Qwen3-Next regrouping, dtypes, damaged
//! and partial checkpoints.
#![allow(clippy::unwrap_used)]

mod common;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use common::{
    FIXTURES, TempDir, Tensor, copy_dir, fixture, read_all, read_file_tensors, read_json,
    weight_files, write_file_tensors, write_single,
};
use myriad_kernels::WeightDtype;
use myriad_model::checkpoint::regroup::{self, DeltaNetHeads};
use myriad_model::checkpoint::{Checkpoint, CheckpointError, HostTensor, MixerTensors};
use myriad_model::config::{LayerKind, ModelConfig};
use safetensors::Dtype;

fn open(dir: &Path) -> (ModelConfig, Checkpoint) {
    let c = ModelConfig::from_dir(dir).unwrap();
    let ck = Checkpoint::open(dir, &c).unwrap();
    (c, ck)
}

fn shape(t: &HostTensor<'_>) -> Vec<usize> {
    t.shape.clone()
}

/// Loads everything and checks every shape against the config.
fn check_all_shapes(c: &ModelConfig, ck: &Checkpoint) {
    let (h, v) = (c.hidden_size, c.vocab_size);
    assert_eq!(shape(&ck.embed_tokens().unwrap()), vec![v, h]);
    assert_eq!(shape(&ck.lm_head().unwrap()), vec![v, h]);
    assert_eq!(shape(&ck.final_norm().unwrap()), vec![h]);
    for l in 0..c.num_layers {
        let t = ck.layer(l).unwrap();
        assert_eq!(shape(&t.input_norm), vec![h]);
        assert_eq!(shape(&t.post_attention_norm), vec![h]);
        assert_eq!(shape(&t.router), vec![c.num_experts, h]);
        let is = c.shared_expert_intermediate_size;
        assert_eq!(shape(&t.shared_gate_proj), vec![is, h]);
        assert_eq!(shape(&t.shared_up_proj), vec![is, h]);
        assert_eq!(shape(&t.shared_down_proj), vec![h, is]);
        assert_eq!(shape(&t.shared_expert_gate), vec![1, h]);
        match (&t.mixer, c.layer_kinds[l]) {
            (MixerTensors::Linear(m), LayerKind::LinearAttention) => {
                let nv = c.linear_num_value_heads;
                assert_eq!(shape(&m.in_proj_qkv), vec![c.conv_dim(), h]);
                assert_eq!(shape(&m.in_proj_z), vec![c.value_dim(), h]);
                assert_eq!(shape(&m.in_proj_b), vec![nv, h]);
                assert_eq!(shape(&m.in_proj_a), vec![nv, h]);
                assert_eq!(shape(&m.conv1d), vec![c.conv_dim(), c.linear_conv_kernel]);
                assert_eq!(shape(&m.dt_bias), vec![nv]);
                assert_eq!(shape(&m.a_log), vec![nv]);
                assert_eq!(m.a_log.dtype, WeightDtype::F32);
                assert_eq!(shape(&m.norm), vec![c.linear_value_head_dim]);
                assert_eq!(shape(&m.out_proj), vec![h, c.value_dim()]);
                for t in [
                    &m.in_proj_qkv,
                    &m.in_proj_z,
                    &m.in_proj_b,
                    &m.in_proj_a,
                    &m.conv1d,
                    &m.out_proj,
                ] {
                    let mx = t.matrix();
                    assert_eq!(
                        mx.rows * mx.cols * mx.dtype.size(),
                        mx.data.len(),
                        "{}",
                        t.name
                    );
                }
            }
            (MixerTensors::Full(m), LayerKind::FullAttention) => {
                assert_eq!(shape(&m.q_proj), vec![c.q_proj_rows(), h]);
                assert_eq!(shape(&m.k_proj), vec![c.kv_dim(), h]);
                assert_eq!(shape(&m.v_proj), vec![c.kv_dim(), h]);
                assert_eq!(shape(&m.o_proj), vec![h, c.attn_output_dim()]);
                assert_eq!(shape(&m.q_norm), vec![c.head_dim]);
                assert_eq!(shape(&m.k_norm), vec![c.head_dim]);
                let n = m.q_norm.matrix();
                assert_eq!((n.rows, n.cols), (1, c.head_dim));
            }
            _ => panic!("layer {l}: mixer does not match the layer kind"),
        }
        for e in 0..c.num_experts {
            let x = ck.expert(l, e).unwrap();
            let i = c.moe_intermediate_size;
            assert_eq!(shape(&x.gate_proj), vec![i, h]);
            assert_eq!(shape(&x.up_proj), vec![i, h]);
            assert_eq!(shape(&x.down_proj), vec![h, i]);
            assert_eq!(x.gate_proj.data.len(), i * h * x.gate_proj.dtype.size());
        }
    }
    assert!(matches!(
        ck.layer(c.num_layers),
        Err(CheckpointError::NoSuchLayer { .. })
    ));
    assert!(matches!(
        ck.expert(0, c.num_experts),
        Err(CheckpointError::NoSuchExpert { .. })
    ));
}

#[test]
fn every_fixture_loads_with_the_right_shapes() {
    for name in FIXTURES {
        let dir = fixture(name);
        let (c, ck) = open(&dir);
        check_all_shapes(&c, &ck);
        let expected_prefix = if name.starts_with("qwen3_5") {
            "model.language_model."
        } else {
            "model."
        };
        assert_eq!(ck.text_prefix(), expected_prefix);
        // Stored BF16 tensors are handed out without a copy.
        let emb = ck.embed_tokens().unwrap();
        assert_eq!(emb.dtype, WeightDtype::BF16);
        assert!(matches!(emb.data, Cow::Borrowed(_)));
        let names = ck.tensor_names();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        assert!(names.contains(&"lm_head.weight".to_string()));
    }
}

#[test]
fn embeddings_match_the_reference_activations() {
    // debug.embeddings = E[debug prompt ids], written by transformers from the same weights.
    for name in FIXTURES {
        let dir = fixture(name);
        let (c, ck) = open(&dir);
        let reference = read_file_tensors(&dir.join("reference.safetensors"));
        let ids = &reference["prompt.2.input_ids"];
        assert_eq!(ids.dtype, Dtype::I64);
        let ids: Vec<usize> = ids
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        let want = reference["debug.embeddings"].f32s();
        let emb = ck.embed_tokens().unwrap().to_f32();
        let h = c.hidden_size;
        for (row, &id) in ids.iter().enumerate() {
            assert_eq!(
                &emb[id * h..(id + 1) * h],
                &want[row * h..(row + 1) * h],
                "{name} row {row}"
            );
        }
    }
}

#[test]
fn fused_expert_slices_match_manual_slices() {
    for name in ["qwen3_5_moe-tiny", "qwen3_5_moe-mini512"] {
        let dir = fixture(name);
        let (c, ck) = open(&dir);
        let all = read_all(&dir);
        let (h, i) = (c.hidden_size, c.moe_intermediate_size);
        for l in [0, c.num_layers - 1] {
            let gate_up =
                &all[&format!("model.language_model.layers.{l}.mlp.experts.gate_up_proj")];
            let down = &all[&format!("model.language_model.layers.{l}.mlp.experts.down_proj")];
            assert_eq!(gate_up.shape, vec![c.num_experts, 2 * i, h]);
            for e in [0, 1, c.num_experts / 2, c.num_experts - 1] {
                let x = ck.expert(l, e).unwrap();
                let base = e * 2 * i * h * 2;
                assert_eq!(&*x.gate_proj.data, &gate_up.data[base..base + i * h * 2]);
                assert_eq!(
                    &*x.up_proj.data,
                    &gate_up.data[base + i * h * 2..base + 2 * i * h * 2]
                );
                let dbase = e * h * i * 2;
                assert_eq!(&*x.down_proj.data, &down.data[dbase..dbase + h * i * 2]);
                assert!(
                    matches!(x.gate_proj.data, Cow::Borrowed(_)),
                    "expert slices are zero-copy"
                );
                assert!(matches!(x.down_proj.data, Cow::Borrowed(_)));
            }
        }
    }
}

#[test]
fn per_expert_tensors_match_the_files() {
    let dir = fixture("qwen3_next-mini512");
    let (_, ck) = open(&dir);
    let all = read_all(&dir);
    for (l, e) in [(0, 0), (1, 17), (3, 511)] {
        let x = ck.expert(l, e).unwrap();
        for (t, proj) in [
            (&x.gate_proj, "gate_proj"),
            (&x.up_proj, "up_proj"),
            (&x.down_proj, "down_proj"),
        ] {
            let stored = &all[&format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight")];
            assert_eq!(&*t.data, stored.data.as_slice());
        }
    }
}

// ------------------------------------------------------------------------------------------
// Qwen3-Next grouped DeltaNet projections
// ------------------------------------------------------------------------------------------

/// The grouped layout, written from the spec text (§2.3 a'): for key head g,
/// `[q_g | k_g | v of heads g·r…g·r+r−1 | z of the same heads]`, and `[b (r) | a (r)]`.
fn interleave_qkvz(
    q: &[Vec<u8>],
    k: &[Vec<u8>],
    v: &[Vec<u8>],
    z: &[Vec<u8>],
    h: DeltaNetHeads,
) -> Vec<Vec<u8>> {
    let r = h.value_heads / h.key_heads;
    let (dk, dv) = (h.key_head_dim, h.value_head_dim);
    let mut out = Vec::new();
    for g in 0..h.key_heads {
        out.extend_from_slice(&q[g * dk..(g + 1) * dk]);
        out.extend_from_slice(&k[g * dk..(g + 1) * dk]);
        out.extend_from_slice(&v[g * r * dv..(g + 1) * r * dv]);
        out.extend_from_slice(&z[g * r * dv..(g + 1) * r * dv]);
    }
    out
}

fn interleave_ba(b: &[Vec<u8>], a: &[Vec<u8>], h: DeltaNetHeads) -> Vec<Vec<u8>> {
    let r = h.value_heads / h.key_heads;
    let mut out = Vec::new();
    for g in 0..h.key_heads {
        out.extend_from_slice(&b[g * r..(g + 1) * r]);
        out.extend_from_slice(&a[g * r..(g + 1) * r]);
    }
    out
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn rows(&mut self, n: usize, row_bytes: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| (0..row_bytes).map(|_| self.next() as u8).collect())
            .collect()
    }
}

#[test]
fn regroup_inverts_the_spec_interleaving() {
    let mut rng = Lcg(42);
    for (nk, dk, nv, dv) in [
        (2, 16, 4, 16),
        (3, 4, 6, 5),
        (2, 8, 2, 8),
        (1, 3, 4, 2),
        (4, 2, 16, 3),
    ] {
        let h = DeltaNetHeads {
            key_heads: nk,
            key_head_dim: dk,
            value_heads: nv,
            value_head_dim: dv,
        };
        let row_bytes = 6;
        let (q, k) = (rng.rows(nk * dk, row_bytes), rng.rows(nk * dk, row_bytes));
        let (v, z) = (rng.rows(nv * dv, row_bytes), rng.rows(nv * dv, row_bytes));
        let (b, a) = (rng.rows(nv, row_bytes), rng.rows(nv, row_bytes));
        let qkvz = interleave_qkvz(&q, &k, &v, &z, h).concat();
        let (qkv_out, z_out) = regroup::split_qkvz(&qkvz, row_bytes, h).unwrap();
        assert_eq!(qkv_out, [q.concat(), k.concat(), v.concat()].concat());
        assert_eq!(z_out, z.concat());
        let ba = interleave_ba(&b, &a, h).concat();
        let (b_out, a_out) = regroup::split_ba(&ba, row_bytes, h).unwrap();
        assert_eq!(b_out, b.concat());
        assert_eq!(a_out, a.concat());
        assert!(regroup::split_qkvz(&qkvz[1..], row_bytes, h).is_none());
    }
}

fn rows_of(t: &Tensor) -> Vec<Vec<u8>> {
    let row_bytes = t.data.len() / t.shape[0];
    t.data.chunks_exact(row_bytes).map(<[u8]>::to_vec).collect()
}

#[test]
fn grouped_projections_load_in_the_qwen3_5_layout() {
    // Rewrite a Qwen3.5 fixture's DeltaNet projections in the Qwen3-Next grouped layout; the
    // loader must hand back exactly the original tensors.
    let src = fixture("qwen3_5_moe-tiny");
    let (c, original) = open(&src);
    let mut tensors = read_all(&src);
    let h = DeltaNetHeads {
        key_heads: c.linear_num_key_heads,
        key_head_dim: c.linear_key_head_dim,
        value_heads: c.linear_num_value_heads,
        value_head_dim: c.linear_value_head_dim,
    };
    for l in (0..c.num_layers).filter(|&l| c.layer_kinds[l] == LayerKind::LinearAttention) {
        let p = |s: &str| format!("model.language_model.layers.{l}.linear_attn.{s}.weight");
        let qkv = tensors.remove(&p("in_proj_qkv")).unwrap();
        let z = tensors.remove(&p("in_proj_z")).unwrap();
        let b = tensors.remove(&p("in_proj_b")).unwrap();
        let a = tensors.remove(&p("in_proj_a")).unwrap();
        let qkv_rows = rows_of(&qkv);
        let (q, rest) = qkv_rows.split_at(c.key_dim());
        let (k, v) = rest.split_at(c.key_dim());
        let qkvz = interleave_qkvz(q, k, v, &rows_of(&z), h);
        let ba = interleave_ba(&rows_of(&b), &rows_of(&a), h);
        let rows = |r: Vec<Vec<u8>>, n| Tensor {
            dtype: Dtype::BF16,
            shape: vec![n, c.hidden_size],
            data: r.concat(),
        };
        tensors.insert(
            p("in_proj_qkvz"),
            rows(qkvz, 2 * c.key_dim() + 2 * c.value_dim()),
        );
        tensors.insert(p("in_proj_ba"), rows(ba, 2 * c.linear_num_value_heads));
    }
    let tmp = TempDir::new("grouped");
    write_single(tmp.path(), &src, &tensors);
    let (_, grouped) = open(tmp.path());
    for l in (0..c.num_layers).filter(|&l| c.layer_kinds[l] == LayerKind::LinearAttention) {
        let (MixerTensors::Linear(want), MixerTensors::Linear(got)) = (
            original.layer(l).unwrap().mixer,
            grouped.layer(l).unwrap().mixer,
        ) else {
            panic!("layer {l} is not linear");
        };
        for (w, g) in [
            (&want.in_proj_qkv, &got.in_proj_qkv),
            (&want.in_proj_z, &got.in_proj_z),
            (&want.in_proj_b, &got.in_proj_b),
            (&want.in_proj_a, &got.in_proj_a),
        ] {
            assert_eq!(w.shape, g.shape, "{}", g.name);
            assert_eq!(w.data, g.data, "{}", g.name);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Dtypes
// ------------------------------------------------------------------------------------------

fn bf16_to_f32_tensor(t: &Tensor) -> Tensor {
    if t.dtype != Dtype::BF16 {
        return t.clone();
    }
    Tensor::from_f32(t.shape.clone(), &t.f32s())
}

#[test]
fn f32_copy_loads_identical_values() {
    for name in ["qwen3_next-mini512", "qwen3_5_moe-tiny"] {
        let src = fixture(name);
        let tmp = TempDir::new("f32");
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        if src.join("model.safetensors.index.json").exists() {
            std::fs::copy(
                src.join("model.safetensors.index.json"),
                tmp.path().join("model.safetensors.index.json"),
            )
            .unwrap();
        }
        for f in weight_files(&src) {
            let converted: BTreeMap<String, Tensor> = read_file_tensors(&src.join(&f))
                .iter()
                .map(|(n, t)| (n.clone(), bf16_to_f32_tensor(t)))
                .collect();
            write_file_tensors(&tmp.path().join(&f), &converted);
        }
        let (c, a) = open(&src);
        let (_, b) = open(tmp.path());
        let same = |x: &HostTensor<'_>, y: &HostTensor<'_>| {
            assert_eq!(y.dtype, WeightDtype::F32, "{}", y.name);
            assert_eq!(x.to_f32(), y.to_f32(), "{}", y.name);
            assert_eq!(x.shape, y.shape);
        };
        same(&a.embed_tokens().unwrap(), &b.embed_tokens().unwrap());
        same(&a.lm_head().unwrap(), &b.lm_head().unwrap());
        same(&a.final_norm().unwrap(), &b.final_norm().unwrap());
        for l in 0..c.num_layers {
            let (x, y) = (a.layer(l).unwrap(), b.layer(l).unwrap());
            same(&x.router, &y.router);
            same(&x.input_norm, &y.input_norm);
            same(&x.shared_down_proj, &y.shared_down_proj);
            match (&x.mixer, &y.mixer) {
                (MixerTensors::Linear(x), MixerTensors::Linear(y)) => {
                    same(&x.in_proj_qkv, &y.in_proj_qkv);
                    same(&x.in_proj_z, &y.in_proj_z);
                    same(&x.in_proj_a, &y.in_proj_a);
                    same(&x.conv1d, &y.conv1d);
                    same(&x.a_log, &y.a_log);
                    same(&x.dt_bias, &y.dt_bias);
                }
                (MixerTensors::Full(x), MixerTensors::Full(y)) => {
                    same(&x.q_proj, &y.q_proj);
                    same(&x.k_norm, &y.k_norm);
                }
                _ => panic!("mixer kinds differ"),
            }
            for e in [0, c.num_experts - 1] {
                let (x, y) = (a.expert(l, e).unwrap(), b.expert(l, e).unwrap());
                same(&x.gate_proj, &y.gate_proj);
                same(&x.up_proj, &y.up_proj);
                same(&x.down_proj, &y.down_proj);
            }
        }
    }
}

#[test]
fn f16_and_bf16_a_log_widen_exactly() {
    let src = fixture("qwen3_next-tiny");
    let (c, _) = open(&src);
    let mut tensors = read_all(&src);
    let h = c.hidden_size;
    // Every finite f16 bit pattern class: normals, subnormals, negative values.
    let bits: Vec<u16> = (0..h as u16)
        .map(|i| i.wrapping_mul(1021) & 0x7bff | ((i & 1) << 15))
        .collect();
    tensors.insert(
        "model.norm.weight".into(),
        Tensor {
            dtype: Dtype::F16,
            shape: vec![h],
            data: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        },
    );
    // A_log stored as bf16 must come out as F32 with the same values.
    let a_log_name = "model.layers.0.linear_attn.A_log";
    let a_log = tensors[a_log_name].clone();
    let a_log_bf16: Vec<u8> = a_log
        .f32s()
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    tensors.insert(
        a_log_name.into(),
        Tensor {
            dtype: Dtype::BF16,
            shape: a_log.shape.clone(),
            data: a_log_bf16.clone(),
        },
    );
    let tmp = TempDir::new("f16");
    write_single(tmp.path(), &src, &tensors);
    let (_, ck) = open(tmp.path());
    let norm = ck.final_norm().unwrap();
    assert_eq!(norm.dtype, WeightDtype::F32);
    let want: Vec<f32> = bits
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect();
    assert_eq!(norm.to_f32(), want);
    let MixerTensors::Linear(m) = ck.layer(0).unwrap().mixer else {
        panic!("layer 0 is linear");
    };
    assert_eq!(m.a_log.dtype, WeightDtype::F32);
    let want: Vec<f32> = a_log_bf16
        .chunks_exact(2)
        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
        .collect();
    assert_eq!(m.a_log.to_f32(), want);
}

/// E4M3 decoding written independently of the loader: (-1)^s · 2^(e-7) · (1 + m/8), subnormal
/// 2^-6 · m/8.
fn e4m3(b: u8) -> f32 {
    let s = if b >> 7 == 1 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 15) as i32;
    let m = (b & 7) as f32;
    if e == 0 {
        s * 2f32.powi(-6) * m / 8.0
    } else {
        s * 2f32.powi(e - 7) * (1.0 + m / 8.0)
    }
}

fn random_e4m3(rng: &mut Lcg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            loop {
                let b = rng.next() as u8;
                if b & 0x7f != 0x7f {
                    break b;
                }
            }
        })
        .collect()
}

fn f8_tensor(rng: &mut Lcg, shape: Vec<usize>) -> (Tensor, Tensor) {
    let n: usize = shape.iter().product();
    let q = Tensor {
        dtype: Dtype::F8_E4M3,
        shape: shape.clone(),
        data: random_e4m3(rng, n),
    };
    let mut sshape = shape[..shape.len() - 2].to_vec();
    sshape.push(shape[shape.len() - 2].div_ceil(128));
    sshape.push(shape[shape.len() - 1].div_ceil(128));
    let scales: Vec<f32> = (0..sshape.iter().product::<usize>())
        .map(|_| (rng.next() % 1000) as f32 / 4096.0 + 0.001)
        .collect();
    (q, Tensor::from_f32(sshape, &scales))
}

/// Expected bf16 values of rows `rows` of slab `slab` of an F8 tensor.
fn dequant_expected(q: &Tensor, s: &Tensor, slab: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
    let (r, cols) = (q.shape[q.shape.len() - 2], q.shape[q.shape.len() - 1]);
    let (gr, gc) = (r.div_ceil(128), cols.div_ceil(128));
    let scales = s.f32s();
    let mut out = Vec::new();
    for i in rows {
        for j in 0..cols {
            let v = e4m3(q.data[slab * r * cols + i * cols + j])
                * scales[slab * gr * gc + (i / 128) * gc + j / 128];
            out.push(half::bf16::from_f32(v).to_f32());
        }
    }
    out
}

#[test]
fn fp8_block_scaled_experts_dequantise() {
    // Big enough that experts span several 128×128 blocks, with partial blocks at the edges.
    let mut config = myriad_model::Preset::Tiny.config(myriad_model::Family::Qwen3Next);
    config.hidden_size = 192;
    config.moe_intermediate_size = 136;
    config.num_experts = 4;
    config.num_experts_per_tok = 2;
    config.vocab_size = 256;
    config.bos_token_id = None;
    config.eos_token_ids = vec![];
    let mut rng = Lcg(7);
    let (h, i) = (config.hidden_size, config.moe_intermediate_size);

    // Per-expert layout (FP8 releases), on a synthetic BF16 model.
    let tmp = TempDir::new("fp8");
    let spec = myriad_model::SynthSpec {
        config: config.clone(),
        seed: 1,
        dtype: WeightDtype::BF16,
        shard_bytes: 0,
    };
    myriad_model::write_random_model(tmp.path(), &spec).unwrap();
    let mut tensors = read_all(tmp.path());
    let mut expected = BTreeMap::new();
    for l in 0..config.num_layers {
        for e in 0..config.num_experts {
            for (proj, shape) in [
                ("gate_proj", vec![i, h]),
                ("up_proj", vec![i, h]),
                ("down_proj", vec![h, i]),
            ] {
                let name = format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight");
                let (q, s) = f8_tensor(&mut rng, shape.clone());
                expected.insert(name.clone(), dequant_expected(&q, &s, 0, 0..shape[0]));
                tensors.insert(name.clone(), q);
                tensors.insert(format!("{name}_scale_inv"), s);
            }
        }
    }
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    write_file_tensors(&tmp.path().join("model.safetensors"), &tensors);
    let ck = Checkpoint::open(tmp.path(), &config).unwrap();
    for l in 0..config.num_layers {
        for e in 0..config.num_experts {
            let x = ck.expert(l, e).unwrap();
            for (t, proj) in [
                (&x.gate_proj, "gate_proj"),
                (&x.up_proj, "up_proj"),
                (&x.down_proj, "down_proj"),
            ] {
                assert_eq!(t.dtype, WeightDtype::BF16);
                let name = format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight");
                assert_eq!(t.to_f32(), expected[&name], "{name}");
            }
        }
    }

    // A missing scale tensor is named.
    tensors.remove("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv");
    write_file_tensors(&tmp.path().join("model.safetensors"), &tensors);
    let ck = Checkpoint::open(tmp.path(), &config).unwrap();
    let msg = ck.expert(1, 2).unwrap_err().to_string();
    assert!(
        msg.contains("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");

    // Fused FP8 experts (scales [E, ⌈2I/128⌉, ⌈H/128⌉]) are sliced per expert and block.
    let mut config35 = config.clone();
    config35.family = myriad_model::Family::Qwen35Moe;
    let tmp35 = TempDir::new("fp8-fused");
    let spec = myriad_model::SynthSpec {
        config: config35.clone(),
        ..spec
    };
    myriad_model::write_random_model(tmp35.path(), &spec).unwrap();
    let mut tensors = read_all(tmp35.path());
    let e_count = config35.num_experts;
    let gu = "model.language_model.layers.2.mlp.experts.gate_up_proj".to_string();
    let dn = "model.language_model.layers.2.mlp.experts.down_proj".to_string();
    let (gq, gs) = f8_tensor(&mut rng, vec![e_count, 2 * i, h]);
    let (dq, ds) = f8_tensor(&mut rng, vec![e_count, h, i]);
    tensors.insert(gu.clone(), gq.clone());
    tensors.insert(format!("{gu}_scale_inv"), gs.clone());
    tensors.insert(dn.clone(), dq.clone());
    tensors.insert(format!("{dn}_scale_inv"), ds.clone());
    write_file_tensors(&tmp35.path().join("model.safetensors"), &tensors);
    let ck = Checkpoint::open(tmp35.path(), &config35).unwrap();
    for e in 0..e_count {
        let x = ck.expert(2, e).unwrap();
        assert_eq!(x.gate_proj.to_f32(), dequant_expected(&gq, &gs, e, 0..i));
        assert_eq!(x.up_proj.to_f32(), dequant_expected(&gq, &gs, e, i..2 * i));
        assert_eq!(x.down_proj.to_f32(), dequant_expected(&dq, &ds, e, 0..h));
    }
}

// ------------------------------------------------------------------------------------------
// Damaged and partial checkpoints
// ------------------------------------------------------------------------------------------

/// Loads everything, returning the first error.
fn load_everything(c: &ModelConfig, ck: &Checkpoint) -> Result<(), CheckpointError> {
    ck.embed_tokens()?;
    ck.lm_head()?;
    ck.final_norm()?;
    for l in 0..c.num_layers {
        ck.layer(l)?;
        for e in 0..c.num_experts {
            ck.expert(l, e)?;
        }
    }
    Ok(())
}

#[test]
fn truncated_shard_names_the_file() {
    let tmp = TempDir::new("trunc");
    copy_dir(&fixture("qwen3_next-mini512"), tmp.path());
    let victim = tmp.path().join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let (c, ck) = open(tmp.path());
    let err = load_everything(&c, &ck).unwrap_err();
    assert!(matches!(err, CheckpointError::Parse { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00002-of-00003.safetensors"),
        "{err}"
    );

    // A single-file checkpoint is parsed at open.
    let tmp = TempDir::new("trunc1");
    copy_dir(&fixture("qwen3_5_moe-tiny"), tmp.path());
    let file = tmp.path().join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(100)
        .unwrap();
    let c = ModelConfig::from_dir(tmp.path()).unwrap();
    let err = Checkpoint::open(tmp.path(), &c).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(3)
        .unwrap();
    let err = Checkpoint::open(tmp.path(), &c).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn missing_tensors_are_named() {
    let src = fixture("qwen3_next-tiny");
    let mut tensors = read_all(&src);
    tensors.remove("model.layers.2.mlp.gate.weight");
    tensors.remove("model.layers.1.mlp.experts.5.down_proj.weight");
    let tmp = TempDir::new("missing");
    write_single(tmp.path(), &src, &tensors);
    let (_, ck) = open(tmp.path());
    let msg = ck.layer(2).unwrap_err().to_string();
    assert!(
        msg.contains("model.layers.2.mlp.gate.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
    let msg = ck.expert(1, 5).unwrap_err().to_string();
    assert!(
        msg.contains("model.layers.1.mlp.experts.5.down_proj.weight"),
        "{msg}"
    );
    ck.layer(1).unwrap();
    ck.expert(1, 4).unwrap();

    // No text model at all.
    let mut tensors = read_all(&src);
    tensors.remove("model.embed_tokens.weight");
    let tmp = TempDir::new("noembed");
    write_single(tmp.path(), &src, &tensors);
    let c = ModelConfig::from_dir(tmp.path()).unwrap();
    let msg = Checkpoint::open(tmp.path(), &c).unwrap_err().to_string();
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("model.language_model."),
        "{msg}"
    );

    // Sharded: absent from the index, or listed but absent from its shard.
    let tmp = TempDir::new("missing-sharded");
    copy_dir(&fixture("qwen3_5_moe-mini512"), tmp.path());
    let index_path = tmp.path().join("model.safetensors.index.json");
    let mut index = read_json(&index_path);
    let map = index["weight_map"].as_object_mut().unwrap();
    map.remove("model.language_model.layers.1.mlp.shared_expert.up_proj.weight");
    let router = "model.language_model.layers.0.mlp.gate.weight";
    let wrong_shard = if map[router] == "model-00001-of-00004.safetensors" {
        "model-00004-of-00004.safetensors"
    } else {
        "model-00001-of-00004.safetensors"
    };
    map.insert(router.into(), wrong_shard.into());
    std::fs::write(&index_path, index.to_string()).unwrap();
    let (_, ck) = open(tmp.path());
    let msg = ck.layer(1).unwrap_err().to_string();
    assert!(
        msg.contains("layers.1.mlp.shared_expert.up_proj.weight") && msg.contains("index.json"),
        "{msg}"
    );
    let msg = ck.layer(0).unwrap_err().to_string();
    assert!(msg.contains(router) && msg.contains(wrong_shard), "{msg}");

    // No weights at all.
    let tmp = TempDir::new("empty");
    let c = ModelConfig::from_dir(&src).unwrap();
    let msg = Checkpoint::open(tmp.path(), &c).unwrap_err().to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let src = fixture("qwen3_next-tiny");
    let (c, _) = open(&src);
    let mut tensors = read_all(&src);
    let name = "model.layers.0.mlp.gate.weight";
    let t = tensors.get_mut(name).unwrap();
    let (e, h) = (c.num_experts, c.hidden_size);
    t.shape = vec![e - 1, h];
    t.data.truncate((e - 1) * h * 2);
    let tmp = TempDir::new("shape");
    write_single(tmp.path(), &src, &tensors);
    let (_, ck) = open(tmp.path());
    let err = ck.layer(0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::Shape { .. }), "{msg}");
    assert!(msg.contains(name), "{msg}");
    assert!(msg.contains(&format!("{:?}", [e, h])), "{msg}");
    assert!(msg.contains(&format!("{:?}", [e - 1, h])), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unknown_dtype_names_tensor_and_dtype() {
    let src = fixture("qwen3_next-tiny");
    let mut tensors = read_all(&src);
    let name = "model.layers.3.self_attn.k_proj.weight";
    let t = tensors.get_mut(name).unwrap();
    t.dtype = Dtype::I32;
    t.data = vec![0; t.data.len() * 2];
    let e5m2 = "model.layers.0.mlp.experts.3.up_proj.weight";
    let t = tensors.get_mut(e5m2).unwrap();
    t.dtype = Dtype::F8_E5M2;
    t.data.truncate(t.data.len() / 2);
    let tmp = TempDir::new("dtype");
    write_single(tmp.path(), &src, &tensors);
    let (_, ck) = open(tmp.path());
    let msg = ck.layer(3).unwrap_err().to_string();
    assert!(msg.contains(name) && msg.contains("I32"), "{msg}");
    let msg = ck.expert(0, 3).unwrap_err().to_string();
    assert!(msg.contains(e5m2) && msg.contains("F8_E5M2"), "{msg}");
}

#[test]
fn shards_are_opened_lazily() {
    // An expert node that owns experts 0..256 must work even though the shard holding the
    // other experts of layer 1 is absent.
    let tmp = TempDir::new("lazy");
    copy_dir(&fixture("qwen3_next-mini512"), tmp.path());
    let index_path = tmp.path().join("model.safetensors.index.json");
    let mut index = read_json(&index_path);
    let map = index["weight_map"].as_object_mut().unwrap();
    let absent = "model-00009-of-00009.safetensors";
    for e in 256..512 {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            map.insert(
                format!("model.layers.1.mlp.experts.{e}.{proj}.weight"),
                absent.into(),
            );
        }
    }
    // Layer 3 lives entirely in a shard that is not there.
    let layer3: Vec<String> = map
        .keys()
        .filter(|k| k.starts_with("model.layers.3."))
        .cloned()
        .collect();
    for k in layer3 {
        map.insert(k, "model-00010-of-00010.safetensors".into());
    }
    std::fs::write(&index_path, index.to_string()).unwrap();

    let (c, ck) = open(tmp.path());
    ck.embed_tokens().unwrap();
    for l in 0..3 {
        ck.layer(l).unwrap();
    }
    for e in 0..256 {
        ck.expert(1, e).unwrap();
    }
    for e in 0..c.num_experts {
        ck.expert(0, e).unwrap();
        ck.expert(2, e).unwrap();
    }
    let err = ck.expert(1, 300).unwrap_err();
    assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
    assert!(err.to_string().contains(absent), "{err}");
    let msg = ck.layer(3).unwrap_err().to_string();
    assert!(msg.contains("model-00010-of-00010.safetensors"), "{msg}");
    // The failure is not cached as success: the next call fails the same way.
    assert!(ck.expert(1, 511).unwrap_err().to_string().contains(absent));
}

#[test]
fn tied_embeddings_use_the_embedding() {
    let src = fixture("qwen3_next-tiny");
    let mut tensors = read_all(&src);
    tensors.remove("lm_head.weight");
    let tmp = TempDir::new("tied");
    write_single(tmp.path(), &src, &tensors);
    let mut c = ModelConfig::from_dir(tmp.path()).unwrap();
    assert!(Checkpoint::open(tmp.path(), &c).unwrap().lm_head().is_err());
    c.tie_word_embeddings = true;
    let ck = Checkpoint::open(tmp.path(), &c).unwrap();
    assert_eq!(ck.lm_head().unwrap().data, ck.embed_tokens().unwrap().data);
}

#[test]
fn conv_weights_are_squeezed_and_unsqueezed_is_accepted() {
    let src = fixture("qwen3_5_moe-tiny");
    let (c, ck) = open(&src);
    let MixerTensors::Linear(m) = ck.layer(0).unwrap().mixer else {
        panic!("layer 0 is linear");
    };
    let stored = &read_all(&src)["model.language_model.layers.0.linear_attn.conv1d.weight"];
    assert_eq!(stored.shape, vec![c.conv_dim(), 1, c.linear_conv_kernel]);
    assert_eq!(&*m.conv1d.data, stored.data.as_slice());
    let mx = m.conv1d.matrix();
    assert_eq!((mx.rows, mx.cols), (c.conv_dim(), c.linear_conv_kernel));

    // Some conversions store the conv already squeezed to [C, K].
    let mut tensors = read_all(&src);
    let name = "model.language_model.layers.0.linear_attn.conv1d.weight";
    tensors.get_mut(name).unwrap().shape = vec![c.conv_dim(), c.linear_conv_kernel];
    let tmp = TempDir::new("conv2d");
    write_single(tmp.path(), &src, &tensors);
    let (_, ck2) = open(tmp.path());
    let MixerTensors::Linear(m2) = ck2.layer(0).unwrap().mixer else {
        panic!("layer 0 is linear");
    };
    assert_eq!(m2.conv1d.shape, m.conv1d.shape);
    assert_eq!(m2.conv1d.data, m.conv1d.data);
}

#[test]
fn checkpoints_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<HostTensor<'static>>();
    let (c, ck) = open(&fixture("qwen3_next-mini512"));
    std::thread::scope(|s| {
        for part in 0..4 {
            let ck = &ck;
            s.spawn(move || {
                for e in (part..c.num_experts).step_by(4) {
                    ck.expert(1, e).unwrap();
                }
            });
        }
    });
}
