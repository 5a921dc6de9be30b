//! Make-before-break under every order of events: each scenario runs once per order in which
//! the expert nodes' reports (loaded, dropped), the attention nodes' switches and the scenario's
//! own events (a request, a crash) can arrive relative to each other and to the machine's reads
//! ([`world::explore`]). [`World`] checks after every step that no version in use routes an
//! expert to a live node that does not hold it (so no version is published before its copies
//! are reported, and no copy is dropped while an attention node runs a version that needs it);
//! each run must end settled: one version everywhere, every node holding exactly its set.

use std::time::Duration;

use myriad_control::ControllerConfig;
use myriad_control::controller::machine::Machine;
use myriad_control::records::{LoadReport, Request};
use myriad_wire::ExpertSet;

use super::world::{self, Chooser, Extra, N, World, explore};

/// More orders than any scenario here has; a change that makes one loop forever fails instead.
const LIMIT: usize = 50_000;
const TICK: Duration = Duration::from_millis(100);

fn config(min_expert_nodes: usize) -> ControllerConfig {
    let mut c = ControllerConfig::new(N);
    c.min_expert_nodes = min_expert_nodes;
    c.settle = Duration::from_millis(200);
    c.tick = TICK;
    c
}

fn extra(label: &'static str, when: fn(&World) -> bool, apply: fn(&mut World)) -> Extra {
    Extra {
        label,
        when,
        apply,
        done: false,
    }
}

fn always(_: &World) -> bool {
    true
}

fn request(id: u64) -> Request {
    Request {
        id,
        extra_replicas: None,
    }
}

/// Tokens that make experts `4 * hot .. 4 * hot + 4` ten times as busy as the rest.
fn skewed(hot: usize) -> LoadReport {
    LoadReport {
        node: "loadgen".into(),
        window_secs: 30.0,
        tokens: (0..N)
            .map(|e| if e / 4 == hot { 100 } else { 10 })
            .collect(),
    }
}

/// Runs `world` under `machine` until it settles, in the order `choose` picks; then checks that
/// it ended on one version, everywhere, with nothing left over. Returns that version's reason.
fn settle(mut w: World, mut m: Machine, choose: &mut Chooser) -> (World, String) {
    w.settle(&mut m, choose, TICK);
    let doc = w.doc(w.current).clone();
    let what = || format!("what happened: {:#?}", w.trace);
    let sets: std::collections::BTreeMap<String, ExpertSet> = doc.sets().into_iter().collect();
    let none = ExpertSet::none(N);
    for (name, node) in &w.nodes {
        let want = sets.get(name).unwrap_or(&none);
        assert_eq!(
            &node.record.held_set(N),
            want,
            "{name} holds its set; {}",
            what()
        );
    }
    let all = sets.values().fold(none.clone(), |acc, s| acc.union(s));
    assert_eq!(all.len(), N, "every expert has a holder; {}", what());
    assert!(w.attention.values().all(|v| *v == w.current), "{}", what());
    assert!(w.drain_requests.is_empty() && w.rebalance_request.is_none());
    assert_eq!(m.cleanup_owed(), None, "{}", what());
    (w, doc.reason)
}

fn report(name: &str, runs: usize, at_least: usize) {
    eprintln!("{name}: {runs} orders");
    assert!(runs >= at_least, "{name}: only {runs} orders explored");
}

#[test]
fn every_order_of_an_initial_placement() {
    let runs = explore(LIMIT, |choose| {
        let mut w = World::new();
        for name in ["e0", "e1", "e2"] {
            w.add_node(name, 16, "");
        }
        w.attention.insert("a0".into(), 0);
        w.attention.insert("a1".into(), 0);
        let m = Machine::new("c0", config(3), w.now());
        let (w, reason) = settle(w, m, choose);
        assert_eq!((w.current, reason.as_str()), (1, "initial"));
    });
    report("initial placement", runs, 10);
}

