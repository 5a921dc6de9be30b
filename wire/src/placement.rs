//! Which expert node serves which experts: a static placement (the control plane replaces it
//! with a versioned one from etcd). Every expert is held by at least one node; an expert held by
//! several nodes has replicas, which is what lets the router fail over when a node dies.
//!
//! File format (JSON): `{"nodes": [{"name": "e0", "addr": "127.0.0.1:7100", "experts": "0-127"}, …]}`
//! where `experts` uses the `ExpertSet` syntax (`all`, ids and inclusive ranges).

use crate::expert_set::ExpertSet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PlacementError {
    #[error("placement {origin}: {detail}")]
    Invalid { origin: String, detail: String },
    #[error("placement {origin}: expert {expert} is held by no node")]
    Unheld { origin: String, expert: usize },
}

/// One expert node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    pub addr: String,
    pub experts: ExpertSet,
}

/// Expert → nodes, for one model.
#[derive(Clone, Debug)]
pub struct Placement {
    nodes: Vec<NodeSpec>,
    /// For each expert, the indices of the nodes holding it, ascending.
    holders: Vec<Vec<usize>>,
}

#[derive(Serialize, Deserialize)]
struct FileNode {
    name: String,
    addr: String,
    experts: String,
}

#[derive(Serialize, Deserialize)]
struct File {
    nodes: Vec<FileNode>,
}

impl Placement {
    /// Checks that names and addresses are unique and every expert has a holder.
    pub fn new(
        nodes: Vec<NodeSpec>,
        num_experts: usize,
        origin: &str,
    ) -> Result<Self, PlacementError> {
        let invalid = |detail: String| PlacementError::Invalid {
            origin: origin.to_string(),
            detail,
        };
        if nodes.is_empty() {
            return Err(invalid("no expert nodes".into()));
        }
        for (i, n) in nodes.iter().enumerate() {
            if n.experts.universe() != num_experts {
                return Err(invalid(format!(
                    "node {} describes {} experts, the model has {num_experts}",
                    n.name,
                    n.experts.universe()
                )));
            }
            if nodes[..i].iter().any(|m| m.name == n.name) {
                return Err(invalid(format!("node name {} appears twice", n.name)));
            }
            if nodes[..i].iter().any(|m| m.addr == n.addr) {
                return Err(invalid(format!("address {} appears twice", n.addr)));
            }
        }
        let mut holders = vec![Vec::new(); num_experts];
        for (i, n) in nodes.iter().enumerate() {
            for e in n.experts.iter() {
                holders[e].push(i);
            }
        }
        if let Some(expert) = holders.iter().position(Vec::is_empty) {
            return Err(PlacementError::Unheld {
                origin: origin.to_string(),
                expert,
            });
        }
        Ok(Placement { nodes, holders })
    }

    /// Splits `num_experts` into contiguous, nearly equal ranges over `addrs` (node `i` named
    /// `e{i}`); with `replicas > 1`, node `i` also holds the ranges of the next `replicas - 1`
    /// nodes (a ring), so every expert lives on `replicas` nodes.
    pub fn even(
        addrs: &[String],
        num_experts: usize,
        replicas: usize,
    ) -> Result<Self, PlacementError> {
        let n = addrs.len();
        if n == 0 {
            return Err(PlacementError::Invalid {
                origin: "--expert-nodes".into(),
                detail: "no expert nodes".into(),
            });
        }
        let replicas = replicas.clamp(1, n);
        let range = |i: usize| (i * num_experts / n, (i + 1) * num_experts / n);
        let nodes = (0..n)
            .map(|i| {
                let spec = (0..replicas)
                    .map(|r| range((i + r) % n))
                    .filter(|(lo, hi)| hi > lo)
                    .map(|(lo, hi)| format!("{lo}-{}", hi - 1))
                    .collect::<Vec<_>>()
                    .join(",");
                let experts = if spec.is_empty() {
                    return Err(PlacementError::Invalid {
                        origin: "--expert-nodes".into(),
                        detail: format!(
                            "{n} nodes for {num_experts} experts leaves node {i} empty"
                        ),
                    });
                } else {
                    ExpertSet::parse(&spec, num_experts).map_err(|e| PlacementError::Invalid {
                        origin: "--expert-nodes".into(),
                        detail: e.to_string(),
                    })?
                };
                Ok(NodeSpec {
                    name: format!("e{i}"),
                    addr: addrs[i].clone(),
                    experts,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Placement::new(nodes, num_experts, "--expert-nodes")
    }

    /// Parses the JSON file format; `origin` names the file in errors.
    pub fn from_json(text: &str, num_experts: usize, origin: &str) -> Result<Self, PlacementError> {
        let invalid = |detail: String| PlacementError::Invalid {
            origin: origin.to_string(),
            detail,
        };
        let file: File = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let nodes = file
            .nodes
            .into_iter()
            .map(|n| {
                let experts = ExpertSet::parse(&n.experts, num_experts)
                    .map_err(|e| invalid(format!("node {}: {e}", n.name)))?;
                Ok(NodeSpec {
                    name: n.name,
                    addr: n.addr,
                    experts,
                })
            })
            .collect::<Result<Vec<_>, PlacementError>>()?;
        Placement::new(nodes, num_experts, origin)
    }

    /// The JSON file format.
    pub fn to_json(&self) -> String {
        let file = File {
            nodes: self
                .nodes
                .iter()
                .map(|n| FileNode {
                    name: n.name.clone(),
                    addr: n.addr.clone(),
                    experts: n.experts.to_string(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    pub fn num_experts(&self) -> usize {
        self.holders.len()
    }

    /// Nodes holding `expert`, ascending.
    pub fn holders(&self, expert: usize) -> &[usize] {
        self.holders.get(expert).map_or(&[], Vec::as_slice)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect()
    }

    #[test]
    fn even_split_covers_every_expert_with_the_asked_replicas() {
        let p = Placement::even(&addrs(4), 512, 1).expect("valid");
        assert_eq!(p.nodes()[1].experts.to_string(), "128-255");
        assert!((0..512).all(|e| p.holders(e).len() == 1));
        let r = Placement::even(&addrs(4), 512, 2).expect("valid");
        assert!((0..512).all(|e| r.holders(e).len() == 2));
        assert_eq!(r.nodes()[3].experts.to_string(), "0-127,384-511");
        let back = Placement::from_json(&r.to_json(), 512, "test").expect("round trip");
        assert_eq!(back.nodes(), r.nodes());
    }

    #[test]
    fn bad_placements_say_what_is_wrong() {
        let e = Placement::from_json(
            r#"{"nodes":[{"name":"a","addr":"x:1","experts":"0-9"}]}"#,
            12,
            "p.json",
        )
        .expect_err("gap");
        assert!(
            e.to_string().contains("expert 10 is held by no node")
                && e.to_string().contains("p.json"),
            "{e}"
        );
        let e = Placement::from_json(r#"{"nodes":[{"name":"a","addr":"x:1","experts":"all"},{"name":"a","addr":"x:2","experts":"all"}]}"#, 4, "p.json")
            .expect_err("dup");
        assert!(e.to_string().contains("appears twice"), "{e}");
        assert!(Placement::from_json("{", 4, "p.json").is_err());
        assert!(Placement::even(&addrs(5), 3, 1).is_err());
    }
}
