//! Expert placement algorithms, pure (no I/O): the first placement of experts on nodes by
//! memory ([`initial`]), the EPLB-style rebalancer that replicates hot experts and repacks the
//! copies ([`rebalance`]), the load-imbalance measure ([`imbalance`]) and the removal of nodes
//! that died or are being drained ([`evacuate`]). The control plane feeds these with what it
//! reads from the store (nodes, load counters) and publishes what they return as a new placement
//! version.
//!
//! One placement applies to every layer (expert id `e` names that expert in all layers), so a
//! node's memory is spent in units of one expert summed over all layers, and a node's capacity
//! is a number of expert *slots*.
//!
//! An expert's load splits evenly over its copies: the router spreads the rows routed to an
//! expert over its holders, so a node carries `load[e] / copies(e)` for each expert it holds.
//!
//! A node may end up holding no experts (too little memory for its share, zero slots, more
//! nodes than copies); it stays in the assignment with an empty set, so assignments keep the
//! node order the callers index `slots` by.

use std::collections::HashSet;

use myriad_wire::ExpertSet;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum EplbError {
    #[error("no expert nodes to place experts on")]
    NoNodes,
    #[error("the model has no experts to place")]
    NoExperts,
    #[error(
        "{num_experts} experts x {replicas} replicas need {needed} expert copies \
         ({needed_bytes} bytes) but the nodes have room for {room}: {short} copies \
         ({short_bytes} bytes) short"
    )]
    NotEnoughMemory {
        num_experts: usize,
        replicas: usize,
        needed: usize,
        needed_bytes: u128,
        room: usize,
        short: usize,
        short_bytes: u128,
    },
    #[error("{copies} expert copies do not fit in the nodes' {slots} slots")]
    NotEnoughSlots { copies: usize, slots: usize },
    #[error(
        "no node can take a copy of expert {expert}: every node with a free slot already holds it"
    )]
    NoRoom { expert: usize },
    #[error("load of expert {expert} is {value}; loads must be finite and non-negative")]
    BadLoad { expert: usize, value: f64 },
    #[error("node {name} is not in the placement")]
    UnknownNode { name: String },
    #[error("invalid input: {detail}")]
    Invalid { detail: String },
}

/// The experts one node holds.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeAssignment {
    pub name: String,
    pub experts: ExpertSet,
}

/// A node's memory available for routed experts.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeCapacity {
    pub name: String,
    pub memory_bytes: u64,
}

/// What [`rebalance`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Rebalance {
    /// The new assignment, same nodes in the same order as the current one.
    pub assignment: Vec<NodeAssignment>,
    /// [`imbalance`] of the current assignment under the given load.
    pub imbalance_before: f64,
    /// [`imbalance`] of the new assignment under the given load.
    pub imbalance_after: f64,
    /// Expert copies added to nodes (each is a weight load on that node).
    pub moves: usize,
    /// Expert copies removed from nodes.
    pub drops: usize,
}

/// How much worse than the from-scratch packing (relative max node load) the rebalancer accepts
/// to leave copies where they are: moving an expert costs a weight transfer, a percent or two of
/// balance does not.
const STICKY_SLACK: f64 = 0.02;

/// Relative margin under which two node loads count as equal, so float noise in sums does not
/// trigger moves.
const LOAD_EPS: f64 = 1e-9;

