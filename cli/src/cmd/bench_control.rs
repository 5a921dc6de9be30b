//! `myriad bench control`: what the control plane costs a running cluster.
//!
//! Starts a real etcd on loopback, N expert-node processes that register with it and hold an
//! uneven placement (the first node half of the experts, the others the rest), and this
//! process's attention side (router, follower and controller). Then, while a batch decodes
//! greedily without pause:
//! 1. the per-node load is measured, a rebalance is requested, and the load is measured again
//!    after it (imbalance = max/mean of (token, expert) pairs per node, from the router's own
//!    counters; the rebalancer's prediction from the reported window is printed beside it);
//! 2. every decode step's duration during the rebalance is compared with the median step
//!    before it (the target: no step more than 10 ms longer), and with an equally long quiet
//!    window after it (what the host's own jitter does to the longest step);
//! 3. one expert node is killed (SIGKILL) and the time from the kill to the next completed
//!    step is measured, beside the lease TTL that bounds how soon the controller can know.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::device::Device;
use anyhow::{Context, Result, bail};
use clap::Args;
use myriad_attention::sampling::argmax;
use myriad_attention::{Engine, SequenceState};
use myriad_control::records::{Request, encode};
use myriad_control::testing::EtcdServer;
use myriad_control::{ClusterView, EtcdStore, Keys, Store};
use myriad_kernels::SeqSpan;
use myriad_model::{Family, ModelConfig, Preset};
use myriad_router::{RemoteExperts, StatsSnapshot};
use serde_json::json;

use crate::cluster::{ClusterArgs, TlsArgs};
use crate::cmd::bench::prompt;
use crate::cmd::generate::OutputFormat;
use crate::cmd::launch::{ExpertProcess, ExpertProcessSpec};
use crate::control::ControlArgs;
use crate::local::load_with;
use crate::runtime::RuntimeArgs;

