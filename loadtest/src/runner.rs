//! The run: find the model, optionally measure one stream alone, then keep `concurrency`
//! streams going until `requests` have been sent, optionally injecting the long prompt once
//! the streams are decoding; everything under one deadline.
//!
//! Load is closed-loop: `concurrency` workers each send a request, read it to the end, and
//! send the next, taking indices from a shared counter until `requests` are used up. So the
//! run ends by itself after exactly `requests` requests (or at the deadline, whichever first).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout_at};

use crate::client::{RequestRecord, Target, stream_once};
use crate::error::Error;
use crate::http::{self, BaseUrl, MAX_ERROR_BODY};
use crate::prompt::RequestShape;
use crate::report::{Phases, Report};
use crate::{Config, Endpoint};

/// How long a retried 429 waits when the server sent no `Retry-After`, and the most it waits
/// when it did (a server asking for minutes would just stall the run until its deadline).
const DEFAULT_RETRY_WAIT: Duration = Duration::from_secs(1);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Random streams of the phases' prompts, so the baseline and the long prompt never repeat a
/// main request's prompt (a server's prefix cache would flatter them).
const BASELINE_STREAM: u64 = 1 << 62;
const LONG_PROMPT_STREAM: u64 = (1 << 62) + 1;

/// Streams decoding and finished in the main phase; the long prompt waits on it.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// Requests that have their first token and have not ended.
    decoding: usize,
    /// Requests that ended (completed or failed).
    finished: usize,
}

struct Shared {
    config: Config,
    target: Target,
    shape: RequestShape,
    clock: Instant,
    deadline: tokio::time::Instant,
    next: AtomicUsize,
    progress: watch::Sender<Progress>,
}

/// Runs the load test described by `config` and summarises it.
///
/// Fails only when the run cannot start (bad configuration, no model to use); failures of
/// individual requests are counted in the report.
pub async fn run(config: &Config) -> Result<Report, Error> {
    config.validate()?;
    let base = BaseUrl::parse(&config.url)?;
    let clock = Instant::now();
    let deadline = tokio::time::Instant::from_std(clock) + config.timeout;
    let limit_s = config.timeout.as_secs_f64();
    // A named model is used as it is; otherwise the first listed, whose context length (when
    // the server gives it) lets a run that cannot fit be refused before it starts.
    let (model, max_model_len) = match &config.model {
        Some(m) => (m.clone(), None),
        None => {
            let listed = timeout_at(deadline, first_model(&base, config.api_key.as_deref()))
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("GET {}", base.url("/v1/models")),
                    limit_s,
                })??;
            (listed.id, listed.max_model_len)
        }
    };
    if let Some(max) = max_model_len {
        check_fits(config, max)?;
    }
    let shape = RequestShape {
        endpoint: config.endpoint,
        model: model.clone(),
        prompt_len: config.prompt_len,
        max_tokens: config.max_tokens,
        vocab_size: config.vocab_size,
        seed: config.seed,
    };
    let target = Target {
        base,
        path: match config.endpoint {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        },
        api_key: config.api_key.clone(),
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        target,
        shape,
        clock,
        deadline,
        next: AtomicUsize::new(0),
        progress: watch::channel(Progress::default()).0,
    });

    let baseline = if config.single_stream_baseline {
        let body = shared.shape.body(BASELINE_STREAM);
        Some(execute(&shared, &body, 0, "the single-stream baseline", false).await)
    } else {
        None
    };

    let main_start = clock.elapsed();
    let long = config.long_prompt.clone().map(|lp| {
        let shared = shared.clone();
        tokio::spawn(async move { long_prompt(&shared, lp.tokens, main_start + lp.after).await })
    });
    let mut workers = JoinSet::new();
    for _ in 0..config.concurrency.min(config.requests) {
        let shared = shared.clone();
        workers.spawn(async move { worker(&shared).await });
    }
    let mut main = Vec::with_capacity(config.requests);
    while let Some(done) = workers.join_next().await {
        // A worker only panics on a bug; its requests are then reported as not started.
        if let Ok(records) = done {
            main.extend(records);
        }
    }
    let main_end = clock.elapsed();
    let (long, long_sent) = match long {
        Some(task) => match task.await {
            Ok((record, sent)) => (Some(record), sent),
            Err(e) => (
                Some(RequestRecord {
                    error: Some(Error::Config(format!("the long-prompt task failed: {e}"))),
                    ..RequestRecord::default()
                }),
                false,
            ),
        },
        None => (None, false),
    };
    main.sort_by_key(|r| r.index);
    Ok(Report::build(
        config,
        &model,
        Phases {
            main,
            main_start,
            main_end,
            long,
            long_sent,
            baseline,
        },
    ))
}

/// A model as `GET /v1/models` lists it.
#[derive(Debug)]
struct ListedModel {
    id: String,
    /// Its context length in tokens (vLLM's `max_model_len`), when the server says.
    max_model_len: Option<usize>,
}