/// Places `num_experts` experts, each on `replicas` distinct nodes (clamped to the node count),
/// in proportion to the nodes' memory: a node with twice the memory gets about twice the expert
/// copies, and no node gets more than `memory_bytes / expert_bytes` of them. `expert_bytes` is
/// what one expert occupies summed over all layers (0 means memory is no constraint).
///
/// Each node receives a contiguous run of the expert ids laid out cyclically (`0..E, 0..E, …`),
/// so its set is one range or two (when the run wraps). A run never exceeds `num_experts`, which
/// keeps a node's experts distinct and puts the copies of an expert on distinct nodes.
pub fn initial(
    nodes: &[NodeCapacity],
    num_experts: usize,
    expert_bytes: u64,
    replicas: usize,
) -> Result<Vec<NodeAssignment>, EplbError> {
    if nodes.is_empty() {
        return Err(EplbError::NoNodes);
    }
    if num_experts == 0 {
        return Err(EplbError::NoExperts);
    }
    unique_names(nodes.iter().map(|n| n.name.as_str()))?;
    let n = nodes.len();
    let replicas = replicas.clamp(1, n);
    let caps: Vec<usize> = nodes
        .iter()
        .map(|node| {
            // Zero-sized experts: memory is no constraint.
            node.memory_bytes
                .checked_div(expert_bytes)
                .map_or(num_experts, |fit| {
                    usize::try_from(fit).map_or(num_experts, |fit| fit.min(num_experts))
                })
        })
        .collect();
    let needed = num_experts * replicas;
    let room: usize = caps.iter().sum();
    if room < needed {
        let short = needed - room;
        return Err(EplbError::NotEnoughMemory {
            num_experts,
            replicas,
            needed,
            needed_bytes: needed as u128 * u128::from(expert_bytes),
            room,
            short,
            short_bytes: short as u128 * u128::from(expert_bytes),
        });
    }
    // Highest-averages apportionment (D'Hondt): the next copy goes to the node whose share per
    // byte would stay smallest, which tracks memory proportions as closely as integers allow and
    // respects each cap exactly.
    let weight: Vec<u128> = nodes.iter().map(|x| u128::from(x.memory_bytes)).collect();
    let mut take = vec![0usize; n];
    for _ in 0..needed {
        let mut best: Option<usize> = None;
        for i in (0..n).filter(|&i| take[i] < caps[i]) {
            // (take_i + 1) / w_i < (take_b + 1) / w_b, cross-multiplied to stay exact.
            let better = best.is_none_or(|b| {
                (take[i] as u128 + 1) * weight[b] < (take[b] as u128 + 1) * weight[i]
            });
            if better {
                best = Some(i);
            }
        }
        // room >= needed guarantees some node is below its cap.
        let Some(b) = best else {
            return Err(EplbError::Invalid {
                detail: "apportionment ran out of room".into(),
            });
        };
        take[b] += 1;
    }

    let mut start = 0usize;
    Ok(nodes
        .iter()
        .zip(&take)
        .map(|(node, &t)| {
            let ids = (start..start + t).map(|p| p % num_experts);
            start += t;
            NodeAssignment {
                name: node.name.clone(),
                experts: ExpertSet::from_ids(ids, num_experts),
            }
        })
        .collect())
}

/// Max node load over mean node load, where each expert's load splits evenly over its holders:
/// 1.0 is perfect balance, `n` is everything on one of `n` nodes. 1.0 when nothing is loaded.
/// Experts beyond `load` count as unloaded.
pub fn imbalance(assignment: &[NodeAssignment], load: &[f64]) -> f64 {
    let held: Vec<Vec<bool>> = assignment.iter().map(|a| held_of(&a.experts)).collect();
    let loads = node_loads(&held, load);
    ratio(&loads)
}

