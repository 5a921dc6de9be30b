//! The controller's decisions, driven without a store or a runtime: a [`Machine`] against the
//! plain-map cluster of [`world`], on a clock that moves only when the tests (or the machine's
//! waits) move it, so nothing here sleeps. These tests pin the exact writes of each kind of
//! pass, in order; `orders.rs` runs changes under every order of the nodes' reports.

mod orders;
mod world;

use std::time::Duration;

use myriad_control::ControlError;
use myriad_control::ControllerConfig;
use myriad_control::controller::machine::{Action, Event, Machine};
use myriad_control::records::{ControllerStatus, LoadReport, Request};
use world::{N, World};

fn config() -> ControllerConfig {
    let mut c = ControllerConfig::new(N);
    c.min_expert_nodes = 3;
    c.settle = Duration::from_millis(500);
    c.load_timeout = Duration::from_secs(1);
    c.suspect_after = Duration::from_secs(2);
    c
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Three nodes running version 1 (`e0` 0-5, `e1` 6-10, `e2` 11-15), attention nodes `a0`, `a1`,
/// and a machine that has taken over (its first pass finds nothing to do).
fn settled() -> (World, Machine) {
    let mut w = World::settled(
        &[("e0", "0-5"), ("e1", "6-10"), ("e2", "11-15")],
        16,
        &["a0", "a1"],
    );
    let mut m = Machine::new("c0", config(), w.now());
    m.take_over(None, Some(&w.view()));
    assert_eq!(m.cleanup_owed(), Some(1));
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    assert!(lines.is_empty() && outcome.is_ok(), "{lines:?} {outcome:?}");
    assert_eq!(m.cleanup_owed(), None);
    (w, m)
}

fn request(id: u64) -> Request {
    Request {
        id,
        extra_replicas: None,
    }
}

/// Every line of `lines` as expected, with a readable message when one is not.
fn assert_lines(lines: &[String], want: &[&str]) {
    assert_eq!(lines, want, "\n got: {lines:#?}");
}

#[test]
fn initial_placement_waits_for_min_nodes_and_settle() {
    let mut w = World::new();
    w.add_node("e0", 16, "");
    w.add_node("e1", 16, "");
    let mut m = Machine::new("c0", config(), w.now());
    w.elapsed = Duration::from_secs(10);
    assert_lines(&w.script(&mut m, |_, _| {}).0, &[]);

    // The third node changes membership: the 500 ms of settling count from when it was seen.
    w.add_node("e2", 16, "");
    for at in [10_000, 10_100, 10_499] {
        w.elapsed = ms(at);
        let (lines, outcome) = w.script(&mut m, |_, _| {});
        assert!(lines.is_empty() && outcome.is_ok(), "at {at} ms: {lines:?}");
    }
    w.elapsed = ms(10_500);
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    outcome.expect("published");
    assert_lines(
        &lines,
        &[
            "assign e0 [0-5] #1 urgent",
            "assign e1 [6-10] #2 urgent",
            "assign e2 [11-15] #3 urgent",
            "read after 0ns",
            "version 1 (initial): e0 [0-5] e1 [6-10] e2 [11-15]",
            "current 1",
            "status: ",
        ],
    );
    assert_eq!(m.cleanup_owed(), Some(1));
}

#[test]
fn initial_placement_adopts_held_sets() {
    let mut w = World::new();
    for (name, held) in [("e0", "0-7"), ("e1", "6-11"), ("e2", "12-15")] {
        w.add_node(name, 16, held);
    }
    let mut m = Machine::new("c0", config(), w.now());
    // Seen first at 1 s: settled at 1.5 s.
    w.elapsed = Duration::from_secs(1);
    assert_lines(&w.script(&mut m, |_, _| {}).0, &[]);
    w.elapsed = ms(1_500);
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    outcome.expect("published");
    assert_lines(
        &lines,
        &[
            "assign e0 [0-7] #1 urgent",
            "assign e1 [6-11] #2 urgent",
            "assign e2 [12-15] #3 urgent",
            "read after 0ns",
            "version 1 (initial): e0 [0-7] e1 [6-11] e2 [12-15]",
            "current 1",
            "status: ",
        ],
    );
}

#[test]
fn a_lapsed_node_is_failed_over() {
    let (mut w, mut m) = settled();
    w.nodes.remove("e1");
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    outcome.expect("failed over");
    assert_lines(
        &lines,
        &[
            "unassign e1",
            "assign e0 [0-10] #4 urgent",
            "read after 0ns",
            "version 2 (failover of e1): e0 [0-10] e2 [11-15]",
            "current 2",
            "status: failed over e1",
        ],
    );
    assert_eq!(m.status().failovers, 1);
    assert!(!w.assignments.contains_key("e1"));
    // Nothing to drop once both attention nodes run version 2: the survivor only gained.
    w.attention.values_mut().for_each(|v| *v = 2);
    let (lines, _) = w.script(&mut m, |_, _| {});
    assert_lines(&lines, &[]);
    assert_eq!(m.cleanup_owed(), None);
}

#[test]
fn a_suspected_node_is_failed_over_after_suspect_after_and_not_before() {
    let (mut w, mut m) = settled();
    let t0 = w.elapsed;
    let quiet = |w: &mut World, m: &mut Machine, at: Duration| {
        w.elapsed = t0 + at;
        let (lines, outcome) = w.script(m, |_, _| {});
        assert!(lines.is_empty() && outcome.is_ok(), "at {at:?}: {lines:?}");
    };
    // A suspicion withdrawn before `suspect_after` moves nothing, and its time does not count
    // towards the next one.
    w.suspects.insert("e2".into(), vec!["a0".into()]);
    quiet(&mut w, &mut m, ms(0));
    quiet(&mut w, &mut m, ms(1_999));
    w.suspects.clear();
    quiet(&mut w, &mut m, ms(2_100));
    w.suspects.insert("e2".into(), vec!["a1".into()]);
    quiet(&mut w, &mut m, ms(2_500));
    quiet(&mut w, &mut m, ms(4_499));
    w.elapsed = t0 + ms(4_500);
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    outcome.expect("failed over");
    assert_eq!(lines[0], "unassign e2");
    assert!(
        lines.contains(&"status: failed over e2".to_string()),
        "{lines:?}"
    );
    assert!(w.nodes.contains_key("e2"), "e2 is still registered");
    assert!(w.doc(2).nodes.iter().all(|p| p.name != "e2"));
}

#[test]
fn a_drain_assigns_the_union_awaits_loads_publishes_then_cleans_up() {
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    let (lines, outcome) = w.script(&mut m, |w, read| {
        if read == 2 {
            w.apply_all();
        }
    });
    outcome.expect("drained");
    assert_lines(
        &lines,
        &[
            "assign e0 [0-10] #4",
            "read after 0ns",
            "read after 50ms",
            "read after 50ms",
            "version 2 (drain of e1): e0 [0-10] e2 [11-15]",
            "current 2",
            "status: drained e1",
            "delete drain request e1",
        ],
    );
    assert!(w.drain_requests.is_empty());
    assert_eq!(m.status().drains, 1);
    assert_eq!(m.cleanup_owed(), Some(2));

    // a1 still runs version 1: e1 keeps its copies.
    w.attention.insert("a0".into(), 2);
    let (lines, _) = w.script(&mut m, |_, _| {});
    assert_lines(&lines, &[]);
    assert_eq!(w.assignments["e1"].experts, "6-10");

    w.attention.insert("a1".into(), 2);
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    outcome.expect("cleaned up");
    assert_lines(&lines, &["assign e1 [] #5"]);
    assert_eq!(m.cleanup_owed(), None);
    w.apply_all();
    assert!(w.held("e1").is_empty());
}

/// As a controller that died between publishing and cleaning up left it: version 1 moved 8-15
/// from e0 to e1 and e0 is still assigned (and holds) everything.
fn dropping_world() -> World {
    let mut w = World::settled(&[("e0", "0-7"), ("e1", "8-15")], 16, &["a0"]);
    w.assignments
        .insert("e0".into(), world::assignment("0-15", 1));
    w.nodes.get_mut("e0").expect("e0").record.held = "0-15".into();
    w
}

#[test]
fn a_change_waits_for_drops_in_flight() {
    let mut w = dropping_world();
    let mut config = config();
    config.min_expert_nodes = 2;
    let mut m = Machine::new("c0", config, w.now());
    m.take_over(None, Some(&w.view()));
    let (lines, _) = w.script(&mut m, |_, _| {});
    assert_lines(&lines, &["assign e0 [0-7] #3"]);

    // e0 has not dropped 8-15 yet: its report cannot acknowledge a load of 8-15.
    w.drain_requests.insert("e1".into());
    let (lines, outcome) = w.script(&mut m, |w, read| {
        if read >= 2 {
            w.apply_all();
        }
    });
    outcome.expect("drained");
    assert_lines(
        &lines,
        &[
            "read after 50ms",
            "read after 50ms",
            "read after 50ms",
            "assign e0 [0-15] #4",
            "read after 0ns",
            "version 2 (drain of e1): e0 [0-15]",
            "current 2",
            "status: drained e1",
            "delete drain request e1",
        ],
    );
}

#[test]
fn drops_time_out_on_the_machines_clock() {
    let mut w = dropping_world();
    let mut config = config();
    config.min_expert_nodes = 2;
    let mut m = Machine::new("c0", config, w.now());
    m.take_over(None, Some(&w.view()));
    w.script(&mut m, |_, _| {}).1.expect("cleanup assigned");
    w.drain_requests.insert("e1".into());
    let start = w.elapsed;
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    let Err(ControlError::Timeout { what, after }) = outcome else {
        panic!("a timeout, not {outcome:?}");
    };
    assert_eq!(what, "expert node e0 to drop the experts it was unassigned");
    assert_eq!(after, Duration::from_secs(1));
    assert_eq!(w.elapsed - start, Duration::from_secs(1));
    assert_eq!(lines.len(), 21);
    assert_eq!(lines[20], "delete drain request e1");
    assert_eq!(w.current, 1);
}

#[test]
fn loads_time_out_on_the_machines_clock() {
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    let start = w.elapsed;
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    let Err(e @ ControlError::Timeout { .. }) = outcome else {
        panic!("a timeout, not {outcome:?}");
    };
    assert_eq!(
        e.to_string(),
        "timed out after 1s waiting for expert node e0 to load its experts"
    );
    // Reads at 0, 50, …, 1000 ms after the assignments: the one at 1 s gives up.
    assert_eq!(w.elapsed - start, Duration::from_secs(1));
    assert_eq!(lines[..2], ["assign e0 [0-10] #4", "read after 0ns"]);
    assert_eq!(lines.iter().filter(|l| *l == "read after 50ms").count(), 20);
    assert_eq!(
        lines.last().map(String::as_str),
        Some("delete drain request e1")
    );
    assert_eq!(w.current, 1, "nothing published");
    let status = m.record_error(&e);
    assert_eq!(
        status.last_outcome,
        "error: timed out after 1s waiting for expert node e0 to load its experts"
    );
}

#[test]
fn a_load_error_ends_the_change_only_when_it_answers_the_latest_assignment() {
    let (mut w, mut m) = settled();
    let e0 = w.nodes.get_mut("e0").expect("e0");
    e0.fail_loads = true;
    // An error from an earlier assignment (serial 1, which it applied) says nothing now.
    e0.record.load_error = Some("assignment 1: old trouble".into());
    w.drain_requests.insert("e1".into());
    let (lines, outcome) = w.script(&mut m, |w, read| {
        if read == 1 {
            w.apply_all();
        }
    });
    let Err(ControlError::Node { node, reason }) = outcome else {
        panic!("a node error, not {outcome:?}");
    };
    assert_eq!(node, "e0");
    assert_eq!(
        reason,
        "could not load its experts: assignment 4: no weights"
    );
    assert_lines(
        &lines,
        &[
            "assign e0 [0-10] #4",
            "read after 0ns",
            "read after 50ms",
            "delete drain request e1",
        ],
    );
}

#[test]
fn requests_are_deleted_after_handling() {
    let (mut w, mut m) = settled();
    w.drain_requests.insert("zz".into());
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    outcome.expect("nothing to drain");
    assert_lines(
        &lines,
        &[
            "status: drain of zz: it holds nothing",
            "delete drain request zz",
        ],
    );

    w.rebalance_request = Some(request(7));
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    outcome.expect("nothing to move");
    assert_lines(
        &lines,
        &[
            "delete rebalance request",
            "status: placement already balanced (imbalance 1.000)",
        ],
    );
    assert_eq!(m.status().last_request, Some(7));

    // A rebalance that fails (its loads time out) is answered too.
    w.rebalance_request = Some(request(8));
    w.loads.push(LoadReport {
        node: "a0".into(),
        window_secs: 30.0,
        tokens: (0..N as u64)
            .map(|e| if e < 6 { 1000 } else { 10 })
            .collect(),
    });
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    let e = outcome.expect_err("the loads time out");
    assert_lines(
        &lines[lines.len() - 2..],
        &["delete rebalance request", &format!("status: error: {e}")],
    );
    assert_eq!(m.status().last_request, Some(8));
    assert!(w.rebalance_request.is_none() && w.drain_requests.is_empty());
}

#[test]
fn a_failed_write_ends_the_step_it_belongs_to() {
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    // The write of `current` fails: nothing is published, the request is still answered.
    w.fail_write = Some(w.writes.len() + 2);
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    assert!(
        matches!(outcome, Err(ControlError::Store(_))),
        "{outcome:?}"
    );
    assert_lines(
        &lines,
        &[
            "assign e0 [0-10] #4",
            "read after 0ns",
            "version 2 (drain of e1): e0 [0-10] e2 [11-15]",
            "current 2",
            "  failed: control-plane store: injected failure",
            "delete drain request e1",
        ],
    );
    assert_eq!(
        (w.current, m.cleanup_owed(), m.status().drains),
        (1, None, 0)
    );

    // Asked again, the nodes already hold the union: only the publication is left.
    w.drain_requests.insert("e1".into());
    let (lines, outcome) = w.script(&mut m, |_, _| {});
    outcome.expect("drained");
    assert_eq!(lines[0], "read after 0ns");
    assert_eq!(lines[2], "current 2");

    // A drain whose status cannot be saved still deletes its request, then fails.
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    w.fail_write = Some(w.writes.len() + 3);
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    assert!(
        matches!(outcome, Err(ControlError::Store(_))),
        "{outcome:?}"
    );
    assert_eq!(m.status().drains, 1, "counted, though not saved");
    assert_eq!(
        lines[4..],
        [
            "status: drained e1",
            "  failed: control-plane store: injected failure",
            "delete drain request e1"
        ]
    );

    // A failed assignment uses up its serial; the next one is not made.
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    w.fail_write = Some(w.writes.len());
    let (lines, _) = w.script(&mut m, |_, _| {});
    assert_eq!(
        lines[..2],
        [
            "assign e0 [0-10] #4",
            "  failed: control-plane store: injected failure"
        ]
    );
    assert_eq!(lines[2], "delete drain request e1");
    assert_eq!(m.serial(), 4);
}

#[test]
fn a_new_leader_continues_counters_serials_and_the_cleanup() {
    let mut w = World::settled(
        &[("e0", "0-5"), ("e1", "6-10"), ("e2", "11-15")],
        16,
        &["a0"],
    );
    w.assignments.get_mut("e1").expect("e1").serial = 41;
    let stored = ControllerStatus {
        leader: "c-old".into(),
        failovers: 3,
        drains: 2,
        rebalances: 1,
        last_outcome: "drained e9".into(),
        ..ControllerStatus::default()
    };
    let mut m = Machine::new("c1", config(), w.now());
    m.take_over(None, None);
    assert_eq!(
        (m.serial(), m.cleanup_owed()),
        (0, None),
        "failed reads change nothing"
    );
    m.take_over(Some(stored), Some(&w.view()));
    assert_eq!(m.status().leader, "c1");
    assert_eq!((m.status().failovers, m.status().drains), (3, 2));
    assert_eq!((m.serial(), m.cleanup_owed()), (41, Some(1)));

    w.nodes.remove("e0");
    let (lines, outcome) = w.script(&mut m, |w, _| w.apply_all());
    outcome.expect("failed over");
    assert_eq!(lines[1], "assign e1 [0-10] #42 urgent");
    let saved = w.status.as_ref().expect("status saved");
    assert_eq!(
        (saved.leader.as_str(), saved.failovers, saved.drains),
        ("c1", 4, 2)
    );
}

#[test]
fn a_rebalance_is_timed_on_the_machines_clock() {
    let mut w = World::settled(
        &[
            ("e0", "0-3"),
            ("e1", "4-7"),
            ("e2", "8-11"),
            ("e3", "12-15"),
        ],
        8,
        &["a0"],
    );
    let mut m = Machine::new("c0", config(), w.now());
    w.loads.push(LoadReport {
        node: "a0".into(),
        window_secs: 30.0,
        tokens: (0..N as u64)
            .map(|e| if e < 4 { 1000 } else { 10 })
            .collect(),
    });
    w.rebalance_request = Some(request(3));
    let (_, outcome) = w.script(&mut m, |w, read| {
        if read == 2 {
            w.apply_all();
        }
    });
    outcome.expect("rebalanced");
    let s = m.status();
    assert_eq!((s.rebalances, s.last_request), (1, Some(3)));
    assert_eq!(s.last_rebalance_seconds, 0.1, "two polls of 50 ms");
    assert!(
        s.last_outcome.starts_with("version 2: imbalance "),
        "{}",
        s.last_outcome
    );
    assert!(s.last_outcome.ends_with(", 0.10s"), "{}", s.last_outcome);
    assert!(s.imbalance_after < s.imbalance_before);
}

#[test]
fn automatic_rebalances_wait_auto_rebalance_every() {
    let mut w = World::settled(
        &[
            ("e0", "0-3"),
            ("e1", "4-7"),
            ("e2", "8-11"),
            ("e3", "12-15"),
        ],
        8,
        &["a0"],
    );
    let mut c = config();
    c.auto_rebalance_above = Some(1.2);
    c.auto_rebalance_every = Duration::from_secs(60);
    let mut m = Machine::new("c0", c, w.now());
    let skew = |hot: usize| LoadReport {
        node: "a0".into(),
        window_secs: 30.0,
        tokens: (0..N)
            .map(|e| if e / 4 == hot { 1000 } else { 10 })
            .collect(),
    };
    w.loads = vec![skew(0)];
    let (_, outcome) = w.script(&mut m, |w, _| w.apply_all());
    outcome.expect("rebalanced");
    assert_eq!(w.current, 2);
    assert!(m.status().last_outcome.starts_with("automatic: version 2"));

    // Another skew 30 s later is left alone until 60 s have passed since the last rebalance.
    w.loads = vec![skew(1)];
    for at in [30, 59] {
        w.elapsed = Duration::from_secs(at);
        w.attention.insert("a0".into(), w.current);
        w.script(&mut m, |w, _| w.apply_all()).1.expect("a pass");
        assert_eq!(w.current, 2, "no rebalance at {at} s");
    }
    w.elapsed = Duration::from_secs(60);
    w.script(&mut m, |w, _| w.apply_all()).1.expect("a pass");
    assert_eq!(w.current, 3);
}

#[test]
fn an_answer_outside_a_pass_is_refused() {
    let w = World::new();
    let mut m = Machine::new("c0", config(), w.now());
    let Action::Done(Err(ControlError::Invalid(msg))) = m.handle(Event::Written, w.now()) else {
        panic!("refused");
    };
    assert!(msg.contains("no pass in progress"), "{msg}");
    // An answer that does not fit the action handed out ends the pass.
    let (mut w, mut m) = settled();
    w.drain_requests.insert("e1".into());
    assert!(matches!(m.start_pass(w.view(), w.now()), Action::Write(_)));
    let action = m.handle(Event::View(w.view()), w.now());
    assert!(
        matches!(action, Action::Done(Err(ControlError::Invalid(_)))),
        "{action:?}"
    );
    // A new pass starts afresh.
    assert!(matches!(m.start_pass(w.view(), w.now()), Action::Write(_)));
}
