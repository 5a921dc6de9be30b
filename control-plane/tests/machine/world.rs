//! A cluster for the controller's [`Machine`] to act on, with no store and no runtime: the keys
//! the controller reads and writes as plain maps, expert nodes that apply their assignments in
//! the order they were written (as `expert_agent` does) when the test says so, attention nodes
//! that switch to the current version when the test says so, and a clock that moves only when
//! the machine waits.
//!
//! After every change (a write of the machine or a report of a node) it checks make-before-break:
//! every version in use (the current one, and each one an attention node runs) routes an
//! expert to a live node only if that node holds it.
//!
//! [`Chooser`] and [`explore`] run a scenario once per order in which the nodes' reports (and
//! the scenario's own events) can arrive, replaying the choices made so far (a stateless model
//! checker): wherever the machine reads the cluster, any one of the reports that could have
//! arrived by then is delivered first.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use myriad_control::ClusterView;
use myriad_control::controller::machine::{Action, Event, Machine, Write};
use myriad_control::records::{
    Assignment, AttentionNodeRecord, ControllerStatus, ExpertNodeRecord, LoadReport, PlacedNode,
    PlacementDoc, Request,
};
use myriad_control::{ControlError, StoreError};
use myriad_wire::ExpertSet;

pub const N: usize = 16;

/// Passes in a row that change nothing before a cluster counts as settled: longer than any
/// wait of the configurations here (`settle`), so nothing is still to come.
pub const QUIET_PASSES: usize = 10;

pub fn set(spec: &str) -> ExpertSet {
    if spec.is_empty() {
        ExpertSet::none(N)
    } else {
        ExpertSet::parse(spec, N).expect("expert set")
    }
}

/// An expert node: its record (what it reports) and the assignments it has yet to apply.
pub struct Node {
    pub record: ExpertNodeRecord,
    pub pending: VecDeque<Assignment>,
    /// Its loads fail (the agent reports `load_error` and keeps what it held).
    pub fail_loads: bool,
}

/// Something that can happen to the cluster between two reads of the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Happening {
    /// The expert node applies the oldest assignment it has not applied, and reports.
    Applies(String),
    /// The attention node switches to the current version, and reports.
    Switches(String),
    /// The scenario's own event (a request, a crash), by its index.
    Extra(usize),
}

/// A scenario's event: it happens once, in any order with the reports, once `when` holds.
pub struct Extra {
    pub label: &'static str,
    pub when: fn(&World) -> bool,
    pub apply: fn(&mut World),
    pub done: bool,
}

pub struct World {
    start: Instant,
    pub elapsed: Duration,
    pub nodes: BTreeMap<String, Node>,
    pub attention: BTreeMap<String, u64>,
    pub assignments: BTreeMap<String, Assignment>,
    pub versions: BTreeMap<u64, PlacementDoc>,
    pub current: u64,
    pub drain_requests: BTreeSet<String>,
    pub rebalance_request: Option<Request>,
    pub suspects: BTreeMap<String, Vec<String>>,
    pub loads: Vec<LoadReport>,
    pub status: Option<ControllerStatus>,
    /// Every write the machine made, in order (failed ones included).
    pub writes: Vec<Write>,
    /// The write (index into `writes`) that fails.
    pub fail_write: Option<usize>,
    pub extras: Vec<Extra>,
    /// What happened, in order, for messages.
    pub trace: Vec<String>,
    /// The last read of the machine was preceded by no report.
    idle: bool,
}

impl World {
    pub fn new() -> World {
        World {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            nodes: BTreeMap::new(),
            attention: BTreeMap::new(),
            assignments: BTreeMap::new(),
            versions: BTreeMap::new(),
            current: 0,
            drain_requests: BTreeSet::new(),
            rebalance_request: None,
            suspects: BTreeMap::new(),
            loads: Vec::new(),
            status: None,
            writes: Vec::new(),
            fail_write: None,
            extras: Vec::new(),
            trace: Vec::new(),
            idle: false,
        }
    }

