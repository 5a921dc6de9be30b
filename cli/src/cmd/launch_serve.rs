//! `myriad launch --http HOST:PORT`: a whole serving cluster on this machine, every role its
//! own process: expert nodes (if `--expert-nodes` > 0; otherwise each attention node runs
//! every expert itself), prefill nodes, decode nodes that hand long prompts to the prefill
//! nodes (mixed nodes when there are no prefill nodes), and the gateway in front of them on
//! `--http`. Prints `ready
//! http://ADDR` once the gateway's `/health` is 200 (every decode node up), then waits for
//! SIGINT/SIGTERM; every process is stopped when it ends or fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use myriad_transport::generate_pki;

use crate::cluster::TlsArgs;
use crate::cmd::launch::{LaunchArgs, start_cluster};
use crate::lifecycle::shutdown_signal;

/// The attention and gateway processes; killed when dropped (the expert nodes belong to the
/// `Cluster` from `start_cluster`, which stops them the same way).
struct Processes {
    children: Vec<(String, Child)>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Processes {
    /// Starts `myriad ARGS` as `name` and waits for its `ready URL` line; returns the URL.
    fn start(
        &mut self,
        exe: &Path,
        name: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<String> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("reading a child's stdout")?;
        self.children.push((name.to_string(), child));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Drain, so a chatty process never blocks on a full pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(timeout) {
            Ok(Some(Ok(l))) if l.starts_with("ready ") => {
                Ok(l.trim_start_matches("ready ").trim().to_string())
            }
            Ok(Some(Ok(l))) => bail!("{name} said {l:?} instead of ready"),
            Ok(_) => bail!("{name} exited before it was ready"),
            Err(_) => bail!("{name} was not ready within {timeout:?}"),
        }
    }
}

/// The command-line flags that give a node `tls`.
fn tls_flags(tls: &TlsArgs) -> Vec<String> {
    if tls.insecure_dev_certs {
        return vec!["--insecure-dev-certs".into()];
    }
    let mut v = Vec::new();
    for (flag, path) in [
        ("--tls-cert", &tls.tls_cert),
        ("--tls-key", &tls.tls_key),
        ("--tls-ca", &tls.tls_ca),
    ] {
        if let Some(p) = path {
            v.push(flag.to_string());
            v.push(p.display().to_string());
        }
    }
    v.push("--tls-server-name".into());
    v.push(tls.tls_server_name.clone());
    v
}

/// Certificates for attention nodes when there are no expert nodes (whose launcher makes
/// them otherwise): one CA and one certificate the attention nodes share, for state
/// transfers between them.
fn attention_only_tls(a: &LaunchArgs, scratch: &Path) -> Result<TlsArgs> {
    if a.insecure_dev_certs {
        return Ok(TlsArgs {
            insecure_dev_certs: true,
            ..TlsArgs::default()
        });
    }
    let pki = scratch.join("pki");
    generate_pki(&pki, &["attention"], "myriad-node")
        .context("generating the cluster's certificates")?;
    Ok(TlsArgs {
        tls_cert: Some(pki.join("attention.pem")),
        tls_key: Some(pki.join("attention.key")),
        tls_ca: Some(pki.join("ca.pem")),
        tls_server_name: "myriad-node".into(),
        insecure_dev_certs: false,
    })
}

/// Waits until `GET {url}/health` answers 200.
fn wait_healthy(url: &str, timeout: Duration) -> Result<()> {
    let addr = url.trim_start_matches("http://");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_exact(&mut head).is_ok()
                && head.ends_with(b"200")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the gateway at {url} was not healthy within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(a: &LaunchArgs, exe: &Path, dir: &Path, http: &str) -> Result<()> {
    if a.decode_nodes == 0 {
        bail!("--http needs at least one decode node (--decode-nodes)");
    }
    let timeout = Duration::from_secs(a.ready_timeout_s);
    let scratch = std::env::temp_dir().join(format!("myriad-launch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    // Expert nodes first: attention nodes connect to them as they start.
    let cluster = if a.expert_nodes > 0 {
        let c = start_cluster(exe, dir, a)?;
        eprintln!(
            "{} expert nodes ready on {}",
            c.addrs.len(),
            c.addrs.join(", ")
        );
        Some(c)
    } else {
        None
    };
    let (tls, placement): (TlsArgs, Option<PathBuf>) = match &cluster {
        Some(c) => (c.tls.clone(), Some(c.placement.clone())),
        None => (attention_only_tls(a, &scratch)?, None),
    };
    let mut procs = Processes {
        children: Vec::new(),
    };
    let runtime = |role: &str| -> Vec<String> {
        let mut v: Vec<String> = ["node", "attention", "--model"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(dir.display().to_string());
        v.extend([
            "--http".into(),
            "127.0.0.1:0".into(),
            "--role".into(),
            role.into(),
        ]);
        v.extend(["--threads".into(), a.node_threads.to_string()]);
        v.extend(["--kv-cache-gb".into(), a.kv_cache_gb.to_string()]);
        if let Some(p) = &placement {
            v.extend(["--placement".into(), p.display().to_string()]);
        }
        v.extend(tls_flags(&tls));
        v
    };
    let mut prefill_urls = Vec::new();
    for i in 0..a.prefill_nodes {
        let url = procs.start(
            exe,
            &format!("prefill node p{i}"),
            &runtime("prefill"),
            timeout,
        )?;
        eprintln!("prefill node p{i} ready at {url}");
        prefill_urls.push(url);
    }
    let mut decode_urls = Vec::new();
    for i in 0..a.decode_nodes {
        // Without prefill nodes the nodes behind the gateway prefill and decode: mixed.
        let mut args = runtime(if prefill_urls.is_empty() {
            "mixed"
        } else {
            "decode"
        });
        if !prefill_urls.is_empty() {
            args.extend(["--prefill-nodes".into(), prefill_urls.join(",")]);
            args.extend([
                "--disagg-min-prompt-tokens".into(),
                a.disagg_min_prompt_tokens.to_string(),
            ]);
        }
        let url = procs.start(exe, &format!("decode node d{i}"), &args, timeout)?;
        eprintln!("decode node d{i} ready at {url}");
        decode_urls.push(url);
    }
    let (host, port) = http
        .rsplit_once(':')
        .with_context(|| format!("--http {http:?} is not HOST:PORT"))?;
    let gateway_args: Vec<String> = vec![
        "gateway".into(),
        "--attention-nodes".into(),
        decode_urls.join(","),
        "--host".into(),
        host.into(),
        "--port".into(),
        port.into(),
    ];
    let url = procs.start(exe, "the gateway", &gateway_args, timeout)?;
    wait_healthy(&url, timeout)?;
    eprintln!(
        "ready: the OpenAI API is at {url}/v1 ({} prefill, {} decode, {} expert nodes; Ctrl-C stops)",
        a.prefill_nodes, a.decode_nodes, a.expert_nodes
    );
    crate::lifecycle::announce_ready(&url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    rt.block_on(shutdown_signal());
    drop(procs);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
