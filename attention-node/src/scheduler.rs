//! Continuous batching for a server: a thread that owns the engine's running batch. Requests
//! join and leave between forward steps; prompts are prefilled in chunks beside running
//! decodes (the engine's token budget), so a long prompt never freezes the streams already
//! running; every generated token is streamed to its request as soon as its step ends.
//!
//! Memory is a pool of KV blocks (`kv_cache_bytes` over the model's block size, see
//! `myriad_kernels::kv`): a sequence takes blocks as it grows, never for its whole context up
//! front. A waiting request is admitted when the blocks its prompt needs (and those the
//! running sequences need to reach their next token) fit with a headroom of 1% of the pool
//! left free, so running decodes do not preempt at once; when a step still needs more, the
//! engine preempts the newest sequences, which are recomputed later and finish with the same
//! tokens (`Engine::plan`). Only a request whose whole context (prompt + `max_tokens`) could
//! never fit the pool is refused ([`SubmitError::TooLarge`], naming the sizes). Requests that
//! wait queue in a bounded queue; past that, `submit` refuses with
//! [`SubmitError::Overloaded`] (the gateway's 429 with `Retry-After`). A request whose event
//! receiver is dropped (the client went away) is cancelled at the next step and its blocks
//! given back.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use myriad_kernels::{Backend, KvCacheSpec};
use myriad_model::{LayerKind, ModelConfig};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::engine::{Active, Engine, Request};
use crate::weights::{attention_dims, deltanet_dims};

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Bytes of the KV block pool all running sequences share (`--kv-cache-gb`).
    pub kv_cache_bytes: u64,
    /// Requests that may wait for admission; more are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            kv_cache_bytes: 4 << 30,
            max_waiting: 256,
        }
    }
}

pub use myriad_engine_api::{Event, Generate, SchedulerStats, Submission, SubmitError};

/// What `Overloaded` suggests: the queue drains as running requests finish, which takes about
/// this long on a loaded server; an estimate from step times would be no better for a client.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a request still waiting or running when the scheduler is dropped hears.
const SHUTTING_DOWN: &str = "the engine is shutting down";

/// Bytes of per-sequence state a sequence of `context_tokens` tokens holds with KV blocks of
/// `spec`: the blocks of every full-attention layer (keys, values and their scales), plus the
/// fixed DeltaNet conv inputs (`(conv_kernel − 1) × conv_dim`) and recurrent state
/// (`num_v_heads × k_head_dim × v_head_dim`, f32) of every linear-attention layer.
pub fn sequence_bytes(config: &ModelConfig, spec: &KvCacheSpec, context_tokens: usize) -> u64 {
    const F32: u64 = 4;
    let attention = attention_dims(config);
    let delta = deltanet_dims(config);
    let (mut full, mut linear) = (0u64, 0u64);
    for kind in &config.layer_kinds {
        match kind {
            LayerKind::FullAttention => full += 1,
            LayerKind::LinearAttention => linear += 1,
        }
    }
    let block = spec.block_bytes(attention.num_kv_heads * attention.head_dim) as u64;
    let conv = delta.conv_kernel.saturating_sub(1) as u64 * delta.conv_dim() as u64;
    let recurrent = delta.num_v_heads as u64 * delta.k_head_dim as u64 * delta.v_head_dim as u64;
    full.saturating_mul(block)
        .saturating_mul(spec.blocks_for(context_tokens) as u64)
        .saturating_add(linear.saturating_mul((conv + recurrent).saturating_mul(F32)))
}

/// The context a request may reach: its prompt and every token it may generate, but never
/// more than the model's context, where generation stops anyway.
fn context_tokens(request: &Request, max_context: usize) -> usize {
    request
        .prompt
        .len()
        .saturating_add(request.max_tokens)
        .min(max_context)
}

/// The block pool as the handle and the thread see it.
#[derive(Clone, Copy, Debug)]
struct Pool {
    /// Blocks in the pool.
    blocks: usize,
    /// Bytes of one block of one layer.
    block_bytes: usize,
    /// Blocks of one layer per block of tokens: the model's full-attention layers.
    layers: usize,
    spec: KvCacheSpec,
    /// Blocks admission leaves free for running sequences to grow into.
    headroom: usize,
}

impl Pool {
    fn new<B: Backend>(engine: &Engine<B>, bytes: u64) -> Pool {
        let model = engine.model();
        let block_bytes = model.kv_block_bytes().max(1);
        let blocks = usize::try_from(bytes / block_bytes as u64).unwrap_or(usize::MAX);
        Pool {
            blocks,
            block_bytes,
            layers: model.attention_layers(),
            spec: model.kv_spec(),
            headroom: blocks / 100,
        }
    }