/// Replicates hot experts and repacks all copies to flatten node load, in the manner of
/// DeepSeek's EPLB, while moving as little as it can.
///
/// `load[e]` is the tokens routed to expert `e` over a recent window (one entry per expert of the
/// model); `slots[i]` is how many experts node `current[i]` can hold. Every expert gets one
/// copy, then `extra_replicas` further copies go one at a time to the expert with the highest
/// load per copy (never more copies than nodes, never more than the slots can lay out).
///
/// The copies are packed twice. From scratch, heaviest first, each onto the least-loaded node
/// with a free slot that lacks that expert: the reference for balance. And incrementally, from
/// the current assignment: surplus copies dropped, missing ones added, then copies moved off the
/// most-loaded node only until it is within 2% of the reference (`STICKY_SLACK`). The incremental
/// result wins when it gets there, which keeps moves to what the load actually requires.
///
/// When the current assignment is itself valid (within `slots`, every expert held) and the new
/// one would not lower the imbalance, the current one is returned unchanged: a balanced
/// placement moves nothing. Whether a gain is worth its `moves` is the caller's call.
pub fn rebalance(
    current: &[NodeAssignment],
    load: &[f64],
    slots: &[usize],
    extra_replicas: usize,
) -> Result<Rebalance, EplbError> {
    let num_experts = check_inputs(current, load, slots)?;
    let n = current.len();
    let cur: Vec<Vec<bool>> = current.iter().map(|a| held_of(&a.experts)).collect();
    let cur_copies: Vec<usize> = (0..num_experts)
        .map(|e| cur.iter().filter(|h| h[e]).count())
        .collect();
    let total_slots: usize = slots.iter().map(|&s| s.min(num_experts)).sum();
    if total_slots < num_experts {
        return Err(EplbError::NotEnoughSlots {
            copies: num_experts,
            slots: total_slots,
        });
    }

    let copies = replica_counts(load, slots, &cur_copies, extra_replicas);

    let weight: Vec<f64> = (0..num_experts)
        .map(|e| load[e] / copies[e] as f64)
        .collect();
    let fresh = pack_fresh(&weight, &copies, slots, &cur)?;
    let limit = max_of(&node_loads(&fresh, load)) * (1.0 + STICKY_SLACK);
    let incremental = pack_incremental(&weight, &copies, slots, &cur, limit)?;
    let chosen = if max_of(&node_loads(&incremental, load)) <= limit * (1.0 + LOAD_EPS) {
        incremental
    } else {
        fresh
    };

    let before = ratio(&node_loads(&cur, load));
    let after = ratio(&node_loads(&chosen, load));
    let current_valid =
        (0..n).all(|i| count(&cur[i]) <= slots[i]) && cur_copies.iter().all(|&c| c > 0);
    if current_valid && after >= before * (1.0 - LOAD_EPS) {
        return Ok(Rebalance {
            assignment: current.to_vec(),
            imbalance_before: before,
            imbalance_after: before,
            moves: 0,
            drops: 0,
        });
    }

    let (mut moves, mut drops) = (0, 0);
    for (old, new) in cur.iter().zip(&chosen) {
        for e in 0..num_experts {
            moves += usize::from(new[e] && !old[e]);
            drops += usize::from(old[e] && !new[e]);
        }
    }
    let assignment = current
        .iter()
        .zip(&chosen)
        .map(|(a, held)| NodeAssignment {
            name: a.name.clone(),
            experts: to_set(held),
        })
        .collect();
    Ok(Rebalance {
        assignment,
        imbalance_before: before,
        imbalance_after: after,
        moves,
        drops,
    })
}

/// Removes the nodes named in `gone` (failed or drained). Experts with another holder just lose
/// that copy; experts left with none go, heaviest first, to the least-loaded surviving node with
/// a free slot (`slots` is indexed like `current`). Every other copy stays where it is, so the
/// survivors load only the orphans' weights. The result lists the survivors in their order.
pub fn evacuate(
    current: &[NodeAssignment],
    gone: &[&str],
    load: &[f64],
    slots: &[usize],
) -> Result<Vec<NodeAssignment>, EplbError> {
    let num_experts = check_inputs(current, load, slots)?;
    for name in gone {
        if !current.iter().any(|a| a.name == *name) {
            return Err(EplbError::UnknownNode {
                name: (*name).to_string(),
            });
        }
    }
    let keep: Vec<usize> = (0..current.len())
        .filter(|&i| !gone.contains(&current[i].name.as_str()))
        .collect();
    if keep.is_empty() {
        return Err(EplbError::NoNodes);
    }
    let mut held: Vec<Vec<bool>> = keep.iter().map(|&i| held_of(&current[i].experts)).collect();
    let room: Vec<usize> = keep.iter().map(|&i| slots[i]).collect();

    let mut orphans: Vec<usize> = (0..num_experts)
        .filter(|&e| !held.iter().any(|h| h[e]))
        .collect();
    orphans.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
    let mut loads = node_loads(&held, load);
    for e in orphans {
        let target = (0..held.len())
            .filter(|&i| count(&held[i]) < room[i])
            .min_by(|&a, &b| loads[a].total_cmp(&loads[b]).then(a.cmp(&b)))
            .ok_or(EplbError::NoRoom { expert: e })?;
        held[target][e] = true;
        // The orphan has exactly one holder now, so its whole load lands here.
        loads[target] += load[e];
    }

    Ok(keep
        .iter()
        .zip(&held)
        .map(|(&i, h)| NodeAssignment {
            name: current[i].name.clone(),
            experts: to_set(h),
        })
        .collect())
}

