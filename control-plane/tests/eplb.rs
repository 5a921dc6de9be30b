//! The placement algorithms (`eplb.rs`) through their public API: initial placement by
//! memory, the EPLB-style rebalance and evacuation keep every expert held within each node's
//! slots, never make things worse, and are deterministic.

#![allow(clippy::unwrap_used)]

use myriad_control::eplb::*;
use myriad_wire::ExpertSet;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn caps(mem: &[u64]) -> Vec<NodeCapacity> {
    mem.iter()
        .enumerate()
        .map(|(i, &m)| NodeCapacity {
            name: format!("e{i}"),
            memory_bytes: m,
        })
        .collect()
}

fn sets(assignment: &[NodeAssignment]) -> Vec<Vec<usize>> {
    assignment
        .iter()
        .map(|a| a.experts.iter().collect())
        .collect()
}

fn holders(assignment: &[NodeAssignment], e: usize) -> usize {
    assignment.iter().filter(|a| a.experts.contains(e)).count()
}

/// The invariants every assignment returned here keeps.
fn assert_valid(assignment: &[NodeAssignment], num_experts: usize, slots: &[usize]) {
    assert_eq!(assignment.len(), slots.len());
    for (a, &s) in assignment.iter().zip(slots) {
        assert_eq!(a.experts.universe(), num_experts);
        // ExpertSet cannot hold an expert twice, so "no duplicate on a node" is by type;
        // the count check is what can fail.
        assert!(
            a.experts.len() <= s,
            "{} holds {} > {s} slots",
            a.name,
            a.experts.len()
        );
    }
    for e in 0..num_experts {
        assert!(holders(assignment, e) >= 1, "expert {e} unheld");
    }
}

#[test]
fn initial_follows_memory_and_keeps_ranges_contiguous() {
    let a = initial(&caps(&[200 * MIB, 100 * MIB]), 300, MIB, 1).expect("fits");
    assert_eq!(a[0].experts.len(), 200);
    assert_eq!(a[1].experts.len(), 100);
    assert_eq!(a[0].experts.to_string(), "0-199");
    assert_eq!(a[1].experts.to_string(), "200-299");
    assert_valid(&a, 300, &[200, 100]);
}

#[test]
fn initial_replicas_land_on_distinct_nodes() {
    let a = initial(&caps(&[12 * MIB; 4]), 16, MIB, 3).expect("fits");
    for e in 0..16 {
        assert_eq!(holders(&a, e), 3, "expert {e}");
    }
    assert!(a.iter().all(|x| x.experts.len() == 12));
    // More replicas than nodes clamps to one copy per node.
    let b = initial(&caps(&[20 * MIB; 2]), 8, MIB, 5).expect("fits");
    assert!((0..8).all(|e| holders(&b, e) == 2));
}

#[test]
fn initial_respects_memory_caps_when_shares_would_exceed_them() {
    // Proportional shares would give the big node more than it can hold (all 10 experts);
    // the cap is the number of experts, the rest spills to the small ones.
    let a = initial(&caps(&[1000 * MIB, 6 * MIB, 6 * MIB]), 10, MIB, 2).expect("fits");
    assert_eq!(a[0].experts.len(), 10);
    assert!(a[1].experts.len() <= 6 && a[2].experts.len() <= 6);
    assert!((0..10).all(|e| holders(&a, e) == 2));
}

#[test]
fn initial_names_the_shortfall() {
    let err = initial(&caps(&[10 * MIB, 10 * MIB]), 16, MIB, 2).expect_err("too small");
    assert_eq!(
        err,
        EplbError::NotEnoughMemory {
            num_experts: 16,
            replicas: 2,
            needed: 32,
            needed_bytes: 32 * u128::from(MIB),
            room: 20,
            short: 12,
            short_bytes: 12 * u128::from(MIB),
        }
    );
    assert!(err.to_string().contains("12 copies"), "{err}");
    assert_eq!(initial(&[], 8, MIB, 1), Err(EplbError::NoNodes));
}

