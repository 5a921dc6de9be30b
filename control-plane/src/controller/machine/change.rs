//! One make-before-break change as the machine carries it out: the view of the pass that made
//! it, the new sets, the checks of its stages (drops done, loads done) and the version it
//! publishes. It only reads the views handed to it.

use std::collections::BTreeMap;

use myriad_wire::ExpertSet;

use crate::controller::ControlError;
use crate::eplb::NodeAssignment;
use crate::records::{PlacedNode, PlacementDoc};
use crate::view::ClusterView;

pub(super) struct Change {
    /// The view of the pass that decided the change: what is assigned and published before it.
    base: ClusterView,
    /// The new placement as decided (nodes left empty included), kept for the cleanup.
    sets: Vec<NodeAssignment>,
    /// The nodes that hold experts in the new placement.
    new: BTreeMap<String, ExpertSet>,
    reason: String,
    /// Steps are (or may be) waiting for the new copies, so nodes load at full speed.
    urgent: bool,
    num_experts: usize,
}

impl Change {
    pub(super) fn new(
        base: ClusterView,
        sets: Vec<NodeAssignment>,
        reason: String,
        urgent: bool,
        num_experts: usize,
    ) -> Self {
        let new = sets
            .iter()
            .filter(|a| !a.experts.is_empty())
            .map(|a| (a.name.clone(), a.experts.clone()))
            .collect();
        Change {
            base,
            sets,
            new,
            reason,
            urgent,
            num_experts,
        }
    }

    pub(super) fn base(&self) -> &ClusterView {
        &self.base
    }

    pub(super) fn urgent(&self) -> bool {
        self.urgent
    }

    pub(super) fn check_registered(&self) -> Result<(), ControlError> {
        match self
            .new
            .keys()
            .find(|name| self.base.expert_node(name).is_none())
        {
            Some(name) => Err(ControlError::Node {
                node: name.clone(),
                reason: "is assigned experts but is not registered".into(),
            }),
            None => Ok(()),
        }
    }

    /// The first node of the change that `view` shows holding a copy outside its assignment
    /// (`None`: every drop it was told to make is done). A node still dropping copies (a
    /// cleanup not yet carried out) reports copies it is about to lose; until it is done, its
    /// report cannot acknowledge a load (the agent applies assignments in order and reports
    /// after each).
    pub(super) fn dropping(&self, view: &ClusterView) -> Result<Option<String>, ControlError> {
        for name in self.new.keys() {
            let Some(assigned) = assigned(view, name, self.num_experts) else {
                continue;
            };
            let Some(rec) = view.expert_node(name) else {
                return Err(ControlError::Node {
                    node: name.clone(),
                    reason: "left while dropping experts".into(),
                });
            };
            if rec
                .held_set(self.num_experts)
                .iter()
                .any(|e| !assigned.contains(e))
            {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }

    /// What each node of the change is to hold while it is under way: everything it is
    /// assigned now stays (the current version's copies and, when the last change is not
    /// cleaned up yet, those of versions attention nodes may still run), plus its new set.
    /// Nodes that only lose experts keep their old sets until the cleanup.
    pub(super) fn targets(&self) -> Vec<(String, ExpertSet)> {
        let old = self.base.placed_sets();
        self.new
            .iter()
            .map(|(name, set)| {
                let mut target = old.get(name).map_or(set.clone(), |o| o.union(set));
                if let Some(assigned) = assigned(&self.base, name, self.num_experts) {
                    target = target.union(&assigned);
                }
                (name.clone(), target)
            })
            .collect()
    }

    /// The first node of the change that `view` does not show holding its new set (`None`:
    /// all do); an error if one left or reports that it cannot load its latest assignment.
    pub(super) fn loading(&self, view: &ClusterView) -> Result<Option<String>, ControlError> {
        for (name, set) in &self.new {
            let Some(rec) = view.expert_node(name) else {
                return Err(ControlError::Node {
                    node: name.clone(),
                    reason: "left while loading its experts".into(),
                });
            };
            let held = rec.held_set(self.num_experts);
            if set.iter().any(|e| !held.contains(e)) {
                // A load error of an earlier assignment says nothing about this one.
                let applied = view
                    .assignments
                    .get(name)
                    .is_some_and(|a| a.serial == rec.applied_serial);
                if let Some(e) = rec.load_error.as_ref().filter(|_| applied) {
                    return Err(ControlError::Node {
                        node: name.clone(),
                        reason: format!("could not load its experts: {e}"),
                    });
                }
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }

    /// The version to publish, checked to be a valid placement.
    pub(super) fn doc(&self) -> Result<PlacementDoc, ControlError> {
        let doc = PlacementDoc {
            version: self.base.version() + 1,
            num_experts: self.num_experts,
            nodes: self
                .new
                .iter()
                .map(|(name, set)| PlacedNode {
                    name: name.clone(),
                    addr: self
                        .base
                        .expert_node(name)
                        .map(|r| r.addr.clone())
                        .unwrap_or_default(),
                    experts: set.to_string(),
                })
                .collect(),
            reason: self.reason.clone(),
        };
        doc.to_placement()
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        Ok(doc)
    }

    /// The version published and the sets its cleanup leaves.
    pub(super) fn into_published(self) -> (u64, Vec<NodeAssignment>) {
        (self.base.version() + 1, self.sets)
    }
}

/// What `node` is assigned now (`None`: no assignment, or one that cannot be read).
fn assigned(view: &ClusterView, node: &str, num_experts: usize) -> Option<ExpertSet> {
    let spec = view.assignments.get(node)?.experts.trim();
    if spec.is_empty() {
        return Some(ExpertSet::none(num_experts));
    }
    ExpertSet::parse(spec, num_experts).ok()
}

/// The current placement as assignments, with every live expert node (new ones empty).
pub(super) fn assignments(view: &ClusterView) -> Vec<NodeAssignment> {
    let n = view.current.as_ref().map_or(0, |d| d.num_experts);
    let placed = view.placed_sets();
    let mut out: Vec<NodeAssignment> = placed
        .iter()
        .map(|(name, experts)| NodeAssignment {
            name: name.clone(),
            experts: experts.clone(),
        })
        .collect();
    for r in &view.expert_nodes {
        if !placed.contains_key(&r.name) {
            out.push(NodeAssignment {
                name: r.name.clone(),
                experts: ExpertSet::none(n),
            });
        }
    }
    out
}

/// Expert slots per node of `current` (a node without a record keeps what it has).
pub(super) fn slots(
    view: &ClusterView,
    current: &[NodeAssignment],
    num_experts: usize,
) -> Vec<usize> {
    current
        .iter()
        .map(|a| {
            view.expert_node(&a.name).map_or(a.experts.len(), |r| {
                r.slots(num_experts).max(a.experts.len())
            })
        })
        .collect()
}