    /// Blocks a sequence of `tokens` tokens holds.
    fn blocks_for(&self, tokens: usize) -> usize {
        self.layers.saturating_mul(self.spec.blocks_for(tokens))
    }
}

/// The engine as `submit` sees it: request checks only, so [`Scheduler`] need not be generic
/// over the backend (the backend lives on the scheduler's thread).
trait Validate: Send + Sync {
    fn validate(&self, request: &Request) -> Result<(), String>;
}

impl<B: Backend> Validate for Engine<B> {
    fn validate(&self, request: &Request) -> Result<(), String> {
        Engine::validate(self, request)
    }
}

/// Counters only the scheduler thread changes; published together so that a snapshot is
/// consistent (e.g. `running` and `reserved_bytes` drop to zero at once).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    running: usize,
    /// KV blocks the running sequences hold.
    kv_blocks: usize,
    preemptions: u64,
    steps: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
    cancelled: u64,
}

/// State shared by the handle and the thread.
struct Shared {
    /// Submitted and not yet admitted (in the channel or the thread's queue). `submit` takes a
    /// slot here before sending, so the bound holds however many threads submit at once.
    waiting: AtomicUsize,
    rejected: AtomicU64,
    counters: Mutex<Counters>,
}

impl Shared {
    fn counters(&self) -> MutexGuard<'_, Counters> {
        // The thread never panics while holding the lock, and the counters stay meaningful
        // even if it did.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A submitted request on the scheduler thread: the request, where its events go and how much
/// of its output has been sent.
struct Job {
    request: Request,
    events: UnboundedSender<Event>,
    sent_prompt_logprobs: bool,
    sent_tokens: usize,
    /// Prompt tokens already added to the `prompt_tokens` counter.
    counted_prompt: usize,
}

impl Borrow<Request> for Job {
    fn borrow(&self) -> &Request {
        &self.request
    }
}

/// Continuous batching over one [`Engine`] on a dedicated thread (see the module docs).
///
/// Dropping it stops the thread: the step in progress finishes, requests still running or
/// waiting hear `Failed("the engine is shutting down")`, and the drop returns once the thread
/// has exited (so it may block for one step).
pub struct Scheduler {
    /// Submissions to the thread; `None` when the thread could not be started. Dropping it is
    /// the thread's signal to stop.
    jobs: Option<Sender<Job>>,
    shared: Arc<Shared>,
    engine: Arc<dyn Validate>,
    model: ModelConfig,
    config: SchedulerConfig,
    pool: Pool,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler thread over `engine` (which should not run other work at the same
    /// time: steps of both would serialise on the backend).
    pub fn start<B: Backend>(engine: Arc<Engine<B>>, config: SchedulerConfig) -> Scheduler {
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
        });
        let (tx, rx) = mpsc::channel();
        let worker_engine = engine.clone();
        let worker_shared = shared.clone();
        let pool = Pool::new(&engine, config.kv_cache_bytes);
        let spawned = std::thread::Builder::new()
            .name("myriad-scheduler".into())
            .spawn(move || {
                Worker {
                    engine: worker_engine,
                    jobs: rx,
                    shared: worker_shared,
                    pool,
                    waiting: VecDeque::new(),
                    active: Vec::new(),
                    counters: Counters::default(),
                }
                .run()
            });
        // Without a thread the scheduler still answers: every submission is `Stopped`.
        let (jobs, thread) = match spawned {
            Ok(handle) => (Some(tx), Some(handle)),
            Err(_) => (None, None),
        };
        Scheduler {
            jobs,
            shared,
            model: engine.model().config().clone(),
            engine,
            config,
            pool,
            next_id: AtomicU64::new(1),
            thread,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// KV blocks in the pool.
    pub fn kv_blocks_total(&self) -> usize {
        self.pool.blocks
    }

    /// KV blocks `request` holds at its longest (prompt + `max_tokens`).
    pub fn context_blocks(&self, request: &Request) -> usize {
        self.pool
            .blocks_for(context_tokens(request, self.model.max_position_embeddings))
    }

    fn reject(&self, error: SubmitError) -> SubmitError {
        self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        error
    }
}

impl Generate for Scheduler {
    /// Checks, sizes and queues `request` without waiting for the engine.
    fn submit(&self, request: Request) -> Result<Submission, SubmitError> {
        let Some(jobs) = &self.jobs else {
            return Err(SubmitError::Stopped);
        };
        if let Err(message) = self.engine.validate(&request) {
            return Err(self.reject(SubmitError::Invalid(message)));
        }
        let tokens = context_tokens(&request, self.model.max_position_embeddings);
        let blocks = self.pool.blocks_for(tokens);
        if blocks > self.pool.blocks {
            let p = &self.pool;
            return Err(self.reject(SubmitError::TooLarge(format!(
                "the request's context of {tokens} tokens (prompt {} + max_tokens {}) needs \
                 {blocks} KV blocks ({} attention layers × {} blocks of {} tokens, {} bytes), \
                 more than the whole KV cache of {} blocks ({} bytes)",
                request.prompt.len(),
                request.max_tokens,
                p.layers,
                p.spec.blocks_for(tokens),
                p.spec.block_tokens,
                blocks as u64 * p.block_bytes as u64,
                p.blocks,
                p.blocks as u64 * p.block_bytes as u64,
            ))));
        }
        let max_waiting = self.config.max_waiting;
        if let Err(waiting) =
            self.shared
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w < max_waiting).then_some(w + 1)
                })
        {
            return Err(self.reject(SubmitError::Overloaded {
                waiting,
                retry_after: RETRY_AFTER,
            }));
        }
        let (events, receiver) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            request,
            events,
            sent_prompt_logprobs: false,
            sent_tokens: 0,
            counted_prompt: 0,
        };
        if jobs.send(job).is_err() {
            // The thread is gone (it can only end early by a bug); give the slot back.
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(Submission {
            id,
            events: receiver,
        })
    }

    fn stats(&self) -> SchedulerStats {
        let c = *self.shared.counters();
        SchedulerStats {
            running: c.running,
            waiting: self.shared.waiting.load(Ordering::Acquire),
            reserved_bytes: c.kv_blocks as u64 * self.pool.block_bytes as u64,
            memory_budget_bytes: self.pool.blocks as u64 * self.pool.block_bytes as u64,
            kv_blocks_used: c.kv_blocks as u64,
            kv_blocks_total: self.pool.blocks as u64,
            preemptions: c.preemptions,
            steps: c.steps,
            prompt_tokens: c.prompt_tokens,
            generated_tokens: c.generated_tokens,
            cancelled: c.cancelled,
            rejected: self.shared.rejected.load(Ordering::Relaxed),
        }
    }

    fn max_context(&self) -> usize {
        self.model.max_position_embeddings
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Closing the channel is the stop signal; it also wakes the thread if it is idle.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // A panic on the thread has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

/// The scheduler thread: owns the queue and the running batch.
struct Worker<B: Backend> {
    engine: Arc<Engine<B>>,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    pool: Pool,
    /// Received, not yet admitted, in arrival order.
    waiting: VecDeque<Job>,
    active: Vec<Active<B, Job>>,
    counters: Counters,
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        while self.intake() {
            // Before admission and the step, so that a request whose client has gone neither
            // takes memory nor gets prefilled.
            self.drop_cancelled();
            self.admit();
            // Before the step too: a step can take long, and admissions and cancellations
            // should show in the stats without waiting for it.
            self.publish();
            self.step();
            self.emit();
            self.publish();
        }
        self.shutdown();
    }

    /// Takes new submissions, blocking while there is nothing to run (an idle scheduler
    /// sleeps in `recv`, it never spins). False once the scheduler handle is dropped.
    fn intake(&mut self) -> bool {
        if self.active.is_empty() && self.waiting.is_empty() {
            match self.jobs.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Forgets requests whose event receiver was dropped, waiting or running.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.waiting.fetch_sub(gone, Ordering::AcqRel);
            self.counters.cancelled += gone as u64;
        }
        let counters = &mut self.counters;
        self.active.retain(|a| {
            let keep = !a.request.events.is_closed();
            if !keep {
                counters.cancelled += 1;
            }
            keep
        });
    }

    /// Starts waiting requests in arrival order while sequences and blocks allow: the blocks
    /// the running sequences need to reach their next token, plus those of the front
    /// request's prompt, plus the headroom, must fit the pool (with nothing running, the
    /// request alone must). The queue is strictly FIFO: a large request at its head is not
    /// overtaken by smaller ones, so it cannot starve.
    fn admit(&mut self) {
        let max_seqs = self.engine.config().max_seqs.max(1);
        let committed: usize = self
            .active
            .iter()
            .map(|a| {
                self.pool
                    .blocks_for(a.request.request.prompt.len() + a.out.token_ids.len())
            })
            .sum();
        let mut committed = committed;
        while self.active.len() < max_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = self.pool.blocks_for(front.request.prompt.len() + 1);
            let headroom = if self.active.is_empty() {
                0
            } else {
                self.pool.headroom
            };
            if committed + need + headroom > self.pool.blocks {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            committed += need;
            // The index is `generate`'s name for a sequence; jobs carry their own channel.
            self.active.push(self.engine.start(0, job));
        }
    }

    /// One forward step (the engine's own planning: decodes first, prefill chunks within the
    /// token budget). If it fails, its sequences are failed and dropped (their state may be
    /// half-updated); sequences outside it are untouched and go on.
    fn step(&mut self) {
        let before: u64 = self.active.iter().map(|a| u64::from(a.preemptions)).sum();
        let shares = self.engine.plan(&mut self.active, Some(self.pool.blocks));
        let after: u64 = self.active.iter().map(|a| u64::from(a.preemptions)).sum();
        self.counters.preemptions += after - before;
        if shares.is_empty() {
            return;
        }
        self.counters.steps += 1;
        let engine = &self.engine;
        let active = &mut self.active;
        // A panic in the model (a bug) fails this step's requests, not the whole server.
        let failure = match catch_unwind(AssertUnwindSafe(|| engine.run(active, &shares))) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic_message(panic.as_ref()),
        };
        let mut failed = vec![false; self.active.len()];
        for &(ai, _) in &shares {
            failed[ai] = true;
            let message = format!("the forward step failed: {failure}");
            // A receiver that is gone needs no message.
            let _ = self.active[ai].request.events.send(Event::Failed(message));
        }
        let mut flags = failed.into_iter();
        self.active.retain(|_| !flags.next().unwrap_or(false));
    }

    /// Streams what every running request produced since the last step and retires the
    /// finished and the cancelled.
    fn emit(&mut self) {
        let counters = &mut self.counters;
        self.active.retain_mut(|a| {
            let delivered = send_new(a, counters);
            if !delivered {
                counters.cancelled += 1;
            }
            delivered && !a.done
        });
    }

    fn publish(&mut self) {
        self.counters.running = self.active.len();
        self.counters.kv_blocks = self.active.iter().map(|a| self.engine.blocks_held(a)).sum();
        *self.shared.counters() = self.counters;
    }

    /// Fails everything still waiting or running, then publishes empty counters.
    fn shutdown(mut self) {
        let failed = |events: &UnboundedSender<Event>| {
            let _ = events.send(Event::Failed(SHUTTING_DOWN.into()));
        };
        let waiting = self.waiting.len();
        for job in self.waiting.drain(..) {
            failed(&job.events);
        }
        self.shared.waiting.fetch_sub(waiting, Ordering::AcqRel);
        for a in self.active.drain(..) {
            failed(&a.request.events);
        }
        self.publish();
    }
}

