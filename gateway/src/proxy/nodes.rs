//! The node table: each attention node's health, role, last load report and this proxy's
//! requests in flight to it, and the choice of the node for a request (a snapshot of the table
//! handed to `choice::choose`, which holds the rule).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::choice::{self, NodeLoad, Reported, Role};
use super::config::NodeUrl;

/// One attention node.
#[derive(Debug)]
pub(crate) struct Node {
    pub url: NodeUrl,
    /// The URL as metrics and messages name it.
    pub label: String,
    healthy: AtomicBool,
    /// Consecutive failed health checks.
    failures: AtomicU32,
    in_flight: AtomicUsize,
    load: Mutex<LoadState>,
    pub health_check_failures: AtomicU64,
}

/// What the node's load reports said, and what this proxy sent it since the last one.
#[derive(Debug, Default)]
struct LoadState {
    role: Role,
    /// `None` until a report arrives, and for a node without load reports.
    reported: Option<Reported>,
    /// Counts the reports, so a request knows whether one arrived while it was in flight.
    epoch: u64,
    /// Requests started since the last report and still in flight.
    since_report: u64,
}

impl Node {
    fn new(url: NodeUrl) -> Self {
        Node {
            label: url.to_string(),
            url,
            // Out of rotation until its first health check passes.
            healthy: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            load: Mutex::default(),
            health_check_failures: AtomicU64::new(0),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests this proxy has sent to the node whose responses have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn load_state(&self) -> MutexGuard<'_, LoadState> {
        // The state is a few plain numbers, each write complete: a poisoned lock holds no
        // broken invariant.
        self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The role its last load report gave (mixed until one does).
    pub fn role(&self) -> Role {
        self.load_state().role
    }

    /// Its last load report, if it reports.
    pub fn reported(&self) -> Option<Reported> {
        self.load_state().reported
    }

    /// Whether clients' requests may go to it: healthy and not a prefill node.
    pub fn in_rotation(&self) -> bool {
        self.snapshot().in_rotation()
    }

    /// Records a load report (`None`: the node has no load endpoint, so it is taken as a
    /// mixed node chosen by this proxy's in-flight count); returns the role it had before.
    pub fn record_load(&self, report: Option<(Role, Reported)>) -> Role {
        let mut load = self.load_state();
        let before = load.role;
        load.role = report.map_or(Role::Mixed, |(role, _)| role);
        load.reported = report.map(|(_, r)| r);
        load.epoch += 1;
        // The report includes every request the node had received; the ones still on their
        // way are few and briefly unaccounted for.
        load.since_report = 0;
        before
    }

    /// The node as the choice sees it.
    pub fn snapshot(&self) -> NodeLoad {
        let load = self.load_state();
        NodeLoad {
            healthy: self.healthy(),
            role: load.role,
            reported: load.reported,
            since_report: load.since_report,
            in_flight: self.in_flight() as u64,
        }
    }

    /// A health check passed; says whether the node was down before.
    pub fn check_passed(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        !self.healthy.swap(true, Ordering::Relaxed)
    }

    /// A health check failed; says whether that took the node out of rotation (after
    /// `threshold` in a row).
    pub fn check_failed(&self, threshold: u32) -> bool {
        self.health_check_failures.fetch_add(1, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        failures >= threshold.max(1) && self.mark_down()
    }

    /// Takes the node out of rotation at once (a request could not reach it); says whether it
    /// was in rotation. The health checks bring it back.
    pub fn mark_down(&self) -> bool {
        self.healthy.swap(false, Ordering::Relaxed)
    }

    /// Counts a request to this node until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        let epoch = {
            let mut load = self.load_state();
            load.since_report += 1;
            load.epoch
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            node: self.clone(),
            epoch,
        }
    }
}

/// A request in flight on a node: counted from before the connection is made until the
/// response body has been relayed (or the client went away).
#[derive(Debug)]
pub(crate) struct InFlight {
    node: Arc<Node>,
    /// The node's report epoch when the request started.
    epoch: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.node.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut load = self.node.load_state();
        // Counted since the last report only if no report came while it ran (a later report
        // counted it, or not, itself).
        if load.epoch == self.epoch {
            load.since_report = load.since_report.saturating_sub(1);
        }
    }
}

