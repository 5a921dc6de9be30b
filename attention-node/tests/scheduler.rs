//! The scheduler end to end on a real (tiny) model: streamed results equal `Engine::generate`
//! bitwise, requests join a running batch, long prompts are prefilled in chunks between the
//! tokens of running streams, cancellation frees state, admission is bounded by memory and by
//! the waiting queue, and a failed step fails only its requests.
//!
//! Nothing here asserts on timing: interleaving is checked through the order of events (an
//! event received means every event the scheduler sent before it is already in its channel),
//! and where a test needs a request to still be running at some point, the test experts hold
//! the scheduler thread at the start of a step (a step gate) instead of hoping the request is
//! long enough. Waits have a generous deadline only so that a broken scheduler fails instead
//! of hanging.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use myriad_attention::LayerState;
use myriad_attention::scheduler::{Scheduler, sequence_bytes};
use myriad_attention::{
    Completion, Engine, EngineConfig, Event, FinishReason, Generate, Model, PositionLogprobs,
    Request, SamplingParams, SchedulerConfig, SchedulerStats, Submission, SubmitError,
};
use myriad_expert::ExpertShard;
use myriad_kernels::cpu::CpuBackend;
use myriad_kernels::{Backend, Routes, SeqSpan};
use myriad_model::moe::{ExpertError, ExpertExecutor};
use myriad_model::{Checkpoint, ExpertSet, GenerationConfig, ModelConfig};

/// Far longer than any wait here should take; only a hung scheduler reaches it.
const PATIENCE: Duration = Duration::from_secs(120);

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5_moe-tiny")
}

/// Routed experts that can be told to fail (or panic) once, to break a step on purpose, and
/// that can hold the scheduler thread at the start of a step.
struct TestExperts {
    inner: ExpertShard<CpuBackend>,
    /// 0: work; 1: fail the next call; 2: panic in the next call.
    mode: AtomicU8,
    /// Steps that may start (None: any number); a step beyond them waits in `begin_step`.
    permits: Mutex<Option<usize>>,
    changed: Condvar,
}

impl TestExperts {
    /// Lets exactly `n` more steps start (None: all of them).
    fn permit(&self, n: Option<usize>) {
        *self.permits.lock().unwrap() = n;
        self.changed.notify_all();
    }

    /// Lets one more step start.
    fn permit_one_more(&self) {
        let mut p = self.permits.lock().unwrap();
        if let Some(n) = p.as_mut() {
            *n += 1;
        }
        self.changed.notify_all();
    }
}

impl ExpertExecutor<CpuBackend> for TestExperts {
    fn begin_step(&self) {
        let mut p = self.permits.lock().unwrap();
        while *p == Some(0) {
            p = self.changed.wait(p).unwrap();
        }
        if let Some(n) = p.as_mut() {
            *n -= 1;
        }
        drop(p);
        self.inner.begin_step();
    }

    fn end_step(&self) {
        self.inner.end_step();
    }

    fn run(
        &self,
        layer: usize,
        x: &<CpuBackend as Backend>::Tensor,
        routes: &Routes,
        out: &mut <CpuBackend as Backend>::Tensor,
    ) -> Result<(), ExpertError> {
        match self.mode.swap(0, Ordering::SeqCst) {
            1 => Err(ExpertError::Remote {
                layer,
                reason: "injected failure".into(),
            }),
            2 => panic!("injected panic"),
            _ => self.inner.run(layer, x, routes, out),
        }
    }
}

struct Loaded {
    engine: Arc<Engine<CpuBackend>>,
    config: ModelConfig,
    experts: Arc<TestExperts>,
}

/// Opens the step gate when dropped, so that a failing test cannot leave the scheduler thread
/// waiting (dropping the scheduler joins it). Declare it after the scheduler.
struct OpenGate<'a>(&'a TestExperts);

impl Drop for OpenGate<'_> {
    fn drop(&mut self) {
        self.0.permit(None);
    }
}

