//! Membership, the controller and the node-side agents together, each property run against
//! `MemoryStore` and against `EtcdStore` on a real etcd (`testing::EtcdServer`, one per test),
//! sharing one async body per property the way `tests/conformance.rs` does.
//!
//! Only the node internals are fakes: [`FakeHolder`] is an expert node's shard (an `ExpertSet`
//! behind a mutex, every change taking a configurable delay), [`FakeSink`] an attention node's
//! router (it records the placements it is given; its applied version either follows at once or
//! is advanced by the test, an attention node that switches between steps). Everything else is
//! the real code: `Registration`, `Controller::run`, `expert_agent::serve_assignments`,
//! `follower::follow`.
//!
//! Make-before-break is checked by a [`Monitor`] sampling, over the whole test, the published
//! version, every attention node's applied version and every expert node's held set: every
//! expert that a version in use assigns to a node must be held by that node at that moment.
//!
//! One etcd-only test follows: an attention node that switches versions while etcd is down.
//!
//! The controller's decisions alone (exact writes of each pass, timeouts and suspicions on a
//! virtual clock, every order of the nodes' reports) are tested without a store or sleeps in
//! `tests/machine/`; these tests prove the shell that carries them out.
//!
//! Every wait is bounded; leases are 1 s (etcd's minimum with the harness's election timeout).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use myriad_control::controller::{Controller, ControllerConfig};
use myriad_control::eplb::{self, NodeAssignment};
use myriad_control::expert_agent::{ExpertHolder, serve_assignments};
use myriad_control::follower::{FollowerConfig, PlacementSink, follow};
use myriad_control::records::{
    Assignment, ControllerStatus, ExpertNodeRecord, LoadReport, PlacedNode, PlacementDoc, Request,
    decode, encode,
};
use myriad_control::testing::EtcdServer;
use myriad_control::{ClusterView, EtcdStore, Keys, Registration, Store};
use myriad_wire::ExpertSet;
use myriad_wire::Placement;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Lease TTL of every registration.
const TTL: Duration = Duration::from_secs(1);
/// Longest wait for anything that should happen "soon" (a load, a publish, a cleanup).
const SOON: Duration = Duration::from_secs(5);
/// What a lease expiry may take beyond its TTL: the last refresh came up to TTL/3 before the
/// holder stopped, and etcd checks for expired leases every 500 ms.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);
/// The controller's tick.
const TICK: Duration = Duration::from_millis(50);
/// One expert's bytes over all layers; node memory is given in these.
const EXPERT_BYTES: u64 = 1 << 20;
const CLUSTER: &str = "test";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

fn set(spec: &str, n: usize) -> ExpertSet {
    if spec.is_empty() {
        ExpertSet::none(n)
    } else {
        ExpertSet::parse(spec, n).expect("expert set")
    }
}

fn covers(set: &ExpertSet, other: &ExpertSet) -> bool {
    other.iter().all(|e| set.contains(e))
}

// ---- fakes of the node internals ----------------------------------------------------------

/// An expert node's shard: what it holds, and every change it made, with when it finished.
struct FakeHolder {
    initial: ExpertSet,
    held: Mutex<ExpertSet>,
    /// Every change (a load or a drop) takes this long, as reading weights would.
    delay: Duration,
    log: Mutex<Vec<(Instant, ExpertSet)>>,
}

impl FakeHolder {
    fn new(held: ExpertSet, delay: Duration) -> Self {
        FakeHolder {
            initial: held.clone(),
            held: Mutex::new(held),
            delay,
            log: Mutex::new(Vec::new()),
        }
    }

    /// What it held at `t` (a change counts from when it finished).
    fn held_at(&self, t: Instant) -> ExpertSet {
        lock(&self.log)
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map_or_else(|| self.initial.clone(), |(_, s)| s.clone())
    }

    fn changes(&self) -> usize {
        lock(&self.log).len()
    }
}

impl ExpertHolder for FakeHolder {
    fn held(&self) -> ExpertSet {
        lock(&self.held).clone()
    }

    fn set_experts(&self, set: &ExpertSet) -> Result<(), String> {
        if *lock(&self.held) == *set {
            return Ok(());
        }
        // Called on a blocking thread, like the real shard.
        std::thread::sleep(self.delay);
        *lock(&self.held) = set.clone();
        lock(&self.log).push((Instant::now(), set.clone()));
        Ok(())
    }
}

/// An attention node's router: records the placements it is given; its steps run `applied`,
/// which follows at once (`auto`) or when the test says so.
struct FakeSink {
    auto: bool,
    applied: watch::Sender<u64>,
    offered: watch::Sender<u64>,
    offers: Mutex<Vec<(u64, Instant)>>,
}

impl FakeSink {
    fn new(auto: bool) -> Self {
        FakeSink {
            auto,
            applied: watch::Sender::new(0),
            offered: watch::Sender::new(0),
            offers: Mutex::new(Vec::new()),
        }
    }
}

