//! How every long-running role starts and stops the same way: the `ready ADDR` line scripts,
//! tests and the launcher wait for, and the signals that stop it.

use std::io::Write;

use anyhow::{Context, Result};

/// Prints `ready {what}` on stdout and flushes it: scripts, tests and `myriad launch` read
/// this line to know the role accepts work (and where).
pub fn announce_ready(what: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {what}")
        .and_then(|()| out.flush())
        .context("writing the ready line")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