    /// A cluster that runs version 1 everywhere: each node holds and is assigned its set.
    pub fn settled(sets: &[(&str, &str)], slots: u64, attention: &[&str]) -> World {
        let mut w = World::new();
        let mut nodes = Vec::new();
        for (i, (name, spec)) in sets.iter().enumerate() {
            w.add_node(name, slots, spec);
            let serial = i as u64 + 1;
            w.assignments
                .insert(name.to_string(), assignment(spec, serial));
            w.nodes.get_mut(*name).expect("added").record.applied_serial = serial;
            nodes.push(placed(name, spec));
        }
        w.versions.insert(1, doc(1, nodes, "initial"));
        w.current = 1;
        for a in attention {
            w.attention.insert(a.to_string(), 1);
        }
        w
    }

    pub fn add_node(&mut self, name: &str, slots: u64, held: &str) {
        let record = ExpertNodeRecord {
            name: name.to_string(),
            addr: format!("{name}.test:4000"),
            memory_bytes: slots << 20,
            expert_bytes: 1 << 20,
            held: held.to_string(),
            model_fingerprint: 7,
            metrics_addr: None,
            applied_serial: 0,
            load_error: None,
        };
        let node = Node {
            record,
            pending: VecDeque::new(),
            fail_loads: false,
        };
        self.nodes.insert(name.to_string(), node);
    }

    pub fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    pub fn held(&self, node: &str) -> ExpertSet {
        self.nodes[node].record.held_set(N)
    }