impl PlacementSink for FakeSink {
    fn set_placement(&self, version: u64, _placement: Placement) -> Result<(), String> {
        lock(&self.offers).push((version, Instant::now()));
        self.offered.send_replace(version);
        if self.auto {
            self.applied.send_replace(version);
        }
        Ok(())
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn expert_tokens(&self) -> Vec<u64> {
        Vec::new()
    }
}

// ---- nodes and controllers run by the tests -----------------------------------------------

struct ExpertNode {
    name: String,
    holder: Arc<FakeHolder>,
    registration: Weak<Registration>,
    task: JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
}

impl ExpertNode {
    async fn start(
        store: &Arc<dyn Store>,
        name: &str,
        slots: u64,
        held: ExpertSet,
        delay: Duration,
    ) -> ExpertNode {
        let registration = Arc::new(
            Registration::new(store.clone(), TTL)
                .await
                .expect("register expert node"),
        );
        let holder = Arc::new(FakeHolder::new(held, delay));
        let record = ExpertNodeRecord {
            name: name.to_string(),
            addr: format!("{name}.test:4000"),
            memory_bytes: slots * EXPERT_BYTES,
            expert_bytes: EXPERT_BYTES,
            held: String::new(),
            model_fingerprint: 7,
            metrics_addr: None,
            applied_serial: 0,
            load_error: None,
        };
        let (shutdown, rx) = watch::channel(false);
        let weak = Arc::downgrade(&registration);
        let task = tokio::spawn(serve_assignments(
            store.clone(),
            Keys::new(CLUSTER),
            registration,
            record,
            holder.clone(),
            rx,
        ));
        ExpertNode {
            name: name.to_string(),
            holder,
            registration: weak,
            task,
            _shutdown: shutdown,
        }
    }

    fn held(&self) -> ExpertSet {
        self.holder.held()
    }

    /// Stops the agent without leaving: its registration is dropped (the keeper stops) and its
    /// keys stay until the lease runs out, as when the process is killed.
    async fn crash(&self) {
        self.task.abort();
        wait_until("the crashed node's registration is dropped", SOON, || {
            self.registration.upgrade().is_none()
        })
        .await;
    }
}

/// `count` expert nodes `e0, e1, …`, each starting with nothing.
async fn expert_nodes(
    store: &Arc<dyn Store>,
    count: usize,
    slots: u64,
    n: usize,
    delay: Duration,
) -> Vec<ExpertNode> {
    let mut nodes = Vec::new();
    for i in 0..count {
        nodes.push(
            ExpertNode::start(store, &format!("e{i}"), slots, ExpertSet::none(n), delay).await,
        );
    }
    nodes
}

struct AttentionNode {
    name: String,
    sink: Arc<FakeSink>,
    _task: JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
}

impl AttentionNode {
    async fn start(store: &Arc<dyn Store>, name: &str, auto: bool) -> AttentionNode {
        let registration = Arc::new(
            Registration::new(store.clone(), TTL)
                .await
                .expect("register attention node"),
        );
        let sink = Arc::new(FakeSink::new(auto));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(follow(
            store.clone(),
            Keys::new(CLUSTER),
            registration,
            name.to_string(),
            sink.clone(),
            FollowerConfig::default(),
            rx,
        ));
        AttentionNode {
            name: name.to_string(),
            sink,
            _task: task,
            _shutdown: shutdown,
        }
    }

    /// Its steps switch to `version`.
    fn apply(&self, version: u64) {
        self.sink.applied.send_replace(version);
    }

    fn applied(&self) -> u64 {
        *self.sink.applied.borrow()
    }

    /// Waits until the follower handed it `version` (or later); returns when.
    async fn offered(&self, version: u64) -> Instant {
        let mut rx = self.sink.offered.subscribe();
        within(
            &format!("attention node {} is given version {version}", self.name),
            SOON,
            rx.wait_for(|v| *v >= version),
        )
        .await
        .expect("the sink lives");
        lock(&self.sink.offers)
            .iter()
            .find(|(v, _)| *v >= version)
            .map(|(_, t)| *t)
            .expect("an offer was recorded")
    }
}

struct RunningController {
    registration: Weak<Registration>,
    task: JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
}

impl RunningController {
    async fn start(store: &Arc<dyn Store>, name: &str, config: ControllerConfig) -> Self {
        let registration = Arc::new(
            Registration::new(store.clone(), TTL)
                .await
                .expect("register controller"),
        );
        let weak = Arc::downgrade(&registration);
        let (shutdown, rx) = watch::channel(false);
        let controller = Controller::new(
            store.clone(),
            Keys::new(CLUSTER),
            registration,
            name,
            config,
        );
        RunningController {
            registration: weak,
            task: tokio::spawn(controller.run(rx)),
            _shutdown: shutdown,
        }
    }

