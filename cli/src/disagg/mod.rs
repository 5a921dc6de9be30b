//! Prefill/decode disaggregation between `myriad node attention --http` processes: a decode
//! node hands long prompts to prefill nodes, which run them and send back the sequence's state
//! over QUIC; the decode node then decodes as if it had prefilled the prompt itself (bit for
//! bit: the state travels as stored, `myriad_attention::handoff`).
//!
//! ```text
//! client ──HTTP──▶ decode node: submit_handoff (prompt's KV blocks reserved), then per
//!                  prefill node by load until one succeeds:
//!                    POST /internal/prefill {request, transfer_id, state_addr} ──▶ prefill node
//!                    prefill node: submit_prefill, wait, then over QUIC to state_addr:
//!                    StateBegin, StateChunk…, StateEnd (each acked) ──▶ decode node's receiver
//!                    ◀── 200 {PrefillOutput}
//!                  deliver {state, output} to the waiting request, which streams on
//! ```
//!
//! | module | owns |
//! | --- | --- |
//! | this file | the flags ([`DisaggArgs`]), the node's role, and [`setup`]: what each role adds to the API server |
//! | [`protocol`] | the JSON of `POST /internal/prefill`, the acks and error frames of a transfer, its deadlines |
//! | [`receiver`] | the decode side's QUIC state receiver: the table of expected transfers |
//! | [`sender`] | the prefill side's QUIC sender of one state |
//! | [`prefill_api`] | the prefill node's `POST /internal/prefill` |
//! | [`loads`] | the prefill nodes as the decode side sees them: their loads, the HTTP calls to them |
//! | [`engine`] | the decode side's `Generate`: direct or hand-off per request, the hand-off task |
//!
//! Failures: a prefill node that cannot be reached, answers an error or breaks off mid-transfer
//! is skipped for the next (fresh transfer id); with none left the request fails with every
//! node's reason. A client that goes away cancels the prefill on the prefill node (its HTTP
//! call is dropped, which drops the prefill node's handler and its ticket) and unregisters the
//! transfer.

pub mod engine;
pub mod loads;
pub mod prefill_api;
pub mod protocol;
pub mod receiver;
pub mod sender;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use myriad_attention::Scheduler;

use crate::cluster::TlsArgs;
use crate::cmd::serve::ApiSetup;
use crate::local::LocalEngine;

/// A node's part in disaggregation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Prefills prompts for decode nodes (`POST /internal/prefill`) besides serving the API.
    Prefill,
    /// Serves clients, handing long prompts to `--prefill-nodes`.
    Decode,
    /// Serves clients, prefilling itself unless `--prefill-nodes` are given (today's node).
    Mixed,
}

impl Role {
    /// The name `GET /internal/load` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Mixed => "mixed",
        }
    }
}

/// `myriad node attention`'s disaggregation flags (only meaningful with `--http`).
#[derive(Args, Clone, Debug)]
pub struct DisaggArgs {
    /// This node's part: `prefill` (prefills for decode nodes), `decode` (hands long prompts
    /// to --prefill-nodes) or `mixed` (does both; hands long prompts off only with
    /// --prefill-nodes).
    #[arg(long, value_enum, default_value_t = Role::Mixed)]
    pub role: Role,
    /// The HTTP base URLs of the prefill nodes this node may hand prompts to, e.g.
    /// `http://10.0.0.5:8001,http://10.0.0.6:8001`.
    #[arg(long, value_delimiter = ',', value_name = "URL,…")]
    pub prefill_nodes: Vec<String>,
    /// Prompts of at least this many tokens are prefilled on a prefill node, shorter ones
    /// here. Chunked prefill already keeps a short prompt from stalling the running decodes,
    /// while a hand-off always costs a round trip and a state transfer with a fixed DeltaNet
    /// part (about 75 MB for Qwen3-Next-80B, plus 24 KiB of KV per token), so only long
    /// prompts are worth moving: from about a thousand tokens a prompt's prefill is the
    /// compute of many decode steps.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub disagg_min_prompt_tokens: usize,
    /// UDP address of this node's QUIC state receiver, where prefill nodes send states
    /// (default with --prefill-nodes: 127.0.0.1:0; on an unspecified IP such as 0.0.0.0 each
    /// prefill node is told the address this host reaches it from).
    #[arg(long, value_name = "HOST:PORT")]
    pub state_listen: Option<std::net::SocketAddr>,
}

