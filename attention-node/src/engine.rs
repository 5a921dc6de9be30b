//! Batched generation: many sequences advance together, one forward step at a time.
//!
//! Each step packs one token for every decoding sequence plus prompt chunks of the sequences
//! still prefilling, up to a token budget, so long prompts are prefilled in chunks beside
//! running decodes instead of stalling them. Logits come back only for the rows that need
//! them: the last prompt row and decode rows (to sample), and every prompt row when prompt
//! log-probabilities were asked for.

use std::borrow::Borrow;

use myriad_kernels::{Backend, SeqSpan};

use crate::error::EngineError;
use crate::forward::{Batch, Model};

mod handoff;
use crate::rng::Rng;
use crate::sampling::{log_softmax, sample, top_logprobs};
use crate::state::SequenceState;

/// Limits of one engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most tokens in one forward step (bounds activation memory and step latency).
    pub max_batch_tokens: usize,
    /// Most sequences running at once; further requests wait.
    pub max_seqs: usize,
    /// Split each step into two micro-batches that take turns (one's attention runs while the
    /// other's routed experts are in flight). Pays off when experts are remote.
    pub ping_pong: bool,
    /// KV blocks all running sequences may hold together (over every attention layer); `None`
    /// is unbounded. When a step needs more, the newest sequences are preempted (their state
    /// dropped, to be recomputed from their tokens later). The scheduler passes its own pool.
    pub kv_blocks: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 2048,
            max_seqs: 256,
            ping_pong: false,
            kv_blocks: None,
        }
    }
}

pub use myriad_engine_api::{FinishReason, PositionLogprobs, Request};

/// The result of one request.
#[derive(Clone, Debug)]
pub struct Completion {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// One entry per reported position (prompt positions first with `echo`; the first prompt
    /// position has none), when log-probabilities were asked for.
    pub logprobs: Option<Vec<Option<PositionLogprobs>>>,
    pub finish_reason: FinishReason,
}

/// Runs requests to completion on a model.
pub struct Engine<B: Backend> {
    model: Model<B>,
    config: EngineConfig,
    eos: Vec<u32>,
}

/// One running sequence. `Q` is however the caller holds its request: a borrow into the
/// request slice for [`Engine::generate`], an owned job with its event channel for the
/// scheduler; both drive the same step code.
pub(crate) struct Active<B: Backend, Q> {
    /// The caller's name for the sequence (its position in `generate`'s requests).
    pub(crate) index: usize,
    pub(crate) request: Q,
    pub(crate) state: SequenceState<B>,
    rng: Rng,
    /// Prompt tokens prefilled so far (never decreases: a preempted sequence recomputes its
    /// state, but its prompt was already prefilled and counted once).
    pub(crate) prefilled: usize,
    /// Prompt positions whose log-probability is recorded (so a recompute records none twice).
    prompt_logged: usize,
    /// Times this sequence was preempted.
    pub(crate) preemptions: u32,
    /// Stop after the first generated token so the state can be handed to a decode node.
    pub(crate) handoff: bool,
    /// Stopped for the hand-off rather than ended (`done` is set too).
    pub(crate) paused: bool,
    /// Admitted, waiting for its state from a prefill node (not run until it arrives).
    pub(crate) awaiting: bool,
    /// KV blocks kept free for the state it awaits.
    pub(crate) reserved: usize,
    /// Generated tokens (and log-probabilities) so far.
    pub(crate) out: Completion,
    pub(crate) done: bool,
}

impl<B: Backend, Q: Borrow<Request>> Active<B, Q> {
    /// Tokens the sequence is made of so far: its prompt, then what it generated.
    fn known(&self) -> usize {
        self.request.borrow().prompt.len() + self.out.token_ids.len()
    }

    fn token(&self, i: usize) -> u32 {
        let prompt = &self.request.borrow().prompt;
        match prompt.get(i) {
            Some(&t) => t,
            None => self.out.token_ids[i - prompt.len()],
        }
    }

    /// Feeds back its last generated token; everything before it is in the state.
    fn decoding(&self) -> bool {
        !self.out.token_ids.is_empty() && self.state.len() + 1 == self.known()
    }

    /// Tokens to feed before the next token can be sampled.
    fn pending(&self) -> usize {
        self.known() - self.state.len()
    }
}

/// One micro-batch of a step: its sequences (indices into the active list), packed tokens,
/// spans, the rows whose logits are needed and what each of those rows is for.
struct StepPart {
    members: Vec<usize>,
    tokens: Vec<u32>,
    spans: Vec<SeqSpan>,
    rows: Vec<usize>,
    uses: Vec<RowUse>,
}

