//! The report: what the run measured, computed from the raw request records, as a serialisable
//! struct (`--output json`) and as text.
//!
//! Latency statistics cover the requests that completed; failures are counted by kind with
//! one example message each. For the long-prompt scenario the prefill window runs from the
//! long prompt's submission to its first token, and an inter-token interval of a stream counts
//! as "during prefill" when it overlaps that window: the interval a stream stalls in while the
//! server prefills spans the window's end, so classifying by arrival time alone would miss
//! exactly the stall the scenario is meant to show.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::client::RequestRecord;
use crate::stats::Distribution;
use crate::{Config, Endpoint};

/// The raw records of a run, which [`Report::build`] summarises.
#[derive(Debug, Clone, Default)]
pub struct Phases {
    /// The main phase's requests.
    pub main: Vec<RequestRecord>,
    /// When the main phase started and when its last stream ended (since the run's start).
    pub main_start: Duration,
    pub main_end: Duration,
    pub long: Option<RequestRecord>,
    /// The long prompt was sent (not given up on before the streams reached steady state).
    pub long_sent: bool,
    pub baseline: Option<RequestRecord>,
}

/// Everything a run reports; `--output json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigSummary,
    pub requests: RequestCounts,
    /// Failures of the main phase by kind (`HTTP 429`, `connect`, `timeout`, ...).
    pub errors: Vec<ErrorCount>,
    /// The run's time limit ended something before it completed.
    pub timed_out: bool,
    /// From the first stream's start to the last stream's end (the baseline and the long
    /// prompt excluded).
    pub wall_s: f64,
    /// Output tokens of the completed streams.
    pub output_tokens: u64,
    /// `output_tokens / wall_s`: the aggregate throughput at this concurrency.
    pub output_tokens_per_s: f64,
    /// Each completed stream's tokens over its whole duration (TTFT included).
    pub stream_tokens_per_s: Distribution,
    pub ttft_ms: Distribution,
    pub itl_ms: Distribution,
    pub long_prompt: Option<LongPromptReport>,
    pub baseline: Option<BaselineReport>,
}

/// The settings the numbers came from.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub seed: u64,
    pub long_prompt_tokens: Option<usize>,
    pub long_prompt_after_s: Option<f64>,
    pub single_stream_baseline: bool,
    pub retry_429: bool,
    pub timeout_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestCounts {
    /// `requests` as configured.
    pub planned: usize,
    pub ok: usize,
    pub failed: usize,
    /// Never sent because the deadline came first.
    pub not_started: usize,
    /// Completed with a token count other than `max_tokens` (a server not honouring
    /// `ignore_eos`, or a context too short).
    pub token_count_mismatch: usize,
    /// 429 answers retried (`--retry-429`), over all requests.
    pub retries_429: u64,
    /// Prompt tokens per request as the server counted them (mean over those reported).
    pub mean_prompt_tokens: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub kind: String,
    pub count: usize,
    /// The first such failure's message.
    pub example: String,
}

/// The long-prompt scenario.
#[derive(Debug, Clone, Serialize)]
pub struct LongPromptReport {
    /// `--long-prompt-tokens`.
    pub prompt_tokens_requested: usize,
    /// As the server counted them.
    pub prompt_tokens: Option<u64>,
    pub sent: bool,
    pub ok: bool,
    pub error: Option<String>,
    /// When it was sent, since the main phase started.
    pub submitted_at_s: Option<f64>,
    /// Its own time to first token: the prefill window's length.
    pub ttft_ms: Option<f64>,
    /// Main-phase streams with at least one inter-token interval in the window.
    pub streams_in_window: usize,
    pub itl_during_prefill_ms: Distribution,
    pub itl_outside_prefill_ms: Distribution,
}

/// The single-stream baseline.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub ok: bool,
    pub error: Option<String>,
    pub output_tokens: u64,
    pub ttft_ms: Option<f64>,
    /// Its tokens over its whole duration, as `stream_tokens_per_s` measures the streams.
    pub tokens_per_s: Option<f64>,
    pub itl_ms: Distribution,
    /// The main phase's `output_tokens_per_s` over this stream's `tokens_per_s`.
    pub aggregate_over_single: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Tokens per second of a completed request over its whole duration.
fn tokens_per_s(r: &RequestRecord) -> Option<f64> {
    let secs = r.end.saturating_sub(r.start).as_secs_f64();
    (r.ok() && secs > 0.0).then(|| r.output_tokens as f64 / secs)
}