impl DisaggArgs {
    /// Refuses flags that say something this node would not do, before the model is loaded.
    pub fn check(&self, http: bool, tls: &TlsArgs) -> Result<()> {
        let hands_off = !self.prefill_nodes.is_empty();
        if !http && (self.role != Role::Mixed || hands_off || self.state_listen.is_some()) {
            bail!("--role, --prefill-nodes and --state-listen need --http");
        }
        // Parsed again by `setup`; here so that a typo fails at once.
        loads::PrefillNodes::parse(&self.prefill_nodes, None, String::new())?;
        let transfers = self.role == Role::Prefill || hands_off;
        if transfers && tls.tls_cert.is_none() && !tls.insecure_dev_certs {
            bail!(
                "states move between prefill and decode nodes over QUIC, and nodes authenticate \
                 each other: give --tls-cert, --tls-key and --tls-ca (see `myriad certs`), or \
                 --insecure-dev-certs for a development setup"
            );
        }
        match self.role {
            Role::Prefill if hands_off || self.state_listen.is_some() => bail!(
                "a prefill node hands nothing off: --prefill-nodes and --state-listen are for \
                 decode and mixed nodes"
            ),
            Role::Decode if !hands_off => {
                bail!("a decode node needs --prefill-nodes to hand its prompts to")
            }
            Role::Mixed if !hands_off && self.state_listen.is_some() => {
                bail!("--state-listen needs --prefill-nodes")
            }
            _ => Ok(()),
        }
    }
}

/// What this node's role adds to its API server, given the scheduler and the HTTP runtime:
/// a prefill node serves `POST /internal/prefill`; a decode (or mixed) node with prefill nodes
/// starts its state receiver and submits through the disaggregating engine.
pub fn setup(
    args: &DisaggArgs,
    tls: &TlsArgs,
    api_keys: &[String],
    max_body_bytes: usize,
    local: &LocalEngine,
    scheduler: Arc<Scheduler>,
    runtime: &tokio::runtime::Runtime,
) -> Result<ApiSetup> {
    let role = args.role.as_str().to_string();
    match args.role {
        Role::Prefill => {
            let tls = tls
                .config()
                .context("prefill nodes send states to decode nodes over QUIC")?;
            let routes = prefill_api::routes(prefill_api::PrefillApi::new(
                scheduler.clone(),
                sender::StateSender::new(tls),
                api_keys.to_vec(),
                max_body_bytes,
            ));
            Ok(ApiSetup {
                engine: scheduler,
                role,
                routes: Some(routes),
            })
        }
        Role::Decode | Role::Mixed if !args.prefill_nodes.is_empty() => {
            let tls = tls
                .config()
                .context("decode nodes receive states from prefill nodes over QUIC")?;
            let model = local.engine.clone();
            let listen = args
                .state_listen
                .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            let receiver = {
                let _guard = runtime.enter();
                receiver::StateReceiver::bind(
                    listen,
                    &tls,
                    local.config.fingerprint(),
                    Arc::new(move |begin| {
                        model
                            .model()
                            .check_state_header(begin)
                            .map_err(|e| e.to_string())
                    }),
                )?
            };
            eprintln!(
                "{role} node: prompts of {}+ tokens are prefilled on {}; states arrive on {}",
                args.disagg_min_prompt_tokens,
                args.prefill_nodes.join(", "),
                receiver.local_addr()
            );
            let nodes = loads::PrefillNodes::parse(
                &args.prefill_nodes,
                api_keys.first().cloned(),
                tls.server_name().to_string(),
            )?;
            let engine = engine::DisaggEngine::new(
                scheduler,
                runtime.handle().clone(),
                nodes,
                receiver,
                args.disagg_min_prompt_tokens,
            );
            Ok(ApiSetup {
                engine: Arc::new(engine),
                role,
                routes: None,
            })
        }
        Role::Decode | Role::Mixed => Ok(ApiSetup {
            engine: scheduler,
            role,
            routes: None,
        }),
    }
}