#[test]
fn nodes_without_a_share_stay_listed_and_empty() {
    let tiny = initial(&caps(&[10 * MIB, MIB / 2]), 8, MIB, 1).expect("fits on e0");
    assert_eq!(tiny[0].experts.len(), 8);
    assert!(tiny[1].experts.is_empty());
    let many = initial(&caps(&[MIB; 5]), 2, 1, 1).expect("fits");
    assert_eq!(many.iter().filter(|a| a.experts.is_empty()).count(), 3);
    assert_valid(&many, 2, &[2; 5]);
}

#[test]
fn a_node_that_joins_empty_takes_its_share() {
    let mut cur = initial(&caps(&[64 * MIB; 3]), 48, MIB, 1).expect("fits");
    cur.push(NodeAssignment {
        name: "new".into(),
        experts: ExpertSet::none(48),
    });
    let r = rebalance(&cur, &[2.0; 48], &[64; 4], 0).expect("ok");
    assert_valid(&r.assignment, 48, &[64; 4]);
    assert_eq!(r.assignment[3].experts.len(), 12);
    assert_eq!((r.moves, r.drops), (12, 12));
    assert_eq!(r.imbalance_after, 1.0);
    // A node with no slots is emptied the same way (drain by capacity).
    let out = rebalance(&r.assignment, &[2.0; 48], &[64, 64, 64, 0], 0).expect("ok");
    assert!(out.assignment[3].experts.is_empty());
    assert_valid(&out.assignment, 48, &[64, 64, 64, 0]);
}

#[test]
fn imbalance_splits_load_over_holders() {
    let a = initial(&caps(&[4 * MIB; 2]), 4, MIB, 1).expect("fits");
    assert_eq!(imbalance(&a, &[1.0; 4]), 1.0);
    assert_eq!(imbalance(&a, &[1.0, 1.0, 0.0, 0.0]), 2.0);
    assert_eq!(imbalance(&a, &[0.0; 4]), 1.0);
    // Expert 0 on both nodes: its load splits, node loads 2+1 vs 2+1.
    let b = vec![
        NodeAssignment {
            name: "a".into(),
            experts: ExpertSet::parse("0,1", 3).expect("valid"),
        },
        NodeAssignment {
            name: "b".into(),
            experts: ExpertSet::parse("0,2", 3).expect("valid"),
        },
    ];
    assert_eq!(imbalance(&b, &[4.0, 1.0, 1.0]), 1.0);
}

#[test]
fn rebalance_replicates_a_hot_expert() {
    let cur = initial(&caps(&[8 * MIB; 4]), 16, MIB, 1).expect("fits");
    let mut load = vec![1.0; 16];
    load[0] = 40.0;
    let r = rebalance(&cur, &load, &[8; 4], 3).expect("rebalances");
    assert_valid(&r.assignment, 16, &[8; 4]);
    assert_eq!(holders(&r.assignment, 0), 4);
    assert!(r.imbalance_after < r.imbalance_before);
    assert!((r.imbalance_after - imbalance(&r.assignment, &load)).abs() < 1e-12);
    assert!(r.moves >= 3);
}

#[test]
fn rebalance_of_a_balanced_placement_moves_nothing() {
    for replicas in 1..=3 {
        let cur = initial(&caps(&[40 * MIB; 4]), 30, MIB, replicas).expect("fits");
        let r = rebalance(&cur, &[5.0; 30], &[40; 4], 30 * (replicas - 1)).expect("ok");
        assert_eq!((r.moves, r.drops), (0, 0), "replicas {replicas}");
        assert_eq!(r.assignment, cur);
    }
}

#[test]
fn rebalance_leaves_unmoved_what_costs_nothing_to_keep() {
    // Only expert 0 is hot; the rest can stay exactly where they are.
    let cur = initial(&caps(&[64 * MIB; 4]), 64, MIB, 1).expect("fits");
    let mut load = vec![1.0; 64];
    load[0] = 30.0;
    let r = rebalance(&cur, &load, &[20; 4], 3).expect("ok");
    println!(
        "hot expert: imbalance {:.3} -> {:.3}, {} moves, {} drops",
        r.imbalance_before, r.imbalance_after, r.moves, r.drops
    );
    assert!(r.imbalance_after < 1.1, "{}", r.imbalance_after);
    assert!(r.moves <= 10, "{} moves", r.moves);
}

