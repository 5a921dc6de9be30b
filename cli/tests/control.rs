//! The control plane against a real etcd (started per test on a free loopback port): expert
//! nodes as `myriad node expert --etcd` processes over QUIC, the attention side (with its
//! controller candidate) in this test process. Every generation must reproduce the
//! transformers reference tokens whatever happens to the placement meanwhile.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myriad::cluster::{ClusterArgs, TlsArgs};
use myriad::cmd::launch::{ExpertProcess, ExpertProcessSpec};
use myriad::control::ControlArgs;
use myriad::local::{LocalEngine, LocalOptions, load_with};
use myriad_attention::{Completion, Event, Generate, Scheduler, SchedulerConfig};
use myriad_control::records::{Request as ControlRequest, encode};
use myriad_control::testing::EtcdServer;
use myriad_control::{ClusterView, EtcdStore, Keys, Store};
use myriad_router::RemoteExperts;
use serde_json::Value;

mod common;
use common::{fixture, ids, reference};

fn requests(r: &Value, max_tokens: usize) -> Vec<myriad_attention::Request> {
    common::requests(r, max_tokens, None, false)
}

/// One request through the scheduler: when it was submitted and when it finished, which
/// reference prompt it ran, and its tokens (or why it failed).
struct Run {
    t0: Instant,
    t1: Instant,
    prompt: usize,
    tokens: Result<Vec<u32>, String>,
}

fn stream_one(scheduler: &Scheduler, prompt: usize, request: myriad_attention::Request) -> Run {
    let t0 = Instant::now();
    let mut tokens = Vec::new();
    let outcome = match scheduler.submit(request) {
        Err(e) => Err(e.to_string()),
        Ok(mut submission) => loop {
            match submission.events.blocking_recv() {
                Some(Event::Token { id, .. }) => tokens.push(id),
                Some(Event::Finished { .. }) => break Ok(()),
                Some(Event::Failed(e) | Event::Unavailable(e)) => break Err(e),
                Some(Event::PromptLogprobs(_)) => {}
                None => break Err("the scheduler dropped the request".to_string()),
            }
        },
    };
    Run {
        t0,
        t1: Instant::now(),
        prompt,
        tokens: outcome.map(|()| tokens),
    }
}

/// Every completion and the reference's greedy tokens agree as far as both go.
fn matches_reference(out: &[Completion], r: &Value, what: &str) {
    for (c, p) in out.iter().zip(r["prompts"].as_array().unwrap()) {
        let want = ids(&p["greedy_ids"]);
        let n = want.len().min(c.token_ids.len());
        assert!(n > 0, "{what}: nothing generated");
        assert_eq!(c.token_ids[..n], want[..n], "{what}");
    }
}

struct Etcd {
    server: EtcdServer,
    rt: tokio::runtime::Runtime,
}

impl Etcd {
    fn start() -> Etcd {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(EtcdServer::start()).unwrap();
        Etcd { server, rt }
    }

    fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(
            self.rt
                .block_on(EtcdStore::connect(&[self.endpoint()]))
                .unwrap(),
        )
    }

    fn view(&self, store: &dyn Store) -> ClusterView {
        self.rt
            .block_on(ClusterView::read(store, &Keys::new("test")))
            .unwrap()
    }
}

fn expert_node(dir: &Path, etcd: &str, name: &str, experts: Option<&str>) -> ExpertProcess {
    // Long enough that a loaded CI machine never lets a live node's lease lapse; the tests
    // that need a dead node noticed quickly ask for a short lease.
    expert_node_with(dir, etcd, name, experts, false, 3000)
}

fn expert_node_with(
    dir: &Path,
    etcd: &str,
    name: &str,
    experts: Option<&str>,
    metrics: bool,
    lease_ttl_ms: u64,
) -> ExpertProcess {
    let spec = ExpertProcessSpec {
        exe: Path::new(env!("CARGO_BIN_EXE_myriad")),
        model: dir,
        etcd,
        cluster: "test",
        lease_ttl_ms,
        threads: 1,
        ready_timeout: Duration::from_secs(120),
        metrics,
        // Tests run many processes at once: loads at full speed keep them short.
        load_duty: 1.0,
    };
    ExpertProcess::start(&spec, name, experts).unwrap()
}

fn attention(dir: &Path, etcd: &str, min_nodes: usize) -> LocalEngine {
    attention_with(dir, etcd, min_nodes, None)
}

