//! The choice of the attention node for a request, as a pure function ([`choose`]) over a
//! snapshot of every node's load ([`NodeLoad`]), so the rule can be tested without sockets:
//!
//! 1. Only nodes in rotation qualify: healthy, not already tried for this request, and not a
//!    `prefill` node (those take prompts from decode nodes, never clients' requests).
//! 2. The lowest score wins. A node that reports its load scores its reported
//!    `running + waiting` plus this proxy's requests to it started since that report and still
//!    in flight (the report cannot know them yet). A node that does not report (an older node
//!    whose `/internal/load` is a 404) scores this proxy's requests in flight to it.
//! 3. Ties go to the node with more free KV blocks (`kv_blocks_total - kv_blocks_used`; 0 for
//!    a node without a report), then round robin: the first in order from a starting point
//!    that moves on by one per request, so idle nodes still share sequential requests.

/// A node's part in prefill/decode disaggregation, as its load report says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Role {
    /// Prefills prompts for decode nodes; never chosen for a client's request.
    Prefill,
    Decode,
    /// Both; also what a node without load reports is taken to be.
    #[default]
    Mixed,
}

impl Role {
    /// `None` for a role this proxy does not know.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            "mixed" => Some(Role::Mixed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Mixed => "mixed",
        }
    }
}

/// What a node's last load report said that the choice uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reported {
    pub running: u64,
    pub waiting: u64,
    pub kv_blocks_free: u64,
}

/// One node as the choice sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeLoad {
    pub healthy: bool,
    pub role: Role,
    /// `None`: the node does not report its load.
    pub reported: Option<Reported>,
    /// This proxy's requests to the node started after its last report, still in flight.
    pub since_report: u64,
    /// All of this proxy's requests to the node in flight.
    pub in_flight: u64,
}

impl NodeLoad {
    /// Whether clients' requests may go to the node.
    pub fn in_rotation(&self) -> bool {
        self.healthy && self.role != Role::Prefill
    }

    /// Lower is better (rule 2).
    pub fn score(&self) -> u64 {
        match self.reported {
            Some(r) => r.running + r.waiting + self.since_report,
            None => self.in_flight,
        }
    }

    fn kv_blocks_free(&self) -> u64 {
        self.reported.map_or(0, |r| r.kv_blocks_free)
    }
}

/// The index of the node for a request, or `None` when no node qualifies. `tried[i]`: node `i`
/// was tried for this request already (missing entries: not tried); `start`: where the round
/// robin begins (taken modulo the number of nodes).
pub(crate) fn choose(loads: &[NodeLoad], tried: &[bool], start: usize) -> Option<usize> {
    let n = loads.len();
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = (start % n + k) % n;
        let node = &loads[i];
        if tried.get(i).copied().unwrap_or(false) || !node.in_rotation() {
            continue;
        }
        let (score, free) = (node.score(), node.kv_blocks_free());
        // Strictly better only: among equals the first in round-robin order stays.
        let better = best.is_none_or(|(_, s, f)| score < s || (score == s && free > f));
        if better {
            best = Some((i, score, free));
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporting(running: u64, waiting: u64, free: u64) -> NodeLoad {
        NodeLoad {
            healthy: true,
            role: Role::Decode,
            reported: Some(Reported {
                running,
                waiting,
                kv_blocks_free: free,
            }),
            since_report: 0,
            in_flight: 0,
        }
    }

    #[test]
    fn lower_reported_load_wins_over_this_proxys_own_counts() {
        // This proxy has more requests on node 1, but node 0 reports a longer queue (other
        // proxies' requests, or long prompts): node 1 is less loaded.
        let mut a = reporting(6, 2, 100);
        a.in_flight = 1;
        let mut b = reporting(1, 0, 100);
        b.in_flight = 5;
        b.since_report = 2;
        assert_eq!((a.score(), b.score()), (8, 3));
        assert_eq!(choose(&[a, b], &[], 0), Some(1));
        assert_eq!(choose(&[a, b], &[], 1), Some(1));
        // Requests sent since the report count: enough of them tip the balance.
        b.since_report = 8;
        assert_eq!(choose(&[a, b], &[], 1), Some(0));
    }

    #[test]
    fn prefill_unhealthy_and_tried_nodes_are_skipped() {
        let mut prefill = reporting(0, 0, 1000);
        prefill.role = Role::Prefill;
        let mut down = reporting(0, 0, 1000);
        down.healthy = false;
        let busy = reporting(9, 9, 0);
        let loads = [prefill, down, busy];
        for start in 0..3 {
            assert_eq!(choose(&loads, &[], start), Some(2), "start {start}");
        }
        assert_eq!(choose(&loads, &[false, false, true], 0), None);
        assert_eq!(choose(&[prefill], &[], 0), None);
        assert_eq!(choose(&[], &[], 7), None);
        // A mixed node and a node without reports (an older one) are in rotation.
        let mut old = NodeLoad {
            healthy: true,
            ..NodeLoad::default()
        };
        assert!(old.in_rotation() && old.role == Role::Mixed);
        old.in_flight = 3;
        assert_eq!(old.score(), 3);
    }

    #[test]
    fn ties_go_to_more_free_blocks() {
        let loads = [
            reporting(2, 0, 10),
            reporting(1, 1, 50),
            reporting(2, 0, 30),
        ];
        for start in 0..3 {
            assert_eq!(choose(&loads, &[], start), Some(1), "start {start}");
        }
        // A node without a report has no free blocks to offer in a tie.
        let old = NodeLoad {
            healthy: true,
            in_flight: 2,
            ..NodeLoad::default()
        };
        assert_eq!(choose(&[old, reporting(2, 0, 1)], &[], 0), Some(1));
    }

    #[test]
    fn round_robin_among_equals() {
        let loads = [reporting(1, 0, 8), reporting(1, 0, 8), reporting(1, 0, 8)];
        let picks: Vec<_> = (0..6).filter_map(|s| choose(&loads, &[], s)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // A tried node is passed over, the next in order takes it.
        assert_eq!(choose(&loads, &[false, true, false], 1), Some(2));
    }
}