    /// Kills the controller: its task and registration go, its lease is left to expire.
    async fn crash(&self) {
        self.task.abort();
        wait_until(
            "the crashed controller's registration is dropped",
            SOON,
            || self.registration.upgrade().is_none(),
        )
        .await;
    }
}

fn config(num_experts: usize, min_expert_nodes: usize) -> ControllerConfig {
    let mut c = ControllerConfig::new(num_experts);
    c.min_expert_nodes = min_expert_nodes;
    c.settle = Duration::from_millis(200);
    c.tick = TICK;
    c.load_timeout = Duration::from_secs(10);
    c
}

// ---- reading and waiting ------------------------------------------------------------------

fn keys() -> Keys {
    Keys::new(CLUSTER)
}

async fn view(store: &dyn Store) -> ClusterView {
    ClusterView::read(store, &keys())
        .await
        .expect("read the cluster")
}

fn describe(v: &ClusterView) -> String {
    let nodes: Vec<String> = v
        .expert_nodes
        .iter()
        .map(|r| format!("{} holds [{}]", r.name, r.held))
        .collect();
    let assigned: Vec<String> = v
        .assignments
        .iter()
        .map(|(n, a)| format!("{n} <- [{}]", a.experts))
        .collect();
    let attention: Vec<String> = v
        .attention_nodes
        .iter()
        .map(|a| format!("{} at v{}", a.name, a.placement_version))
        .collect();
    format!(
        "version {} ({:?}); {nodes:?}; assigned {assigned:?}; attention {attention:?}; leader {:?}; \
         last outcome {:?}",
        v.version(),
        v.current.as_ref().map(|d| &d.nodes),
        v.leader,
        v.status.as_ref().map(|s| &s.last_outcome),
    )
}

/// Polls the cluster until `f` says yes; panics with the last view after `limit`.
async fn wait_view<T>(
    store: &dyn Store,
    what: &str,
    limit: Duration,
    mut f: impl FnMut(&ClusterView) -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = view(store).await;
        if let Some(t) = f(&v) {
            return t;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {limit:?}; last seen: {}", describe(&v));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn current_version(store: &dyn Store) -> u64 {
    store
        .get(&keys().current())
        .await
        .expect("get current")
        .map_or(0, |kv| {
            String::from_utf8_lossy(&kv.value)
                .trim()
                .parse()
                .expect("a version number")
        })
}

async fn doc(store: &dyn Store, version: u64) -> PlacementDoc {
    let kv = store
        .get(&keys().version(version))
        .await
        .expect("get version")
        .unwrap_or_else(|| panic!("version {version} is stored"));
    decode(&kv).expect("a placement doc")
}

/// Every version stored, in order.
async fn versions(store: &dyn Store) -> Vec<u64> {
    let (kvs, _) = store.list(&keys().versions()).await.expect("list versions");
    kvs.iter()
        .map(|kv| decode::<PlacementDoc>(kv).expect("a placement doc").version)
        .collect()
}

async fn status(store: &dyn Store) -> ControllerStatus {
    view(store)
        .await
        .status
        .expect("the controller saved its status")
}

fn sets(doc: &PlacementDoc) -> BTreeMap<String, ExpertSet> {
    doc.sets().into_iter().collect()
}

fn node_set(doc: &PlacementDoc, node: &str) -> ExpertSet {
    sets(doc)
        .remove(node)
        .unwrap_or_else(|| ExpertSet::none(doc.num_experts))
}

/// Every expert has a holder in `doc`.
fn assert_covers_all(doc: &PlacementDoc) {
    let all = sets(doc)
        .values()
        .fold(ExpertSet::none(doc.num_experts), |acc, s| acc.union(s));
    assert_eq!(
        all.len(),
        doc.num_experts,
        "version {} leaves experts without a holder: {:?}",
        doc.version,
        doc.nodes
    );
}

/// Each node of `doc` held its set at `published_by` (when an attention node was handed the
/// version, which is after it was published and before any of its copies may be dropped).
fn assert_loaded_before(nodes: &[ExpertNode], doc: &PlacementDoc, published_by: Instant) {
    for (name, want) in sets(doc) {
        let node = nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("version {} names unknown node {name}", doc.version));
        let then = node.holder.held_at(published_by);
        assert!(
            covers(&then, &want),
            "version {} was handed to an attention node while {name} held [{then}], not [{want}]",
            doc.version
        );
    }
}

/// Writes what `myriad control` writes to ask for a drain or a rebalance.
async fn request(store: &dyn Store, key: &str, id: u64) {
    let r = Request {
        id,
        extra_replicas: None,
    };
    store
        .put(key, encode(&r), None)
        .await
        .expect("write request");
}

/// A load report from an attention node that is not otherwise part of the test.
async fn report_load(store: &dyn Store, tokens: Vec<u64>) {
    let r = LoadReport {
        node: "loadgen".into(),
        window_secs: 30.0,
        tokens,
    };
    store
        .put(&keys().load("loadgen"), encode(&r), None)
        .await
        .expect("write load report");
}

// ---- the make-before-break monitor --------------------------------------------------------

struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<MonitorReport>,
}

#[derive(Debug, Default)]
struct MonitorReport {
    samples: usize,
    /// Published versions as they were seen, in order.
    published: Vec<u64>,
    /// Each distinct violation once.
    violations: Vec<String>,
    violating_samples: usize,
}

impl Monitor {
    /// Samples, until finished, the published version and the attention nodes' applied
    /// versions around a read of every expert node's held set. A version counts as in use for a
    /// sample only if it was the same before and after the read of the held sets; for those, a
    /// node's copy that is missing was missing while the version was in use.
    fn start(
        store: &Arc<dyn Store>,
        experts: &[&ExpertNode],
        attention: &[&AttentionNode],
    ) -> Self {
        let store = store.clone();
        let holders: Vec<(String, Arc<FakeHolder>)> = experts
            .iter()
            .map(|e| (e.name.clone(), e.holder.clone()))
            .collect();
        let sinks: Vec<(String, Arc<FakeSink>)> = attention
            .iter()
            .map(|a| (a.name.clone(), a.sink.clone()))
            .collect();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut report = MonitorReport::default();
            let mut docs: BTreeMap<u64, PlacementDoc> = BTreeMap::new();
            let applied = |sinks: &[(String, Arc<FakeSink>)]| -> Vec<u64> {
                sinks.iter().map(|(_, s)| *s.applied.borrow()).collect()
            };
            while !*stopped.borrow() {
                let a1 = applied(&sinks);
                let c1 = current_version(&*store).await;
                let held: BTreeMap<String, ExpertSet> = holders
                    .iter()
                    .map(|(name, h)| (name.clone(), h.held()))
                    .collect();
                let c2 = current_version(&*store).await;
                let a2 = applied(&sinks);
                report.samples += 1;
                for c in [c1, c2] {
                    if c > 0 && report.published.last() != Some(&c) {
                        report.published.push(c);
                    }
                }
                let mut in_use = Vec::new();
                if c1 == c2 && c1 > 0 {
                    in_use.push((c1, "the published version".to_string()));
                }
                for (i, (name, _)) in sinks.iter().enumerate() {
                    if a1[i] == a2[i] && a1[i] > 0 {
                        in_use.push((a1[i], format!("the version attention node {name} runs")));
                    }
                }
                for (version, what) in in_use {
                    if let Entry::Vacant(slot) = docs.entry(version) {
                        slot.insert(doc(&*store, version).await);
                    }
                    for (node, want) in sets(&docs[&version]) {
                        let Some(has) = held.get(&node) else { continue };
                        let missing = want.difference(has);
                        if missing.is_empty() {
                            continue;
                        }
                        report.violating_samples += 1;
                        let line = format!(
                            "{what}, v{version}, routes [{missing}] to {node}, which holds [{has}]"
                        );
                        if !report.violations.contains(&line) {
                            report.violations.push(line);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = stopped.changed() => {}
                }
            }
            report
        });
        Monitor { stop, task }
    }

