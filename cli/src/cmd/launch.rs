//! `myriad launch`: a whole cluster on this machine. Starts N expert-node processes on
//! loopback (mutual TLS with a freshly generated CA unless `--insecure-dev-certs`), waits until
//! each is ready, then runs the attention side in this process on JSON request lines from
//! stdin. The expert nodes are stopped when it finishes, fails, or gets SIGINT/SIGTERM. With
//! `--http`, a serving cluster instead (`launch_serve.rs`).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use myriad_model::ModelConfig;
use myriad_router::Placement;
use myriad_transport::generate_pki;

use crate::cluster::{ClusterArgs, TlsArgs};
use crate::cmd::node::serve_requests;
use crate::lifecycle::shutdown_signal;
use crate::local::load_with;
use crate::runtime::RuntimeArgs;

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Model directory (default: the built-in small model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Expert-node processes to start.
    #[arg(long, default_value_t = 4)]
    pub expert_nodes: usize,
    /// Nodes holding each expert.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Worker threads per expert node.
    #[arg(long, default_value_t = 1)]
    pub node_threads: usize,
    /// Development certificates instead of a generated CA.
    #[arg(long)]
    pub insecure_dev_certs: bool,
    /// Split steps into two micro-batches (attention overlaps the expert round trip).
    #[arg(long)]
    pub ping_pong: bool,
    /// How long to wait for the expert nodes to come up, in seconds.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout_s: u64,
    /// Use this etcd as the control plane: expert nodes register and take their experts from
    /// the placement it holds, and the attention side runs the controller (instead of a
    /// static placement file).
    #[arg(long)]
    pub etcd: Option<String>,
    /// Serve the OpenAI API on HOST:PORT with every role as its own process: the expert
    /// nodes (none: each attention node runs every expert), --prefill-nodes, --decode-nodes
    /// and the gateway (see `launch_serve.rs`). Without it, requests are JSON lines on stdin.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "etcd")]
    pub http: Option<String>,
    /// With --http: prefill-node processes (long prompts are prefilled there).
    #[arg(long, default_value_t = 0)]
    pub prefill_nodes: usize,
    /// With --http: decode-node processes behind the gateway.
    #[arg(long, default_value_t = 1)]
    pub decode_nodes: usize,
    /// With --http: prompts of at least this many tokens go through a prefill node.
    #[arg(long, default_value_t = 1024)]
    pub disagg_min_prompt_tokens: usize,
    /// With --http: each attention node's KV block pool, in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub kv_cache_gb: f64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The started processes and their scratch directory; stops and removes them when dropped.
pub struct Cluster {
    children: Arc<Mutex<Vec<Child>>>,
    dir: PathBuf,
    pub placement: PathBuf,
    pub addrs: Vec<String>,
    /// TLS flags of the attention side.
    pub tls: TlsArgs,
}

impl Cluster {
    /// Stops every expert node.
    pub fn stop(&self) {
        stop_children(&self.children);
    }

    /// Kills node `i` (tests and demos of failover).
    pub fn kill_node(&self, i: usize) -> Result<()> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let child = children.get_mut(i).context("no such node")?;
        child.kill().context("killing an expert node")?;
        let _ = child.wait();
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stop_children(children: &Mutex<Vec<Child>>) {
    let mut children = children.lock().unwrap_or_else(|e| e.into_inner());
    for c in children.iter_mut() {
        // Expert nodes keep no per-sequence state, so killing one loses nothing.
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

/// Free loopback UDP ports (bound and released; a race with other processes is unlikely on a
/// test machine and fails loudly at bind time).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("finding free UDP ports")?;
    sockets
        .iter()
        .map(|s| Ok(s.local_addr().context("reading a bound port")?.port()))
        .collect()
}

/// Starts `args.expert_nodes` expert nodes (processes of the `myriad` binary `exe`) for the
/// model in `dir` and waits until they serve.
pub fn start_cluster(exe: &Path, dir: &Path, args: &LaunchArgs) -> Result<Cluster> {
    let config = ModelConfig::from_dir(dir)?;
    let scratch = std::env::temp_dir().join(format!(
        "myriad-cluster-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let addrs: Vec<String> = free_ports(args.expert_nodes)?
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let placement = Placement::even(&addrs, config.num_experts, args.replicas)?;
    let placement_path = scratch.join("placement.json");
    std::fs::write(&placement_path, placement.to_json())
        .with_context(|| format!("writing {}", placement_path.display()))?;
    let names: Vec<String> = placement.nodes().iter().map(|n| n.name.clone()).collect();
    let tls_flags = |name: &str| -> Vec<String> {
        if args.insecure_dev_certs {
            vec!["--insecure-dev-certs".into()]
        } else {
            let pki = scratch.join("pki");
            vec![
                "--tls-cert".into(),
                pki.join(format!("{name}.pem")).display().to_string(),
                "--tls-key".into(),
                pki.join(format!("{name}.key")).display().to_string(),
                "--tls-ca".into(),
                pki.join("ca.pem").display().to_string(),
            ]
        }
    };
    let attention_tls = if args.insecure_dev_certs {
        TlsArgs {
            insecure_dev_certs: true,
            ..TlsArgs::default()
        }
    } else {
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("attention");
        generate_pki(&scratch.join("pki"), &all, "myriad-node")
            .context("generating the cluster's certificates")?;
        let pki = scratch.join("pki");
        TlsArgs {
            tls_cert: Some(pki.join("attention.pem")),
            tls_key: Some(pki.join("attention.key")),
            tls_ca: Some(pki.join("ca.pem")),
            tls_server_name: "myriad-node".into(),
            insecure_dev_certs: false,
        }
    };
    let children = Arc::new(Mutex::new(Vec::new()));
    let cluster = Cluster {
        children: children.clone(),
        dir: scratch.clone(),
        placement: placement_path.clone(),
        addrs: addrs.clone(),
        tls: attention_tls,
    };
    let (tx, rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    for (i, node) in placement.nodes().iter().enumerate() {
        let mut cmd = Command::new(exe);
        cmd.args(["node", "expert", "--model"])
            .arg(dir)
            .args(["--listen", &node.addr, "--placement"])
            .arg(&placement_path)
            .args([
                "--name",
                &node.name,
                "--threads",
                &args.node_threads.to_string(),
            ])
            .args(tls_flags(&node.name))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting expert node {}", node.name))?;
        let stdout = child.stdout.take().context("expert node stdout")?;
        children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        let tx = tx.clone();
        let name = node.name.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let msg = match lines.next() {
                Some(Ok(l)) if l.starts_with("ready ") => Ok(i),
                Some(Ok(l)) => Err(format!("expert node {name} said {l:?} instead of ready")),
                _ => Err(format!("expert node {name} exited before it was ready")),
            };
            let _ = tx.send(msg);
            // Drain, so a chatty node never blocks on a full pipe.
            for _ in lines {}
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(args.ready_timeout_s);
    for _ in 0..placement.nodes().len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!(e),
            Err(_) => bail!(
                "expert nodes did not become ready within {} s",
                args.ready_timeout_s
            ),
        }
    }
    Ok(cluster)
}

/// `launch --etcd`: expert nodes that take their experts from the control plane.
fn run_controlled(a: &LaunchArgs, exe: &Path, dir: &Path, etcd: &str) -> Result<()> {
    let spec = ExpertProcessSpec {
        exe,
        model: dir,
        etcd,
        cluster: "default",
        lease_ttl_ms: 3000,
        threads: a.node_threads,
        ready_timeout: Duration::from_secs(a.ready_timeout_s),
        metrics: false,
        load_duty: 0.25,
    };
    let nodes = (0..a.expert_nodes)
        .map(|i| ExpertProcess::start(&spec, &format!("e{i}"), None))
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "{} expert nodes registered with {etcd}: {}",
        nodes.len(),
        nodes
            .iter()
            .map(|n| n.addr.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cluster_args = ClusterArgs {
        control: crate::control::ControlArgs {
            etcd: vec![etcd.to_string()],
            cluster_name: "default".into(),
            lease_ttl_ms: 3000,
        },
        min_expert_nodes: a.expert_nodes,
        replicas: a.replicas,
        ping_pong: a.ping_pong,
        failover_wait_ms: 60_000,
        ..ClusterArgs::default()
    };
    let tls = TlsArgs {
        insecure_dev_certs: true,
        ..TlsArgs::default()
    };
    let engine = load_with(dir, &a.runtime.options(), &cluster_args, &tls)?;
    serve_requests(&engine, std::io::stdin().lock(), std::io::stdout().lock())
}

/// One `myriad node expert --etcd` process (experts from the control plane); killed on drop.
pub struct ExpertProcess {
    child: Child,
    pub name: String,
    /// The address it serves on.
    pub addr: String,
}

/// How to start an [`ExpertProcess`].
#[derive(Clone, Debug)]
pub struct ExpertProcessSpec<'a> {
    pub exe: &'a Path,
    pub model: &'a Path,
    pub etcd: &'a str,
    pub cluster: &'a str,
    pub lease_ttl_ms: u64,
    pub threads: usize,
    pub ready_timeout: Duration,
    /// Serve `/metrics` on a free loopback port (its address is in the node's record).
    pub metrics: bool,
    /// `--load-duty`: the share of a core a rebalance's loads may take.
    pub load_duty: f64,
}

impl ExpertProcess {
    /// Starts node `name` (holding `experts` at first, or nothing until assigned) on a free
    /// loopback port with development certificates, and waits for its ready line.
    pub fn start(spec: &ExpertProcessSpec<'_>, name: &str, experts: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(spec.exe);
        cmd.args(["node", "expert", "--model"])
            .arg(spec.model)
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .args(["--etcd", spec.etcd, "--cluster", spec.cluster])
            .args(["--lease-ttl-ms", &spec.lease_ttl_ms.to_string()])
            .args([
                "--threads",
                &spec.threads.to_string(),
                "--insecure-dev-certs",
            ])
            .args(["--load-duty", &spec.load_duty.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(e) = experts {
            cmd.args(["--experts", e]);
        }
        if spec.metrics {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting expert node {name}"))?;
        let stdout = child.stdout.take().context("expert node stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let mut node = ExpertProcess {
            child,
            name: name.to_string(),
            addr: String::new(),
        };
        match rx.recv_timeout(spec.ready_timeout) {
            Ok(Some(Ok(l))) if l.starts_with("ready ") => {
                node.addr = l.trim_start_matches("ready ").trim().to_string();
                Ok(node)
            }
            Ok(Some(Ok(l))) => bail!("expert node {name} said {l:?} instead of ready"),
            Ok(_) => bail!("expert node {name} exited before it was ready"),
            Err(_) => bail!(
                "expert node {name} was not ready within {:?}",
                spec.ready_timeout
            ),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL: no goodbye to the control plane, as in a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ExpertProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn run(a: &LaunchArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => crate::builtin::default_model()?,
    };
    let exe = std::env::current_exe().context("locating the myriad binary")?;
    if let Some(etcd) = &a.etcd {
        return run_controlled(a, &exe, &dir, etcd);
    }
    if let Some(http) = &a.http {
        return crate::cmd::launch_serve::run(a, &exe, &dir, http);
    }
    let cluster = start_cluster(&exe, &dir, a)?;
    eprintln!(
        "{} expert nodes ready on {}",
        cluster.addrs.len(),
        cluster.addrs.join(", ")
    );
    // SIGINT/SIGTERM stop the nodes before this process goes.
    let children = cluster.children.clone();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(shutdown_signal());
            stop_children(&children);
            std::process::exit(130);
        }
    });
    let cluster_args = ClusterArgs {
        placement: Some(cluster.placement.clone()),
        ping_pong: a.ping_pong,
        ..ClusterArgs::default()
    };
    let engine = load_with(&dir, &a.runtime.options(), &cluster_args, &cluster.tls)?;
    serve_requests(&engine, std::io::stdin().lock(), std::io::stdout().lock())
}
