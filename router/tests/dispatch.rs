//! Dispatch + combine equals local compute: for random placements (with replicas) and random
//! routings, the router over the in-process transport gives what one shard holding every
//! expert gives, up to the float reassociation of summing per-node partials.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use myriad_expert::{ExpertService, ExpertShard, NodeIdentity};
use myriad_kernels::cpu::CpuBackend;
use myriad_kernels::{Backend, Routes};
use myriad_model::moe::ExpertExecutor;
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_router::{NodeSpec, Placement, RemoteExperts, RouterConfig};
use myriad_transport::LocalNetwork;
use myriad_wire::Limits;
use proptest::prelude::*;

struct World {
    config: ModelConfig,
    backend: Arc<CpuBackend>,
    all: ExpertShard<CpuBackend>,
    dir: std::path::PathBuf,
    runtime: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_next-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir, &config).unwrap();
        let backend = Arc::new(CpuBackend::new(1));
        let all = ExpertShard::load(
            backend.clone(),
            &config,
            &ckpt,
            &ExpertSet::all(config.num_experts),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        World {
            config,
            backend,
            all,
            dir,
            runtime,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn routed_dispatch_matches_local_experts(
        nodes in 1usize..5,
        replicas in 1usize..3,
        rows in 1usize..12,
        seed in any::<u64>(),
        layer in 0usize..4,
    ) {
        let w = world();
        let e = w.config.num_experts;
        let addrs: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
        let placement = Placement::even(&addrs, e, replicas).unwrap();
        let ckpt = Checkpoint::open(&w.dir, &w.config).unwrap();
        let network = LocalNetwork::new();
        for NodeSpec { name, addr, experts } in placement.nodes() {
            let shard = Arc::new(ExpertShard::load(w.backend.clone(), &w.config, &ckpt, experts).unwrap());
            let id = NodeIdentity {
                name: name.clone(),
                model_fingerprint: w.config.fingerprint(),
                num_layers: w.config.num_layers,
                num_experts: e,
                hidden: w.config.hidden_size,
            };
            network.register(addr.clone(), Arc::new(ExpertService::new(shard, id, Limits::default())));
        }
        let router = RemoteExperts::new(
            placement, Arc::new(network.connector()), w.runtime.handle().clone(),
            w.config.hidden_size, w.config.num_layers, RouterConfig::default(),
        );
        // Random rows and random routes (0..k experts per row, distinct, random weights).
        let mut rng = xorshift(seed);
        let h = w.config.hidden_size;
        let x: Vec<f32> = (0..rows * h).map(|_| rng() - 0.5).collect();
        let mut routes = Routes::new();
        for _ in 0..rows {
            let k = (rng() * (w.config.num_experts_per_tok + 1) as f32) as usize;
            let mut ids: Vec<u32> = Vec::new();
            while ids.len() < k {
                let id = (rng() * e as f32) as u32 % e as u32;
                if !ids.contains(&id) { ids.push(id); }
            }
            let ws: Vec<f32> = ids.iter().map(|_| rng()).collect();
            routes.push_row(&ids, &ws);
        }
        let xt = w.backend.upload(rows, h, &x).unwrap();
        let mut a = w.backend.zeros(rows, h);
        w.all.run(layer, &xt, &routes, &mut a).unwrap();
        let a = w.backend.download(&a);
        let b = router.submit(layer, x.clone(), &routes).unwrap().wait().unwrap();
        let d = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        prop_assert!(d < 1e-5, "dispatch differs from local compute by {d}");
    }
}

/// A tiny xorshift generator (uniform in [0, 1)).
fn xorshift(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    }
}
