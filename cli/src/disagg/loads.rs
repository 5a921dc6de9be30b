//! The prefill nodes as a decode node sees them: their base URLs, their loads (each node's
//! `GET /internal/load`, read when a hand-off starts, so the choice is never stale), the order
//! to try them in, and the HTTP call that asks one to prefill.
//!
//! HTTP goes through `myriad_loadtest::http`, the repository's HTTP/1.1 client on hyper's
//! connection-level client: one fresh connection per call, so dropping a call closes its
//! connection, which is what tells the prefill node to cancel.

use std::cmp::Reverse;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use myriad_attention::PrefillOutput;
use myriad_gateway::LoadReport;
use myriad_gateway::http::LOAD_PATH;
use myriad_loadtest::http::{BaseUrl, MAX_ERROR_BODY, error_message, send};
use tokio::time::timeout;

use super::protocol::{LOAD_DEADLINE, PREFILL_PATH, PrefillCall};

/// The prefill nodes a decode node may use.
pub struct PrefillNodes {
    nodes: Vec<BaseUrl>,
    /// Sent as `Authorization: Bearer KEY` (the decode node's first API key: the nodes of one
    /// cluster share theirs).
    api_key: Option<String>,
    /// The TLS name prefill nodes ask this node's state receiver for.
    pub server_name: String,
}

/// A prefill node's load, or why it could not be read.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub url: BaseUrl,
    pub load: Result<LoadReport, String>,
}

impl Candidate {
    /// The order to try nodes in: readable loads first, by requests running and waiting, then
    /// by free KV blocks (most first); nodes whose load cannot be read last (they are probably
    /// down, but are still tried: a load report is not a prefill).
    fn key(&self) -> (bool, u64, Reverse<u64>) {
        match &self.load {
            Ok(l) => (
                false,
                l.running.saturating_add(l.waiting),
                Reverse(l.kv_blocks_total.saturating_sub(l.kv_blocks_used)),
            ),
            Err(_) => (true, 0, Reverse(0)),
        }
    }
}

impl PrefillNodes {
    pub fn parse(urls: &[String], api_key: Option<String>, server_name: String) -> Result<Self> {
        let nodes = urls
            .iter()
            .filter(|u| !u.trim().is_empty())
            .map(|u| BaseUrl::parse(u.trim()).with_context(|| format!("--prefill-nodes {u}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(PrefillNodes {
            nodes,
            api_key,
            server_name,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node with its load, in the order to try them (a stable sort: ties keep the
    /// configured order). Loads are read concurrently, each within [`LOAD_DEADLINE`].
    pub async fn by_load(&self) -> Vec<Candidate> {
        let reads = self.nodes.iter().map(|url| async move {
            let load = match timeout(LOAD_DEADLINE, self.load(url)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no load report within {LOAD_DEADLINE:?}")),
            };
            Candidate {
                url: url.clone(),
                load,
            }
        });
        let mut candidates = join_all(reads).await;
        candidates.sort_by_key(Candidate::key);
        candidates
    }

    async fn load(&self, url: &BaseUrl) -> Result<LoadReport, String> {
        let response = send(url, "GET", LOAD_PATH, None, None)
            .await
            .map_err(|e| e.to_string())?;
        let mut response = response
            .error_for_status()
            .await
            .map_err(|e| e.to_string())?;
        let body = response
            .read_to_end(MAX_ERROR_BODY)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("{}{LOAD_PATH}: {e}", url.root()))
    }

    /// Asks `url` to prefill `call.request` and send its state as `call.transfer_id`; the
    /// answer's `PrefillOutput`, or why not. The caller bounds the time; dropping the future
    /// closes the connection, which cancels the prefill there.
    pub async fn prefill(
        &self,
        url: &BaseUrl,
        call: &PrefillCall,
    ) -> Result<PrefillOutput, String> {
        let body = serde_json::to_vec(call).map_err(|e| format!("encoding the call: {e}"))?;
        let response = send(
            url,
            "POST",
            PREFILL_PATH,
            self.api_key.as_deref(),
            Some(&body),
        )
        .await
        .map_err(|e| e.to_string())?;
        if response.status != 200 {
            let status = response.status;
            let mut response = response;
            let message = match response.read_to_end(MAX_ERROR_BODY).await {
                Ok(b) => error_message(&b),
                Err(e) => format!("(the error body could not be read: {e})"),
            };
            return Err(format!("HTTP {status}: {message}"));
        }
        let mut response = response;
        let body = response
            .read_to_end(output_limit(&call.request))
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("the prefill output: {e}"))
    }
}

/// The largest `PrefillOutput` a request can have: its prompt's log-probabilities dominate
/// (every position with its top alternatives, tens of bytes each in JSON).
fn output_limit(request: &myriad_attention::Request) -> usize {
    let per_position = 64 * (request.logprobs.unwrap_or(0) + 2);
    (1 << 20) + request.prompt.len().saturating_mul(per_position)
}

/// Runs futures concurrently and returns their outputs in order (a small `join_all`: the
/// workspace has no futures crate).
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// The address a prefill node at `url` should send states to: the receiver's own, or, when it
/// listens on an unspecified IP (0.0.0.0, ::), the IP this host reaches `url` from (the route
/// the kernel picks for a connected UDP socket; nothing is sent), with the receiver's port.
pub fn state_addr_for(receiver: SocketAddr, url: &BaseUrl) -> String {
    if !receiver.ip().is_unspecified() {
        return receiver.to_string();
    }
    let local = std::net::UdpSocket::bind(SocketAddr::new(receiver.ip(), 0))
        .and_then(|s| s.connect(url.authority()).map(|()| s))
        .and_then(|s| s.local_addr());
    match local {
        Ok(l) => SocketAddr::new(l.ip(), receiver.port()).to_string(),
        // No route: loopback is the best guess (the same host).
        Err(_) => SocketAddr::new(
            if receiver.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            receiver.port(),
        )
        .to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(running: u64, waiting: u64, used: u64) -> Result<LoadReport, String> {
        Ok(LoadReport {
            role: "prefill".into(),
            running,
            waiting,
            kv_blocks_used: used,
            kv_blocks_total: 100,
            preemptions: 0,
        })
    }

    #[test]
    fn nodes_are_tried_least_loaded_first_and_unreadable_last() {
        let url = |p: u16| BaseUrl::parse(&format!("http://127.0.0.1:{p}")).unwrap();
        let mut c = [
            Candidate {
                url: url(1),
                load: Err("refused".into()),
            },
            Candidate {
                url: url(2),
                load: load(2, 1, 10),
            },
            Candidate {
                url: url(3),
                load: load(1, 0, 50),
            },
            Candidate {
                url: url(4),
                load: load(0, 1, 10),
            },
        ];
        c.sort_by_key(Candidate::key);
        let order: Vec<String> = c.iter().map(|c| c.url.authority()).collect();
        assert_eq!(
            order,
            ["127.0.0.1:4", "127.0.0.1:3", "127.0.0.1:2", "127.0.0.1:1"]
        );
    }

    #[test]
    fn an_unspecified_receiver_is_advertised_by_route() {
        let url = BaseUrl::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(
            state_addr_for("0.0.0.0:5000".parse().unwrap(), &url),
            "127.0.0.1:5000"
        );
        assert_eq!(
            state_addr_for("127.0.0.1:5000".parse().unwrap(), &url),
            "127.0.0.1:5000"
        );
    }
}
