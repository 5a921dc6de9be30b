//! Router counters: calls, bytes each way, round-trip times, failovers and placement switches,
//! plus the wire minimum the bytes are compared against (each row reaches each of its
//! destination nodes once and comes back once: `hidden × 4 bytes × destinations`, each way).
//! Per-node counters are keyed by node name, so they survive placement changes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default, Clone)]
struct Counters {
    calls: u64,
    pairs: u64,
    bytes_sent: u64,
    bytes_received: u64,
    rtt_total: Duration,
    rtt_max: Duration,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    row_visits: u64,
    minimum_bytes: u64,
    failovers: u64,
    switches: u64,
}

#[derive(Default)]
pub(crate) struct Stats {
    per_node: Mutex<BTreeMap<String, Counters>>,
    totals: Mutex<Totals>,
}

/// Counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The bytes a perfect protocol would move for the same dispatches (both ways).
    pub minimum_bytes: u64,
    /// Σ over dispatched rows of their distinct destination nodes.
    pub row_visits: u64,
    /// Layer steps that had to send some pairs again (to a replica or a newer placement).
    pub failovers: u64,
    /// Placement versions made active after the first.
    pub placement_switches: u64,
    pub rtt_mean: Duration,
    pub rtt_max: Duration,
    /// Per node, ascending by name.
    pub per_node: Vec<NodeStats>,
}

/// One node's counters.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    pub name: String,
    pub calls: u64,
    /// (token, expert) pairs the node served.
    pub pairs: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_mean: Duration,
}

fn mean(total: Duration, n: u64) -> Duration {
    if n > 0 {
        total / n as u32
    } else {
        Duration::ZERO
    }
}

impl Stats {
    pub(crate) fn record_call(
        &self,
        node: &str,
        pairs: usize,
        sent: usize,
        received: usize,
        rtt: Duration,
    ) {
        let mut v = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        let c = v.entry(node.to_string()).or_default();
        c.calls += 1;
        c.pairs += pairs as u64;
        c.bytes_sent += sent as u64;
        c.bytes_received += received as u64;
        c.rtt_total += rtt;
        c.rtt_max = c.rtt_max.max(rtt);
    }

    pub(crate) fn record_plan(&self, row_visits: usize, hidden: usize) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.row_visits += row_visits as u64;
        t.minimum_bytes += (row_visits * hidden * 4 * 2) as u64;
    }

    pub(crate) fn record_failover(&self) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failovers += 1;
    }

    pub(crate) fn record_switch(&self) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .switches += 1;
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let v = self
            .per_node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t = *self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let calls: u64 = v.values().map(|c| c.calls).sum();
        let rtt_total: Duration = v.values().map(|c| c.rtt_total).sum();
        StatsSnapshot {
            calls,
            bytes_sent: v.values().map(|c| c.bytes_sent).sum(),
            bytes_received: v.values().map(|c| c.bytes_received).sum(),
            minimum_bytes: t.minimum_bytes,
            row_visits: t.row_visits,
            failovers: t.failovers,
            placement_switches: t.switches,
            rtt_mean: mean(rtt_total, calls),
            rtt_max: v.values().map(|c| c.rtt_max).max().unwrap_or_default(),
            per_node: v
                .iter()
                .map(|(name, c)| NodeStats {
                    name: name.clone(),
                    calls: c.calls,
                    pairs: c.pairs,
                    bytes_sent: c.bytes_sent,
                    bytes_received: c.bytes_received,
                    rtt_mean: mean(c.rtt_total, c.calls),
                })
                .collect(),
        }
    }
}