    /// Stops sampling and asserts that no version in use ever lacked a copy.
    async fn finish(self) -> MonitorReport {
        self.stop.send_replace(true);
        let report = within("the monitor stops", SOON, self.task)
            .await
            .expect("the monitor ran");
        assert!(
            report.samples >= 10,
            "the monitor hardly ran: {} samples",
            report.samples
        );
        assert!(
            report.violations.is_empty(),
            "make-before-break broken in {} of {} samples (published {:?}):\n{}",
            report.violating_samples,
            report.samples,
            report.published,
            report.violations.join("\n")
        );
        report
    }
}

// ---- properties ---------------------------------------------------------------------------

/// A registration's keys live while it is kept alive, go with its lease when it is dropped,
/// go at once on `leave`, and come back under a new lease when the lease is lost underneath.
async fn registration_lives_with_its_lease(store: Arc<dyn Store>) {
    let kept = async {
        let reg = Registration::new(store.clone(), TTL)
            .await
            .expect("register");
        reg.put("/t/kept", b"a".to_vec()).await.expect("put");
        let lease = reg.lease();
        let until = Instant::now() + TTL * 5 / 2;
        while Instant::now() < until {
            let kv = store.get("/t/kept").await.expect("get");
            assert_eq!(
                kv.map(|kv| kv.lease),
                Some(Some(lease)),
                "kept alive, the key stays under its lease"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reg.renewals(), 0, "a lease kept alive is never lost");

        // Dropped without leaving (the keeper is aborted): the key outlives the process by at
        // most the TTL.
        drop(reg);
        let dropped = Instant::now();
        assert!(
            store.get("/t/kept").await.expect("get").is_some(),
            "dropping a registration does not revoke its lease"
        );
        within(
            "the dropped registration's key expires",
            TTL + EXPIRY_SLACK,
            async {
                while store.get("/t/kept").await.expect("get").is_some() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
        eprintln!(
            "key gone {:?} after the registration was dropped",
            dropped.elapsed()
        );
    };

    let left = async {
        let reg = Registration::new(store.clone(), TTL)
            .await
            .expect("register");
        reg.put("/t/left/1", b"x".to_vec()).await.expect("put");
        reg.put("/t/left/2", b"y".to_vec()).await.expect("put");
        reg.leave().await.expect("leave");
        let (kvs, _) = store.list("/t/left/").await.expect("list");
        assert!(kvs.is_empty(), "leave removes the keys at once: {kvs:?}");
    };

    let revoked = async {
        let reg = Registration::new(store.clone(), TTL)
            .await
            .expect("register");
        reg.put("/t/rev/a", b"1".to_vec()).await.expect("put");
        reg.put("/t/rev/a", b"2".to_vec()).await.expect("put again");
        reg.put("/t/rev/b", b"3".to_vec()).await.expect("put");
        assert!(
            reg.create("/t/rev/mine", b"m".to_vec())
                .await
                .expect("create")
        );
        assert!(
            reg.create("/t/rev/taken", b"t".to_vec())
                .await
                .expect("create")
        );
        let old = reg.lease();
        store
            .revoke(old)
            .await
            .expect("revoke the lease underneath");
        // Someone else takes one of its exclusive keys while it is down.
        store
            .put("/t/rev/taken", b"other".to_vec(), None)
            .await
            .expect("put");

        within("the keeper re-registers", SOON, async {
            while reg.renewals() == 0 || store.get("/t/rev/mine").await.expect("get").is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let new = reg.lease();
        assert_ne!(new, old, "a new lease");
        assert_eq!(reg.renewals(), 1);
        let (kvs, _) = store.list("/t/rev/").await.expect("list");
        let got: Vec<(&str, &[u8], Option<_>)> = kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.lease))
            .collect();
        assert_eq!(
            got,
            [
                ("/t/rev/a", &b"2"[..], Some(new)),
                ("/t/rev/b", &b"3"[..], Some(new)),
                ("/t/rev/mine", &b"m"[..], Some(new)),
                ("/t/rev/taken", &b"other"[..], None),
            ],
            "the latest values under the new lease; an exclusive key taken meanwhile is left"
        );
        assert!(reg.owns("/t/rev/mine").await.expect("owns"));
        assert!(!reg.owns("/t/rev/taken").await.expect("owns"));
        // The new lease is kept alive too.
        tokio::time::sleep(TTL * 3 / 2).await;
        assert!(store.get("/t/rev/a").await.expect("get").is_some());
        assert_eq!(reg.renewals(), 1);
        reg.leave().await.expect("leave");
    };

    tokio::join!(kept, left, revoked);
}

/// Nodes without experts and with equal memory get the experts spread evenly, each held by the
/// node the first version names, loaded before it is published.
async fn initial_placement_spreads_experts_evenly(store: Arc<dyn Store>) {
    let n = 18;
    let experts = expert_nodes(&store, 4, 32, n, Duration::from_millis(20)).await;
    let att = AttentionNode::start(&store, "a0", true).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&att]);
    let _controller = RunningController::start(&store, "c0", config(n, 4)).await;

    let published_by = att.offered(1).await;
    let v1 = doc(&*store, 1).await;
    assert_eq!(v1.reason, "initial");
    assert_eq!(v1.nodes.len(), 4, "{:?}", v1.nodes);
    assert_covers_all(&v1);
    let sizes: Vec<usize> = sets(&v1).values().map(ExpertSet::len).collect();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        n,
        "one copy of each expert: {sizes:?}"
    );
    let (min, max) = (
        sizes.iter().min().expect("nodes"),
        sizes.iter().max().expect("nodes"),
    );
    assert!(max - min <= 1, "balanced within one expert: {sizes:?}");
    for node in &experts {
        assert_eq!(
            node.held(),
            node_set(&v1, &node.name),
            "{} holds its set",
            node.name
        );
    }
    assert_loaded_before(&experts, &v1, published_by);
    for (name, addr) in v1.nodes.iter().map(|p| (&p.name, &p.addr)) {
        assert_eq!(
            addr,
            &format!("{name}.test:4000"),
            "addresses come from the records"
        );
    }

    wait_view(&*store, "the attention node reports version 1", SOON, |v| {
        (v.attention_nodes.len() == 1 && v.attention_nodes[0].placement_version == 1).then_some(())
    })
    .await;
    // Nothing more happens: the placement stays, nobody loads anything again.
    tokio::time::sleep(TICK * 6).await;
    assert_eq!(versions(&*store).await, [1]);
    for node in &experts {
        assert_eq!(node.holder.changes(), 1, "{} loaded once", node.name);
        assert_eq!(node.held(), node_set(&v1, &node.name));
    }
    let report = monitor.finish().await;
    assert_eq!(report.published, [1]);
}

