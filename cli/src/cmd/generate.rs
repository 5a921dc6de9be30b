//! `myriad generate`: offline generation, as the contract in `shared/design.md` states.
//!
//! The prompt is token ids (`--prompt-token-ids`), text (`--prompt`) or one chat message
//! (`--chat`, rendered with the model's chat template). `--output json` prints one JSON object:
//! `{"prompt_token_ids", "token_ids", "logprobs", "finish_reason", "text"}` where `logprobs`
//! has an entry per reported position (with `--echo`, prompt positions first, the first being
//! null) holding the token's natural-log probability and the `--logprobs K` most likely tokens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use myriad_attention::{Completion, Request, SamplingParams};
use myriad_gateway::{ChatTemplate, Tokenizer};
use serde_json::{Value, json};

use crate::cluster::{ClusterArgs, TlsArgs};
use crate::runtime::RuntimeArgs;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory in the Hugging Face layout (default: the built-in small model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "chat"])]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Prompt as text (tokenised without added special tokens).
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Option<String>,
    /// One user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for `--chat`.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Render `--chat` with `enable_thinking=false`.
    #[arg(long, requires = "chat")]
    pub no_thinking: bool,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy (default: the model's generation_config.json).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Extra token ids that end generation.
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    /// Also report log-probabilities of the prompt tokens.
    #[arg(long)]
    pub echo: bool,
    /// Report log-probabilities with the K most likely tokens at each position.
    #[arg(long, value_name = "K")]
    pub logprobs: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Where the routed experts run (default: in this process).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::builtin::default_model()?,
    };
    let tokenizer = load_tokenizer(&dir, args)?;
    let prompt = prompt_ids(&dir, args, tokenizer.as_ref())?;
    let local = crate::local::load_with(&dir, &args.runtime.options(), &args.cluster, &args.tls)?;
    let g = &local.generation;
    let sampling = SamplingParams {
        temperature: args
            .temperature
            .or(g.temperature.filter(|_| g.do_sample.unwrap_or(true)))
            .unwrap_or(0.0),
        top_p: args.top_p.or(g.top_p).unwrap_or(1.0),
        top_k: args.top_k.or(g.top_k.map(|k| k as usize)).unwrap_or(0),
        seed: args.seed,
    };
    let request = Request {
        prompt,
        max_tokens: args.max_tokens,
        sampling,
        ignore_eos: args.ignore_eos,
        stop_token_ids: args.stop_token_ids.clone(),
        logprobs: args.logprobs,
        echo: args.echo,
    };
    let out = local.engine.generate(std::slice::from_ref(&request))?;
    let c = out
        .into_iter()
        .next()
        .context("the engine returned no completion")?;
    match args.output {
        OutputFormat::Json => println!("{}", completion_json(&c, tokenizer.as_ref())?),
        OutputFormat::Text => {
            let Some(tok) = &tokenizer else {
                bail!(
                    "{} has no tokenizer.json, so text output is impossible: use --output json",
                    dir.display()
                );
            };
            println!("{}", tok.decode(&c.token_ids, true)?);
        }
    }
    Ok(())
}

fn load_tokenizer(dir: &Path, args: &GenerateArgs) -> Result<Option<Tokenizer>> {
    let needed = args.prompt.is_some() || args.chat.is_some() || args.output == OutputFormat::Text;
    if !dir.join(myriad_gateway::TOKENIZER_FILE).exists() && !needed {
        return Ok(None);
    }
    Ok(Some(Tokenizer::from_dir(dir)?))
}

fn prompt_ids(dir: &Path, args: &GenerateArgs, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_token_ids {
        return Ok(ids.clone());
    }
    let tok = tok.context("a text prompt needs the model's tokenizer.json")?;
    if let Some(text) = &args.prompt {
        return Ok(tok.encode(text)?);
    }
    if let Some(msg) = &args.chat {
        let template = ChatTemplate::from_dir(dir)?;
        let mut messages = Vec::new();
        if let Some(sys) = &args.system {
            messages.push(json!({"role": "system", "content": sys}));
        }
        messages.push(json!({"role": "user", "content": msg}));
        let mut extra = serde_json::Map::new();
        if args.no_thinking {
            extra.insert("enable_thinking".into(), Value::Bool(false));
        }
        let text = template.render(&Value::Array(messages), None, true, &extra)?;
        return Ok(tok.encode(&text)?);
    }
    bail!("give a prompt: --prompt-token-ids, --prompt or --chat")
}

/// The JSON object of the contract (plus `finish_reason`, and `text` when a tokenizer exists).
pub fn completion_json(c: &Completion, tok: Option<&Tokenizer>) -> Result<Value> {
    let logprobs = c.logprobs.as_ref().map(|v| {
        Value::Array(
            v.iter()
                .map(|p| match p {
                    None => Value::Null,
                    Some(p) => json!({
                        "token_id": p.token_id,
                        "logprob": p.logprob,
                        "top": p.top.iter().map(|t| json!({"token_id": t.token_id, "logprob": t.logprob})).collect::<Vec<_>>(),
                    }),
                })
                .collect(),
        )
    });
    let mut obj = json!({
        "prompt_token_ids": c.prompt_token_ids,
        "token_ids": c.token_ids,
        "logprobs": logprobs,
        "finish_reason": c.finish_reason.as_str(),
    });
    if let Some(t) = tok {
        obj["text"] = Value::String(t.decode(&c.token_ids, true)?);
    }
    Ok(obj)
}