/// Shared validation of an assignment with its per-expert load and per-node slots; returns the
/// number of experts.
fn check_inputs(
    current: &[NodeAssignment],
    load: &[f64],
    slots: &[usize],
) -> Result<usize, EplbError> {
    let first = current.first().ok_or(EplbError::NoNodes)?;
    let num_experts = first.experts.universe();
    if num_experts == 0 {
        return Err(EplbError::NoExperts);
    }
    if let Some(a) = current.iter().find(|a| a.experts.universe() != num_experts) {
        return Err(EplbError::Invalid {
            detail: format!(
                "node {} describes {} experts, node {} describes {num_experts}",
                a.name,
                a.experts.universe(),
                first.name
            ),
        });
    }
    unique_names(current.iter().map(|a| a.name.as_str()))?;
    if load.len() != num_experts {
        return Err(EplbError::Invalid {
            detail: format!("{} load entries for {num_experts} experts", load.len()),
        });
    }
    if let Some((expert, &value)) = load
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || **v < 0.0)
    {
        return Err(EplbError::BadLoad { expert, value });
    }
    if slots.len() != current.len() {
        return Err(EplbError::Invalid {
            detail: format!("{} slot counts for {} nodes", slots.len(), current.len()),
        });
    }
    Ok(num_experts)
}

fn unique_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), EplbError> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(EplbError::Invalid {
                detail: format!("node name {name} appears twice"),
            });
        }
    }
    Ok(())
}

/// Copies per expert: one each, then the budget one copy at a time to the highest load per
/// copy. Ties go to experts that currently have more copies than they have been given (keeping a
/// copy is free), then to the lower id, so the result is deterministic. A copy is only granted
/// if all copies can still be laid out on distinct nodes within the slots (the Gale-Ryser
/// condition: any `k` experts together have at most `sum_i min(slots_i, k)` copies); without
/// that check a generous budget on tight slots asks for the impossible.
fn replica_counts(load: &[f64], slots: &[usize], current: &[usize], extra: usize) -> Vec<usize> {
    let num_experts = load.len();
    let n = slots.len();
    let room: Vec<usize> = (0..=num_experts)
        .map(|k| slots.iter().map(|&s| s.min(k)).sum())
        .collect();
    let mut copies = vec![1usize; num_experts];
    // Experts per copy count, which is all the feasibility check needs.
    let mut by_count = vec![0usize; n + 1];
    by_count[1] = num_experts;
    let budget = extra
        .min(room[num_experts].saturating_sub(num_experts))
        .min(num_experts * (n - 1));
    let mut stuck = vec![false; n + 1];
    let mut granted = 0;
    while granted < budget {
        let mut best: Option<usize> = None;
        for e in (0..num_experts).filter(|&e| copies[e] < n && !stuck[copies[e]]) {
            let better = best.is_none_or(|b| {
                let (pe, pb) = (load[e] / copies[e] as f64, load[b] / copies[b] as f64);
                pe > pb || (pe == pb && current[e] > copies[e] && current[b] <= copies[b])
            });
            if better {
                best = Some(e);
            }
        }
        // An unloaded expert gains nothing from another copy; keep the memory.
        let Some(b) = best.filter(|&b| load[b] > 0.0) else {
            break;
        };
        let v = copies[b];
        if !feasible_after_increment(&by_count, v, &room) {
            // Raising any expert from v copies fails the same way; more copies elsewhere only
            // use up room, so it stays infeasible for the rest of this call.
            stuck[v] = true;
            continue;
        }
        by_count[v] -= 1;
        by_count[v + 1] += 1;
        copies[b] += 1;
        granted += 1;
    }
    copies
}