#[test]
fn tight_slots_with_replicas_stay_valid() {
    // Three nodes of 2 slots, experts 0 and 1 want 3 copies each: once one node fills with
    // {2, x}, the greedy can be left with a free slot only where the expert already is.
    let cur = vec![
        NodeAssignment {
            name: "a".into(),
            experts: ExpertSet::parse("0,1", 4).expect("valid"),
        },
        NodeAssignment {
            name: "b".into(),
            experts: ExpertSet::parse("2", 4).expect("valid"),
        },
        NodeAssignment {
            name: "c".into(),
            experts: ExpertSet::parse("3", 4).expect("valid"),
        },
    ];
    let load = [9.0, 9.0, 1.0, 1.0];
    let r = rebalance(&cur, &load, &[2, 2, 3], 3).expect("ok");
    assert_valid(&r.assignment, 4, &[2, 2, 3]);
    assert!(r.imbalance_after <= r.imbalance_before);
}

#[test]
fn rebalance_rejects_bad_input() {
    let cur = initial(&caps(&[8 * MIB; 2]), 8, MIB, 1).expect("fits");
    assert!(matches!(
        rebalance(&cur, &[1.0; 7], &[8, 8], 0),
        Err(EplbError::Invalid { .. })
    ));
    assert!(matches!(
        rebalance(&cur, &[f64::NAN; 8], &[8, 8], 0),
        Err(EplbError::BadLoad { expert: 0, .. })
    ));
    assert!(matches!(
        rebalance(&cur, &[1.0; 8], &[3, 3], 0),
        Err(EplbError::NotEnoughSlots {
            copies: 8,
            slots: 6
        })
    ));
}

#[test]
fn evacuate_reassigns_only_orphans() {
    let cur = initial(&caps(&[6 * MIB; 4]), 8, MIB, 1).expect("fits");
    let mut cur2 = cur.clone();
    // Expert 0 also on e3, so losing e0 orphans 1 only.
    cur2[3].experts = ExpertSet::parse("0,6,7", 8).expect("valid");
    let load = [1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    let out = evacuate(&cur2, &["e0"], &load, &[6; 4]).expect("room");
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|a| a.name != "e0"));
    assert_valid(&out, 8, &[6; 3]);
    // The orphan went to the least-loaded survivor; nothing else moved.
    let gained: usize = out
        .iter()
        .zip(&cur2[1..])
        .map(|(n, o)| n.experts.len() - o.experts.len())
        .sum();
    assert_eq!(gained, 1);
    assert!(out[0].experts.contains(1), "{:?}", sets(&out));

    assert_eq!(
        evacuate(&cur, &["nope"], &load, &[6; 4]),
        Err(EplbError::UnknownNode {
            name: "nope".into()
        })
    );
    assert_eq!(
        evacuate(&cur, &["e0", "e1", "e2"], &load, &[2; 4]),
        Err(EplbError::NoRoom { expert: 1 })
    );
    assert_eq!(
        evacuate(&cur, &["e0", "e1", "e2", "e3"], &load, &[6; 4]),
        Err(EplbError::NoNodes)
    );
}

/// Deterministic pseudo-random permutation (LCG-driven Fisher-Yates) so the test needs no
/// RNG dependency and prints the same numbers every run.
fn shuffled(n: usize, mut seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
    v
}

#[test]
fn skewed_zipf_load_flattens() {
    const E: usize = 512;
    let cur = initial(&caps(&[160 * MIB; 4]), E, MIB, 1).expect("fits");
    let slots = [160; 4];
    for (what, rank) in [
        ("zipf(1.2), hot ids scattered", shuffled(E, 7)),
        ("zipf(1.2), hot ids on one node", (0..E).collect()),
    ] {
        let load: Vec<f64> = (0..E)
            .map(|e| 1e6 / ((rank[e] + 1) as f64).powf(1.2))
            .collect();
        for extra in [0, 16, 64] {
            let r = rebalance(&cur, &load, &slots, extra).expect("rebalances");
            println!(
                "{what}, 512 experts on 4 nodes, {extra} extra replicas: imbalance \
                 {:.3} -> {:.3} ({} copies moved, {} dropped)",
                r.imbalance_before, r.imbalance_after, r.moves, r.drops
            );
            assert_valid(&r.assignment, E, &slots);
            assert!(r.imbalance_after <= r.imbalance_before);
            if extra == 64 {
                assert!(r.imbalance_after < 1.05, "{}", r.imbalance_after);
                assert!(r.imbalance_before > 1.3, "{}", r.imbalance_before);
            }
        }
    }
}