impl Report {
    /// Summarises `phases` of a run of `config` against `model`.
    pub fn build(config: &Config, model: &str, phases: Phases) -> Report {
        let ok: Vec<&RequestRecord> = phases.main.iter().filter(|r| r.ok()).collect();
        let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let wall = phases
            .main_end
            .saturating_sub(phases.main_start)
            .as_secs_f64();
        let output_tokens_per_s = if wall > 0.0 {
            output_tokens as f64 / wall
        } else {
            0.0
        };

        let mut errors: BTreeMap<String, ErrorCount> = BTreeMap::new();
        for e in phases.main.iter().filter_map(|r| r.error.as_ref()) {
            errors
                .entry(e.kind())
                .or_insert_with(|| ErrorCount {
                    kind: e.kind(),
                    count: 0,
                    example: e.to_string(),
                })
                .count += 1;
        }
        let prompt_counts: Vec<f64> = phases
            .main
            .iter()
            .filter_map(|r| r.prompt_tokens.map(|p| p as f64))
            .collect();
        let requests = RequestCounts {
            planned: config.requests,
            ok: ok.len(),
            failed: phases.main.len() - ok.len(),
            not_started: config.requests.saturating_sub(phases.main.len()),
            token_count_mismatch: ok
                .iter()
                .filter(|r| r.output_tokens != config.max_tokens as u64)
                .count(),
            retries_429: phases.main.iter().map(|r| u64::from(r.retries_429)).sum(),
            mean_prompt_tokens: (!prompt_counts.is_empty())
                .then(|| prompt_counts.iter().sum::<f64>() / prompt_counts.len() as f64),
        };

        let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft()).map(ms).collect();
        let itl: Vec<f64> = ok
            .iter()
            .flat_map(|r| r.itl_intervals())
            .map(|(a, b)| ms(b.saturating_sub(a)))
            .collect();
        let per_stream: Vec<f64> = ok.iter().filter_map(|r| tokens_per_s(r)).collect();

        let long_prompt =
            phases
                .long
                .as_ref()
                .zip(config.long_prompt.as_ref())
                .map(|(long, lp)| {
                    let sent = phases.long_sent;
                    // The window closes at the first token, or when the long prompt failed.
                    let window = (long.start, long.first_token.unwrap_or(long.end));
                    let (mut during, mut outside) = (Vec::new(), Vec::new());
                    let mut streams_in_window = 0;
                    for r in &ok {
                        let mut in_window = false;
                        for (a, b) in r.itl_intervals() {
                            if sent && a < window.1 && b > window.0 {
                                during.push(ms(b - a));
                                in_window = true;
                            } else {
                                outside.push(ms(b.saturating_sub(a)));
                            }
                        }
                        streams_in_window += usize::from(in_window);
                    }
                    LongPromptReport {
                        prompt_tokens_requested: lp.tokens,
                        prompt_tokens: long.prompt_tokens,
                        sent,
                        ok: long.ok(),
                        error: long.error.as_ref().map(ToString::to_string),
                        submitted_at_s: sent
                            .then(|| long.start.saturating_sub(phases.main_start).as_secs_f64()),
                        ttft_ms: long.ttft().map(ms),
                        streams_in_window,
                        itl_during_prefill_ms: Distribution::of(&during),
                        itl_outside_prefill_ms: Distribution::of(&outside),
                    }
                });

        let baseline = phases.baseline.as_ref().map(|b| {
            let tps = tokens_per_s(b);
            let itl: Vec<f64> = b
                .itl_intervals()
                .map(|(a, c)| ms(c.saturating_sub(a)))
                .collect();
            BaselineReport {
                ok: b.ok(),
                error: b.error.as_ref().map(ToString::to_string),
                output_tokens: b.output_tokens,
                ttft_ms: b.ttft().map(ms),
                tokens_per_s: tps,
                itl_ms: Distribution::of(&itl),
                aggregate_over_single: tps
                    .filter(|&t| t > 0.0 && output_tokens > 0)
                    .map(|t| output_tokens_per_s / t),
            }
        });

        let timed_out = requests.not_started > 0
            || phases
                .main
                .iter()
                .chain(&phases.long)
                .chain(&phases.baseline)
                .any(|r| matches!(r.error, Some(crate::Error::Timeout { .. })));

        Report {
            config: ConfigSummary {
                url: config.url.clone(),
                model: model.to_string(),
                endpoint: config.endpoint,
                concurrency: config.concurrency,
                requests: config.requests,
                prompt_len: config.prompt_len,
                max_tokens: config.max_tokens,
                seed: config.seed,
                long_prompt_tokens: config.long_prompt.as_ref().map(|l| l.tokens),
                long_prompt_after_s: config.long_prompt.as_ref().map(|l| l.after.as_secs_f64()),
                single_stream_baseline: config.single_stream_baseline,
                retry_429: config.retry_429,
                timeout_s: config.timeout.as_secs_f64(),
            },
            requests,
            errors: errors.into_values().collect(),
            timed_out,
            wall_s: wall,
            output_tokens,
            output_tokens_per_s,
            stream_tokens_per_s: Distribution::of(&per_stream),
            ttft_ms: Distribution::of(&ttft),
            itl_ms: Distribution::of(&itl),
            long_prompt,
            baseline,
        }
    }
}