fn attention_with(
    dir: &Path,
    etcd: &str,
    min_nodes: usize,
    metrics_addr: Option<std::net::SocketAddr>,
) -> LocalEngine {
    let args = ClusterArgs {
        metrics_addr,
        control: ControlArgs {
            etcd: vec![etcd.to_string()],
            cluster_name: "test".into(),
            lease_ttl_ms: 2000,
        },
        node_name: Some("a0".into()),
        min_expert_nodes: min_nodes,
        expert_deadline_ms: 2000,
        failover_wait_ms: 60_000,
        ..ClusterArgs::default()
    };
    let tls = TlsArgs {
        insecure_dev_certs: true,
        ..TlsArgs::default()
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

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn router(engine: &LocalEngine) -> Arc<RemoteExperts> {
    engine.experts.router.clone().unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[test]
fn killing_an_expert_node_without_replicas_mid_generation_loses_no_request() {
    let dir = fixture("qwen3_5_moe-mini512");
    let r = reference(&dir);
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let mut nodes: Vec<ExpertProcess> = (0..3)
        .map(|i| expert_node_with(&dir, &ep, &format!("e{i}"), None, false, 1000))
        .collect();
    let engine = Arc::new(attention(&dir, &ep, 3));
    let router = router(&engine);
    assert_eq!(router.placement_version(), 1);
    assert_eq!(
        router.placement().nodes().len(),
        3,
        "spread over every node"
    );
    matches_reference(
        &engine.engine.generate(&requests(&r, 16)).unwrap(),
        &r,
        "initial placement",
    );

    let e = engine.clone();
    let reqs = requests(&r, 64);
    let run = std::thread::spawn(move || e.engine.generate(&reqs));
    let calls = router.stats().calls;
    wait_until("generation", Duration::from_secs(60), || {
        router.stats().calls > calls + 30
    });
    nodes[1].kill();
    let killed = Instant::now();
    let out = run.join().unwrap().expect("every request completes");
    matches_reference(&out, &r, "after failover");
    assert!(out.iter().all(|c| c.token_ids.len() == 64));
    assert!(router.placement_version() >= 2);
    assert!(
        router.placement().node("e1").is_none(),
        "e1 is no longer placed"
    );
    let store = etcd.store();
    let view = etcd.view(&*store);
    assert!(view.status.as_ref().unwrap().failovers >= 1);
    let steps = router.recent_steps();
    let recovered = steps
        .iter()
        .find(|s| s.ended > killed)
        .map(|s| s.ended - killed)
        .unwrap();
    let normal = median(
        steps
            .iter()
            .filter(|s| s.ended < killed)
            .map(|s| s.duration)
            .collect(),
    );
    eprintln!(
        "FIGURE failover: kill -> next successful step {:.0} ms (lease TTL 1000 ms; normal step {:.1} ms)",
        recovered.as_secs_f64() * 1e3,
        normal.as_secs_f64() * 1e3
    );
}

#[test]
fn a_registered_node_that_stops_answering_is_replaced() {
    let dir = fixture("qwen3_next-mini512");
    let r = reference(&dir);
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    // A lease far longer than the test: only the attention node's reports can reveal e1.
    let nodes: Vec<ExpertProcess> = (0..3)
        .map(|i| expert_node_with(&dir, &ep, &format!("e{i}"), None, false, 60_000))
        .collect();
    let engine = Arc::new(attention(&dir, &ep, 3));
    let router = router(&engine);
    let e = engine.clone();
    let reqs = requests(&r, 48);
    let run = std::thread::spawn(move || e.engine.generate(&reqs));
    wait_until("generation", Duration::from_secs(60), || {
        router.stats().calls > 30
    });
    let stop = |sig: &str| {
        Command::new("kill")
            .args([sig, &nodes[1].pid().to_string()])
            .status()
            .unwrap()
    };
    assert!(stop("-STOP").success());
    let out = run.join().unwrap();
    assert!(stop("-CONT").success());
    let out = out.expect("every request completes");
    matches_reference(&out, &r, "after replacing a hung node");
    assert!(
        router.placement().node("e1").is_none(),
        "e1 is no longer placed"
    );
    let store = etcd.store();
    let view = etcd.view(&*store);
    assert!(
        view.expert_node("e1").is_some(),
        "e1 kept its lease throughout"
    );
    assert!(view.status.unwrap().failovers >= 1);
}

#[test]
fn a_rebalance_under_a_skewed_load_switches_placement_between_steps() {
    let dir = fixture("qwen3_next-mini512");
    let r = reference(&dir);
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    // Nodes started with their experts are adopted as they are: e0 holds 7/8 of them.
    let _nodes = [
        expert_node(&dir, &ep, "e0", Some("0-447")),
        expert_node(&dir, &ep, "e1", Some("448-511")),
    ];
    let engine = Arc::new(attention(&dir, &ep, 2));
    let router = router(&engine);
    assert_eq!(
        router.placement().node("e0").unwrap().experts.to_string(),
        "0-447"
    );
    let store = etcd.store();
    let keys = Keys::new("test");

    // Requests through the scheduler until the rebalance is over, each timed, with three in
    // flight at staggered points: every step boundary then falls inside some request's life,
    // so wherever the switch lands, a running request sees it (run-to-completion batches
    // back to back left a gap between batches where the switch could fall).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scheduler = Arc::new(Scheduler::start(
        engine.engine.clone(),
        SchedulerConfig::default(),
    ));
    let prompts = requests(&r, 32);
    let streams: Vec<_> = (0..3)
        .map(|k| {
            let (sched, halt, prompts) = (scheduler.clone(), stop.clone(), prompts.clone());
            std::thread::spawn(move || {
                // Stagger the streams by a few tokens each.
                let mut runs = Vec::new();
                let mut i = k;
                let mut first = true;
                while !halt.load(std::sync::atomic::Ordering::Acquire) {
                    let mut req = prompts[i % prompts.len()].clone();
                    if first {
                        req.max_tokens = 4 + 9 * k;
                        first = false;
                    }
                    runs.push(stream_one(&sched, i % prompts.len(), req));
                    i += 3;
                }
                runs
            })
        })
        .collect();
    // Wait for a load report, then ask for a rebalance while the generations run.
    wait_until("a load report", Duration::from_secs(60), || {
        etcd.view(&*store).load(512).iter().sum::<f64>() > 0.0
    });
    let asked = Instant::now();
    let id = 7;
    etcd.rt
        .block_on(store.put(
            &keys.rebalance_request(),
            encode(&ControlRequest {
                id,
                extra_replicas: Some(0),
            }),
            None,
        ))
        .unwrap();
    wait_until("the rebalance", Duration::from_secs(120), || {
        etcd.view(&*store)
            .status
            .is_some_and(|s| s.last_request == Some(id))
    });
    let done = Instant::now();
    // Until the old copies are gone and a generation ran entirely on the new placement.
    wait_until("a step on version 2", Duration::from_secs(60), || {
        router
            .recent_steps()
            .iter()
            .filter(|s| s.placement_version == 2)
            .count()
            > 40
    });
    stop.store(true, std::sync::atomic::Ordering::Release);
    let runs: Vec<Run> = streams
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let prompts = r["prompts"].as_array().unwrap();
    for run in &runs {
        let tokens = run.tokens.as_ref().expect("every request completes");
        let want = ids(&prompts[run.prompt]["greedy_ids"]);
        let n = want.len().min(tokens.len());
        assert!(n > 0, "nothing generated");
        assert_eq!(tokens[..n], want[..n], "across the rebalance");
    }

    let view = etcd.view(&*store);
    let status = view.status.clone().unwrap();
    assert_eq!(status.rebalances, 1, "{}", status.last_outcome);
    assert!(
        status.imbalance_after < status.imbalance_before,
        "{status:?}"
    );
    assert_eq!(view.version(), 2);
    // The switch happened between two steps of one running generation.
    let steps = router.recent_steps();
    let switched_within = runs.iter().any(|run| {
        let inside = |v: u64| {
            steps
                .iter()
                .any(|s| s.placement_version == v && s.ended > run.t0 && s.ended <= run.t1)
        };
        inside(1) && inside(2)
    });
    assert!(switched_within, "no request ran on both versions");
    assert!(router.stats().placement_switches >= 1);
    // Old copies are dropped once the attention node runs version 2.
    wait_until("old copies dropped", Duration::from_secs(30), || {
        let v = etcd.view(&*store);
        v.expert_nodes.iter().all(|n| {
            let placed = v
                .current
                .as_ref()
                .unwrap()
                .nodes
                .iter()
                .find(|p| p.name == n.name);
            placed.is_some_and(|p| p.experts == n.held)
        })
    });
    let during: Vec<Duration> = steps
        .iter()
        .filter(|s| s.ended >= asked && s.ended <= done + Duration::from_millis(200))
        .map(|s| s.duration)
        .collect();
    let before: Vec<Duration> = steps
        .iter()
        .filter(|s| s.ended < asked)
        .map(|s| s.duration)
        .collect();
    eprintln!(
        "FIGURE rebalance: imbalance {:.3} -> {:.3}; {:.2}s; longest step during it {:.1} ms over {} steps, median step before {:.1} ms",
        status.imbalance_before,
        status.imbalance_after,
        status.last_rebalance_seconds,
        during
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
        during.len(),
        median(before).as_secs_f64() * 1e3
    );

    // The operator's view agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args([
            "control",
            "status",
            "--json",
            "--cluster",
            "test",
            "--etcd",
            &ep,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["placement_version"], 2);
    assert_eq!(s["rebalances"], 1);
    assert_eq!(s["leader"], "a0");
}