/// The tiny fixture on one CPU thread (tests run in parallel on few cores).
fn load(engine: EngineConfig) -> Loaded {
    let dir = fixture();
    let config = ModelConfig::from_dir(&dir).unwrap();
    let generation = GenerationConfig::from_dir(&dir, &config).unwrap();
    let ckpt = Checkpoint::open(&dir, &config).unwrap();
    let backend = Arc::new(CpuBackend::new(1));
    let shard = ExpertShard::load(
        backend.clone(),
        &config,
        &ckpt,
        &ExpertSet::all(config.num_experts),
    )
    .unwrap();
    let experts = Arc::new(TestExperts {
        inner: shard,
        mode: AtomicU8::new(0),
        permits: Mutex::new(None),
        changed: Condvar::new(),
    });
    let model = Model::load(config.clone(), backend, &ckpt, experts.clone()).unwrap();
    Loaded {
        engine: Arc::new(Engine::new(model, engine, generation.eos_token_ids)),
        config,
        experts,
    }
}

/// A deterministic prompt of ordinary (non-special) token ids.
fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((seed * 7919 + i * 104_729 + 13) % 1000) as u32)
        .collect()
}

/// A greedy request that runs to `max_tokens` whatever it generates.
fn long(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        ignore_eos: true,
        ..Request::greedy(prompt, max_tokens)
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
}

/// A submission and the events received from it so far.
struct Stream {
    sub: Submission,
    events: Vec<Event>,
}

impl Stream {
    fn new(sub: Submission) -> Self {
        Stream {
            sub,
            events: Vec::new(),
        }
    }

    /// Waits for the next event.
    fn next(&mut self) -> Event {
        let rx = &mut self.sub.events;
        let got = RUNTIME
            .with(|rt| rt.block_on(async { tokio::time::timeout(PATIENCE, rx.recv()).await }));
        let event = got
            .unwrap_or_else(|_| panic!("request {}: no event within {PATIENCE:?}", self.sub.id))
            .unwrap_or_else(|| panic!("request {}: stream closed early", self.sub.id));
        self.events.push(event.clone());
        event
    }

    /// Takes every event already sent, without waiting.
    fn drain(&mut self) {
        while let Ok(e) = self.sub.events.try_recv() {
            self.events.push(e);
        }
    }

    /// Waits for the final event.
    fn finish(&mut self) -> &Event {
        while !self.ended() {
            self.next();
        }
        self.events.last().unwrap()
    }

    fn ended(&self) -> bool {
        matches!(
            self.events.last(),
            Some(Event::Finished { .. } | Event::Failed(_))
        )
    }

    fn tokens(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count()
    }

    fn has_finished(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Finished { .. }))
    }
}

/// A log-probability with its floats as bits, so that equality is bitwise.
#[derive(Debug, PartialEq)]
struct Bits {
    token_id: u32,
    logprob: u32,
    top: Vec<(u32, u32)>,
}

fn bits(p: &PositionLogprobs) -> Bits {
    Bits {
        token_id: p.token_id,
        logprob: p.logprob.to_bits(),
        top: p
            .top
            .iter()
            .map(|t| (t.token_id, t.logprob.to_bits()))
            .collect(),
    }
}

/// A request's outcome in comparable form.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    logprobs: Option<Vec<Option<Bits>>>,
    reason: FinishReason,
}

impl Outcome {
    fn of(c: &Completion) -> Self {
        Outcome {
            tokens: c.token_ids.clone(),
            logprobs: c
                .logprobs
                .as_ref()
                .map(|v| v.iter().map(|p| p.as_ref().map(bits)).collect()),
            reason: c.finish_reason,
        }
    }