    pub fn doc(&self, version: u64) -> &PlacementDoc {
        &self.versions[&version]
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            expert_nodes: self.nodes.values().map(|n| n.record.clone()).collect(),
            attention_nodes: self
                .attention
                .iter()
                .map(|(name, v)| AttentionNodeRecord {
                    name: name.clone(),
                    placement_version: *v,
                    metrics_addr: None,
                })
                .collect(),
            current: self.versions.get(&self.current).cloned(),
            assignments: self.assignments.clone(),
            loads: self.loads.clone(),
            leader: None,
            status: self.status.clone(),
            rebalance_request: self.rebalance_request.clone(),
            drain_requests: self.drain_requests.iter().cloned().collect(),
            suspects: self.suspects.clone(),
        }
    }

    /// Makes one write of the machine.
    pub fn write(&mut self, write: Write) -> Result<(), StoreError> {
        let failing = self.fail_write == Some(self.writes.len());
        self.writes.push(write.clone());
        if failing {
            self.trace.push(format!("{write:?} failed"));
            return Err(StoreError::Other("injected failure".into()));
        }
        match write {
            Write::PutAssignment { node, assignment } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.pending.push_back(assignment.clone());
                }
                self.assignments.insert(node, assignment);
            }
            Write::DeleteAssignment { node } => {
                self.assignments.remove(&node);
            }
            Write::PutVersion(doc) => {
                self.versions.insert(doc.version, doc);
            }
            Write::SetCurrent { version } => {
                assert!(self.versions.contains_key(&version), "v{version} stored");
                self.current = version;
                self.trace.push(format!("v{version} published"));
            }
            Write::DeleteDrainRequest { node } => {
                self.drain_requests.remove(&node);
            }
            Write::DeleteRebalanceRequest => self.rebalance_request = None,
            Write::SaveStatus(s) => self.status = Some(s),
        }
        self.check("after a write");
        Ok(())
    }

    /// What could happen now.
    pub fn enabled(&self) -> Vec<Happening> {
        let mut out: Vec<Happening> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.pending.is_empty())
            .map(|(name, _)| Happening::Applies(name.clone()))
            .collect();
        if self.current > 0 {
            out.extend(
                self.attention
                    .iter()
                    .filter(|(_, v)| **v != self.current)
                    .map(|(name, _)| Happening::Switches(name.clone())),
            );
        }
        out.extend(
            (0..self.extras.len())
                .filter(|&i| !self.extras[i].done && (self.extras[i].when)(self))
                .map(Happening::Extra),
        );
        out
    }

    pub fn deliver(&mut self, h: &Happening) {
        match h {
            Happening::Applies(name) => {
                let node = self.nodes.get_mut(name).expect("a live node");
                let a = node.pending.pop_front().expect("an assignment to apply");
                let want = set(&a.experts);
                let held = node.record.held_set(N);
                if held != want {
                    if node.fail_loads && want.iter().any(|e| !held.contains(e)) {
                        node.record.load_error =
                            Some(format!("assignment {}: no weights", a.serial));
                    } else {
                        node.record.held = want.to_string();
                        node.record.load_error = None;
                    }
                } else {
                    node.record.load_error = None;
                }
                node.record.applied_serial = a.serial;
                self.trace
                    .push(format!("{name} holds [{}]", node.record.held));
            }
            Happening::Switches(name) => {
                self.attention.insert(name.clone(), self.current);
                self.trace.push(format!("{name} runs v{}", self.current));
            }
            Happening::Extra(i) => {
                self.extras[*i].done = true;
                self.trace.push(self.extras[*i].label.to_string());
                (self.extras[*i].apply)(self);
            }
        }
        self.check("after a report");
    }

    /// Make-before-break: every version in use routes each expert of a live node to a node that
    /// holds it.
    pub fn check(&self, when: &str) {
        let in_use: BTreeSet<u64> = self
            .attention
            .values()
            .copied()
            .chain([self.current])
            .filter(|v| *v > 0)
            .collect();
        for v in in_use {
            for (node, want) in self.versions[&v].sets() {
                let Some(n) = self.nodes.get(&node) else {
                    continue;
                };
                let missing = want.difference(&n.record.held_set(N));
                assert!(
                    missing.is_empty(),
                    "{when}: v{v} is in use and routes [{missing}] to {node}, which holds [{}]\n\
                     what happened: {:#?}",
                    n.record.held,
                    self.trace
                );
            }
        }
    }

    /// One pass of the machine; at every read it waits for, one of the reports that could have
    /// arrived is delivered first (`choose` says which).
    pub fn pass(&mut self, m: &mut Machine, choose: &mut Chooser) -> Result<(), ControlError> {
        let mut action = m.start_pass(self.view(), self.now());
        for _ in 0..100_000 {
            action = match action {
                Action::Done(outcome) => {
                    if let Err(e) = &outcome {
                        self.trace.push(format!("pass failed: {e}"));
                    }
                    return outcome;
                }
                Action::Write(w) => {
                    let event = match self.write(w) {
                        Ok(()) => Event::Written,
                        Err(e) => Event::Failed(e),
                    };
                    m.handle(event, self.now())
                }
                Action::ReadView { after } => {
                    self.elapsed += after;
                    self.observe(choose);
                    m.handle(Event::View(self.view()), self.now())
                }
            };
        }
        panic!("a pass that does not end; what happened: {:#?}", self.trace);
    }

    /// Before the machine reads: one of the reports that could have arrived is delivered, or
    /// none (the machine reads before anyone acts), but not none twice in a row while one is
    /// due, since a read that sees the same again decides the same. Returns whether it was none.
    fn observe(&mut self, choose: &mut Chooser) -> bool {
        let enabled = self.enabled();
        let may_idle = !self.idle || enabled.is_empty();
        let pick = choose.pick(enabled.len() + usize::from(may_idle));
        self.idle = pick == enabled.len();
        if !self.idle {
            self.deliver(&enabled[pick]);
        }
        self.idle
    }

    /// Passes every `tick` until the cluster is quiet, each read of the machine preceded by
    /// one report or none ([`Self::observe`]); quiet is [`QUIET_PASSES`] passes in a row that
    /// saw nothing new and wrote nothing.
    pub fn settle(&mut self, m: &mut Machine, choose: &mut Chooser, tick: Duration) {
        let mut quiet = 0;
        for _ in 0..500 {
            let idle = self.observe(choose);
            self.elapsed += tick;
            let before = self.writes.len();
            let _ = self.pass(m, choose);
            quiet = if idle && self.writes.len() == before {
                quiet + 1
            } else {
                0
            };
            if quiet == QUIET_PASSES {
                return;
            }
        }
        panic!(
            "the cluster never settles; what happened: {:#?}",
            self.trace
        );
    }
}

