//! [`EtcdServer`]: a real, single-member etcd for tests, on free loopback ports with its own
//! temporary data directory, that can be stopped and restarted in place (same ports, same
//! data) to exercise reconnects. It is killed and its directory removed on drop.
//!
//! It lives in the library (not `tests/`) so that other crates' tests can start one too.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// How long a fresh or restarted etcd gets to answer a read.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// A port picked by binding port 0 can be taken by someone else before etcd binds it.
const START_ATTEMPTS: usize = 4;

#[derive(Debug, Error)]
pub enum EtcdServerError {
    #[error(
        "etcd not found: install Debian's etcd-server (scripts/test.sh does) or set MYRIAD_ETCD_BIN"
    )]
    NotFound,
    #[error("etcd test server: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd at {endpoint} exited during startup ({status}); log {log}:\n{tail}")]
    Exited {
        endpoint: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("etcd at {endpoint} did not answer within {after:?}: {reason}; log {log}:\n{tail}")]
    NotReady {
        endpoint: String,
        after: Duration,
        reason: String,
        log: String,
        tail: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EtcdServerError {
    let what = what.into();
    move |source| EtcdServerError::Io { what, source }
}

/// A running etcd process owned by a test.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    /// Holds `data/` (etcd's data dir) and `etcd.log`; removed on drop.
    root: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves reads.
    pub async fn start() -> Result<EtcdServer, EtcdServerError> {
        let bin = find_etcd()?;
        let root = unique_dir()?;
        let mut server = EtcdServer {
            bin,
            root,
            client_port: 0,
            peer_port: 0,
            child: None,
        };
        let mut attempt = 1;
        loop {
            let (client_port, peer_port) = free_port_pair()?;
            server.client_port = client_port;
            server.peer_port = peer_port;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                // Most likely a port collision: a fresh pair and a fresh data dir.
                Err(EtcdServerError::Exited { .. }) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    server.kill();
                    let data = server.data_dir();
                    if data.exists() {
                        fs::remove_dir_all(&data).map_err(io_err(format!(
                            "removing {} after a failed start",
                            data.display()
                        )))?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:PORT`, the client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// etcd's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// etcd's log file (errors only).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("etcd.log")
    }

    /// Whether the process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills etcd (SIGKILL, like a crash) and waits for it to exit; the data stays.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Kills etcd (if running) and starts it again on the same ports with the same data,
    /// waiting until it serves reads. Also the way to bring it back after [`EtcdServer::stop`].
    pub async fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn_and_wait().await
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine; either way reap it so no zombie outlives the test.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), EtcdServerError> {
        let data = self.data_dir();
        let log = self.log_path();
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        // etcd's own log goes to the file via --log-outputs; stdout/stderr catch whatever it
        // prints before its logger is set up (flag errors).
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let mut cmd = Command::new(&self.bin);
        // ETCD_* variables are flags to etcd; a developer's environment must not reconfigure
        // the test server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let mut log_arg = OsString::from("--log-outputs=");
        log_arg.push(log.as_os_str());
        let mut data_arg = OsString::from("--data-dir=");
        data_arg.push(data.as_os_str());
        cmd.arg("--name=myriad-test")
            .arg(data_arg)
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=myriad-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=myriad-test")
            // A shorter election timeout lowers etcd's minimum lease TTL (1.5 election
            // timeouts, rounded up to whole seconds) from 2 s to 1 s, so lease tests are quick.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg(log_arg)
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", self.bin.display())))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), EtcdServerError> {
        let endpoint = self.endpoint();
        let started = Instant::now();
        let mut reason = String::from("no answer yet");
        while started.elapsed() < READY_WITHIN {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(EtcdServerError::Exited {
                    endpoint,
                    status: status.to_string(),
                    log: self.log_path().display().to_string(),
                    tail: log_tail(&self.log_path()),
                });
            }
            match probe(&endpoint).await {
                Ok(()) => return Ok(()),
                Err(e) => reason = e,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(EtcdServerError::NotReady {
            endpoint,
            after: READY_WITHIN,
            reason,
            log: self.log_path().display().to_string(),
            tail: log_tail(&self.log_path()),
        })
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// One connect + read against `endpoint`, each bounded, with a throwaway client so that no
/// state leaks into the test's own clients.
async fn probe(endpoint: &str) -> Result<(), String> {
    let wait = Duration::from_millis(500);
    crate::EtcdStore::connect_with_timeouts(&[endpoint.to_string()], wait, wait)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `$MYRIAD_ETCD_BIN`, then `etcd` on `PATH`, then `/usr/bin/etcd`.
pub fn find_etcd() -> Result<PathBuf, EtcdServerError> {
    if let Some(bin) = std::env::var_os("MYRIAD_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(EtcdServerError::NotFound)
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let fallback = PathBuf::from("/usr/bin/etcd");
    if fallback.is_file() {
        return Ok(fallback);
    }
    Err(EtcdServerError::NotFound)
}

fn unique_dir() -> Result<PathBuf, EtcdServerError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "myriad-etcd-{}-{n}-{nanos:08x}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
}

/// Two distinct free loopback ports, both held until both are picked so they differ.
fn free_port_pair() -> Result<(u16, u16), EtcdServerError> {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| Ok((l.local_addr()?.port(), l)))
            .map_err(io_err("picking a free loopback port"))
    };
    let (client, _a) = bind()?;
    let (peer, _b) = bind()?;
    Ok((client, peer))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