impl StepPart {
    /// Packs `shares` ((active index, tokens this step)) into one micro-batch.
    fn build<B: Backend, Q: Borrow<Request>>(
        active: &[Active<B, Q>],
        shares: &[(usize, usize)],
    ) -> StepPart {
        let mut p = StepPart {
            members: Vec::new(),
            tokens: Vec::new(),
            spans: Vec::new(),
            rows: Vec::new(),
            uses: Vec::new(),
        };
        for &(ai, take) in shares {
            let a = &active[ai];
            let r: &Request = a.request.borrow();
            let m = p.members.len();
            let start = p.tokens.len();
            // Prompt tokens, then (after a preemption) the generated ones being recomputed; a
            // decoding sequence feeds back its last token.
            let past = a.state.len();
            let want_prompt_lp = r.echo && r.logprobs.is_some();
            for j in 0..take {
                let pos = past + j;
                p.tokens.push(a.token(pos));
                if pos + 1 < r.prompt.len() {
                    if want_prompt_lp && pos + 1 > a.prompt_logged {
                        p.rows.push(start + j);
                        p.uses.push(RowUse::Prompt(m, pos + 1));
                    }
                } else if pos + 1 == a.known() && r.max_tokens > 0 {
                    p.rows.push(start + j);
                    p.uses.push(RowUse::Next(m));
                }
            }
            p.spans.push(SeqSpan {
                start,
                len: p.tokens.len() - start,
                past: a.state.len(),
            });
            p.members.push(ai);
        }
        p
    }
}

/// Disjoint mutable borrows of the states of each part's members, in member order.
fn disjoint_states<'a, B: Backend, Q>(
    active: &'a mut [Active<B, Q>],
    parts: &[StepPart],
) -> Vec<Vec<&'a mut SequenceState<B>>> {
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; active.len()];
    for (pi, p) in parts.iter().enumerate() {
        for (m, &ai) in p.members.iter().enumerate() {
            owner[ai] = Some((pi, m));
        }
    }
    let mut slots: Vec<Vec<Option<&'a mut SequenceState<B>>>> = parts
        .iter()
        .map(|p| (0..p.members.len()).map(|_| None).collect())
        .collect();
    for (a, o) in active.iter_mut().zip(&owner) {
        if let Some((pi, m)) = *o {
            slots[pi][m] = Some(&mut a.state);
        }
    }
    slots
        .into_iter()
        .map(|v| v.into_iter().flatten().collect())
        .collect()
}

/// What a row of logits is for.
enum RowUse {
    /// Predicts prompt token `i` (log-probability only).
    Prompt(usize, usize),
    /// Predicts the next generated token.
    Next(usize),
}

impl<B: Backend> Engine<B> {
    /// `eos` are the ids that end a sequence unless a request ignores them.
    pub fn new(model: Model<B>, config: EngineConfig, eos: Vec<u32>) -> Self {
        Engine { model, config, eos }
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Checks a request before any work; the message names the problem.
    pub fn validate(&self, r: &Request) -> Result<(), String> {
        let c = self.model.config();
        if r.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some((i, t)) = r
            .prompt
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= c.vocab_size)
        {
            return Err(format!(
                "prompt token {i} has id {t}, outside the vocabulary of {}",
                c.vocab_size
            ));
        }
        if r.prompt.len() > c.max_position_embeddings {
            return Err(format!(
                "the prompt has {} tokens, more than the model's context of {}",
                r.prompt.len(),
                c.max_position_embeddings
            ));
        }
        if let Some(k) = r.logprobs
            && k > c.vocab_size
        {
            return Err(format!(
                "logprobs {k} exceeds the vocabulary of {}",
                c.vocab_size
            ));
        }
        r.sampling.validate()
    }