#[test]
fn serving_continues_across_an_etcd_restart() {
    let dir = fixture("qwen3_5_moe-mini512");
    let r = reference(&dir);
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint();
    let _nodes: Vec<ExpertProcess> = (0..2)
        .map(|i| expert_node(&dir, &ep, &format!("e{i}"), None))
        .collect();
    let engine = Arc::new(attention(&dir, &ep, 2));
    let router = router(&engine);
    let e = engine.clone();
    let reqs = requests(&r, 48);
    let run = std::thread::spawn(move || e.engine.generate(&reqs));
    wait_until("generation", Duration::from_secs(60), || {
        router.stats().calls > 20
    });
    etcd.rt.block_on(etcd.server.restart()).unwrap();
    let out = run
        .join()
        .unwrap()
        .expect("serving does not depend on etcd");
    matches_reference(&out, &r, "across the etcd restart");

    // The control plane works again: the controller drains a node on request.
    let store = etcd.store();
    let keys = Keys::new("test");
    wait_until("nodes registered again", Duration::from_secs(30), || {
        let v = etcd.view(&*store);
        v.expert_nodes.len() == 2 && v.attention_nodes.len() == 1
    });
    etcd.rt
        .block_on(store.put(
            &keys.drain_request("e1"),
            encode(&ControlRequest {
                id: 1,
                extra_replicas: None,
            }),
            None,
        ))
        .unwrap();
    wait_until("the drain", Duration::from_secs(60), || {
        router.placement().node("e1").is_none()
    });
    matches_reference(
        &engine.engine.generate(&requests(&r, 16)).unwrap(),
        &r,
        "after the drain",
    );
}