/// Nodes started with sets that together cover every expert are adopted as they are.
async fn initial_placement_adopts_held_sets(store: Arc<dyn Store>) {
    let n = 16;
    let given = [("e0", "0-7"), ("e1", "6-11"), ("e2", "12-15")];
    let mut experts = Vec::new();
    for (name, spec) in given {
        experts.push(
            ExpertNode::start(&store, name, 16, set(spec, n), Duration::from_millis(20)).await,
        );
    }
    let att = AttentionNode::start(&store, "a0", true).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&att]);
    let _controller = RunningController::start(&store, "c0", config(n, 3)).await;

    att.offered(1).await;
    let v1 = doc(&*store, 1).await;
    let placed: Vec<(&str, &str)> = v1
        .nodes
        .iter()
        .map(|p| (p.name.as_str(), p.experts.as_str()))
        .collect();
    assert_eq!(placed, given, "adopted unchanged");
    // The assignments say what they hold, and after the cleanup they still hold it.
    wait_view(
        &*store,
        "assignments and the attention node settle",
        SOON,
        |v| {
            let assigned: Vec<(&str, &str)> = v
                .assignments
                .iter()
                .map(|(k, a)| (k.as_str(), a.experts.as_str()))
                .collect();
            (assigned == given && v.attention_nodes.iter().all(|a| a.placement_version == 1))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(TICK * 4).await;
    for node in &experts {
        assert_eq!(
            node.holder.changes(),
            0,
            "{} never loaded or dropped",
            node.name
        );
    }
    assert_eq!(versions(&*store).await, [1]);
    monitor.finish().await;
}

/// Draining a node: the survivors load its experts before the new version is published, and it
/// keeps its copies until every attention node runs the new version.
async fn drain_is_make_before_break(store: Arc<dyn Store>) {
    let n = 16;
    let experts = expert_nodes(&store, 3, 16, n, Duration::from_millis(100)).await;
    let fast = AttentionNode::start(&store, "a0", true).await;
    let slow = AttentionNode::start(&store, "a1", false).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&fast, &slow]);
    let _controller = RunningController::start(&store, "c0", config(n, 3)).await;

    slow.offered(1).await;
    slow.apply(1);
    let v1 = doc(&*store, 1).await;
    wait_view(
        &*store,
        "both attention nodes report version 1",
        SOON,
        |v| {
            (v.attention_nodes.len() == 2
                && v.attention_nodes.iter().all(|a| a.placement_version == 1))
            .then_some(())
        },
    )
    .await;

    request(&*store, &keys().drain_request("e1"), 11).await;
    let published_by = fast.offered(2).await;
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "drain of e1");
    assert!(v2.nodes.iter().all(|p| p.name != "e1"), "{:?}", v2.nodes);
    assert_covers_all(&v2);
    for name in ["e0", "e2"] {
        assert!(
            covers(&node_set(&v2, name), &node_set(&v1, name)),
            "{name} keeps its copies"
        );
    }
    assert_loaded_before(&experts, &v2, published_by);

    // a1 still runs version 1: e1 keeps its copies, whatever the controller does meanwhile.
    let v1_e1 = node_set(&v1, "e1");
    let until = Instant::now() + TICK * 8;
    while Instant::now() < until {
        assert_eq!(
            experts[1].held(),
            v1_e1,
            "e1 keeps its copies while a1 runs v1"
        );
        let v = view(&*store).await;
        assert_eq!(
            v.assignments["e1"].experts,
            v1_e1.to_string(),
            "e1 stays assigned its copies while a1 runs v1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&*store).await;
    assert_eq!(s.drains, 1);
    assert_eq!(s.last_outcome, "drained e1");
    assert!(
        view(&*store).await.drain_requests.is_empty(),
        "the request is done"
    );

    slow.apply(2);
    wait_until("the old copies are dropped", SOON, || {
        experts.iter().all(|e| e.held() == node_set(&v2, &e.name))
    })
    .await;
    assert!(experts[1].held().is_empty());
    assert_eq!(versions(&*store).await, [1, 2]);
    let report = monitor.finish().await;
    assert_eq!(report.published, [1, 2]);
}

/// A rebalance under skewed load: copies of hot experts move, loaded before the new version
/// is published, the old copies dropped only after every attention node runs it; the status
/// records the imbalance before and after.
async fn rebalance_under_skew_is_make_before_break(store: Arc<dyn Store>) {
    let n = 16;
    let experts = expert_nodes(&store, 4, 8, n, Duration::from_millis(60)).await;
    let fast = AttentionNode::start(&store, "a0", true).await;
    let slow = AttentionNode::start(&store, "a1", false).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&fast, &slow]);
    let _controller = RunningController::start(&store, "c0", config(n, 4)).await;

    slow.offered(1).await;
    slow.apply(1);
    let v1 = doc(&*store, 1).await;
    wait_view(
        &*store,
        "both attention nodes report version 1",
        SOON,
        |v| {
            (v.attention_nodes.len() == 2
                && v.attention_nodes.iter().all(|a| a.placement_version == 1))
            .then_some(())
        },
    )
    .await;

    // Every expert of e0 is hot.
    let hot = node_set(&v1, "e0");
    let tokens: Vec<u64> = (0..n)
        .map(|e| if hot.contains(e) { 1000 } else { 10 })
        .collect();
    report_load(&*store, tokens.clone()).await;
    request(&*store, &keys().rebalance_request(), 7).await;

    let published_by = fast.offered(2).await;
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "rebalance");
    assert_covers_all(&v2);
    assert_loaded_before(&experts, &v2, published_by);
    let s = wait_view(&*store, "the rebalance is recorded", SOON, |v| {
        v.status
            .clone()
            .filter(|s| s.last_request == Some(7) && v.rebalance_request.is_none())
    })
    .await;
    println!(
        "rebalance: imbalance {:.3} -> {:.3} ({})",
        s.imbalance_before, s.imbalance_after, s.last_outcome
    );
    assert_eq!(s.rebalances, 1);
    assert!(
        s.imbalance_after < s.imbalance_before,
        "imbalance {} -> {}",
        s.imbalance_before,
        s.imbalance_after
    );
    let load: Vec<f64> = tokens.iter().map(|&t| t as f64).collect();
    let as_assignment = |d: &PlacementDoc| -> Vec<NodeAssignment> {
        d.sets()
            .into_iter()
            .map(|(name, experts)| NodeAssignment { name, experts })
            .collect()
    };
    let before = eplb::imbalance(&as_assignment(&v1), &load);
    let after = eplb::imbalance(&as_assignment(&v2), &load);
    assert!(
        (s.imbalance_before - before).abs() < 1e-9,
        "{before} recorded as {}",
        s.imbalance_before
    );
    assert!(
        (s.imbalance_after - after).abs() < 1e-9,
        "{after} recorded as {}",
        s.imbalance_after
    );
    assert!(after < 1.5, "the hot experts are spread: {after}");
    assert!(
        hot.iter().any(|e| !node_set(&v2, "e0").contains(e)),
        "some hot expert moved off e0"
    );

    // a1 still runs version 1: every node keeps its old copies next to its new ones.
    let until = Instant::now() + TICK * 8;
    while Instant::now() < until {
        for e in &experts {
            let both = node_set(&v1, &e.name).union(&node_set(&v2, &e.name));
            assert_eq!(
                e.held(),
                both,
                "{} holds old and new while a1 runs v1",
                e.name
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    slow.apply(2);
    wait_until("the old copies are dropped", SOON, || {
        experts.iter().all(|e| e.held() == node_set(&v2, &e.name))
    })
    .await;
    assert_eq!(versions(&*store).await, [1, 2]);
    monitor.finish().await;
}

/// Two changes in a row while an attention node still runs the version before both: the second
/// change must not drop the copies that node routes to.
async fn changes_keep_the_copies_a_lagging_node_uses(store: Arc<dyn Store>) {
    let n = 16;
    let experts = expert_nodes(&store, 4, 8, n, Duration::from_millis(40)).await;
    let fast = AttentionNode::start(&store, "a0", true).await;
    let slow = AttentionNode::start(&store, "a1", false).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&fast, &slow]);
    let _controller = RunningController::start(&store, "c0", config(n, 4)).await;

    slow.offered(1).await;
    slow.apply(1);
    let v1 = doc(&*store, 1).await;
    wait_view(
        &*store,
        "both attention nodes report version 1",
        SOON,
        |v| {
            (v.attention_nodes.len() == 2
                && v.attention_nodes.iter().all(|a| a.placement_version == 1))
            .then_some(())
        },
    )
    .await;

    let hot = node_set(&v1, "e0");
    report_load(
        &*store,
        (0..n)
            .map(|e| if hot.contains(e) { 1000 } else { 10 })
            .collect(),
    )
    .await;
    request(&*store, &keys().rebalance_request(), 1).await;
    fast.offered(2).await;
    request(&*store, &keys().drain_request("e3"), 2).await;
    fast.offered(3).await;
    let (v2, v3) = (doc(&*store, 2).await, doc(&*store, 3).await);
    assert_eq!(v3.reason, "drain of e3");
    assert_covers_all(&v3);
    assert_eq!(slow.applied(), 1, "a1 still runs version 1");

    let until = Instant::now() + TICK * 6;
    while Instant::now() < until {
        for e in &experts {
            let want = [&v1, &v2, &v3].iter().fold(ExpertSet::none(n), |acc, d| {
                acc.union(&node_set(d, &e.name))
            });
            assert!(
                covers(&e.held(), &want),
                "{} must hold [{want}] while versions 1-3 are in use, holds [{}]",
                e.name,
                e.held()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    slow.apply(3);
    wait_until("only version 3's copies are left", SOON, || {
        experts.iter().all(|e| e.held() == node_set(&v3, &e.name))
    })
    .await;
    assert!(experts[3].held().is_empty());
    monitor.finish().await;
}

/// A controller that takes over in the middle of a change finishes its cleanup; a change that
/// comes while a node is still dropping copies must not count a copy being dropped as held.
async fn a_change_waits_for_drops_in_flight(store: Arc<dyn Store>) {
    let n = 16;
    // As a controller that died between publishing and cleaning up left it: version 1 moved
    // experts 8-15 from e0 to e1; e0 is still assigned (and holds) everything.
    let v1 = PlacementDoc {
        version: 1,
        num_experts: n,
        nodes: vec![
            PlacedNode {
                name: "e0".into(),
                addr: "e0.test:4000".into(),
                experts: "0-7".into(),
            },
            PlacedNode {
                name: "e1".into(),
                addr: "e1.test:4000".into(),
                experts: "8-15".into(),
            },
        ],
        reason: "rebalance".into(),
    };
    let k = keys();
    store
        .put(&k.version(1), encode(&v1), None)
        .await
        .expect("put");
    store
        .put(&k.current(), b"1".to_vec(), None)
        .await
        .expect("put");
    for (node, spec, serial) in [("e0", "0-15", 1), ("e1", "8-15", 2)] {
        let a = Assignment {
            experts: spec.into(),
            serial,
            urgent: false,
        };
        store
            .put(&k.assignment(node), encode(&a), None)
            .await
            .expect("put");
    }
    let delay = Duration::from_millis(300);
    let experts = vec![
        ExpertNode::start(&store, "e0", 16, ExpertSet::all(n), delay).await,
        ExpertNode::start(&store, "e1", 16, set("8-15", n), delay).await,
    ];
    let att = AttentionNode::start(&store, "a0", true).await;
    att.offered(1).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&att]);
    wait_view(&*store, "the attention node reports version 1", SOON, |v| {
        (v.attention_nodes.len() == 1 && v.attention_nodes[0].placement_version == 1).then_some(())
    })
    .await;

    let _controller = RunningController::start(&store, "c0", config(n, 2)).await;
    // The new leader drops e0's old copies; while e0 is at it, e1 is drained, which gives e0
    // the experts it is dropping right now.
    wait_view(&*store, "the cleanup is assigned", SOON, |v| {
        v.assignments
            .get("e0")
            .is_some_and(|a| a.experts == "0-7")
            .then_some(())
    })
    .await;
    request(&*store, &k.drain_request("e1"), 3).await;
    let published_by = att.offered(2).await;
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "drain of e1");
    assert_eq!(node_set(&v2, "e0"), ExpertSet::all(n));
    assert_loaded_before(&experts, &v2, published_by);
    wait_until("e0 holds everything and e1 nothing", SOON, || {
        experts[0].held() == ExpertSet::all(n) && experts[1].held().is_empty()
    })
    .await;
    monitor.finish().await;
}