#[test]
fn larger_heterogeneous_cluster() {
    const E: usize = 512;
    let mem: Vec<u64> = (0..16).map(|i| (80 + 16 * (i % 3)) * MIB).collect();
    let cur = initial(&caps(&mem), E, MIB, 2).expect("fits");
    let slots: Vec<usize> = mem.iter().map(|m| (m / MIB) as usize).collect();
    assert_valid(&cur, E, &slots);
    let rank = shuffled(E, 11);
    let load: Vec<f64> = (0..E)
        .map(|e| 1e6 / ((rank[e] + 1) as f64).powf(1.1))
        .collect();
    let started = std::time::Instant::now();
    let r = rebalance(&cur, &load, &slots, E + 128).expect("rebalances");
    println!(
        "zipf(1.1), 512 experts x2 on 16 mixed nodes, 128 extra: imbalance {:.3} -> {:.3} \
         ({} moved, {} dropped, {:?})",
        r.imbalance_before,
        r.imbalance_after,
        r.moves,
        r.drops,
        started.elapsed()
    );
    assert_valid(&r.assignment, E, &slots);
    assert!(r.imbalance_after < r.imbalance_before);
    let out = evacuate(&r.assignment, &["e3", "e7"], &load, &slots).expect("room");
    assert_valid(&out, E, &[&slots[..3], &slots[4..7], &slots[8..]].concat());
}

/// Memory in units of expert_bytes, plus a remainder that must not count as a slot.
fn arb_cluster() -> impl Strategy<Value = (Vec<u64>, usize, usize)> {
    (1usize..6, 1usize..48, 1usize..4).prop_flat_map(|(n, e, r)| {
        (
            proptest::collection::vec((1u64..64, 0u64..1000), n)
                .prop_map(|v| v.into_iter().map(|(u, rem)| u * 1000 + rem).collect()),
            Just(e),
            Just(r),
        )
    })
}

fn slots_for(mem: &[u64], e: usize) -> Vec<usize> {
    mem.iter().map(|m| ((m / 1000) as usize).min(e)).collect()
}

