//! Dispatch planning, with no I/O: which node serves each (token, expert) pair of one layer.
//!
//! Per token, pairs go to nodes already chosen for that token when a node holding the expert is
//! among them (a token then travels to each node once, whatever number of its experts live
//! there); otherwise to the least-loaded usable replica (load: pairs already queued at the node
//! plus pairs this plan gives it; ties go to the lower node index, so plans are deterministic).

use myriad_wire::Routes;
use thiserror::Error;

use myriad_wire::placement::Placement;

#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("no reachable node holds expert {expert}")]
    NoHolder { expert: u32 },
}

/// The rows and pairs sent to one node.
#[derive(Clone, Debug, PartialEq)]
pub struct SubBatch {
    pub node: usize,
    /// Rows of the original batch, ascending.
    pub rows: Vec<usize>,
    /// Row `i`'s pairs on this node (for original row `rows[i]`), in route order.
    pub routes: Routes,
}

/// One message per destination node, in ascending node order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub batches: Vec<SubBatch>,
}

impl Plan {
    /// Σ over rows of the number of distinct nodes the row is sent to.
    pub fn row_visits(&self) -> usize {
        self.batches.iter().map(|b| b.rows.len()).sum()
    }
}

/// One row's share of a node's work: (row, expert ids, gate weights).
type RowPairs = (usize, Vec<u32>, Vec<f32>);

/// Plans `routes` (rows with no pairs are sent nowhere). `usable[n]` says whether node `n` may be
/// used; `queued[n]` is the load it already has.
pub fn plan(
    routes: &Routes,
    placement: &Placement,
    usable: &[bool],
    queued: &[usize],
) -> Result<Plan, PlanError> {
    let nodes = placement.nodes().len();
    let mut load: Vec<usize> = (0..nodes)
        .map(|n| queued.get(n).copied().unwrap_or(0))
        .collect();
    // Per node: (row, pairs of that row) in row order.
    let mut per_node: Vec<Vec<RowPairs>> = vec![Vec::new(); nodes];
    let mut chosen: Vec<usize> = Vec::new();
    for r in 0..routes.rows() {
        chosen.clear();
        let (experts, weights) = routes.row(r);
        let mut assignment: Vec<usize> = Vec::with_capacity(experts.len());
        for &e in experts {
            let holders: Vec<usize> = placement
                .holders(e as usize)
                .iter()
                .copied()
                .filter(|&n| usable.get(n).copied().unwrap_or(false))
                .collect();
            let Some(&first) = holders.first() else {
                return Err(PlanError::NoHolder { expert: e });
            };
            let node = holders
                .iter()
                .copied()
                .find(|n| chosen.contains(n))
                .unwrap_or_else(|| {
                    holders
                        .iter()
                        .copied()
                        .min_by_key(|&n| (load[n], n))
                        .unwrap_or(first)
                });
            if !chosen.contains(&node) {
                chosen.push(node);
            }
            load[node] += 1;
            assignment.push(node);
        }
        for &node in &chosen {
            let mut ids = Vec::new();
            let mut ws = Vec::new();
            for (j, &n) in assignment.iter().enumerate() {
                if n == node {
                    ids.push(experts[j]);
                    ws.push(weights[j]);
                }
            }
            per_node[node].push((r, ids, ws));
        }
    }
    let batches = per_node
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(node, rows)| {
            let mut routes =
                Routes::with_capacity(rows.len(), rows.iter().map(|(_, e, _)| e.len()).sum());
            let mut ids = Vec::with_capacity(rows.len());
            for (r, e, w) in rows {
                ids.push(r);
                routes.push_row(&e, &w);
            }
            SubBatch {
                node,
                rows: ids,
                routes,
            }
        })
        .collect();
    Ok(Plan { batches })
}

#[cfg(test)]
mod tests {
    use super::*;
    use myriad_wire::ExpertSet;

    use myriad_wire::placement::NodeSpec;

    fn placement(specs: &[&str], experts: usize) -> Placement {
        let nodes = specs
            .iter()
            .enumerate()
            .map(|(i, s)| NodeSpec {
                name: format!("n{i}"),
                addr: format!("a{i}"),
                experts: ExpertSet::parse(s, experts).expect("spec"),
            })
            .collect();
        Placement::new(nodes, experts, "test").expect("valid")
    }

    #[test]
    fn pairs_follow_their_experts_and_keep_route_order() {
        let p = placement(&["0-3", "4-7"], 8);
        let mut routes = Routes::new();
        routes.push_row(&[5, 1, 6, 2], &[0.4, 0.3, 0.2, 0.1]);
        routes.push_row(&[], &[]);
        routes.push_row(&[0, 3], &[0.5, 0.5]);
        let plan = plan(&routes, &p, &[true, true], &[0, 0]).expect("plannable");
        assert_eq!(plan.batches.len(), 2);
        assert_eq!(plan.batches[0].rows, vec![0, 2]);
        assert_eq!(
            plan.batches[0].routes.row(0),
            (&[1u32, 2][..], &[0.3f32, 0.1][..])
        );
        assert_eq!(plan.batches[1].rows, vec![0]);
        assert_eq!(
            plan.batches[1].routes.row(0),
            (&[5u32, 6][..], &[0.4f32, 0.2][..])
        );
        assert_eq!(plan.row_visits(), 3);
    }

    #[test]
    fn replicas_balance_load_reuse_a_chosen_node_and_skip_dead_ones() {
        let p = placement(&["0-7", "0-7", "4-7"], 8);
        let mut routes = Routes::new();
        for _ in 0..4 {
            routes.push_row(&[0], &[1.0]);
        }
        let plan = plan(&routes, &p, &[true, true, true], &[0, 0, 0]).expect("plannable");
        let sizes: Vec<usize> = plan.batches.iter().map(|b| b.rows.len()).collect();
        assert_eq!(
            sizes,
            vec![2, 2],
            "expert 0 alternates between its two holders"
        );
        // A token whose first expert went to node 0 sends its other experts there too.
        let mut r2 = Routes::new();
        r2.push_row(&[1, 5], &[0.5, 0.5]);
        let plan2 = crate::plan::plan(&r2, &p, &[true, true, true], &[0, 0, 0]).expect("plannable");
        assert_eq!(plan2.batches.len(), 1);
        // Dead node 0: everything moves to node 1; nothing holds an expert no live node has.
        let plan3 =
            crate::plan::plan(&routes, &p, &[false, true, true], &[0, 0, 0]).expect("plannable");
        assert!(plan3.batches.iter().all(|b| b.node == 1));
        assert_eq!(
            crate::plan::plan(&routes, &p, &[false, false, true], &[0, 0, 0]),
            Err(PlanError::NoHolder { expert: 0 })
        );
    }
}