/// A node that dies (lease expired) is failed over: the next version leaves it out and every
/// expert is held by a live node.
async fn failover_replaces_a_crashed_node(store: Arc<dyn Store>) {
    let n = 16;
    let experts = expert_nodes(&store, 3, 16, n, Duration::from_millis(20)).await;
    let att = AttentionNode::start(&store, "a0", true).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&att]);
    let _controller = RunningController::start(&store, "c0", config(n, 3)).await;

    att.offered(1).await;
    let v1 = doc(&*store, 1).await;
    assert!(!node_set(&v1, "e1").is_empty());

    experts[1].crash().await;
    let crashed = Instant::now();
    let published_by = within(
        "the failover",
        TTL + EXPIRY_SLACK + Duration::from_secs(1),
        att.offered(2),
    )
    .await;
    eprintln!("failed over {:?} after the crash", crashed.elapsed());
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "failover of e1");
    assert!(v2.nodes.iter().all(|p| p.name != "e1"), "{:?}", v2.nodes);
    assert_covers_all(&v2);
    let live = [&experts[0], &experts[2]];
    for e in live {
        assert!(
            covers(&e.held(), &node_set(&v2, &e.name)),
            "{} holds its set",
            e.name
        );
    }
    assert_loaded_before(&experts, &v2, published_by);
    let s = wait_view(&*store, "the failover is recorded", SOON, |v| {
        v.status.clone().filter(|s| s.failovers > 0)
    })
    .await;
    assert_eq!(s.failovers, 1);
    assert_eq!(s.last_outcome, "failed over e1");

    // It happens once: the cluster then settles on version 2.
    tokio::time::sleep(TICK * 6).await;
    let v = view(&*store).await;
    assert_eq!(v.version(), 2);
    assert_eq!(v.status.expect("status").failovers, 1);
    assert!(
        !v.assignments.contains_key("e1"),
        "the dead node's assignment is removed"
    );
    wait_until("the survivors hold exactly version 2", SOON, || {
        live.iter().all(|e| e.held() == node_set(&v2, &e.name))
    })
    .await;
    monitor.finish().await;
}