/// Whether raising one expert from `v` to `v + 1` copies keeps every top-`k` sum of copy counts
/// within `room[k]`.
fn feasible_after_increment(by_count: &[usize], v: usize, room: &[usize]) -> bool {
    let (mut k, mut prefix) = (0usize, 0usize);
    for c in (1..by_count.len()).rev() {
        let mut m = by_count[c];
        if c == v + 1 {
            m += 1;
        }
        if c == v {
            m -= 1;
        }
        for _ in 0..m {
            k += 1;
            prefix += c;
            if prefix > room[k] {
                return false;
            }
        }
    }
    true
}

/// Experts heaviest copy first (ties: lower id).
fn heaviest_first(weight: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..weight.len()).collect();
    order.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    order
}

/// Packs from scratch, greedy longest-processing-time style: copies heaviest first, each onto
/// the least-loaded node with a free slot that lacks the expert. This is the balance reference
/// the incremental packing is measured against.
fn pack_fresh(
    weight: &[f64],
    copies: &[usize],
    slots: &[usize],
    cur: &[Vec<bool>],
) -> Result<Vec<Vec<bool>>, EplbError> {
    let mut p = Packing::new(weight, slots);
    for e in heaviest_first(weight) {
        for _ in 0..copies[e] {
            p.place(e, cur)?;
        }
    }
    Ok(p.held)
}

/// Starts from the current assignment and changes only what it must: drops surplus copies,
/// trims nodes over their slots (lightest copies out), adds missing copies greedily, then moves copies off the
/// most-loaded node until it is within `cap` (or nothing improves it).
fn pack_incremental(
    weight: &[f64],
    copies: &[usize],
    slots: &[usize],
    cur: &[Vec<bool>],
    cap: f64,
) -> Result<Vec<Vec<bool>>, EplbError> {
    let n = slots.len();
    let num_experts = weight.len();
    let mut p = Packing::new(weight, slots);
    for i in 0..n {
        for e in (0..num_experts).filter(|&e| cur[i][e]) {
            p.put(i, e);
        }
    }
    for e in 0..num_experts {
        while p.holders(e) > copies[e] {
            // Surplus copies leave over-full nodes first, then the busiest.
            let h = (0..n).filter(|&i| p.held[i][e]).max_by(|&a, &b| {
                let over = |i: usize| p.count[i] > slots[i];
                over(a)
                    .cmp(&over(b))
                    .then(p.loads[a].total_cmp(&p.loads[b]))
                    .then(b.cmp(&a))
            });
            let Some(h) = h else { break };
            p.take(h, e);
        }
    }
    for i in 0..n {
        while p.count[i] > slots[i] {
            let lightest = (0..num_experts)
                .filter(|&f| p.held[i][f])
                .min_by(|&a, &b| weight[a].total_cmp(&weight[b]).then(a.cmp(&b)));
            let Some(f) = lightest else { break };
            p.take(i, f);
        }
    }
    for e in heaviest_first(weight) {
        while p.holders(e) < copies[e] {
            p.place(e, cur)?;
        }
    }
    p.settle(cap);
    Ok(p.held)
}

/// The state of one packing run.
struct Packing<'a> {
    held: Vec<Vec<bool>>,
    count: Vec<usize>,
    loads: Vec<f64>,
    slots: &'a [usize],
    weight: &'a [f64],
}

impl<'a> Packing<'a> {
    fn new(weight: &'a [f64], slots: &'a [usize]) -> Self {
        let n = slots.len();
        Packing {
            held: vec![vec![false; weight.len()]; n],
            count: vec![0; n],
            loads: vec![0.0; n],
            slots,
            weight,
        }
    }

    fn put(&mut self, node: usize, e: usize) {
        self.held[node][e] = true;
        self.count[node] += 1;
        self.loads[node] += self.weight[e];
    }

    fn take(&mut self, node: usize, e: usize) {
        self.held[node][e] = false;
        self.count[node] -= 1;
        self.loads[node] -= self.weight[e];
    }

    fn holders(&self, e: usize) -> usize {
        self.held.iter().filter(|h| h[e]).count()
    }