    /// Rebuilds a completion from a finished stream, checking the event protocol on the way:
    /// prompt log-probabilities first and only with echo + logprobs, log-probabilities on
    /// every token exactly when asked for, one `Finished` last with the right counts.
    fn streamed(r: &Request, events: &[Event]) -> Self {
        let echo_lp = r.echo && r.logprobs.is_some();
        let mut logprobs = r.logprobs.map(|_| Vec::new());
        let mut tokens = Vec::new();
        let mut reason = None;
        for (i, e) in events.iter().enumerate() {
            assert!(reason.is_none(), "an event after Finished: {e:?}");
            match e {
                Event::PromptLogprobs(p) => {
                    assert!(echo_lp && i == 0, "unexpected prompt log-probs at {i}");
                    assert_eq!(p.len(), r.prompt.len());
                    if let Some(v) = logprobs.as_mut() {
                        v.extend(p.iter().map(|p| p.as_ref().map(bits)));
                    }
                }
                Event::Token { id, logprobs: lp } => {
                    assert_eq!(lp.is_some(), r.logprobs.is_some(), "token log-probs");
                    if let (Some(v), Some(p)) = (logprobs.as_mut(), lp) {
                        v.push(Some(bits(p)));
                    }
                    tokens.push(*id);
                }
                Event::Finished {
                    reason: why,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    assert_eq!(*prompt_tokens, r.prompt.len());
                    assert_eq!(*completion_tokens, tokens.len());
                    reason = Some(*why);
                }
                Event::Failed(m) | Event::Unavailable(m) => panic!("request failed: {m}"),
            }
        }
        if echo_lp {
            assert!(
                matches!(events.first(), Some(Event::PromptLogprobs(_))),
                "echo + logprobs starts with the prompt log-probs"
            );
        }
        Outcome {
            tokens,
            logprobs,
            reason: reason.expect("the stream ends with Finished"),
        }
    }
}

fn solo(engine: &Engine<CpuBackend>, r: &Request) -> Outcome {
    Outcome::of(&engine.generate(std::slice::from_ref(r)).unwrap()[0])
}

/// Polls the stats until `done` holds (the scheduler updates them after each step).
fn wait_stats(s: &Scheduler, what: &str, done: impl Fn(&SchedulerStats) -> bool) -> SchedulerStats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = s.stats();
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed {what}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn streams_equal_generate_bitwise() {
    let m = load(EngineConfig::default());
    let requests = vec![
        Request::greedy(prompt(1, 9), 12),
        Request {
            echo: true,
            logprobs: Some(3),
            ..Request::greedy(prompt(2, 7), 5)
        },
        Request {
            echo: true,
            logprobs: Some(2),
            ..Request::greedy(prompt(3, 6), 0)
        },
        Request::greedy(prompt(4, 5), 0),
        Request {
            logprobs: Some(1),
            sampling: SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                top_k: 50,
                seed: Some(7),
            },
            ..long(prompt(5, 11), 8)
        },
        Request {
            echo: true,
            ..long(prompt(6, 1), 6)
        },
    ];
    let expected = m.engine.generate(&requests).unwrap();
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    assert_eq!(s.max_context(), m.config.max_position_embeddings);
    let mut streams: Vec<Stream> = requests
        .iter()
        .map(|r| Stream::new(s.submit(r.clone()).unwrap()))
        .collect();
    for ((r, st), want) in requests.iter().zip(&mut streams).zip(&expected) {
        st.finish();
        assert_eq!(Outcome::streamed(r, &st.events), Outcome::of(want));
    }
    // Requests were streamed to completion one after another as well.
    for (r, want) in requests.iter().zip(&expected) {
        let mut st = Stream::new(s.submit(r.clone()).unwrap());
        st.finish();
        assert_eq!(Outcome::streamed(r, &st.events), Outcome::of(want));
    }
    let st = wait_stats(&s, "all requests done", |st| st.running == 0);
    assert_eq!((st.waiting, st.reserved_bytes, st.cancelled), (0, 0, 0));
    let prompts: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let generated: usize = expected.iter().map(|c| c.token_ids.len()).sum();
    // Requests with max_tokens 0 and no prompt log-probs are never prefilled.
    let skipped = requests[3].prompt.len();
    assert_eq!(st.prompt_tokens, 2 * (prompts - skipped) as u64);
    assert_eq!(st.generated_tokens, 2 * generated as u64);
}

