//! The dispatch state machine (`myriad_router::dispatch`) driven by hand, with no network and
//! no clock: every order in which replies and failures can arrive gives the same bits; failed
//! pairs move to replicas, refusing nodes are avoided within the step, used-up attempts and
//! experts without a usable holder wait for a newer placement, and giving up names why.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use myriad_router::StepError;
use myriad_router::dispatch::{Dispatch, Health, NodeFailure, Route, Step};
use myriad_transport::TransportError;
use myriad_wire::{ExpertSet, NodeSpec, Placement, Routes};

const HIDDEN: usize = 2;

fn route(version: u64, specs: &[&str], experts: usize) -> Arc<Route> {
    let nodes = specs
        .iter()
        .enumerate()
        .map(|(i, s)| NodeSpec {
            name: format!("n{i}"),
            addr: format!("a{i}"),
            experts: ExpertSet::parse(s, experts).unwrap(),
        })
        .collect();
    Arc::new(Route {
        version,
        placement: Placement::new(nodes, experts, "test").unwrap(),
    })
}

/// An expert's output for a row: any fixed function works, the tests compare bits.
fn expert_out(expert: u32, row: usize, col: usize) -> f32 {
    ((expert as f32 + 1.0) * 0.37 + row as f32 * 1.13 + col as f32 * 0.011).sin()
}

/// What a healthy node answers for a batch: per row, the weighted sum in route order.
fn answer(d: &Dispatch, i: usize) -> Vec<f32> {
    let b = &d.round()[i];
    let mut out = vec![0f32; b.rows.len() * HIDDEN];
    for (k, &row) in b.rows.iter().enumerate() {
        let (experts, weights) = b.routes.row(k);
        for (&e, &w) in experts.iter().zip(weights) {
            for c in 0..HIDDEN {
                out[k * HIDDEN + c] += w * expert_out(e, row, c);
            }
        }
    }
    out
}

fn routes(rows: &[&[u32]]) -> Routes {
    let mut r = Routes::new();
    for experts in rows {
        let w: Vec<f32> = (0..experts.len()).map(|k| 0.5 / (k + 1) as f32).collect();
        r.push_row(experts, &w);
    }
    r
}

fn down() -> NodeFailure {
    NodeFailure::Transport(TransportError::Timeout {
        peer: "x".into(),
        after: std::time::Duration::from_secs(1),
    })
}