    fn free(&self, node: usize) -> bool {
        self.count[node] < self.slots[node]
    }

    /// Adds one copy of `e` on the least-loaded node with a free slot that lacks it; on equal
    /// load a node that holds `e` in `cur` wins, since it already has the weights.
    fn place(&mut self, e: usize, cur: &[Vec<bool>]) -> Result<(), EplbError> {
        let target = (0..self.held.len())
            .filter(|&i| self.free(i) && !self.held[i][e])
            .min_by(|&a, &b| {
                let (la, lb) = (self.loads[a], self.loads[b]);
                if (la - lb).abs() <= LOAD_EPS * la.abs().max(lb.abs()) {
                    cur[b][e].cmp(&cur[a][e]).then(a.cmp(&b))
                } else {
                    la.total_cmp(&lb)
                }
            });
        match target {
            Some(t) => {
                self.put(t, e);
                Ok(())
            }
            None => self.augment(e),
        }
    }

    /// Every node with a free slot already holds `e`. Finds a chain of moves, as in bipartite
    /// matching: a full node `k0` lacking `e` hands some `f1` to `k1`, which hands `f2` to `k2`,
    /// …, ending at a node with a free slot; then `e` goes on `k0`. Such a chain exists whenever
    /// the copy counts are feasible, which `replica_counts` guarantees.
    fn augment(&mut self, e: usize) -> Result<(), EplbError> {
        let n = self.held.len();
        let mut seen = vec![false; n];
        let mut parent: Vec<Option<(usize, usize)>> = vec![None; n];
        let mut queue = std::collections::VecDeque::new();
        for k in (0..n).filter(|&k| !self.held[k][e]) {
            seen[k] = true;
            queue.push_back(k);
        }
        while let Some(u) = queue.pop_front() {
            for v in 0..n {
                if seen[v] {
                    continue;
                }
                let f = (0..self.weight.len())
                    .filter(|&f| self.held[u][f] && !self.held[v][f])
                    .min_by(|&a, &b| self.weight[a].total_cmp(&self.weight[b]).then(a.cmp(&b)));
                let Some(f) = f else { continue };
                seen[v] = true;
                parent[v] = Some((u, f));
                if self.free(v) {
                    let mut at = v;
                    while let Some((from, moved)) = parent[at] {
                        self.take(from, moved);
                        self.put(at, moved);
                        at = from;
                    }
                    self.put(at, e);
                    return Ok(());
                }
                queue.push_back(v);
            }
        }
        Err(EplbError::NoRoom { expert: e })
    }

    /// Local search: while the most-loaded node is above `cap`, move one of its copies to
    /// another node (the heaviest copy that keeps the receiver within `cap`, fewest moves; else
    /// the move that best lowers the pair's maximum), or swap two copies when no move helps.
    /// Every step lowers the sorted load vector lexicographically, so it cannot cycle.
    fn settle(&mut self, cap: f64) {
        let n = self.held.len();
        let num_experts = self.weight.len();
        let total: usize = self.count.iter().sum();
        for _ in 0..4 * total + 16 {
            let Some(k) =
                (0..n).max_by(|&a, &b| self.loads[a].total_cmp(&self.loads[b]).then(b.cmp(&a)))
            else {
                return;
            };
            let lk = self.loads[k];
            if lk <= cap {
                return;
            }
            let improves = |pair_max: f64| pair_max < lk - LOAD_EPS * lk.abs();
            let mut fit: Option<(f64, usize, usize)> = None;
            let mut any: Option<(f64, usize, usize)> = None;
            for f in (0..num_experts).filter(|&f| self.held[k][f]) {
                let w = self.weight[f];
                for j in (0..n).filter(|&j| j != k && self.free(j) && !self.held[j][f]) {
                    let pair_max = (lk - w).max(self.loads[j] + w);
                    if !improves(pair_max) {
                        continue;
                    }
                    if self.loads[j] + w <= cap && fit.is_none_or(|(bw, ..)| w > bw) {
                        fit = Some((w, j, f));
                    }
                    if any.is_none_or(|(bm, ..)| pair_max < bm) {
                        any = Some((pair_max, j, f));
                    }
                }
            }
            if let Some((_, j, f)) = fit.or(any) {
                self.take(k, f);
                self.put(j, f);
                continue;
            }
            let mut swap: Option<(f64, usize, usize, usize)> = None;
            for f in (0..num_experts).filter(|&f| self.held[k][f]) {
                for j in (0..n).filter(|&j| j != k && !self.held[j][f]) {
                    for g in (0..num_experts).filter(|&g| self.held[j][g] && !self.held[k][g]) {
                        let d = self.weight[f] - self.weight[g];
                        if d <= 0.0 {
                            continue;
                        }
                        let pair_max = (lk - d).max(self.loads[j] + d);
                        if improves(pair_max) && swap.is_none_or(|(bm, ..)| pair_max < bm) {
                            swap = Some((pair_max, j, f, g));
                        }
                    }
                }
            }
            let Some((_, j, f, g)) = swap else { return };
            self.take(k, f);
            self.take(j, g);
            self.put(j, f);
            self.put(k, g);
        }
    }
}

