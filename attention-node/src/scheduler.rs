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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use myriad_kernels::Backend;
use myriad_model::ModelConfig;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::engine::{Engine, Request};

mod handoff;
mod pool;
mod worker;

use handoff::JobKind;
pub use handoff::{PrefillTicket, StateSlot};
pub use pool::sequence_bytes;
use pool::{Pool, context_tokens};
use worker::Worker;

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

pub use myriad_engine_api::{Event, Generate, SchedulerStats, ServePath, Submission, SubmitError};

/// What `Overloaded` suggests: the queue drains as running requests finish, which takes about
/// this long on a loaded server; an estimate from step times would be no better for a client.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a request still waiting or running when the scheduler is dropped hears.
const SHUTTING_DOWN: &str = "the engine is shutting down";

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

/// What the scheduler thread receives.
pub(crate) enum Msg {
    Job(Job),
    /// Something the thread waits for may have happened (a state delivered or abandoned).
    Wake,
    /// The scheduler handle is dropped (state slots hold senders too, so the channel alone
    /// does not say so).
    Stop,
}

/// How long an idle scheduler thread sleeps before it looks again at what only polling shows
/// (clients that went away while their request waits for a state).
const IDLE_POLL: Duration = Duration::from_millis(20);

/// A submitted request on the scheduler thread: the request, what it is for, where its events
/// go and how much of its output has been sent.
pub(crate) struct Job {
    request: Request,
    kind: JobKind,
    events: UnboundedSender<Event>,
    sent_prompt_logprobs: bool,
    sent_tokens: usize,
    /// Prompt tokens already added to the `prompt_tokens` counter.
    counted_prompt: usize,
}

impl Job {
    /// Whoever waits for this job is gone.
    fn cancelled(&self) -> bool {
        match &self.kind {
            JobKind::Prefill(tx) => tx.is_closed(),
            _ => self.events.is_closed(),
        }
    }

    /// Tells whoever waits that the job failed.
    fn fail(self, message: String) {
        match self.kind {
            JobKind::Prefill(tx) => {
                let _ = tx.send(Err(message));
            }
            _ => {
                let _ = self.events.send(Event::Failed(message));
            }
        }
    }

    /// Tells whoever waits that no node could serve the job.
    fn unavailable(self, message: String) {
        match self.kind {
            JobKind::Prefill(tx) => {
                let _ = tx.send(Err(message));
            }
            _ => {
                let _ = self.events.send(Event::Unavailable(message));
            }
        }
    }
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
    jobs: Option<Sender<Msg>>,
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

impl Scheduler {
    /// Checks, sizes and queues a job for `request`; `context` is the tokens it may reach
    /// here. Returns the request id and the receiver of its events.
    fn enqueue(
        &self,
        request: Request,
        kind: JobKind,
        context: usize,
    ) -> Result<(u64, UnboundedReceiver<Event>), SubmitError> {
        let Some(jobs) = &self.jobs else {
            return Err(SubmitError::Stopped);
        };
        if let Err(message) = self.engine.validate(&request) {
            return Err(self.reject(SubmitError::Invalid(message)));
        }
        let blocks = self.pool.blocks_for(context);
        if blocks > self.pool.blocks {
            let p = &self.pool;
            return Err(self.reject(SubmitError::TooLarge(format!(
                "the request's context of {context} tokens (prompt {} + max_tokens {}) needs \
                 {blocks} KV blocks ({} attention layers × {} blocks of {} tokens, {} bytes), \
                 more than the whole KV cache of {} blocks ({} bytes)",
                request.prompt.len(),
                request.max_tokens,
                p.layers,
                p.spec.blocks_for(context),
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
            kind,
            events,
            sent_prompt_logprobs: false,
            sent_tokens: 0,
            counted_prompt: 0,
        };
        if jobs.send(Msg::Job(job)).is_err() {
            // The thread is gone (it can only end early by a bug); give the slot back.
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok((id, receiver))
    }

    /// Queues `request` to be prefilled here and handed off: the ticket gives its state after
    /// the prompt and its outputs up to the first token. Only the prompt (and one token) must
    /// fit this node's pool.
    pub fn submit_prefill(&self, request: Request) -> Result<PrefillTicket, SubmitError> {
        let (tx, result) = tokio::sync::oneshot::channel();
        let context = request.prompt.len().saturating_add(1);
        self.enqueue(request, JobKind::Prefill(tx), context)?;
        Ok(PrefillTicket { result })
    }

    /// Queues `request` to continue from a state prefilled elsewhere: it is admitted (its
    /// prompt's blocks reserved) before the state exists; deliver the state through the slot.
    /// Its events (prompt log-probabilities and first token from the hand-off included) arrive
    /// on the submission like any other request's.
    pub fn submit_handoff(&self, request: Request) -> Result<(Submission, StateSlot), SubmitError> {
        let Some(wake) = self.jobs.clone() else {
            return Err(SubmitError::Stopped);
        };
        let (state_tx, state) = tokio::sync::oneshot::channel();
        let (admitted_tx, admitted) = tokio::sync::oneshot::channel();
        let context = context_tokens(&request, self.model.max_position_embeddings);
        let kind = JobKind::Resume {
            state,
            admitted: Some(admitted_tx),
        };
        let (id, events) = self.enqueue(request, kind, context)?;
        let slot = StateSlot {
            admitted: Some(admitted),
            state: Some(state_tx),
            wake,
        };
        Ok((
            Submission {
                id,
                events,
                path: ServePath::Disaggregated,
            },
            slot,
        ))
    }
}

impl Generate for Scheduler {
    /// Checks, sizes and queues `request` without waiting for the engine.
    fn submit(&self, request: Request) -> Result<Submission, SubmitError> {
        let context = context_tokens(&request, self.model.max_position_embeddings);
        let (id, events) = self.enqueue(request, JobKind::Stream, context)?;
        Ok(Submission {
            id,
            events,
            path: ServePath::Direct,
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
        // `Stop` wakes the thread if it is idle; closing the channel would not while state
        // slots hold senders.
        if let Some(jobs) = self.jobs.take() {
            let _ = jobs.send(Msg::Stop);
        }
        if let Some(thread) = self.thread.take() {
            // A panic on the thread has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}