impl World {
    /// Every node applies every assignment it has not applied yet.
    pub fn apply_all(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            while !self.nodes[&name].pending.is_empty() {
                self.deliver(&Happening::Applies(name.clone()));
            }
        }
    }

    /// One pass, each action written down as a line (see [`line`]); `on_read` runs before each
    /// read the machine waits for, with how many reads came before it in this pass.
    pub fn script(
        &mut self,
        m: &mut Machine,
        mut on_read: impl FnMut(&mut World, usize),
    ) -> (Vec<String>, Result<(), ControlError>) {
        let mut lines = Vec::new();
        let mut reads = 0;
        let mut action = m.start_pass(self.view(), self.now());
        loop {
            action = match action {
                Action::Done(outcome) => return (lines, outcome),
                Action::Write(w) => {
                    lines.push(line(&w));
                    let event = match self.write(w) {
                        Ok(()) => Event::Written,
                        Err(e) => {
                            lines.push(format!("  failed: {e}"));
                            Event::Failed(e)
                        }
                    };
                    m.handle(event, self.now())
                }
                Action::ReadView { after } => {
                    lines.push(format!("read after {after:?}"));
                    self.elapsed += after;
                    on_read(self, reads);
                    reads += 1;
                    assert!(reads < 10_000, "a pass that does not end");
                    m.handle(Event::View(self.view()), self.now())
                }
            };
        }
    }
}

/// A write in a few words: `assign e0 [0-5] #4 urgent`, `version 2 (drain of e1): e0 [0-7] …`.
pub fn line(w: &Write) -> String {
    match w {
        Write::PutAssignment { node, assignment } => format!(
            "assign {node} [{}] #{}{}",
            assignment.experts,
            assignment.serial,
            if assignment.urgent { " urgent" } else { "" }
        ),
        Write::DeleteAssignment { node } => format!("unassign {node}"),
        Write::PutVersion(doc) => {
            let nodes: Vec<String> = doc
                .nodes
                .iter()
                .map(|p| format!("{} [{}]", p.name, p.experts))
                .collect();
            format!(
                "version {} ({}): {}",
                doc.version,
                doc.reason,
                nodes.join(" ")
            )
        }
        Write::SetCurrent { version } => format!("current {version}"),
        Write::DeleteDrainRequest { node } => format!("delete drain request {node}"),
        Write::DeleteRebalanceRequest => "delete rebalance request".to_string(),
        Write::SaveStatus(s) => format!("status: {}", s.last_outcome),
    }
}

pub fn assignment(spec: &str, serial: u64) -> Assignment {
    Assignment {
        experts: spec.to_string(),
        serial,
        urgent: false,
    }
}

pub fn placed(name: &str, spec: &str) -> PlacedNode {
    PlacedNode {
        name: name.to_string(),
        addr: format!("{name}.test:4000"),
        experts: spec.to_string(),
    }
}

pub fn doc(version: u64, nodes: Vec<PlacedNode>, reason: &str) -> PlacementDoc {
    PlacementDoc {
        version,
        num_experts: N,
        nodes,
        reason: reason.to_string(),
    }
}

/// The choices of one run: replays `replay`, then takes the first option, recording each
/// choice point with its number of options.
pub struct Chooser {
    replay: Vec<usize>,
    taken: Vec<(usize, usize)>,
}

impl Chooser {
    pub fn pick(&mut self, options: usize) -> usize {
        assert!(options > 0, "a choice among nothing");
        if options == 1 {
            return 0;
        }
        let choice = self.replay.get(self.taken.len()).copied().unwrap_or(0);
        self.taken.push((choice, options));
        choice
    }
}

/// Runs `run` once per sequence of choices (depth first); returns how many runs there were.
pub fn explore(limit: usize, mut run: impl FnMut(&mut Chooser)) -> usize {
    let mut replay = Vec::new();
    for runs in 1..=limit {
        let mut chooser = Chooser {
            replay,
            taken: Vec::new(),
        };
        run(&mut chooser);
        let mut taken = chooser.taken;
        loop {
            match taken.pop() {
                None => return runs,
                Some((choice, options)) if choice + 1 < options => {
                    taken.push((choice + 1, options));
                    break;
                }
                Some(_) => {}
            }
        }
        replay = taken.into_iter().map(|(choice, _)| choice).collect();
    }
    panic!("more than {limit} orders to explore");
}