/// An expert node that keeps its lease but that an attention node reports unreachable (hung,
/// partitioned) is failed over once the report has lasted `suspect_after`. (That a report
/// withdrawn sooner changes nothing is a decision alone, shown on the machine's own clock in
/// `tests/machine`.)
async fn an_unreachable_node_is_replaced_while_registered(store: Arc<dyn Store>) {
    let n = 16;
    let k = Keys::new(CLUSTER);
    let _experts = expert_nodes(&store, 3, 16, n, Duration::from_millis(20)).await;
    let att = AttentionNode::start(&store, "a0", true).await;
    let mut c = config(n, 3);
    c.suspect_after = Duration::from_millis(600);
    let _controller = RunningController::start(&store, "c0", c).await;
    att.offered(1).await;

    let reported = Instant::now();
    store
        .put(&k.suspect("e1", "a0"), Vec::new(), None)
        .await
        .expect("put");
    within("the failover", Duration::from_secs(5), att.offered(2)).await;
    assert!(
        reported.elapsed() >= Duration::from_millis(600),
        "not before suspect_after"
    );
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "failover of e1");
    assert!(v2.nodes.iter().all(|p| p.name != "e1"));
    assert_covers_all(&v2);
    let v = view(&*store).await;
    assert!(v.expert_node("e1").is_some(), "e1 is still registered");
    assert_eq!(v.status.expect("status").failovers, 1);
}