/// `GET /metrics` over a plain TCP connection: (status line, content type, body).
fn scrape(addr: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

#[test]
fn every_node_serves_valid_prometheus_metrics() {
    let dir = fixture("qwen3_5_moe-mini512");
    let r = reference(&dir);
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let _nodes: Vec<ExpertProcess> = (0..2)
        .map(|i| expert_node_with(&dir, &ep, &format!("e{i}"), None, true, 3000))
        .collect();
    let engine = attention_with(&dir, &ep, 2, Some("127.0.0.1:0".parse().unwrap()));
    matches_reference(
        &engine.engine.generate(&requests(&r, 8)).unwrap(),
        &r,
        "with metrics on",
    );
    let attention = engine
        .experts
        .control
        .as_ref()
        .unwrap()
        .metrics_addr
        .unwrap()
        .to_string();
    let (status, ctype, body) = scrape(&attention);
    assert!(status.contains("200"), "{status}");
    assert!(ctype.contains("version=0.0.4"), "{ctype}");
    for family in [
        "myriad_expert_tokens_routed_total{expert=\"",
        "myriad_expert_node_pairs_total{node=\"e0\"}",
        "myriad_expert_load_imbalance{node=\"a0\"}",
        "myriad_placement_version{node=\"a0\"} 1",
        "myriad_rebalances_total",
        "myriad_expert_node_failovers_total",
    ] {
        assert!(body.contains(family), "{family} missing from:\n{body}");
    }
    // Bounded label set: one series per expert, not per (layer, expert).
    let series = body
        .lines()
        .filter(|l| l.starts_with("myriad_expert_tokens_routed_total{"))
        .count();
    assert_eq!(series, 512);
    common::promtool_accepts(&body);

    let store = etcd.store();
    let view = etcd.view(&*store);
    for n in &view.expert_nodes {
        let (status, _, body) = scrape(n.metrics_addr.as_deref().unwrap());
        assert!(status.contains("200"), "{status}");
        assert!(
            body.contains(&format!("myriad_experts_held{{node=\"{}\"}} 256", n.name)),
            "{body}"
        );
        assert!(body.contains("myriad_expert_tokens_served_total{expert=\""));
        common::promtool_accepts(&body);
    }
}

#[test]
fn the_in_memory_control_plane_runs_in_process_expert_nodes() {
    let dir = fixture("qwen3_next-mini512");
    let r = reference(&dir);
    let args = ClusterArgs {
        in_process_experts: 3,
        node_name: Some("a0".into()),
        ..ClusterArgs::default()
    };
    let engine = load_with(
        &dir,
        &LocalOptions {
            threads: 2,
            ..LocalOptions::default()
        },
        &args,
        &TlsArgs::default(),
    )
    .unwrap();
    let router = router(&engine);
    assert_eq!(router.placement_version(), 1);
    assert_eq!(router.placement().nodes().len(), 3);
    matches_reference(
        &engine.engine.generate(&requests(&r, 16)).unwrap(),
        &r,
        "in-process expert nodes",
    );
    // The controller inside this process rebalances by the load the generation reported.
    let control = engine.experts.control.as_ref().unwrap();
    let (store, keys) = (control.store.clone(), control.keys.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    wait_until("a load report", Duration::from_secs(30), || {
        let v = rt.block_on(ClusterView::read(&*store, &keys)).unwrap();
        v.load(512).iter().sum::<f64>() > 0.0
    });
    rt.block_on(store.put(
        &keys.rebalance_request(),
        encode(&ControlRequest {
            id: 3,
            extra_replicas: Some(8),
        }),
        None,
    ))
    .unwrap();
    wait_until("the rebalance", Duration::from_secs(60), || {
        let v = rt.block_on(ClusterView::read(&*store, &keys)).unwrap();
        v.status.is_some_and(|s| s.last_request == Some(3))
    });
    let v = rt.block_on(ClusterView::read(&*store, &keys)).unwrap();
    assert!(
        v.status
            .as_ref()
            .unwrap()
            .last_outcome
            .starts_with("version 2"),
        "{:?}",
        v.status
    );
    wait_until("version 2 in use", Duration::from_secs(30), || {
        router.placement_version() == 2
    });
    matches_reference(
        &engine.engine.generate(&requests(&r, 16)).unwrap(),
        &r,
        "after the rebalance",
    );
}

#[test]
fn a_standalone_controller_places_and_drains_without_attention_nodes() {
    let dir = fixture("qwen3_5_moe-mini512");
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let _nodes: Vec<ExpertProcess> = (0..2)
        .map(|i| expert_node(&dir, &ep, &format!("e{i}"), None))
        .collect();
    let exe = env!("CARGO_BIN_EXE_myriad");
    let mut controller = Command::new(exe)
        .args(["control", "run", "--model"])
        .arg(&dir)
        .args(["--etcd", &ep, "--cluster", "test", "--lease-ttl-ms", "1000"])
        .args(["--min-expert-nodes", "2", "--name", "c0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = etcd.store();
    wait_until("the first placement", Duration::from_secs(60), || {
        etcd.view(&*store).version() == 1
    });
    let view = etcd.view(&*store);
    assert_eq!(view.leader.as_deref(), Some("c0"));
    assert_eq!(view.current.as_ref().unwrap().nodes.len(), 2);
    // The operator's drain goes through the standalone controller.
    let out = Command::new(exe)
        .args([
            "control",
            "drain",
            "e1",
            "--json",
            "--cluster",
            "test",
            "--etcd",
            &ep,
        ])
        .args(["--wait-s", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["drained"], "e1");
    let view = etcd.view(&*store);
    let doc = view.current.unwrap();
    assert!(doc.nodes.iter().all(|n| n.name != "e1"));
    assert_eq!(doc.nodes[0].experts, "0-511");
    let _ = controller.kill();
    let _ = controller.wait();
}