fn held_of(set: &ExpertSet) -> Vec<bool> {
    let mut held = vec![false; set.universe()];
    for e in set.iter() {
        held[e] = true;
    }
    held
}

fn count(held: &[bool]) -> usize {
    held.iter().filter(|h| **h).count()
}

fn to_set(held: &[bool]) -> ExpertSet {
    ExpertSet::from_ids((0..held.len()).filter(|&e| held[e]), held.len())
}

/// Per-node load with each expert's load split evenly over its holders.
fn node_loads(held: &[Vec<bool>], load: &[f64]) -> Vec<f64> {
    let universe = held.iter().map(Vec::len).max().unwrap_or(0);
    let holders: Vec<usize> = (0..universe)
        .map(|e| {
            held.iter()
                .filter(|h| h.get(e).copied().unwrap_or(false))
                .count()
        })
        .collect();
    held.iter()
        .map(|h| {
            (0..h.len())
                .filter(|&e| h[e])
                .map(|e| load.get(e).copied().unwrap_or(0.0) / holders[e] as f64)
                .sum()
        })
        .collect()
}

fn max_of(loads: &[f64]) -> f64 {
    loads.iter().copied().fold(0.0, f64::max)
}

fn ratio(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    // NaN totals (unvalidated load passed to `imbalance`) count as unloaded too.
    if loads.is_empty() || total.is_nan() || total <= 0.0 {
        return 1.0;
    }
    max_of(loads) / (total / loads.len() as f64)
}

/// The packing and replica-budget internals; the public algorithms are tested through their
/// API in `tests/eplb.rs`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmenting_chain_unjams_tight_slots() {
        // Greedy order fills e2's only two slots with {1, 2} before expert 3 comes; the only
        // layout puts {2, 3} there, reached by moving expert 1 over to e1.
        let weight = [10.0, 9.0, 1.0, 1.0];
        let copies = [2, 2, 3, 3];
        let slots = [4, 4, 2];
        let none = vec![vec![false; 4]; 3];
        let held = pack_fresh(&weight, &copies, &slots, &none).expect("feasible");
        assert_eq!(held[2], vec![false, false, true, true]);
        for e in 0..4 {
            assert_eq!(held.iter().filter(|h| h[e]).count(), copies[e]);
        }
    }

    #[test]
    fn replica_budget_stops_where_slots_cannot_lay_copies_out() {
        // Two experts can have 3 copies only if the 2-slot node takes both; the third hot
        // expert's extra copy would need a fourth slot there.
        let copies = replica_counts(&[9.0, 8.0, 7.0, 0.5], &[4, 4, 2], &[1; 4], 100);
        let mut sorted = copies.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let room = |k: usize| [4usize, 4, 2].iter().map(|&s| s.min(k)).sum::<usize>();
        let mut prefix = 0;
        for (k, c) in sorted.iter().enumerate() {
            prefix += c;
            assert!(prefix <= room(k + 1), "{copies:?}");
        }
        assert_eq!(copies.iter().sum::<usize>(), 10, "{copies:?}");
    }
}