#[derive(Args, Debug)]
pub struct ControlBenchArgs {
    /// Model directory (default: the built-in `bench` preset, made on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Expert-node processes.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Sequences decoding together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// Seconds of decoding measured before the rebalance (and after it).
    #[arg(long, default_value_t = 6)]
    pub measure_s: u64,
    /// Extra copies of hot experts the rebalance may make.
    #[arg(long, default_value_t = 16)]
    pub extra_replicas: usize,
    /// Lease TTL of every node, in milliseconds (bounds failure detection).
    #[arg(long, default_value_t = 2000)]
    pub lease_ttl_ms: u64,
    /// Worker threads of each expert node.
    #[arg(long, default_value_t = 1)]
    pub node_threads: usize,
    /// The share of one core each expert node's rebalance loads may take.
    #[arg(long, default_value_t = 0.25)]
    pub load_duty: f64,
    /// Skip killing a node at the end.
    #[arg(long)]
    pub skip_failover: bool,
    /// Write every step (seconds since the rebalance request, duration in ms, placement
    /// version) to this CSV file.
    #[arg(long)]
    pub steps_csv: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Max over mean of the pairs each node served between two snapshots.
fn measured_imbalance(a: &StatsSnapshot, b: &StatsSnapshot, nodes: &[String]) -> f64 {
    let pairs: Vec<f64> = nodes
        .iter()
        .map(|n| {
            let get = |s: &StatsSnapshot| {
                s.per_node
                    .iter()
                    .find(|x| &x.name == n)
                    .map_or(0, |x| x.pairs)
            };
            get(b).saturating_sub(get(a)) as f64
        })
        .collect();
    let mean = pairs.iter().sum::<f64>() / pairs.len().max(1) as f64;
    if mean == 0.0 {
        return 1.0;
    }
    pairs.iter().cloned().fold(0.0, f64::max) / mean
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What the orchestration thread saw, for the report.
#[derive(Default)]
struct Timeline {
    imbalance_before: f64,
    imbalance_after: f64,
    predicted_before: f64,
    predicted_after: f64,
    outcome: String,
    asked: Option<Instant>,
    published: Option<Instant>,
    cleaned: Option<Instant>,
    /// A window as long as the rebalance, after it, with nothing happening.
    control: Option<(Instant, Instant)>,
    killed: Option<Instant>,
    killed_node: String,
    versions: Vec<u64>,
}

pub fn run(a: &ControlBenchArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => crate::builtin::ensure(Preset::Bench, Family::Qwen35Moe)?,
    };
    if a.nodes < 2 {
        bail!("--nodes must be at least 2 (one is killed)");
    }
    let config = ModelConfig::from_dir(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let etcd = rt
        .block_on(EtcdServer::start())
        .context("starting etcd (install Debian's etcd-server)")?;
    let endpoint = etcd.endpoint();
    let nodes = start_uneven_expert_nodes(a, &dir, &endpoint, config.num_experts)?;
    eprintln!(
        "{} expert nodes registered with etcd at {endpoint}",
        a.nodes
    );
    let engine = load_with(
        &dir,
        &a.runtime.options(),
        &attention_cluster(a, &endpoint),
        &TlsArgs {
            insecure_dev_certs: true,
            ..TlsArgs::default()
        },
    )?;
    let router: Arc<RemoteExperts> = engine
        .experts
        .router
        .clone()
        .context("the cluster has a router")?;
    let store: Arc<dyn Store> =
        Arc::new(rt.block_on(EtcdStore::connect(std::slice::from_ref(&endpoint)))?);

    let done = Arc::new(AtomicBool::new(false));
    let orchestration = Orchestration {
        router: router.clone(),
        store,
        keys: Keys::new("bench"),
        nodes: nodes.clone(),
        handle: rt.handle().clone(),
        measure: Duration::from_secs(a.measure_s),
        extra_replicas: a.extra_replicas,
        skip_failover: a.skip_failover,
        lease_ttl: Duration::from_millis(a.lease_ttl_ms),
        timeline: Mutex::new(Timeline::default()),
    };
    let orchestrate = {
        let done = done.clone();
        std::thread::spawn(move || {
            let result = orchestration.run();
            done.store(true, Ordering::Release);
            result.map(|()| {
                orchestration
                    .timeline
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
            })
        })
    };
    decode_until(&engine.engine, &config, a, &done)?;
    let timeline = orchestrate
        .join()
        .map_err(|_| anyhow::anyhow!("the orchestration thread panicked"))??;
    report(a, &dir, &timeline, &router)?;
    drop(engine);
    drop(nodes);
    Ok(())
}

/// Expert-node processes registered with etcd at `endpoint`, uneven on purpose: node 0 holds
/// half of the experts, the others share the rest.
fn start_uneven_expert_nodes(
    a: &ControlBenchArgs,
    dir: &Path,
    endpoint: &str,
    n: usize,
) -> Result<Vec<Arc<Mutex<ExpertProcess>>>> {
    let exe = std::env::current_exe().context("locating the myriad binary")?;
    let spec = ExpertProcessSpec {
        exe: &exe,
        model: dir,
        etcd: endpoint,
        cluster: "bench",
        lease_ttl_ms: a.lease_ttl_ms,
        threads: a.node_threads,
        ready_timeout: Duration::from_secs(600),
        metrics: false,
        load_duty: a.load_duty,
    };
    let rest = a.nodes - 1;
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        let (lo, hi) = if i == 0 {
            (0, n / 2)
        } else {
            (
                n / 2 + (i - 1) * (n - n / 2) / rest,
                n / 2 + i * (n - n / 2) / rest,
            )
        };
        let set = format!("{lo}-{}", hi - 1);
        nodes.push(Arc::new(Mutex::new(ExpertProcess::start(
            &spec,
            &format!("e{i}"),
            Some(&set),
        )?)));
    }
    Ok(nodes)
}

/// This process's attention side: router, follower and controller on the etcd cluster.
fn attention_cluster(a: &ControlBenchArgs, endpoint: &str) -> ClusterArgs {
    ClusterArgs {
        control: ControlArgs {
            etcd: vec![endpoint.to_string()],
            cluster_name: "bench".into(),
            lease_ttl_ms: a.lease_ttl_ms,
        },
        node_name: Some("a0".into()),
        min_expert_nodes: a.nodes,
        extra_replicas: a.extra_replicas,
        failover_wait_ms: 120_000,
        expert_deadline_ms: 5_000,
        ..ClusterArgs::default()
    }
}

/// The bench's script, run on its own thread while the main thread decodes: measure, request
/// a rebalance and follow it to its cleanup, measure a quiet window, kill a node.
struct Orchestration {
    router: Arc<RemoteExperts>,
    store: Arc<dyn Store>,
    keys: Keys,
    nodes: Vec<Arc<Mutex<ExpertProcess>>>,
    handle: tokio::runtime::Handle,
    measure: Duration,
    extra_replicas: usize,
    skip_failover: bool,
    lease_ttl: Duration,
    timeline: Mutex<Timeline>,
}

/// How long the bench waits for the rebalance and its cleanup.
const REBALANCE_LIMIT: Duration = Duration::from_secs(600);

impl Orchestration {
    fn run(&self) -> Result<()> {
        std::thread::sleep(Duration::from_secs(1));
        let s0 = self.router.stats();
        std::thread::sleep(self.measure);
        let s1 = self.router.stats();
        self.timeline().imbalance_before = measured_imbalance(&s0, &s1, &self.node_names());
        let (asked, cleaned) = self.rebalance()?;
        // The control window: as long as the rebalance took, with nothing happening, so the
        // host's own step-time jitter is measured beside the rebalance's.
        std::thread::sleep(Duration::from_millis(500));
        let s2 = self.router.stats();
        let window = self.measure.max(cleaned - asked);
        let control_from = Instant::now();
        std::thread::sleep(window);
        let s3 = self.router.stats();
        {
            let mut t = self.timeline();
            t.control = Some((control_from, Instant::now()));
            t.imbalance_after = measured_imbalance(&s2, &s3, &self.node_names());
        }
        if !self.skip_failover {
            self.kill_one()?;
        }
        self.timeline().versions = self
            .view("end")?
            .current
            .iter()
            .map(|c| c.version)
            .collect();
        Ok(())
    }

