//! The values stored under [`crate::keys`], as JSON. Every read names its key when the value
//! cannot be understood, so a hand-edited or foreign key shows up as a clear error.

use myriad_wire::ExpertSet;
use myriad_wire::{NodeSpec, Placement};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{KeyValue, StoreError};

/// What an expert node says about itself (under its lease).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertNodeRecord {
    pub name: String,
    /// Where attention nodes reach it (QUIC or in-process address).
    pub addr: String,
    /// Memory it may fill with experts.
    pub memory_bytes: u64,
    /// Bytes one expert occupies over all layers.
    pub expert_bytes: u64,
    /// The experts it holds now, `ExpertSet` syntax (empty: none yet).
    pub held: String,
    pub model_fingerprint: u64,
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// The serial of the last assignment the node acted on.
    #[serde(default)]
    pub applied_serial: u64,
    /// Why that assignment could not be applied (it holds what it held before).
    #[serde(default)]
    pub load_error: Option<String>,
}

impl ExpertNodeRecord {
    /// How many experts fit in its memory.
    pub fn slots(&self, num_experts: usize) -> usize {
        if self.expert_bytes == 0 {
            return num_experts;
        }
        ((self.memory_bytes / self.expert_bytes) as usize).min(num_experts)
    }

    pub fn held_set(&self, num_experts: usize) -> ExpertSet {
        parse_set(&self.held, num_experts).unwrap_or_else(|| ExpertSet::none(num_experts))
    }
}

/// What an attention node says about itself (under its lease).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionNodeRecord {
    pub name: String,
    /// The placement version its steps use now.
    pub placement_version: u64,
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

/// One node of a placement version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacedNode {
    pub name: String,
    pub addr: String,
    pub experts: String,
}

/// A placement version: which node serves which experts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementDoc {
    pub version: u64,
    pub num_experts: usize,
    pub nodes: Vec<PlacedNode>,
    /// Why it was made (`initial`, `rebalance`, `failover of e2`, `drain of e1`).
    pub reason: String,
}

impl PlacementDoc {
    pub fn to_placement(&self) -> Result<Placement, myriad_wire::PlacementError> {
        let origin = format!("placement version {}", self.version);
        let nodes = self
            .nodes
            .iter()
            .map(|n| {
                let experts = ExpertSet::parse(&n.experts, self.num_experts).map_err(|e| {
                    myriad_wire::PlacementError::Invalid {
                        origin: origin.clone(),
                        detail: format!("node {}: {e}", n.name),
                    }
                })?;
                Ok(NodeSpec {
                    name: n.name.clone(),
                    addr: n.addr.clone(),
                    experts,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Placement::new(nodes, self.num_experts, &origin)
    }

    /// Expert sets by node name.
    pub fn sets(&self) -> Vec<(String, ExpertSet)> {
        self.nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    parse_set(&n.experts, self.num_experts)
                        .unwrap_or_else(|| ExpertSet::none(self.num_experts)),
                )
            })
            .collect()
    }
}

/// What an expert node must hold now. During a move it is the union of the old and the new
/// placement's sets (make before break).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub experts: String,
    /// Bumped on every write so a node can tell a repeated assignment from a new one.
    pub serial: u64,
    /// Steps are waiting for it (initial placement, failover): load as fast as possible.
    /// Otherwise (rebalance, drain) the node may load slowly to leave serving undisturbed.
    #[serde(default)]
    pub urgent: bool,
}

/// Tokens an attention node routed to each expert (summed over layers) in the last
/// `window_secs` seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub node: String,
    pub window_secs: f64,
    pub tokens: Vec<u64>,
}

/// A request from `myriad control` to the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    /// Extra replicas the rebalancer may create (rebalance only).
    #[serde(default)]
    pub extra_replicas: Option<usize>,
}

/// The controller's record of what it has done.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub leader: String,
    pub rebalances: u64,
    pub rebalance_seconds_total: f64,
    pub last_rebalance_seconds: f64,
    pub failovers: u64,
    pub drains: u64,
    /// The id of the last request handled and its outcome.
    pub last_request: Option<u64>,
    pub last_outcome: String,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
}

fn parse_set(spec: &str, num_experts: usize) -> Option<ExpertSet> {
    if spec.trim().is_empty() {
        return Some(ExpertSet::none(num_experts));
    }
    ExpertSet::parse(spec, num_experts).ok()
}

/// `set` in `ExpertSet` syntax, empty for no experts.
pub fn set_spec(set: &ExpertSet) -> String {
    set.to_string()
}

/// The version number stored under `placement/current`.
pub fn decode_version(kv: &KeyValue) -> Result<u64, StoreError> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: kv.key.clone(),
            reason: "not a version number".into(),
        })
}

/// Decodes a stored JSON value, naming the key when it cannot.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}
