//! The node table: each attention node's health and requests in flight, and the choice of the
//! node for a request: the healthy one with the fewest requests in flight, ties broken round
//! robin (so an idle cluster still spreads sequential requests over every node).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

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
    pub health_check_failures: AtomicU64,
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
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight on a node: counted from before the connection is made until the
/// response body has been relayed (or the client went away).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Node>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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

    pub fn healthy_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.healthy()).count()
    }

    /// The healthy node not yet `tried` with the fewest requests in flight; among equals, the
    /// first from a starting point that moves on by one per request (a retry, with some node
    /// tried already, does not move it).
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
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let node = &self.nodes[i];
            if tried.get(i).copied().unwrap_or(false) || !node.healthy() {
                continue;
            }
            let load = node.in_flight();
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
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
}