/// `GET /v1/models` → the first model listed.
async fn first_model(base: &BaseUrl, api_key: Option<&str>) -> Result<ListedModel, Error> {
    let resp = http::send(base, "GET", "/v1/models", api_key, None).await?;
    let mut resp = resp.error_for_status().await?;
    let target = resp.target().to_string();
    let body = resp.read_to_end(MAX_ERROR_BODY * 16).await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
        target: target.clone(),
        reason: format!("the model list is not JSON: {e}"),
    })?;
    let model = v.pointer("/data/0");
    let Some(id) = model.and_then(|m| m.get("id")).and_then(Value::as_str) else {
        return Err(Error::NoModel { target });
    };
    Ok(ListedModel {
        id: id.to_string(),
        max_model_len: model
            .and_then(|m| m.get("max_model_len"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok()),
    })
}

/// Refuses, before anything is sent, a run whose requests can never fit the model's context of
/// `max_model_len` tokens: the long prompt (plus its one generated token), and a completion
/// prompt plus `max_tokens` (a chat prompt's template adds a few tokens the server counts).
fn check_fits(config: &Config, max_model_len: usize) -> Result<(), Error> {
    if let Some(lp) = &config.long_prompt
        && lp.tokens + 1 > max_model_len
    {
        return Err(Error::Config(format!(
            "the long prompt of {} tokens (+1 generated) does not fit the model's context of \
             {max_model_len} tokens (max_model_len in /v1/models): use --long-prompt-tokens {} \
             or less",
            lp.tokens,
            max_model_len.saturating_sub(1)
        )));
    }
    let needed = config.prompt_len + config.max_tokens;
    if config.endpoint == Endpoint::Completions && needed > max_model_len {
        return Err(Error::Config(format!(
            "prompts of {} tokens + {} generated = {needed} tokens do not fit the model's \
             context of {max_model_len} tokens (max_model_len in /v1/models)",
            config.prompt_len, config.max_tokens
        )));
    }
    Ok(())
}

/// One of the `concurrency` closed-loop workers: its records, in the order it ran them.
async fn worker(shared: &Shared) -> Vec<RequestRecord> {
    let mut records = Vec::new();
    // At most `requests` iterations over all workers: the counter only grows.
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.config.requests || tokio::time::Instant::now() >= shared.deadline {
            return records;
        }
        let body = shared.shape.body(i as u64);
        records.push(execute(shared, &body, i, &format!("request {i}"), true).await);
    }
}

/// Injects the long prompt once `at` has passed and every unfinished stream is decoding (the
/// streams' steady state), or once the streams are all done. The flag: it was sent.
async fn long_prompt(shared: &Shared, tokens: usize, at: Duration) -> (RequestRecord, bool) {
    let requests = shared.config.requests;
    let concurrency = shared.config.concurrency;
    let steady = async {
        tokio::time::sleep_until(tokio::time::Instant::from_std(shared.clock + at)).await;
        let mut rx = shared.progress.subscribe();
        // The sender lives in `shared`, so this only returns once the condition holds.
        let _ = rx
            .wait_for(|p| {
                p.finished >= requests
                    || p.decoding >= concurrency.min(requests.saturating_sub(p.finished))
            })
            .await;
    };
    if timeout_at(shared.deadline, steady).await.is_err() {
        let now = shared.clock.elapsed();
        let never = RequestRecord {
            start: now,
            end: now,
            error: Some(Error::Timeout {
                what: "the long prompt (never sent: the streams did not reach steady state)".into(),
                limit_s: shared.config.timeout.as_secs_f64(),
            }),
            ..RequestRecord::default()
        };
        return (never, false);
    }
    let shape = RequestShape {
        prompt_len: tokens,
        max_tokens: 1,
        ..shared.shape.clone()
    };
    let body = shape.body(LONG_PROMPT_STREAM);
    (
        execute(shared, &body, 0, "the long prompt", false).await,
        true,
    )
}

/// Runs one request to its end, retrying 429s when asked, all under the deadline. `main`:
/// it is one of the main phase's streams, whose progress the long prompt waits on.
async fn execute(
    shared: &Shared,
    body: &[u8],
    index: usize,
    what: &str,
    main: bool,
) -> RequestRecord {
    let mut rec = RequestRecord {
        index,
        ..RequestRecord::default()
    };
    let mut got_first = false;
    let mut on_first = || {
        got_first = true;
        if main {
            shared.progress.send_modify(|p| p.decoding += 1);
        }
    };
    let attempts = async {
        // Bounded: at most `max_retries` retries, each after a bounded wait.
        loop {
            match stream_once(&shared.target, body, shared.clock, &mut rec, &mut on_first).await {
                Err(Error::Status {
                    status: 429,
                    retry_after,
                    ..
                }) if shared.config.retry_429 && rec.retries_429 < shared.config.max_retries => {
                    rec.retries_429 += 1;
                    sleep(
                        retry_after
                            .unwrap_or(DEFAULT_RETRY_WAIT)
                            .min(MAX_RETRY_WAIT),
                    )
                    .await;
                }
                result => return result,
            }
        }
    };
    let result = match timeout_at(shared.deadline, attempts).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: what.to_string(),
            limit_s: shared.config.timeout.as_secs_f64(),
        }),
    };
    if let Err(e) = result {
        rec.end = shared.clock.elapsed();
        rec.error = Some(e);
    }
    if main {
        shared.progress.send_modify(|p| {
            if got_first {
                p.decoding -= 1;
            }
            p.finished += 1;
        });
    }
    rec
}