/// Two controllers: one leads; when it dies the other takes over within the TTL and goes on
/// (counters continued, a drain done).
async fn leader_election_and_takeover(store: Arc<dyn Store>) {
    let n = 16;
    let experts = expert_nodes(&store, 3, 16, n, Duration::from_millis(20)).await;
    let att = AttentionNode::start(&store, "a0", true).await;
    let monitor = Monitor::start(&store, &experts.iter().collect::<Vec<_>>(), &[&att]);

    let first = RunningController::start(&store, "c1", config(n, 3)).await;
    wait_view(&*store, "c1 leads", SOON, |v| {
        (v.leader.as_deref() == Some("c1")).then_some(())
    })
    .await;
    let _second = RunningController::start(&store, "c2", config(n, 3)).await;
    att.offered(1).await;
    wait_view(&*store, "c1 records the initial placement", SOON, |v| {
        v.status.is_some().then_some(())
    })
    .await;
    // Only the leader acts: c2 never takes the key nor writes the status while c1 lives.
    let until = Instant::now() + TICK * 6;
    while Instant::now() < until {
        let v = view(&*store).await;
        assert_eq!(v.leader.as_deref(), Some("c1"));
        assert_eq!(v.status.as_ref().map(|s| s.leader.as_str()), Some("c1"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_view(&*store, "version 1 is in use", SOON, |v| {
        v.attention_nodes
            .iter()
            .all(|a| a.placement_version == 1)
            .then_some(())
    })
    .await;

    first.crash().await;
    let crashed = Instant::now();
    wait_view(
        &*store,
        "c2 takes over",
        TTL + EXPIRY_SLACK + Duration::from_secs(1),
        |v| (v.leader.as_deref() == Some("c2")).then_some(()),
    )
    .await;
    eprintln!("c2 took over {:?} after c1 died", crashed.elapsed());

    request(&*store, &keys().drain_request("e0"), 5).await;
    att.offered(2).await;
    let v2 = doc(&*store, 2).await;
    assert_eq!(v2.reason, "drain of e0");
    assert_covers_all(&v2);
    let s = wait_view(&*store, "c2 records the drain", SOON, |v| {
        v.status.clone().filter(|s| s.drains == 1)
    })
    .await;
    assert_eq!(s.leader, "c2");
    assert_eq!(view(&*store).await.leader.as_deref(), Some("c2"));
    wait_until("e0's copies are dropped", SOON, || {
        experts[0].held().is_empty()
    })
    .await;
    assert_eq!(versions(&*store).await, [1, 2]);
    monitor.finish().await;
}

// ---- the two stores ----------------------------------------------------------------------

macro_rules! both_stores {
    ($($property:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let store: std::sync::Arc<dyn myriad_control::Store> =
                        std::sync::Arc::new(myriad_control::MemoryStore::new());
                    super::$property(store).await;
                }
            )*
        }

        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let (_server, store) = super::etcd().await;
                    super::$property(store).await;
                }
            )*
        }
    };
}

both_stores!(
    registration_lives_with_its_lease,
    initial_placement_spreads_experts_evenly,
    initial_placement_adopts_held_sets,
    drain_is_make_before_break,
    rebalance_under_skew_is_make_before_break,
    changes_keep_the_copies_a_lagging_node_uses,
    a_change_waits_for_drops_in_flight,
    failover_replaces_a_crashed_node,
    an_unreachable_node_is_replaced_while_registered,
    leader_election_and_takeover,
);

async fn etcd() -> (EtcdServer, Arc<dyn Store>) {
    let server = EtcdServer::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[server.endpoint()])
        .await
        .expect("connect to etcd");
    (server, Arc::new(store))
}

// ---- beyond the shared properties ---------------------------------------------------------

/// An attention node that switches versions while etcd is down still reports the switch once
/// etcd is back, so the old copies are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_while_an_attention_node_switches() {
    let (mut server, store) = etcd().await;
    let n = 16;
    let experts = expert_nodes(&store, 2, 16, n, Duration::from_millis(20)).await;
    let att = AttentionNode::start(&store, "a0", false).await;
    let _controller = RunningController::start(&store, "c0", config(n, 2)).await;
    att.offered(1).await;
    att.apply(1);
    request(&*store, &keys().drain_request("e1"), 1).await;
    att.offered(2).await;
    let v2 = doc(&*store, 2).await;

    server.stop();
    att.apply(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await.expect("restart etcd");
    wait_view(&*store, "a0's record catches up", SOON, |v| {
        v.attention_nodes
            .iter()
            .any(|a| a.name == "a0" && a.placement_version == 2)
            .then_some(())
    })
    .await;
    wait_until("the old copies are dropped", SOON, || {
        experts.iter().all(|e| e.held() == node_set(&v2, &e.name))
    })
    .await;
}
