//! A consistent-enough read of one cluster's state: live nodes, the current placement, load
//! reports and pending requests. The controller, `myriad control` and tests all read through
//! it, so they agree on what the keys mean.

use std::collections::BTreeMap;

use myriad_wire::ExpertSet;

use crate::keys::Keys;
use crate::records::{
    Assignment, AttentionNodeRecord, ControllerStatus, ExpertNodeRecord, LoadReport, PlacementDoc,
    Request, decode, decode_version,
};
use crate::store::{Store, StoreError};

/// The cluster as the store describes it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub expert_nodes: Vec<ExpertNodeRecord>,
    pub attention_nodes: Vec<AttentionNodeRecord>,
    pub current: Option<PlacementDoc>,
    pub assignments: BTreeMap<String, Assignment>,
    pub loads: Vec<LoadReport>,
    pub leader: Option<String>,
    pub status: Option<ControllerStatus>,
    pub rebalance_request: Option<Request>,
    /// Nodes asked to be drained.
    pub drain_requests: Vec<String>,
    /// Expert nodes some attention node cannot reach, with the attention nodes that say so.
    pub suspects: BTreeMap<String, Vec<String>>,
}

impl ClusterView {
    pub async fn read(store: &dyn Store, keys: &Keys) -> Result<ClusterView, StoreError> {
        let (kvs, _) = store.list(keys.root()).await?;
        let mut v = ClusterView::default();
        let current_version = kvs
            .iter()
            .find(|kv| kv.key == keys.current())
            .map(decode_version)
            .transpose()?;
        for kv in &kvs {
            let k = kv.key.as_str();
            if k.starts_with(&keys.expert_nodes()) {
                v.expert_nodes.push(decode(kv)?);
            } else if k.starts_with(&keys.attention_nodes()) {
                v.attention_nodes.push(decode(kv)?);
            } else if k.starts_with(&keys.assignments()) {
                v.assignments.insert(Keys::leaf(k).to_string(), decode(kv)?);
            } else if k.starts_with(&keys.loads()) {
                v.loads.push(decode(kv)?);
            } else if Some(k) == current_version.map(|c| keys.version(c)).as_deref() {
                v.current = Some(decode(kv)?);
            } else if k == keys.leader() {
                v.leader = Some(String::from_utf8_lossy(&kv.value).into_owned());
            } else if k == keys.status() {
                v.status = Some(decode(kv)?);
            } else if k == keys.rebalance_request() {
                v.rebalance_request = Some(decode(kv)?);
            } else if k.starts_with(&keys.drain_requests()) {
                v.drain_requests.push(Keys::leaf(k).to_string());
            } else if let Some(rest) = k.strip_prefix(&keys.suspects())
                && let Some((expert, attention)) = rest.split_once('/')
            {
                v.suspects
                    .entry(expert.to_string())
                    .or_default()
                    .push(attention.to_string());
            }
        }
        if let (Some(c), None) = (current_version, &v.current) {
            return Err(StoreError::Corrupt {
                key: keys.current(),
                reason: format!("names version {c}, which is not stored"),
            });
        }
        Ok(v)
    }

    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |d| d.version)
    }

    pub fn expert_node(&self, name: &str) -> Option<&ExpertNodeRecord> {
        self.expert_nodes.iter().find(|n| n.name == name)
    }

    /// Tokens per expert over every attention node's window, as floats for the rebalancer.
    pub fn load(&self, num_experts: usize) -> Vec<f64> {
        let mut load = vec![0f64; num_experts];
        for r in &self.loads {
            for (l, t) in load.iter_mut().zip(&r.tokens) {
                *l += *t as f64;
            }
        }
        load
    }

    /// The current placement's sets by node name (empty without a placement).
    pub fn placed_sets(&self) -> BTreeMap<String, ExpertSet> {
        self.current
            .as_ref()
            .map(|d| d.sets().into_iter().collect())
            .unwrap_or_default()
    }
}