/// `1.23` or `-` for a missing value.
struct Num(Option<f64>, usize);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:.*}", self.1),
            None => f.write_str("-"),
        }
    }
}

fn percentiles(d: &Distribution) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  max {}  (n={})",
        Num(d.p50, 1),
        Num(d.p90, 1),
        Num(d.p99, 1),
        Num(d.max, 1),
        d.count
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let endpoint = match c.endpoint {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        };
        // Chat prompts are words; what they came to in tokens is the server's count.
        let prompt = match (c.endpoint, self.requests.mean_prompt_tokens) {
            (Endpoint::Chat, Some(t)) => format!("{} words (~{t:.0} tokens)", c.prompt_len),
            (Endpoint::Chat, None) => format!("{} words", c.prompt_len),
            (Endpoint::Completions, _) => format!("{} tokens", c.prompt_len),
        };
        writeln!(
            f,
            "{} model {}: {endpoint}, concurrency {}, {} requests, prompt {prompt}, \
             max_tokens {}",
            c.url, c.model, c.concurrency, c.requests, c.max_tokens
        )?;
        let r = &self.requests;
        write!(f, "requests       {} ok, {} failed", r.ok, r.failed)?;
        if r.not_started > 0 {
            write!(f, ", {} not started", r.not_started)?;
        }
        if r.retries_429 > 0 {
            write!(f, ", {} retries after 429", r.retries_429)?;
        }
        writeln!(f)?;
        if r.token_count_mismatch > 0 {
            writeln!(
                f,
                "warning        {} completed requests did not produce max_tokens tokens",
                r.token_count_mismatch
            )?;
        }
        if self.timed_out {
            writeln!(
                f,
                "warning        the run hit its time limit ({} s)",
                c.timeout_s
            )?;
        }
        writeln!(f, "wall time      {:.3} s", self.wall_s)?;
        writeln!(
            f,
            "output tokens  {} ({:.1} tokens/s aggregate)",
            self.output_tokens, self.output_tokens_per_s
        )?;
        let s = &self.stream_tokens_per_s;
        writeln!(
            f,
            "per stream     mean {} tokens/s  (min {}, p50 {})",
            Num(s.mean, 1),
            Num(s.min, 1),
            Num(s.p50, 1)
        )?;
        writeln!(f, "TTFT ms        {}", percentiles(&self.ttft_ms))?;
        writeln!(f, "ITL ms         {}", percentiles(&self.itl_ms))?;
        if let Some(b) = &self.baseline {
            match &b.error {
                None => writeln!(
                    f,
                    "single stream  {} tokens/s (TTFT {} ms); aggregate at concurrency {}: \
                     {:.1} tokens/s = {}x a single stream",
                    Num(b.tokens_per_s, 1),
                    Num(b.ttft_ms, 1),
                    c.concurrency,
                    self.output_tokens_per_s,
                    Num(b.aggregate_over_single, 2)
                )?,
                Some(e) => writeln!(f, "single stream  failed: {e}")?,
            }
        }
        if let Some(l) = &self.long_prompt {
            if l.sent {
                writeln!(
                    f,
                    "long prompt    {} tokens sent at {} s, TTFT {} ms{}",
                    l.prompt_tokens.unwrap_or(l.prompt_tokens_requested as u64),
                    Num(l.submitted_at_s, 3),
                    Num(l.ttft_ms, 1),
                    match &l.error {
                        Some(e) => format!(" (failed: {e})"),
                        None => String::new(),
                    }
                )?;
            } else {
                writeln!(
                    f,
                    "long prompt    not sent: {}",
                    l.error.as_deref().unwrap_or("-")
                )?;
            }
            let (d, o) = (&l.itl_during_prefill_ms, &l.itl_outside_prefill_ms);
            writeln!(
                f,
                "  ITL ms during its prefill   p50 {}  p99 {}  max {}  (n={}, {} streams)",
                Num(d.p50, 1),
                Num(d.p99, 1),
                Num(d.max, 1),
                d.count,
                l.streams_in_window
            )?;
            writeln!(
                f,
                "  ITL ms outside it           p50 {}  p99 {}  max {}  (n={})",
                Num(o.p50, 1),
                Num(o.p99, 1),
                Num(o.max, 1),
                o.count
            )?;
            if l.sent && l.streams_in_window == 0 {
                writeln!(
                    f,
                    "  (no stream was decoding during the prefill: more requests or a smaller \
                     --long-prompt-after-s)"
                )?;
            }
        }
        for e in &self.errors {
            writeln!(f, "error          {} x {}: {}", e.count, e.kind, e.example)?;
        }
        Ok(())
    }
}