    /// Requests a rebalance and waits until its old copies are dropped: (asked, cleaned).
    fn rebalance(&self) -> Result<(Instant, Instant)> {
        let id = 1;
        let req = Request {
            id,
            extra_replicas: Some(self.extra_replicas),
        };
        let v0 = self.router.placement_version();
        let asked = Instant::now();
        self.timeline().asked = Some(asked);
        self.handle.block_on(
            self.store
                .put(&self.keys.rebalance_request(), encode(&req), None),
        )?;
        let deadline = asked + REBALANCE_LIMIT;
        loop {
            if self.router.placement_version() > v0 {
                self.timeline().published.get_or_insert(Instant::now());
            }
            let v = self.view("rebalance")?;
            if let Some(s) = v.status.as_ref().filter(|s| s.last_request == Some(id)) {
                let mut t = self.timeline();
                t.outcome = s.last_outcome.clone();
                t.predicted_before = s.imbalance_before;
                t.predicted_after = s.imbalance_after;
                break;
            }
            if Instant::now() > deadline {
                bail!("the rebalance did not finish within {REBALANCE_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Until the old copies are dropped (every node holds exactly its new set).
        loop {
            let v = self.view("cleanup")?;
            let clean = v.current.as_ref().is_some_and(|c| {
                c.nodes
                    .iter()
                    .all(|p| v.expert_node(&p.name).is_some_and(|r| r.held == p.experts))
            });
            if clean {
                break;
            }
            if Instant::now() > deadline {
                bail!("old copies were not dropped within {REBALANCE_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let cleaned = Instant::now();
        self.timeline().cleaned = Some(cleaned);
        Ok((asked, cleaned))
    }

    /// SIGKILLs expert node 1 and waits for the failover placement (bounded).
    fn kill_one(&self) -> Result<()> {
        let victim = 1;
        let v1 = self.router.placement_version();
        {
            let mut node = self.nodes[victim].lock().unwrap_or_else(|e| e.into_inner());
            node.kill();
            let mut t = self.timeline();
            t.killed = Some(Instant::now());
            t.killed_node = node.name.clone();
        }
        let limit = Instant::now() + self.lease_ttl * 4 + Duration::from_secs(300);
        while self.router.placement_version() <= v1 && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    fn view(&self, what: &str) -> Result<ClusterView> {
        self.handle
            .block_on(ClusterView::read(&*self.store, &self.keys))
            .with_context(|| format!("reading the cluster ({what})"))
    }

    fn node_names(&self) -> Vec<String> {
        self.router
            .placement()
            .nodes()
            .iter()
            .map(|x| x.name.clone())
            .collect()
    }

    fn timeline(&self) -> std::sync::MutexGuard<'_, Timeline> {
        self.timeline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Decodes a batch greedily without pause until `done` (or the context runs out).
fn decode_until(
    engine: &Engine<Device>,
    config: &ModelConfig,
    a: &ControlBenchArgs,
    done: &AtomicBool,
) -> Result<()> {
    let model = engine.model();
    let vocab = config.vocab_size;
    let bsz = a.batch.max(1);
    let mut seqs: Vec<SequenceState<Device>> = (0..bsz).map(|_| model.new_sequence()).collect();
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    for i in 0..bsz {
        spans.push(SeqSpan {
            start: tokens.len(),
            len: a.prompt_len,
            past: 0,
        });
        tokens.extend(prompt(config, a.prompt_len, 1 + i as u64));
    }
    let rows: Vec<usize> = spans.iter().map(|s| s.start + s.len - 1).collect();
    let mut refs: Vec<&mut SequenceState<Device>> = seqs.iter_mut().collect();
    let logits = model.forward(&tokens, &spans, &mut refs, &rows, None)?;
    let mut next: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    let mut past = a.prompt_len;
    let rows: Vec<usize> = (0..bsz).collect();
    while !done.load(Ordering::Acquire) {
        if past + 1 >= config.max_position_embeddings.min(1 << 20) {
            break;
        }
        let spans: Vec<SeqSpan> = (0..bsz)
            .map(|i| SeqSpan {
                start: i,
                len: 1,
                past,
            })
            .collect();
        let logits = model.forward(&next, &spans, &mut refs, &rows, None)?;
        next = logits.chunks_exact(vocab).map(argmax).collect();
        past += 1;
    }
    Ok(())
}

/// Step-time windows and figures from the router's step records, printed as text or JSON
/// (and every step as CSV with `--steps-csv`).
fn report(a: &ControlBenchArgs, dir: &Path, t: &Timeline, router: &RemoteExperts) -> Result<()> {
    let bsz = a.batch.max(1);
    let steps = router.recent_steps();
    let asked = t.asked.context("the rebalance was not requested")?;
    let cleaned = t.cleaned.context("the rebalance did not finish")?;
    let window = |from: Instant, to: Instant| -> Vec<Duration> {
        let mut v: Vec<Duration> = steps
            .iter()
            .filter(|s| s.ended >= from && s.ended - s.duration <= to)
            .map(|s| s.duration)
            .collect();
        v.sort();
        v
    };
    let quantile = |v: &[Duration], q: f64| -> f64 {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| ms(*d))
    };
    // The first steps are the prefill and the warm-up.
    let first = steps.get(3).map_or(asked, |s| s.ended);
    let before = window(first, asked);
    let median = before.get(before.len() / 2).copied().unwrap_or_default();
    let during = window(asked, cleaned);
    let longest = during.last().copied().unwrap_or_default();
    let control = t
        .control
        .map(|(from, to)| window(from, to))
        .unwrap_or_default();
    if let Some(path) = &a.steps_csv {
        let mut csv = String::from("t_s,duration_ms,version\n");
        for s in &steps {
            let t = if s.ended >= asked {
                (s.ended - asked).as_secs_f64()
            } else {
                -(asked - s.ended).as_secs_f64()
            };
            csv.push_str(&format!(
                "{t:.4},{:.3},{}\n",
                ms(s.duration),
                s.placement_version
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    let recovery = t
        .killed
        .and_then(|k| steps.iter().find(|s| s.ended > k).map(|s| s.ended - k));
    let report = json!({
        "model": dir.display().to_string(),
        "expert_nodes": a.nodes,
        "batch": bsz,
        "lease_ttl_ms": a.lease_ttl_ms,
        "imbalance_before": t.imbalance_before,
        "imbalance_after": t.imbalance_after,
        "predicted_imbalance_before": t.predicted_before,
        "predicted_imbalance_after": t.predicted_after,
        "rebalance_outcome": t.outcome,
        "rebalance_seconds": (cleaned - asked).as_secs_f64(),
        "median_step_ms": ms(median),
        "longest_step_during_rebalance_ms": ms(longest),
        "steps_during_rebalance": during.len(),
        "excess_ms": ms(longest) - ms(median),
        "during_rebalance_ms": {"p50": quantile(&during, 0.5), "p90": quantile(&during, 0.9),
            "p99": quantile(&during, 0.99), "max": ms(longest)},
        "control_window_ms": {"steps": control.len(), "p50": quantile(&control, 0.5),
            "p90": quantile(&control, 0.9), "p99": quantile(&control, 0.99),
            "max": quantile(&control, 1.0)},
        "killed_node": t.killed_node,
        "kill_to_next_step_ms": recovery.map(ms),
        "placement_versions": t.versions,
        "failovers": router.stats().failovers,
    });
    match a.output {
        OutputFormat::Json => println!("{report}"),
        OutputFormat::Text => {
            println!(
                "imbalance (max/mean pairs per node): {:.3} before, {:.3} after (predicted {:.3} -> {:.3})",
                t.imbalance_before, t.imbalance_after, t.predicted_before, t.predicted_after
            );
            println!(
                "rebalance: {} ({:.2} s until old copies dropped)",
                t.outcome,
                (cleaned - asked).as_secs_f64()
            );
            println!(
                "decode steps at batch {bsz}: median {:.1} ms before; longest during the rebalance {:.1} ms over {} steps ({:+.1} ms)",
                ms(median),
                ms(longest),
                during.len(),
                ms(longest) - ms(median)
            );
            println!(
                "  during the rebalance: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms; an equally long quiet window after it: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms",
                quantile(&during, 0.5),
                quantile(&during, 0.9),
                quantile(&during, 0.99),
                ms(longest),
                quantile(&control, 0.5),
                quantile(&control, 0.9),
                quantile(&control, 0.99),
                quantile(&control, 1.0)
            );
            if let Some(r) = recovery {
                println!(
                    "killed {}: next step completed {:.0} ms later (lease TTL {} ms)",
                    t.killed_node,
                    ms(r),
                    a.lease_ttl_ms
                );
            }
        }
    }
    Ok(())
}