/// Runs a step to the end: nodes named in `dead` never answer (transport failure), in
/// `refusing` answer with an error; replies of a round arrive in the order `order` gives
/// (a permutation of the round's batch indices, cut to the round's size).
fn run(
    d: &mut Dispatch,
    usable: &[bool],
    dead: &[&str],
    refusing: &[&str],
    order: &dyn Fn(usize) -> Vec<usize>,
) -> (Result<Vec<f32>, StepError>, Vec<Health>) {
    let queued = vec![0; usable.len()];
    // The driver leaves a node that did not answer out of later plans.
    let mut usable = usable.to_vec();
    let mut health = Vec::new();
    let mut step = d.plan_round(&usable, &queued);
    for _ in 0..100 {
        step = match step {
            Step::Done(r) => return (r, health),
            Step::Replan => d.plan_round(&usable, &queued),
            Step::AwaitPlacement { .. } => d.on_no_placement(),
            Step::Send { .. } => {
                let n = d.round().len();
                for i in order(n) {
                    let name = d.round()[i].name.clone();
                    let outcome = if dead.contains(&name.as_str()) {
                        Err(down())
                    } else if refusing.contains(&name.as_str()) {
                        Err(NodeFailure::Refused("no".into()))
                    } else {
                        Ok(answer(d, i))
                    };
                    let h = d.on_reply(i, outcome);
                    if let Health::Down { name, .. } = &h {
                        let index: usize = name[1..].parse().unwrap();
                        usable[index] = false;
                    }
                    health.push(h);
                }
                d.end_round()
            }
        };
    }
    panic!("the step did not end");
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for k in 0..=p.len() {
            let mut q = p.clone();
            q.insert(k, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn every_reply_order_gives_the_same_bits() {
    let r = route(1, &["0-3", "4-7", "0-7"], 8);
    let rows = routes(&[&[0, 5, 7], &[1], &[4, 2], &[6, 3, 0, 1]]);
    let mut first: Option<Vec<f32>> = None;
    for p in permutations(3) {
        let mut d = Dispatch::new(0, HIDDEN, rows.clone(), r.clone(), 3);
        let (out, _) = run(&mut d, &[true; 3], &[], &[], &|n| {
            p.iter().copied().filter(|&i| i < n).collect()
        });
        let out = out.unwrap();
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(
                f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "order {p:?}"
            ),
        }
    }
    // And it is the routed output, up to summation order.
    let out = first.unwrap();
    for row in 0..rows.rows() {
        let (experts, weights) = rows.row(row);
        for c in 0..HIDDEN {
            let want: f32 = experts
                .iter()
                .zip(weights)
                .map(|(&e, &w)| w * expert_out(e, row, c))
                .sum();
            assert!((out[row * HIDDEN + c] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn failures_in_any_order_fail_over_to_replicas_with_the_same_bits() {
    // Every expert has two holders; any one node may die, in any reply order.
    let r = route(1, &["0-5", "2-7", "0-1,6-7"], 8);
    let rows = routes(&[&[0, 5, 7], &[1, 2], &[4, 3], &[6, 3, 0, 1], &[7]]);
    for dead in ["n0", "n1", "n2"] {
        let mut outs = Vec::new();
        for p in permutations(3) {
            let mut d = Dispatch::new(3, HIDDEN, rows.clone(), r.clone(), 3);
            let (out, health) = run(&mut d, &[true; 3], &[dead], &[], &|n| {
                p.iter().copied().filter(|&i| i < n).collect()
            });
            let out = out.unwrap_or_else(|e| panic!("{dead} dead, order {p:?}: {e}"));
            assert!(health.contains(&Health::Down {
                name: dead.into(),
                addr: dead.replace('n', "a"),
            }));
            outs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        assert!(
            outs.windows(2).all(|w| w[0] == w[1]),
            "{dead}: order matters"
        );
    }
}

#[test]
fn a_refusing_node_is_not_asked_again_within_the_step() {
    let r = route(1, &["0-3", "0-3"], 4);
    let mut d = Dispatch::new(0, HIDDEN, routes(&[&[0], &[1], &[2], &[3]]), r, 3);
    let mut asked = Vec::new();
    let mut step = d.plan_round(&[true, true], &[0, 0]);
    loop {
        step = match step {
            Step::Send { .. } => {
                for i in 0..d.round().len() {
                    let name = d.round()[i].name.clone();
                    asked.push(name.clone());
                    let outcome = if name == "n0" {
                        Err(NodeFailure::Refused("overloaded".into()))
                    } else {
                        Ok(answer(&d, i))
                    };
                    assert_eq!(
                        d.on_reply(i, outcome),
                        if name == "n0" {
                            Health::Unchanged
                        } else {
                            Health::Up { name }
                        }
                    );
                }
                d.end_round()
            }
            // Even though the driver still calls n0 usable.
            Step::Replan => d.plan_round(&[true, true], &[0, 0]),
            Step::Done(r) => {
                r.unwrap();
                break;
            }
            Step::AwaitPlacement { .. } => panic!("n1 holds everything"),
        };
    }
    assert_eq!(asked, ["n0", "n1", "n1"], "n0 once, then only n1");
}

#[test]
fn used_up_attempts_wait_for_a_placement_and_give_up_naming_every_failure() {
    let r = route(7, &["0-1", "0-1"], 2);
    let mut d = Dispatch::new(2, HIDDEN, routes(&[&[0, 1]]), r, 2);
    let mut step = d.plan_round(&[true, true], &[0, 0]);
    let mut rounds = 0;
    let newer_than = loop {
        step = match step {
            Step::Send { .. } => {
                rounds += 1;
                for i in 0..d.round().len() {
                    d.on_reply(i, Err(down()));
                }
                d.end_round()
            }
            Step::Replan => d.plan_round(&[true, true], &[0, 0]),
            Step::AwaitPlacement { newer_than } => break newer_than,
            Step::Done(r) => panic!("ended early: {r:?}"),
        };
    };
    assert_eq!((rounds, newer_than), (2, 7));
    match d.on_no_placement() {
        Step::Done(Err(StepError::Remote { layer: 2, reason })) => {
            // One failure per round, each naming the node and its address.
            assert_eq!(reason.split("; ").count(), 2, "{reason}");
            assert!(reason.starts_with("n0 (a0): "), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_expert_without_a_usable_holder_waits_for_the_failover_placement() {
    // Node 0 alone holds experts 0-1 and is down; the control plane moves them to node 1.
    let old = route(3, &["0-1", "2-3"], 4);
    let rows = routes(&[&[0, 2], &[3]]);
    let mut d = Dispatch::new(1, HIDDEN, rows.clone(), old, 3);
    let Step::AwaitPlacement { newer_than: 3 } = d.plan_round(&[false, true], &[0, 0]) else {
        panic!("no live holder of expert 0: the step must wait");
    };
    // No newer placement: the error names the expert and why.
    let mut gave_up = Dispatch::new(1, HIDDEN, rows.clone(), route(3, &["0-1", "2-3"], 4), 3);
    gave_up.plan_round(&[false, true], &[0, 0]);
    match gave_up.on_no_placement() {
        Step::Done(Err(StepError::Unavailable {
            layer: 1,
            expert: 0,
            reason,
        })) => assert!(reason.contains("no expert node that holds it"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The failover placement arrives: everything goes to node 1, version 4.
    d.on_placement(route(4, &["0-3"], 4));
    let Step::Send { row_visits } = d.plan_round(&[true], &[0]) else {
        panic!("plannable now");
    };
    assert_eq!(row_visits, 2);
    assert_eq!(d.route().version, 4);
    assert!(d.round().iter().all(|b| b.name == "n0" && b.addr == "a0"));
    let (out, _) = run(&mut d, &[true], &[], &[], &|n| (0..n).collect());
    assert_eq!(out.unwrap().len(), 2 * HIDDEN);
}

#[test]
fn batches_to_a_node_the_new_placement_drops_are_named() {
    let r = route(1, &["0-1", "2-3", "0-3"], 4);
    let mut d = Dispatch::new(0, HIDDEN, routes(&[&[0, 2]]), r, 3);
    let Step::Send { .. } = d.plan_round(&[true, true, false], &[0, 0, 0]) else {
        panic!("plannable");
    };
    let names: Vec<&str> = d.round().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["n0", "n1"]);
    let newer = route(2, &["0-1", "0-3"], 4); // n0 stays, "n1" is now the old n2's set
    assert!(
        d.dropped_by(&newer.placement).is_empty(),
        "names, not indices"
    );
    let without_n1 = Placement::new(
        vec![NodeSpec {
            name: "n0".into(),
            addr: "a0".into(),
            experts: ExpertSet::parse("0-3", 4).unwrap(),
        }],
        4,
        "test",
    )
    .unwrap();
    assert_eq!(d.dropped_by(&without_n1), vec![1]);
}

#[test]
fn rows_without_pairs_come_back_zero() {
    let r = route(1, &["0-3"], 4);
    let mut d = Dispatch::new(0, HIDDEN, routes(&[&[], &[1], &[]]), r, 1);
    let (out, _) = run(&mut d, &[true], &[], &[], &|n| (0..n).collect());
    let out = out.unwrap();
    assert_eq!(&out[..HIDDEN], &[0.0; HIDDEN]);
    assert_eq!(&out[2 * HIDDEN..], &[0.0; HIDDEN]);
    assert!(out[HIDDEN..2 * HIDDEN].iter().any(|v| *v != 0.0));
}