/// Every node, in the order given.
#[derive(Debug)]
pub(crate) struct Nodes {
    nodes: Vec<Arc<Node>>,
    /// Where the next tie-break starts.
    next: AtomicUsize,
}

impl Nodes {
    pub fn new(urls: Vec<NodeUrl>) -> Self {
        Nodes {
            nodes: urls.into_iter().map(|u| Arc::new(Node::new(u))).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn get(&self, i: usize) -> &Arc<Node> {
        &self.nodes[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.iter()
    }

    /// Nodes in rotation (healthy, not prefill).
    pub fn healthy_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.in_rotation()).count()
    }

    /// The node for a request, by `choice::choose` over the nodes not yet `tried`. The round
    /// robin's starting point moves on by one per request; a retry (some node tried already)
    /// does not move it.
    pub fn pick(&self, tried: &[bool]) -> Option<usize> {
        let n = self.nodes.len();
        if n == 0 {
            return None;
        }
        let start = if tried.contains(&true) {
            self.next.load(Ordering::Relaxed)
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        } % n;
        let loads: Vec<NodeLoad> = self.nodes.iter().map(|n| n.snapshot()).collect();
        choice::choose(&loads, tried, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Nodes {
        let urls = (0..n)
            .map(|i| NodeUrl::parse(&format!("http://127.0.0.1:{}", 9000 + i)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        let nodes = Nodes::new(urls);
        for node in nodes.iter() {
            node.check_passed();
        }
        nodes
    }

    #[test]
    fn ties_go_round_robin_and_load_wins() {
        let t = nodes(3);
        let none = [false; 3];
        let picks: Vec<_> = (0..6).filter_map(|_| t.pick(&none)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Node 0 and 2 busy: node 1 every time.
        let _a = t.get(0).start();
        let _b = t.get(2).start();
        assert!((0..4).all(|_| t.pick(&none) == Some(1)));
        // Tried nodes and unhealthy ones are skipped, whatever their load.
        assert_eq!(t.pick(&[false, true, false]).map(|i| i != 1), Some(true));
        t.get(1).mark_down();
        t.get(2).mark_down();
        assert_eq!(t.pick(&none), Some(0));
        assert_eq!(t.pick(&[true, false, false]), None);
        drop(_a);
        assert_eq!(t.get(0).in_flight(), 0);
    }

    #[test]
    fn health_checks_need_a_run_of_failures() {
        let t = nodes(1);
        let node = t.get(0);
        assert!(!node.check_failed(2), "one failure is not enough");
        assert!(!node.check_passed(), "it never left");
        assert!(!node.check_failed(2));
        assert!(node.check_failed(2), "two in a row take it out");
        assert!(!node.healthy());
        assert!(node.check_passed(), "back");
        assert_eq!(node.health_check_failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn requests_count_until_the_next_report() {
        let t = nodes(1);
        let node = t.get(0);
        let reported = Reported {
            running: 2,
            waiting: 1,
            kv_blocks_free: 10,
        };
        node.record_load(Some((Role::Decode, reported)));
        let early = node.start();
        let done = node.start();
        assert_eq!(node.snapshot().score(), 5, "3 reported + 2 sent since");
        drop(done);
        assert_eq!(
            node.snapshot().score(),
            4,
            "a finished request left no load"
        );
        // A new report includes the request still running; it no longer counts on top, and
        // ending it later does not take it off the next requests' count.
        node.record_load(Some((Role::Decode, reported)));
        let late = node.start();
        drop(early);
        assert_eq!(node.snapshot().since_report, 1);
        drop(late);
        assert_eq!(node.snapshot().since_report, 0);
        assert_eq!(node.in_flight(), 0);
        // A node without reports (404): mixed, chosen by in-flight count.
        assert_eq!(node.record_load(None), Role::Decode);
        let _one = node.start();
        assert_eq!((node.role(), node.snapshot().score()), (Role::Mixed, 1));
    }

    #[test]
    fn prefill_nodes_are_healthy_but_out_of_rotation() {
        let t = nodes(2);
        t.get(0)
            .record_load(Some((Role::Prefill, Reported::default())));
        assert!(t.get(0).healthy() && !t.get(0).in_rotation());
        assert_eq!(t.healthy_count(), 1);
        assert!((0..4).all(|_| t.pick(&[false; 2]) == Some(1)));
    }
}