#[test]
fn every_order_of_a_drain() {
    let runs = explore(LIMIT, |choose| {
        let mut w = World::settled(
            &[("e0", "0-5"), ("e1", "6-10"), ("e2", "11-15")],
            16,
            &["a0", "a1"],
        );
        w.extras.push(extra("drain of e1 asked", always, |w| {
            w.drain_requests.insert("e1".into());
        }));
        let mut m = Machine::new("c0", config(3), w.now());
        m.take_over(None, Some(&w.view()));
        let (w, reason) = settle(w, m, choose);
        assert_eq!((w.current, reason.as_str()), (2, "drain of e1"));
    });
    report("drain", runs, 10);
}

/// A rebalance, then a drain asked for at any point after the rebalance is published, while the
/// attention node may still run version 1 or 2: the drain's change must keep the copies of every
/// version in use.
#[test]
fn every_order_of_two_changes_in_a_row() {
    let runs = explore(LIMIT, |choose| {
        let mut w = World::settled(
            &[("e0", "0-5"), ("e1", "6-10"), ("e2", "11-15")],
            8,
            &["a0"],
        );
        w.loads.push(skewed(0));
        w.rebalance_request = Some(request(1));
        w.extras.push(extra(
            "drain of e2 asked",
            |w| w.current >= 2,
            |w| {
                w.drain_requests.insert("e2".into());
            },
        ));
        let mut m = Machine::new("c0", config(3), w.now());
        m.take_over(None, Some(&w.view()));
        let (w, reason) = settle(w, m, choose);
        assert_eq!((w.current, reason.as_str()), (3, "drain of e2"));
        assert!(w.held("e2").is_empty());
    });
    report("two changes", runs, 1_000);
}

/// A node crashes at any point of a rebalance (before it is handled, while nodes load, after it
/// is published): the change fails or goes through, and the crashed node is failed over.
#[test]
fn every_order_of_a_crash_during_a_rebalance() {
    let runs = explore(LIMIT, |choose| {
        let mut w = World::settled(
            &[("e0", "0-5"), ("e1", "6-10"), ("e2", "11-15")],
            16,
            &["a0"],
        );
        w.loads.push(skewed(1));
        w.rebalance_request = Some(request(1));
        w.extras.push(extra("e1 crashes", always, |w| {
            w.nodes.remove("e1");
        }));
        let mut m = Machine::new("c0", config(3), w.now());
        m.take_over(None, Some(&w.view()));
        let (w, reason) = settle(w, m, choose);
        // Crashed first, the rebalance comes after the failover (if anything is left to move).
        assert!(
            reason == "failover of e1" || w.versions.values().any(|d| d.reason == "failover of e1"),
            "{reason}"
        );
        let status = w.status.as_ref().expect("status saved");
        assert_eq!(status.failovers, 1);
        assert_eq!(
            status.last_request,
            Some(1),
            "the rebalance request was answered"
        );
        assert!(w.doc(w.current).nodes.iter().all(|p| p.name != "e1"));
    });
    report("crash during a rebalance", runs, 100);
}

/// A new leader finds a cleanup not carried out (e0 still assigned and holding what version 1
/// moved to e1) and a drain of e1 asked at any point: e0's report of 8-15 must not count until
/// its drop of 8-15 is done.
#[test]
fn every_order_after_a_takeover_with_drops_in_flight() {
    let runs = explore(LIMIT, |choose| {
        let mut w = World::settled(&[("e0", "0-7"), ("e1", "8-15")], 16, &["a0"]);
        w.assignments
            .insert("e0".into(), world::assignment("0-15", 1));
        w.nodes.get_mut("e0").expect("e0").record.held = "0-15".into();
        w.extras.push(extra("drain of e1 asked", always, |w| {
            w.drain_requests.insert("e1".into());
        }));
        let mut m = Machine::new("c0", config(2), w.now());
        m.take_over(None, Some(&w.view()));
        let (w, reason) = settle(w, m, choose);
        assert_eq!((w.current, reason.as_str()), (2, "drain of e1"));
        assert_eq!(w.held("e0"), ExpertSet::all(N));
    });
    report("take-over with drops in flight", runs, 10);
}
