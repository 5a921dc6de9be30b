//! Router counters: calls, bytes each way, round-trip times and failovers, plus the wire
//! minimum the bytes are compared against (each row reaches each of its destination nodes once
//! and comes back once: `hidden × 4 bytes × destinations`, each way).

use std::sync::Mutex;
use std::time::Duration;

use crate::placement::Placement;

#[derive(Default, Clone)]
struct Counters {
    calls: u64,
    bytes_sent: u64,
    bytes_received: u64,
    rtt_total: Duration,
    rtt_max: Duration,
}

pub(crate) struct Stats {
    per_node: Mutex<Vec<Counters>>,
    totals: Mutex<(u64, u64, u64)>,
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
    pub failovers: u64,
    pub rtt_mean: Duration,
    pub rtt_max: Duration,
    /// (node name, calls, mean round trip) per node.
    pub per_node: Vec<(String, u64, Duration)>,
}

impl Stats {
    pub(crate) fn new(nodes: usize) -> Self {
        Stats {
            per_node: Mutex::new(vec![Counters::default(); nodes]),
            totals: Mutex::new((0, 0, 0)),
        }
    }

    pub(crate) fn record_call(&self, node: usize, sent: usize, received: usize, rtt: Duration) {
        let mut v = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut v[node];
        c.calls += 1;
        c.bytes_sent += sent as u64;
        c.bytes_received += received as u64;
        c.rtt_total += rtt;
        c.rtt_max = c.rtt_max.max(rtt);
    }

    pub(crate) fn record_plan(&self, row_visits: usize, hidden: usize) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += row_visits as u64;
        t.1 += (row_visits * hidden * 4 * 2) as u64;
    }

    pub(crate) fn record_failover(&self) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.2 += 1;
    }

    pub(crate) fn snapshot(&self, placement: &Placement) -> StatsSnapshot {
        let v = self
            .per_node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t = *self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let calls: u64 = v.iter().map(|c| c.calls).sum();
        let rtt_total: Duration = v.iter().map(|c| c.rtt_total).sum();
        StatsSnapshot {
            calls,
            bytes_sent: v.iter().map(|c| c.bytes_sent).sum(),
            bytes_received: v.iter().map(|c| c.bytes_received).sum(),
            minimum_bytes: t.1,
            row_visits: t.0,
            failovers: t.2,
            rtt_mean: if calls > 0 {
                rtt_total / calls as u32
            } else {
                Duration::ZERO
            },
            rtt_max: v.iter().map(|c| c.rtt_max).max().unwrap_or_default(),
            per_node: v
                .iter()
                .zip(placement.nodes())
                .map(|(c, n)| {
                    (
                        n.name.clone(),
                        c.calls,
                        if c.calls > 0 {
                            c.rtt_total / c.calls as u32
                        } else {
                            Duration::ZERO
                        },
                    )
                })
                .collect(),
        }
    }
}
