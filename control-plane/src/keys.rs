//! The key layout, under one prefix per cluster (`/myriad/{cluster}/`):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `nodes/expert/{name}` | [`crate::records::ExpertNodeRecord`] | the node's |
//! | `nodes/attention/{name}` | [`crate::records::AttentionNodeRecord`] (incl. the placement version it runs) | the node's |
//! | `placement/current` | the current version, decimal | — |
//! | `placement/versions/{version:020}` | [`crate::records::PlacementDoc`] | — |
//! | `assign/{expert node}` | [`crate::records::Assignment`]: what the node must hold now | — |
//! | `load/{attention node}` | [`crate::records::LoadReport`]: tokens per expert over a sliding window | the node's |
//! | `controller/leader` | the name of the node running the controller | the leader's |
//! | `requests/rebalance`, `requests/drain/{node}` | [`crate::records::Request`] from `myriad control` | — |
//! | `suspects/{expert node}/{attention node}` | empty: the attention node's calls to that expert node fail | the attention node's |
//! | `status/controller` | [`crate::records::ControllerStatus`]: rebalances, failovers, last outcome | — |
//!
//! Versions are zero-padded so that listing `placement/versions/` returns them in order.

/// Keys of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Keys {
            root: format!("/myriad/{cluster}/"),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn expert_nodes(&self) -> String {
        format!("{}nodes/expert/", self.root)
    }

    pub fn expert_node(&self, name: &str) -> String {
        format!("{}{name}", self.expert_nodes())
    }

    pub fn attention_nodes(&self) -> String {
        format!("{}nodes/attention/", self.root)
    }

    pub fn attention_node(&self, name: &str) -> String {
        format!("{}{name}", self.attention_nodes())
    }

    pub fn current(&self) -> String {
        format!("{}placement/current", self.root)
    }

    pub fn versions(&self) -> String {
        format!("{}placement/versions/", self.root)
    }

    pub fn version(&self, v: u64) -> String {
        format!("{}{v:020}", self.versions())
    }

    pub fn assignments(&self) -> String {
        format!("{}assign/", self.root)
    }

    pub fn assignment(&self, node: &str) -> String {
        format!("{}{node}", self.assignments())
    }

    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }

    pub fn load(&self, node: &str) -> String {
        format!("{}{node}", self.loads())
    }

    pub fn leader(&self) -> String {
        format!("{}controller/leader", self.root)
    }

    pub fn rebalance_request(&self) -> String {
        format!("{}requests/rebalance", self.root)
    }

    pub fn drain_requests(&self) -> String {
        format!("{}requests/drain/", self.root)
    }

    pub fn drain_request(&self, node: &str) -> String {
        format!("{}{node}", self.drain_requests())
    }

    pub fn suspects(&self) -> String {
        format!("{}suspects/", self.root)
    }

    pub fn suspect(&self, expert_node: &str, attention_node: &str) -> String {
        format!("{}{expert_node}/{attention_node}", self.suspects())
    }

    pub fn status(&self) -> String {
        format!("{}status/controller", self.root)
    }

    /// The last path segment of `key` (a node name).
    pub fn leaf(key: &str) -> &str {
        key.rsplit('/').next().unwrap_or(key)
    }
}