#[test]
fn requests_join_a_running_batch() {
    let m = load(EngineConfig::default());
    let a = long(prompt(10, 8), 100);
    let b = Request::greedy(prompt(11, 5), 4);
    let (want_a, want_b) = (solo(&m.engine, &a), solo(&m.engine, &b));
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    let _open = OpenGate(&m.experts);
    // A runs three steps (three tokens) and is held at the start of its fourth.
    m.experts.permit(Some(3));
    let mut sa = Stream::new(s.submit(a.clone()).unwrap());
    for _ in 0..3 {
        assert!(matches!(sa.next(), Event::Token { .. }));
    }
    let mut sb = Stream::new(s.submit(b.clone()).unwrap());
    m.experts.permit(None);
    sb.finish();
    // Everything sent to A before B's `Finished` is in A's channel by now.
    sa.drain();
    assert!(
        !sa.has_finished(),
        "A ({} tokens) finished before B ({} tokens) joined and ended",
        a.max_tokens,
        b.max_tokens
    );
    let a_at_b_end = sa.events.len();
    sa.finish();
    assert!(
        sa.events[a_at_b_end..]
            .iter()
            .any(|e| matches!(e, Event::Token { .. })),
        "A kept producing tokens after B ended"
    );
    assert_eq!(Outcome::streamed(&a, &sa.events), want_a);
    assert_eq!(Outcome::streamed(&b, &sb.events), want_b);
}

#[test]
fn long_prompt_is_prefilled_between_tokens_of_running_streams() {
    let max_batch_tokens = 16;
    let m = load(EngineConfig {
        max_batch_tokens,
        ..EngineConfig::default()
    });
    let b = Request::greedy(prompt(21, 200), 2);
    let want_b = solo(&m.engine, &b);
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    let _open = OpenGate(&m.experts);
    m.experts.permit(Some(2));
    let mut sa = Stream::new(s.submit(long(prompt(20, 4), 1000)).unwrap());
    sa.next();
    sa.next();
    let mut sb = Stream::new(s.submit(b.clone()).unwrap());
    m.experts.permit(None);
    assert!(matches!(sb.next(), Event::Token { .. }));
    // Every token A got up to the step that sampled B's first token is in A's channel now.
    sa.drain();
    let during = sa.tokens() - 2;
    // A decodes one token per step, so B gets 15 tokens of each step's budget: its prompt
    // takes at least 200 / 15 steps, and A must have been served in every one of them.
    let prefill_steps = b.prompt.len().div_ceil(max_batch_tokens - 1);
    assert!(
        during >= prefill_steps,
        "A got {during} tokens while B's {}-token prompt was prefilled (≥ {prefill_steps} steps)",
        b.prompt.len()
    );
    sb.finish();
    assert_eq!(Outcome::streamed(&b, &sb.events), want_b);
    drop(sa);
    wait_stats(&s, "nothing running", |st| st.running == 0);
}

#[test]
fn dropping_a_submission_cancels_it() {
    // One sequence at a time: B waits while A runs.
    let m = load(EngineConfig {
        max_seqs: 1,
        ..EngineConfig::default()
    });
    let a = long(prompt(30, 6), 1000);
    let b = long(prompt(31, 6), 1000);
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    let _open = OpenGate(&m.experts);
    // What A holds after its prompt and first tokens: its attention layers' first blocks.
    let held = m.engine.model().kv_blocks_for(a.prompt.len() + 1) as u64;
    let bytes = held * m.engine.model().kv_block_bytes() as u64;
    m.experts.permit(Some(2));
    let mut sa = Stream::new(s.submit(a.clone()).unwrap());
    sa.next();
    sa.next();
    let sb = Stream::new(s.submit(b).unwrap());
    let st = s.stats();
    assert_eq!((st.running, st.waiting, st.reserved_bytes), (1, 1, bytes));
    assert_eq!(st.kv_blocks_used, held);
    // A waiting request whose client left is dropped before it is ever prefilled.
    drop(sb);
    m.experts.permit(Some(1));
    let st = wait_stats(&s, "B cancelled", |st| st.cancelled == 1);
    assert_eq!((st.running, st.waiting, st.reserved_bytes), (1, 0, bytes));
    assert_eq!(st.prompt_tokens, a.prompt.len() as u64);
    // A running one is dropped at the next step and its state freed.
    drop(sa);
    m.experts.permit(None);
    let st = wait_stats(&s, "A cancelled", |st| st.cancelled == 2);
    assert_eq!((st.running, st.waiting, st.reserved_bytes), (0, 0, 0));
    assert_eq!(m.engine.model().backend().kv_blocks_live(), 0);
    assert_eq!(st.prompt_tokens, a.prompt.len() as u64);
    assert!(st.generated_tokens >= 2);
    // The scheduler keeps serving.
    let c = Request::greedy(prompt(32, 5), 3);
    let mut sc = Stream::new(s.submit(c.clone()).unwrap());
    sc.finish();
    assert_eq!(Outcome::streamed(&c, &sc.events), solo(&m.engine, &c));
}