fn arb_load(e: usize) -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(prop_oneof![Just(0.0), 0.0f64..10.0, 0.0f64..10_000.0], e)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn initial_is_valid_or_says_why((mem, e, r) in arb_cluster()) {
        let nodes = caps(&mem);
        let slots = slots_for(&mem, e);
        let rr = r.min(mem.len());
        match initial(&nodes, e, 1000, r) {
            Ok(a) => {
                assert_valid(&a, e, &slots);
                for x in 0..e {
                    prop_assert_eq!(holders(&a, x), rr);
                }
            }
            Err(EplbError::NotEnoughMemory { .. }) => {
                prop_assert!(slots.iter().sum::<usize>() < e * rr);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }

    #[test]
    fn rebalance_is_valid_and_never_worse(
        (mem, e, r) in arb_cluster(),
        spare in proptest::collection::vec(0usize..8, 6),
        extra in 0usize..64,
        seed in any::<u64>(),
    ) {
        let Ok(cur) = initial(&caps(&mem), e, 1000, r) else { return Ok(()) };
        let slots: Vec<usize> = slots_for(&mem, e)
            .iter()
            .zip(&spare)
            .map(|(s, x)| s + x)
            .collect();
        let load: Vec<f64> = shuffled(e, seed)
            .iter()
            .map(|&k| if k % 5 == 0 { 0.0 } else { 1000.0 / (k + 1) as f64 })
            .collect();
        let out = rebalance(&cur, &load, &slots, extra).expect("valid current fits");
        assert_valid(&out.assignment, e, &slots);
        let n = mem.len();
        let copies: usize = (0..e).map(|x| holders(&out.assignment, x)).sum();
        if out.moves + out.drops > 0 {
            prop_assert!(copies <= e + extra, "{copies} copies for {e} + {extra}");
        }
        prop_assert!((0..e).all(|x| holders(&out.assignment, x) <= n));
        prop_assert!(out.imbalance_after <= out.imbalance_before + 1e-9);
        prop_assert!((out.imbalance_after - imbalance(&out.assignment, &load)).abs() < 1e-9);
        prop_assert!((out.imbalance_before - imbalance(&cur, &load)).abs() < 1e-9);
        let (mut moves, mut drops) = (0, 0);
        for (o, c) in out.assignment.iter().zip(&cur) {
            prop_assert_eq!(&o.name, &c.name);
            moves += o.experts.iter().filter(|&x| !c.experts.contains(x)).count();
            drops += c.experts.iter().filter(|&x| !o.experts.contains(x)).count();
        }
        prop_assert_eq!((moves, drops), (out.moves, out.drops));
    }

    #[test]
    fn rebalance_with_random_load_stays_valid(
        (mem, e, r) in arb_cluster(),
        load_seed in proptest::collection::vec(0.0f64..100.0, 48),
        extra in 0usize..64,
    ) {
        let Ok(cur) = initial(&caps(&mem), e, 1000, r) else { return Ok(()) };
        let slots = slots_for(&mem, e);
        let load = &load_seed[..e];
        let out = rebalance(&cur, load, &slots, extra).expect("valid current fits");
        assert_valid(&out.assignment, e, &slots);
        prop_assert!(out.imbalance_after <= out.imbalance_before + 1e-9);
    }

    #[test]
    fn balanced_uniform_moves_nothing(n in 1usize..6, e in 1usize..64, r in 1usize..4, slack in 0usize..5) {
        let r = r.min(n);
        prop_assume!(e * r >= n);
        let per = (e * r).div_ceil(n) + slack;
        let cur = initial(&caps(&vec![per as u64 * 1000; n]), e, 1000, r).expect("fits");
        let out = rebalance(&cur, &vec![3.0; e], &vec![per; n], e * (r - 1)).expect("ok");
        prop_assert_eq!((out.moves, out.drops), (0, 0));
        prop_assert_eq!(out.assignment, cur);
    }

    #[test]
    fn evacuate_keeps_surviving_copies(
        (mem, e, r) in arb_cluster(),
        gone_mask in any::<u8>(),
        spare in proptest::collection::vec(0usize..8, 6),
        load in arb_load(48),
    ) {
        let Ok(cur) = initial(&caps(&mem), e, 1000, r) else { return Ok(()) };
        let n = mem.len();
        let gone: Vec<&str> = (0..n)
            .filter(|i| gone_mask & (1 << i) != 0)
            .map(|i| cur[i].name.as_str())
            .collect();
        let slots: Vec<usize> = slots_for(&mem, e)
            .iter()
            .zip(&spare)
            .map(|(s, x)| s + x)
            .collect();
        let survivors: Vec<usize> = (0..n).filter(|&i| !gone.contains(&cur[i].name.as_str())).collect();
        match evacuate(&cur, &gone, &load[..e], &slots) {
            Ok(out) => {
                let kept: Vec<usize> = survivors.iter().map(|&i| slots[i]).collect();
                assert_valid(&out, e, &kept);
                for (o, &i) in out.iter().zip(&survivors) {
                    prop_assert_eq!(&o.name, &cur[i].name);
                    prop_assert!(cur[i].experts.iter().all(|x| o.experts.contains(x)));
                    // Only orphans were added.
                    for x in o.experts.iter().filter(|&x| !cur[i].experts.contains(x)) {
                        prop_assert!(survivors.iter().all(|&s| !cur[s].experts.contains(x)));
                        prop_assert_eq!(holders(&out, x), 1);
                    }
                }
            }
            Err(EplbError::NoNodes) => prop_assert!(survivors.is_empty()),
            Err(EplbError::NoRoom { .. }) => {
                let orphans = (0..e)
                    .filter(|&x| survivors.iter().all(|&s| !cur[s].experts.contains(x)))
                    .count();
                let free: usize = survivors
                    .iter()
                    .map(|&s| slots[s].saturating_sub(cur[s].experts.len()))
                    .sum();
                prop_assert!(free < orphans);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }
}