/// Sends the events `a` has produced since the last call: its prompt log-probabilities once
/// prefilled, each new token, and `Finished` when done. False if the receiver is gone.
fn send_new<B: Backend>(a: &mut Active<B, Job>, counters: &mut Counters) -> bool {
    let job = &mut a.request;
    counters.prompt_tokens += (a.prefilled - job.counted_prompt) as u64;
    job.counted_prompt = a.prefilled;
    let r = &job.request;
    let prompt_len = r.prompt.len();
    let echo_logprobs = r.echo && r.logprobs.is_some();
    // With echo, the engine's log-probabilities hold one entry per prompt position first.
    let offset = if echo_logprobs { prompt_len } else { 0 };
    if echo_logprobs && !job.sent_prompt_logprobs && a.prefilled == prompt_len {
        job.sent_prompt_logprobs = true;
        // Taken rather than cloned: each entry is sent once and not needed again.
        let prompt = a
            .out
            .logprobs
            .as_mut()
            .map(|v| v.iter_mut().take(offset).map(Option::take).collect())
            .unwrap_or_default();
        if job.events.send(Event::PromptLogprobs(prompt)).is_err() {
            return false;
        }
    }
    while job.sent_tokens < a.out.token_ids.len() {
        let i = job.sent_tokens;
        job.sent_tokens += 1;
        counters.generated_tokens += 1;
        let logprobs = a
            .out
            .logprobs
            .as_mut()
            .and_then(|v| v.get_mut(offset + i))
            .and_then(Option::take);
        let token = Event::Token {
            id: a.out.token_ids[i],
            logprobs,
        };
        if job.events.send(token).is_err() {
            return false;
        }
    }
    if a.done {
        let finished = Event::Finished {
            reason: a.out.finish_reason,
            prompt_tokens: prompt_len,
            completion_tokens: a.out.token_ids.len(),
        };
        return job.events.send(finished).is_ok();
    }
    true
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}