#[test]
fn admission_is_bounded_by_blocks_and_queue() {
    let m = load(EngineConfig::default());
    // Equal sizes, blocks for two prompts at a time: the others wait, first come first served.
    let requests: Vec<Request> = (0..5)
        .map(|i| Request::greedy(prompt(40 + i, 6), 5))
        .collect();
    let expected = m.engine.generate(&requests).unwrap();
    let block_bytes = m.engine.model().kv_block_bytes() as u64;
    let one = m.engine.model().kv_blocks_for(6 + 5) as u64 * block_bytes;
    assert_eq!(
        one,
        m.engine.model().kv_blocks_for(6 + 1) as u64 * block_bytes
    );
    let budget = 2 * one;
    let s = Scheduler::start(
        m.engine.clone(),
        SchedulerConfig {
            kv_cache_bytes: budget,
            max_waiting: 16,
        },
    );
    let mut streams: Vec<Stream> = requests
        .iter()
        .map(|r| Stream::new(s.submit(r.clone()).unwrap()))
        .collect();
    for j in 0..streams.len() {
        streams[j].next();
        let st = s.stats();
        assert!(st.running <= 2 && st.reserved_bytes <= budget, "{st:?}");
        // Request j was admitted only when at most one earlier one still ran, and its first
        // event was sent after the `Finished` of the others, which are now in their channels.
        for earlier in &mut streams[..j] {
            earlier.drain();
        }
        let finished = streams[..j].iter().filter(|e| e.has_finished()).count();
        assert!(
            finished + 1 >= j,
            "request {j} started while {} earlier ones ran",
            j - finished
        );
    }
    for ((r, st), want) in requests.iter().zip(&mut streams).zip(&expected) {
        st.finish();
        assert_eq!(Outcome::streamed(r, &st.events), Outcome::of(want));
    }
    drop(s);

    // The waiting queue is bounded: two long requests fill the sequence slots, two more
    // wait, the next is refused.
    let m = load(EngineConfig {
        max_seqs: 2,
        ..EngineConfig::default()
    });
    let a = long(prompt(50, 4), 1000);
    let budget = 2 * sequence_bytes(&m.config, &m.engine.model().kv_spec(), 4 + 1000);
    let s = Scheduler::start(
        m.engine.clone(),
        SchedulerConfig {
            kv_cache_bytes: budget,
            max_waiting: 2,
        },
    );
    let _open = OpenGate(&m.experts);
    // Step by step until both long requests run, so neither can end before the checks.
    m.experts.permit(Some(0));
    let running: Vec<Stream> = (0..2)
        .map(|_| Stream::new(s.submit(a.clone()).unwrap()))
        .collect();
    wait_stats(&s, "two running", |st| {
        m.experts.permit_one_more();
        st.running == 2
    });
    let w = Request::greedy(prompt(51, 4), 3);
    let mut waiting: Vec<Stream> = (0..2)
        .map(|_| Stream::new(s.submit(w.clone()).unwrap()))
        .collect();
    assert_eq!(s.stats().waiting, 2);
    match s.submit(w.clone()) {
        Err(SubmitError::Overloaded {
            waiting,
            retry_after,
        }) => {
            assert_eq!(waiting, 2);
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    // A request that could never fit, even alone.
    let huge = Request::greedy(prompt(52, 4), 4000);
    let need = s.context_blocks(&huge);
    let total = s.kv_blocks_total();
    assert!(need > total);
    match s.submit(huge) {
        Err(SubmitError::TooLarge(msg)) => {
            assert!(
                msg.contains(&format!("needs {need} KV blocks"))
                    && msg.contains(&format!("{total} blocks"))
                    && msg.contains("4004 tokens"),
                "{msg}"
            );
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Invalid requests.
    let vocab = m.config.vocab_size as u32;
    match s.submit(Request::greedy(vec![1, vocab, 2], 3)) {
        Err(SubmitError::Invalid(msg)) => assert!(msg.contains("vocabulary"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(matches!(
        s.submit(Request::greedy(Vec::new(), 3)),
        Err(SubmitError::Invalid(_))
    ));
    let st = s.stats();
    assert_eq!((st.rejected, st.running, st.waiting), (4, 2, 2));
    // Once the long ones go, the waiting ones run and complete.
    drop(running);
    m.experts.permit(None);
    let want = solo(&m.engine, &w);
    for st in &mut waiting {
        st.finish();
        assert_eq!(Outcome::streamed(&w, &st.events), want);
    }
    let st = wait_stats(&s, "everything done", |st| st.running == 0);
    assert_eq!((st.waiting, st.reserved_bytes, st.cancelled), (0, 0, 2));
}

#[test]
fn a_failed_step_fails_its_requests_and_serving_goes_on() {
    let m = load(EngineConfig::default());
    let b = Request::greedy(prompt(61, 5), 4);
    let want_b = solo(&m.engine, &b);
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    let _open = OpenGate(&m.experts);
    for (mode, what) in [(1, "injected failure"), (2, "injected panic")] {
        // A's first step runs; its second is held, then breaks.
        m.experts.permit(Some(1));
        let mut sa = Stream::new(s.submit(long(prompt(60, 5), 1000)).unwrap());
        sa.next();
        m.experts.mode.store(mode, Ordering::SeqCst);
        m.experts.permit(None);
        match sa.finish() {
            Event::Failed(msg) => assert!(msg.contains(what), "{msg}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        let st = wait_stats(&s, "the failed request freed", |st| st.running == 0);
        assert_eq!(st.reserved_bytes, 0);
        let mut sb = Stream::new(s.submit(b.clone()).unwrap());
        sb.finish();
        assert_eq!(Outcome::streamed(&b, &sb.events), want_b);
    }
}

#[test]
fn dropping_the_scheduler_fails_pending_requests() {
    let m = load(EngineConfig {
        max_seqs: 1,
        ..EngineConfig::default()
    });
    let a = long(prompt(70, 4), 1000);
    let s = Scheduler::start(m.engine.clone(), SchedulerConfig::default());
    let _open = OpenGate(&m.experts);
    // A runs one step and is held at the start of its second; B waits for a slot.
    m.experts.permit(Some(1));
    let mut running = Stream::new(s.submit(a.clone()).unwrap());
    running.next();
    let mut waiting = Stream::new(s.submit(a).unwrap());
    // Dropping the scheduler waits for the held step, so the gate opens from elsewhere.
    let experts = m.experts.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        experts.permit(None);
    });
    drop(s);
    opener.join().unwrap();
    for st in [&mut running, &mut waiting] {
        match st.finish() {
            Event::Failed(msg) => assert!(msg.contains("shutting down"), "{msg}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(st.sub.events.try_recv().is_err());
    }
}

/// The state formula counts exactly the blocks and values a sequence's state holds.
#[test]
fn sequence_bytes_is_the_state_a_sequence_holds() {
    let m = load(EngineConfig::default());
    let model = m.engine.model();
    let backend = model.backend();
    let spec = model.kv_spec();
    for len in [1, 10, spec.block_tokens, spec.block_tokens + 1] {
        let tokens = prompt(80, len);
        let mut seq = model.new_sequence();
        let span = SeqSpan {
            start: 0,
            len: tokens.len(),
            past: 0,
        };
        model
            .forward(&tokens, &[span], &mut [&mut seq], &[], None)
            .unwrap();
        let bytes: usize = seq
            .layers()
            .iter()
            .map(|l| match l {
                LayerState::DeltaNet(d) => {
                    let h = backend.delta_state_to_host(d);
                    4 * (h.conv.len() + h.recurrent.len())
                }
                LayerState::Attention(c) => {
                    let h = backend.kv_cache_to_host(c);
                    assert_eq!(h.len, len);
                    backend.kv_cache_blocks(c) * model.kv_block_bytes()
                }
            })
            .sum();
        assert_eq!(
            sequence_bytes(&m.config, &spec, len),
            bytes as u64,
            "{len} tokens"
        );
        assert_eq!(backend.kv_blocks_live(), model.kv_blocks_for(len));
    }
    assert_eq!(backend.kv_blocks_live(), 0);
}