    /// Generates for every request; results are in request order.
    pub fn generate(&self, requests: &[Request]) -> Result<Vec<Completion>, EngineError> {
        for (index, r) in requests.iter().enumerate() {
            self.validate(r)
                .map_err(|message| EngineError::BadRequest { index, message })?;
        }
        let mut results: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut waiting: std::collections::VecDeque<usize> = (0..requests.len()).collect();
        let mut active: Vec<Active<B, &Request>> = Vec::new();
        while !waiting.is_empty() || !active.is_empty() {
            while active.len() < self.config.max_seqs.max(1) {
                let Some(i) = waiting.pop_front() else { break };
                active.push(self.start(i, &requests[i]));
            }
            let shares = self.plan(&mut active, self.config.kv_blocks);
            if shares.is_empty() && active.iter().any(|a| !a.done) {
                return Err(EngineError::Batch(
                    "the KV block pool cannot hold the oldest running sequence".into(),
                ));
            }
            self.run(&mut active, &shares)?;
            for a in active.iter_mut().filter(|a| a.done) {
                results[a.index] = Some(std::mem::replace(&mut a.out, empty_completion()));
            }
            active.retain(|a| !a.done);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(empty_completion))
            .collect())
    }

    /// A new running sequence for `request` (already validated), named `index`.
    pub(crate) fn start<Q: Borrow<Request>>(&self, index: usize, request: Q) -> Active<B, Q> {
        let r: &Request = request.borrow();
        let logprobs = r
            .logprobs
            .map(|_| if r.echo { vec![None] } else { Vec::new() });
        let done = r.max_tokens == 0 && !(r.echo && r.logprobs.is_some());
        let rng = Rng::new(r.sampling.seed.unwrap_or_else(Rng::entropy_seed));
        let out = Completion {
            prompt_token_ids: r.prompt.clone(),
            token_ids: Vec::new(),
            logprobs,
            finish_reason: FinishReason::Length,
        };
        Active {
            index,
            request,
            state: self.model.new_sequence(),
            rng,
            prefilled: 0,
            prompt_logged: 0,
            preemptions: 0,
            handoff: false,
            paused: false,
            awaiting: false,
            reserved: 0,
            out,
            done,
        }
    }

    /// Drops `a`'s state (giving back its KV blocks); it will be recomputed from its prompt
    /// and generated tokens, and then continues where it stopped.
    pub(crate) fn preempt<Q>(&self, a: &mut Active<B, Q>) {
        a.state = self.model.new_sequence();
        a.preemptions += 1;
    }

    /// KV blocks `a` holds.
    pub(crate) fn blocks_held<Q>(&self, a: &Active<B, Q>) -> usize {
        self.model.kv_blocks_for(a.state.len())
    }

    /// What the next step runs: `(active index, tokens)` for each sequence in it, decoding
    /// sequences first, within the token budget and `kv_blocks` (the blocks all of `active`
    /// may hold; `None`: unbounded). Empty when nothing is left to run.
    ///
    /// When a sequence needs blocks that are not free, sequences admitted after it that are
    /// not in this step are preempted, newest first (vLLM's recompute policy); if that is not
    /// enough, a prefill takes the tokens that fit and a decode preempts itself. The oldest
    /// sequence can therefore always progress, and any request whose whole context fits the
    /// pool completes.
    pub(crate) fn plan<Q: Borrow<Request>>(
        &self,
        active: &mut [Active<B, Q>],
        kv_blocks: Option<usize>,
    ) -> Vec<(usize, usize)> {
        // Decoding sequences first: each costs one token and must not wait behind prefills.
        let order: Vec<usize> = {
            let (dec, pre): (Vec<usize>, Vec<usize>) = (0..active.len())
                .filter(|&i| !active[i].done && !active[i].awaiting)
                .partition(|&i| active[i].decoding());
            dec.into_iter().chain(pre).collect()
        };
        // Blocks reserved for states on their way count as held.
        let held: usize = active
            .iter()
            .map(|a| self.blocks_held(a) + a.reserved)
            .sum();
        let mut free = kv_blocks.map(|cap| cap.saturating_sub(held));
        let mut scheduled = vec![false; active.len()];
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut shares: Vec<(usize, usize)> = Vec::new();
        for ai in order {
            if budget == 0 {
                break;
            }
            let decoding = active[ai].decoding();
            let mut take = if decoding {
                1
            } else {
                active[ai].pending().min(budget)
            };
            if take == 0 {
                continue;
            }
            if let Some(free) = free.as_mut() {
                let past = active[ai].state.len();
                let need = |take: usize| {
                    self.model.kv_blocks_for(past + take) - self.model.kv_blocks_for(past)
                };
                // Newest first: those admitted after `ai` and not in this step.
                let mut victim = active.len();
                while need(take) > *free {
                    let Some(v) = (ai + 1..victim)
                        .rev()
                        .find(|&v| !scheduled[v] && self.blocks_held(&active[v]) > 0)
                    else {
                        break;
                    };
                    *free += self.blocks_held(&active[v]);
                    self.preempt(&mut active[v]);
                    victim = v;
                }
                if need(take) > *free {
                    if decoding {
                        *free += self.blocks_held(&active[ai]);
                        self.preempt(&mut active[ai]);
                        continue;
                    }
                    while take > 0 && need(take) > *free {
                        take -= 1;
                    }
                    if take == 0 {
                        continue;
                    }
                }
                *free -= need(take);
            }
            scheduled[ai] = true;
            budget -= take;
            shares.push((ai, take));
        }
        shares
    }

    /// Runs one forward step over `shares` (from [`Self::plan`] on the same `active`), then
    /// samples, records log-probabilities and applies the stop rules. On an error the states
    /// of the sequences in `shares` are undefined (a layer may have been applied to some);
    /// the others are untouched.
    pub(crate) fn run<Q: Borrow<Request>>(
        &self,
        active: &mut [Active<B, Q>],
        shares: &[(usize, usize)],
    ) -> Result<(), EngineError> {
        if shares.is_empty() {
            return Ok(());
        }
        // Ping-pong: two micro-batches of about equal tokens.
        let parts: Vec<Vec<(usize, usize)>> = if self.config.ping_pong && shares.len() >= 2 {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            let (mut tx, mut ty) = (0, 0);
            for &s in shares {
                if tx <= ty {
                    tx += s.1;
                    x.push(s);
                } else {
                    ty += s.1;
                    y.push(s);
                }
            }
            vec![x, y]
        } else {
            vec![shares.to_vec()]
        };
        let built: Vec<StepPart> = parts.iter().map(|p| StepPart::build(active, p)).collect();
        let logits: Vec<Vec<f32>> = {
            let mut seqs = disjoint_states(active, &built);
            match (built.as_slice(), seqs.as_mut_slice()) {
                ([one], [s1]) => {
                    vec![
                        self.model
                            .forward(&one.tokens, &one.spans, s1, &one.rows, None)?,
                    ]
                }
                ([p1, p2], [s1, s2]) => {
                    let (l1, l2) = self.model.forward_pingpong(
                        Batch {
                            tokens: &p1.tokens,
                            spans: &p1.spans,
                            seqs: s1,
                            logit_rows: &p1.rows,
                        },
                        Batch {
                            tokens: &p2.tokens,
                            spans: &p2.spans,
                            seqs: s2,
                            logit_rows: &p2.rows,
                        },
                    )?;
                    vec![l1, l2]
                }
                _ => {
                    return Err(EngineError::Batch(
                        "a step has one or two micro-batches".into(),
                    ));
                }
            }
        };
        let vocab = self.model.config().vocab_size;
        for (part, part_logits) in built.iter().zip(&logits) {
            for &ai in &part.members {
                let a = &mut active[ai];
                let in_state = a.state.len().min(a.request.borrow().prompt.len());
                a.prefilled = a.prefilled.max(in_state);
            }
            for (row_logits, u) in part_logits.chunks_exact(vocab).zip(&part.uses) {
                match *u {
                    RowUse::Prompt(m, i) => {
                        let a = &mut active[part.members[m]];
                        let r: &Request = a.request.borrow();
                        let lp = log_softmax(row_logits);
                        let tok = r.prompt[i];
                        a.prompt_logged = a.prompt_logged.max(i);
                        if let Some(v) = a.out.logprobs.as_mut() {
                            v.push(Some(PositionLogprobs {
                                token_id: tok,
                                logprob: lp[tok as usize],
                                top: top_logprobs(&lp, r.logprobs.unwrap_or(0)),
                            }));
                        }
                    }
                    RowUse::Next(m) => self.accept(&mut active[part.members[m]], row_logits),
                }
            }
            for &ai in &part.members {
                let a = &mut active[ai];
                let r: &Request = a.request.borrow();
                if a.prefilled == r.prompt.len() && r.max_tokens == 0 {
                    a.done = true;
                }
            }
        }
        Ok(())
    }

    /// Samples the next token of `a` from `logits` and applies the stop rules.
    fn accept<Q: Borrow<Request>>(&self, a: &mut Active<B, Q>, logits: &[f32]) {
        let r: &Request = a.request.borrow();
        let tok = sample(logits, &r.sampling, &mut a.rng);
        if let (Some(k), Some(v)) = (r.logprobs, a.out.logprobs.as_mut()) {
            let lp = log_softmax(logits);
            v.push(Some(PositionLogprobs {
                token_id: tok,
                logprob: lp[tok as usize],
                top: top_logprobs(&lp, k),
            }));
        }
        a.out.token_ids.push(tok);
        let ctx = self.model.config().max_position_embeddings;
        if (!r.ignore_eos && self.eos.contains(&tok)) || r.stop_token_ids.contains(&tok) {
            a.out.finish_reason = FinishReason::Stop;
            a.done = true;
        } else if a.out.token_ids.len() >= r.max_tokens
            || r.prompt.len() + a.out.token_ids.len() >= ctx
        {
            a.out.finish_reason = FinishReason::Length;
            a.done = true;
        } else if a.handoff {
            a.paused = true;
            a.done = true;
        }
    }
}

fn empty_completion() -> Completion {
    Completion {
        prompt_token_ids: Vec::new(),
        token_ids: Vec::new(),
        logprobs: None,
        finish_reason: FinishReason::Length,
    }
}
