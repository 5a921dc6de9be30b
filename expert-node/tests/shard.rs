//! An expert node's shard: holding a subset of experts gives exactly the results of holding
//! them all for the rows routed to it, and routing to an expert it lacks is a clear error.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use myriad_expert::{ExpertSet, ExpertShard};
use myriad_kernels::cpu::CpuBackend;
use myriad_kernels::{Backend, Routes};
use myriad_model::moe::{ExpertError, ExpertExecutor};
use myriad_model::{Checkpoint, ModelConfig};

#[test]
fn a_subset_shard_matches_the_full_one_and_refuses_others() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5_moe-mini512");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, &config).unwrap();
    let b = Arc::new(CpuBackend::new(2));
    let full = ExpertShard::load(
        b.clone(),
        &config,
        &ckpt,
        &ExpertSet::all(config.num_experts),
    )
    .unwrap();
    let part_set = ExpertSet::parse("0-63,300,511", config.num_experts).unwrap();
    let part = ExpertShard::load(b.clone(), &config, &ckpt, &part_set).unwrap();
    assert_eq!(part.experts().len(), 66);

    let h = config.hidden_size;
    let rows = 5;
    let x: Vec<f32> = (0..rows * h)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    let mut routes = Routes::new();
    for r in 0..rows {
        let ids = [r as u32, 300, 511, (r * 11) as u32 % 64];
        routes.push_row(&ids, &[0.4, 0.3, 0.2, 0.1]);
    }
    let xt = b.upload(rows, h, &x).unwrap();
    for layer in 0..config.num_layers {
        let (mut a, mut c) = (b.zeros(rows, h), b.zeros(rows, h));
        full.run(layer, &xt, &routes, &mut a).unwrap();
        part.run(layer, &xt, &routes, &mut c).unwrap();
        assert_eq!(b.download(&a), b.download(&c), "layer {layer}");
    }

    let mut outside = Routes::new();
    outside.push_row(&[1, 200], &[0.5, 0.5]);
    let x1 = b.upload(1, h, &x[..h]).unwrap();
    let mut o = b.zeros(1, h);
    let err = part.run(2, &x1, &outside, &mut o).unwrap_err();
    assert!(
        matches!(
            err,
            ExpertError::Unavailable {
                layer: 2,
                expert: 200,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0-63,300,511"), "{err}");
    let err = part
        .run(config.num_layers, &x1, &routes, &mut o)
        .unwrap_err();
    assert!(matches!(err, ExpertError::NoSuchLayer { .. }), "{err}");
}
