//! `myriad loadtest`: drive an OpenAI-compatible server (`myriad serve`, vLLM) with concurrent
//! streams and report throughput, time to first token and inter-token latencies; optionally
//! next to a single stream alone, and with one long prompt injected mid-run.
//!
//! The work is in `myriad-loadtest`; this turns flags into its `Config` and prints the report.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use myriad_loadtest::{Config, Endpoint, LongPrompt};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EndpointArg {
    /// `/v1/completions` with random token-id prompts (exact prompt lengths).
    Completions,
    /// `/v1/chat/completions` with random-word prompts (approximate prompt lengths).
    Chat,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OutputArg {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct LoadtestArgs {
    /// The server: `http://host:port` (a trailing `/v1` is accepted; no TLS).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to request (default: the first one `GET /v1/models` lists).
    #[arg(long)]
    pub model: Option<String>,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "MYRIAD_API_KEY")]
    pub api_key: Option<String>,
    /// Which API the streams use.
    #[arg(long, value_enum, default_value_t = EndpointArg::Completions)]
    pub endpoint: EndpointArg,
    /// Prompt length of every stream in tokens (chat: words).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Completions prompts draw token ids from 0..VOCAB_SIZE (the default fits every model).
    #[arg(long, default_value_t = 1000)]
    pub vocab_size: u32,
    /// Streams running at once.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all; the run ends after them.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub requests: usize,
    /// Tokens every stream produces (sent with `ignore_eos: true`).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Seeds the random prompts and the requests' sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Inject one request with a prompt of this many tokens (and max_tokens 1) mid-run, and
    /// report the streams' inter-token latencies during its prefill apart from the rest.
    #[arg(long)]
    pub long_prompt_tokens: Option<usize>,
    /// Send the long prompt no earlier than this many seconds after the streams start. It is
    /// always sent only once every running stream is decoding, so by default (0) it goes out
    /// as soon as the streams are all decoding, while they have the most tokens left.
    #[arg(long, default_value_t = 0.0)]
    pub long_prompt_after_s: f64,
    /// First run one stream of the same shape alone, to compare the aggregate throughput with.
    #[arg(long)]
    pub single_stream_baseline: bool,
    /// Retry requests answered 429 after their Retry-After (otherwise they count as failed).
    #[arg(long)]
    pub retry_429: bool,
    /// Most retries of one request with --retry-429.
    #[arg(long, default_value_t = 10)]
    pub max_retries: u32,
    /// Time limit of the whole run in seconds; what has not finished by then is cut off.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
    /// Report format.
    #[arg(long, value_enum, default_value_t = OutputArg::Text)]
    pub output: OutputArg,
}

fn seconds(flag: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{flag} must be a number of seconds ≥ 0"))
}

pub fn run(a: &LoadtestArgs) -> Result<()> {
    let timeout = seconds("--timeout-s", a.timeout_s)?;
    let long_prompt = match a.long_prompt_tokens {
        Some(tokens) => Some(LongPrompt {
            tokens,
            after: seconds("--long-prompt-after-s", a.long_prompt_after_s)?,
        }),
        None => None,
    };
    let config = Config {
        url: a.url.clone(),
        model: a.model.clone(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        endpoint: match a.endpoint {
            EndpointArg::Completions => Endpoint::Completions,
            EndpointArg::Chat => Endpoint::Chat,
        },
        prompt_len: a.prompt_len,
        vocab_size: a.vocab_size,
        concurrency: a.concurrency,
        requests: a.requests,
        max_tokens: a.max_tokens,
        seed: a.seed,
        long_prompt,
        single_stream_baseline: a.single_stream_baseline,
        retry_429: a.retry_429,
        max_retries: a.max_retries,
        timeout,
    };
    // The client parses JSON for every chunk of every stream; a few threads keep timestamps
    // prompt at high concurrency without taking the cores a local server needs.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("myriad-loadtest")
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    let report = runtime.block_on(myriad_loadtest::run(&config))?;
    match a.output {
        OutputArg::Text => print!("{report}"),
        OutputArg::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("writing the report as JSON")?
        ),
    }
    if report.requests.ok == 0 {
        let why = report
            .errors
            .first()
            .map(|e| e.example.clone())
            .unwrap_or_else(|| "no request was sent".into());
        bail!("no request completed: {why}");
    }
    // The long-prompt figures are what was asked for: a run without them is no success.
    if let Some(l) = report.long_prompt.as_ref().filter(|l| !l.ok) {
        bail!(
            "the long prompt of {} tokens did not complete: {}",
            l.prompt_tokens_requested,
            l.error.as_deref().unwrap_or("no error reported")
        );
    }
    Ok(())
}
