//! Expert nodes as separate `myriad node expert` processes over real QUIC sockets on loopback,
//! with mutual TLS from a generated CA: the attention side in this test process.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use myriad::cluster::{ClusterArgs, TlsArgs};
use myriad::cmd::launch::{Cluster, LaunchArgs, start_cluster};
use myriad::local::{LocalEngine, LocalOptions, load_with};
use myriad::runtime::RuntimeArgs;
use myriad_attention::Completion;
use myriad_transport::{Connector, Frame, QuicConnector, QuicLimits, TlsConfig};
use myriad_wire::{FrameKind, Hello, Limits, Message, decode_header};
use serde_json::Value;

mod common;
use common::{fixture, ids, reference};

fn requests(r: &Value, max_tokens: usize) -> Vec<myriad_attention::Request> {
    common::requests(r, max_tokens, Some(3), true)
}

fn launch(dir: &Path, nodes: usize, replicas: usize) -> Cluster {
    let args = LaunchArgs {
        model: None,
        expert_nodes: nodes,
        replicas,
        node_threads: 1,
        insecure_dev_certs: false,
        ping_pong: false,
        ready_timeout_s: 120,
        etcd: None,
        http: None,
        prefill_nodes: 0,
        decode_nodes: 1,
        disagg_min_prompt_tokens: 1024,
        kv_cache_gb: 4.0,
        runtime: RuntimeArgs {
            threads: 1,
            isa: None,
            precision: Default::default(),
            max_batch_tokens: 2048,
            max_seqs: 256,
            kv_cache_dtype: None,
            kv_block_tokens: 32,
        },
    };
    start_cluster(Path::new(env!("CARGO_BIN_EXE_myriad")), dir, &args).unwrap()
}

fn attention(dir: &Path, cluster: &Cluster, in_process: bool) -> LocalEngine {
    let args = ClusterArgs {
        placement: Some(cluster.placement.clone()),
        in_process,
        ..ClusterArgs::default()
    };
    let tls = if in_process {
        TlsArgs::default()
    } else {
        cluster.tls.clone()
    };
    load_with(
        dir,
        &LocalOptions {
            threads: 2,
            ..LocalOptions::default()
        },
        &args,
        &tls,
    )
    .unwrap()
}

fn same(a: &[Completion], b: &[Completion]) {
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.token_ids, y.token_ids);
        assert_eq!(
            x.logprobs, y.logprobs,
            "log-probabilities must match bit for bit"
        );
    }
}

#[test]
fn four_node_processes_reproduce_the_reference_and_the_in_process_cluster_exactly() {
    for name in ["qwen3_5_moe-mini512", "qwen3_next-mini512"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let cluster = launch(&dir, 4, 1);
        let remote = attention(&dir, &cluster, false);
        let local = attention(&dir, &cluster, true);
        let got = remote.engine.generate(&requests(&r, 16)).unwrap();
        for (c, p) in got.iter().zip(r["prompts"].as_array().unwrap()) {
            assert_eq!(c.token_ids, ids(&p["greedy_ids"]), "{name}");
        }
        same(&got, &local.engine.generate(&requests(&r, 16)).unwrap());
        let s = remote.experts.router.as_ref().unwrap().stats();
        assert!(s.calls > 0 && s.failovers == 0);
        // The wire carries each row once per destination node, each way, plus small headers.
        let ratio = (s.bytes_sent + s.bytes_received) as f64 / s.minimum_bytes as f64;
        assert!(
            (1.0..1.2).contains(&ratio),
            "wire bytes are {ratio:.3}x the minimum"
        );
    }
}

#[test]
fn killing_a_node_with_a_replica_mid_generation_still_completes() {
    let dir = fixture("qwen3_next-mini512");
    let r = reference(&dir);
    let cluster = Arc::new(launch(&dir, 4, 2));
    let engine = Arc::new(attention(&dir, &cluster, false));
    let router = engine.experts.router.clone().unwrap();
    let e = engine.clone();
    let reqs = requests(&r, 96);
    let run = std::thread::spawn(move || e.engine.generate(&reqs));
    // Wait until generation is under way, then kill node e1.
    let t0 = std::time::Instant::now();
    while router.stats().calls < 40 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    cluster.kill_node(1).unwrap();
    let out = run.join().unwrap().unwrap();
    for (c, p) in out.iter().zip(r["prompts"].as_array().unwrap()) {
        assert_eq!(c.token_ids.len(), 96);
        assert_eq!(
            c.token_ids[..16],
            ids(&p["greedy_ids"])[..],
            "the reference prefix survives failover"
        );
    }
    assert!(
        router.stats().failovers >= 1,
        "the router should have failed over"
    );
}

#[test]
fn a_node_survives_garbage_wrong_versions_and_oversize_frames() {
    let dir = fixture("qwen3_5_moe-tiny");
    let cluster = launch(&dir, 1, 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = cluster.addrs[0].clone();
    let tls = TlsConfig::Files {
        cert: cluster.tls.tls_cert.clone().unwrap(),
        key: cluster.tls.tls_key.clone().unwrap(),
        ca: cluster.tls.tls_ca.clone().unwrap(),
        server_name: "myriad-node".into(),
    };
    let fingerprint = myriad_model::ModelConfig::from_dir(&dir)
        .unwrap()
        .fingerprint();
    rt.block_on(async {
        let good = QuicConnector::new(&tls, QuicLimits::default()).unwrap();
        let good_conn = good.connect(&addr).await.unwrap();
        let hello = || {
            Frame::new(
                FrameKind::Hello,
                Hello {
                    client: "good".into(),
                    model_fingerprint: fingerprint,
                }
                .encode(),
            )
        };
        assert_eq!(
            good_conn
                .call(hello(), Duration::from_secs(10))
                .await
                .unwrap()
                .kind,
            FrameKind::HelloAck
        );

        let mut header = myriad_wire::encode_header(FrameKind::Hello, 4).to_vec();
        header[4] = 99; // unsupported version
        let oversize = myriad_wire::encode_header(FrameKind::ExpertRequest, u32::MAX).to_vec();
        let mut bad_payload = myriad_wire::encode_header(FrameKind::ExpertRequest, 3).to_vec();
        bad_payload.extend_from_slice(&[1, 2, 3]);
        for (what, bytes, closes) in [
            ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), true),
            ("wrong version", header, true),
            ("oversize frame", oversize, true),
            ("undecodable request", bad_payload, false),
        ] {
            let bad = QuicConnector::new(&tls, QuicLimits::default()).unwrap();
            let conn = bad.dial(&addr).await.unwrap();
            let (mut send, mut recv) = conn.quinn().open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            let _ = send.finish();
            let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
                .await
                .unwrap();
            if let Ok(reply) = reply {
                let h: [u8; 12] = reply[..12].try_into().unwrap();
                assert_eq!(
                    decode_header(&h, u32::MAX).unwrap().kind,
                    FrameKind::Error,
                    "{what}"
                );
            }
            if closes {
                let closed =
                    tokio::time::timeout(Duration::from_secs(10), conn.quinn().closed()).await;
                assert!(
                    closed.is_ok(),
                    "{what}: the node should drop a misbehaving peer"
                );
            }
            // The well-behaved client is served throughout.
            assert_eq!(
                good_conn
                    .call(hello(), Duration::from_secs(10))
                    .await
                    .unwrap()
                    .kind,
                FrameKind::HelloAck,
                "after {what}"
            );
        }
        let _ = Limits::default();
    });
}
