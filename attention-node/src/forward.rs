//! The model: one forward step over a packed batch of sequences (spec §2.1).
//!
//! A step takes the new tokens of several sequences packed one after another (prefill chunks
//! and single decode tokens mixed freely), runs every layer over all of them at once (dense
//! matmuls see the whole batch; each mixer reads and advances its own sequence's state), and
//! returns the logits of the rows asked for. Routed experts are reached only through the
//! [`ExpertExecutor`]; the router gate, the shared expert and the combine stay here.

use std::sync::Arc;

use myriad_kernels::{Backend, KvCacheSpec, SeqSpan};
use myriad_model::checkpoint::Checkpoint;
use myriad_model::config::{LayerKind, ModelConfig};
use myriad_model::moe::{ExpertExecutor, ExpertTicket};

use crate::error::EngineError;
use crate::state::{LayerState, SequenceState};
use crate::trace::Trace;
use crate::weights::{DenseWeights, MixerWeights, attention_dims, deltanet_dims};

/// One forward step's input: new tokens of several sequences, packed.
pub struct Batch<'s, 'q, B: Backend> {
    pub tokens: &'s [u32],
    pub spans: &'s [SeqSpan],
    pub seqs: &'s mut [&'q mut SequenceState<B>],
    /// Rows of `tokens` whose logits are wanted.
    pub logit_rows: &'s [usize],
}

/// A batch moving through the layers.
struct Lane<'s, 'q, B: Backend> {
    batch: Batch<'s, 'q, B>,
    /// Residual stream.
    x: B::Tensor,
    /// Normalised input of the next mixer.
    u: B::Tensor,
    /// The current layer's routed experts in flight.
    pending: Option<PendingMoe<B>>,
}

struct PendingMoe<B: Backend> {
    v: B::Tensor,
    ticket: Box<dyn ExpertTicket<B>>,
}

/// Brackets one forward step for the expert executor (see `ExpertExecutor::begin_step`); ends
/// it on every path out, errors included.
struct StepGuard<'a, B: Backend>(&'a dyn ExpertExecutor<B>);

impl<'a, B: Backend> StepGuard<'a, B> {
    fn begin(experts: &'a dyn ExpertExecutor<B>) -> Self {
        experts.begin_step();
        StepGuard(experts)
    }
}

impl<B: Backend> Drop for StepGuard<'_, B> {
    fn drop(&mut self) {
        self.0.end_step();
    }
}

/// The attention side of a model plus a way to reach its routed experts.
pub struct Model<B: Backend> {
    config: ModelConfig,
    backend: Arc<B>,
    weights: DenseWeights<B>,
    experts: Arc<dyn ExpertExecutor<B>>,
    /// The block layout of every sequence's KV caches.
    kv_spec: KvCacheSpec,
}

impl<B: Backend> Model<B> {
    pub fn new(
        config: ModelConfig,
        backend: Arc<B>,
        weights: DenseWeights<B>,
        experts: Arc<dyn ExpertExecutor<B>>,
    ) -> Self {
        Model {
            config,
            backend,
            weights,
            experts,
            kv_spec: KvCacheSpec::default(),
        }
    }

    /// Stores KV caches in blocks of `spec` (default: 32 tokens of f32).
    pub fn with_kv_spec(mut self, spec: KvCacheSpec) -> Self {
        self.kv_spec = spec;
        self
    }

    pub fn kv_spec(&self) -> KvCacheSpec {
        self.kv_spec
    }

    /// Full-attention layers (each holds its own blocks per sequence).
    pub fn attention_layers(&self) -> usize {
        self.config
            .layer_kinds
            .iter()
            .filter(|k| **k == LayerKind::FullAttention)
            .count()
    }

    /// KV blocks a sequence holding `tokens` tokens has, over all attention layers.
    pub fn kv_blocks_for(&self, tokens: usize) -> usize {
        self.attention_layers() * self.kv_spec.blocks_for(tokens)
    }

    /// Bytes of one KV block of one layer.
    pub fn kv_block_bytes(&self) -> usize {
        let d = attention_dims(&self.config);
        self.kv_spec.block_bytes(d.num_kv_heads * d.head_dim)
    }

    /// Loads the dense weights of `ckpt`; routed experts run on `experts`.
    pub fn load(
        config: ModelConfig,
        backend: Arc<B>,
        ckpt: &Checkpoint,
        experts: Arc<dyn ExpertExecutor<B>>,
    ) -> Result<Self, EngineError> {
        let weights = DenseWeights::load(&*backend, &config, ckpt)?;
        Ok(Model::new(config, backend, weights, experts))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn weights(&self) -> &DenseWeights<B> {
        &self.weights
    }

    /// A fresh, empty sequence.
    pub fn new_sequence(&self) -> SequenceState<B> {
        let b = &*self.backend;
        let layers = self
            .config
            .layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::LinearAttention => {
                    LayerState::DeltaNet(b.new_delta_state(&deltanet_dims(&self.config)))
                }
                LayerKind::FullAttention => LayerState::Attention(
                    b.new_kv_cache(&attention_dims(&self.config), &self.kv_spec),
                ),
            })
            .collect();
        SequenceState { layers, len: 0 }
    }

    /// Runs one step. `seqs[i]` receives `tokens[spans[i].start .. +spans[i].len]`, which must
    /// continue it (`spans[i].past == seqs[i].len()`); spans must tile `tokens` in order.
    /// Returns host logits `[logit_rows.len(), vocab]` for the requested rows of the batch.
    pub fn forward(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        seqs: &mut [&mut SequenceState<B>],
        logit_rows: &[usize],
        mut trace: Option<&mut dyn Trace>,
    ) -> Result<Vec<f32>, EngineError> {
        self.check_batch(tokens, spans, seqs, logit_rows)?;
        let _step = StepGuard::begin(&*self.experts);
        let mut lane = self.start(
            Batch {
                tokens,
                spans,
                seqs,
                logit_rows,
            },
            &mut trace,
        )?;
        for l in 0..self.weights.layers.len() {
            self.attend(&mut lane, l, &mut trace)?;
            self.finish_moe(&mut lane, l, &mut trace)?;
        }
        self.logits(lane, &mut trace)
    }

    /// Runs two batches of distinct sequences as ping-pong micro-batches (MegaScale-Infer):
    /// while one micro-batch's routed experts are in flight, the other computes its attention
    /// and shared expert, so the expert round trip hides behind local work. Each batch's
    /// results are exactly what [`Model::forward`] gives it alone.
    pub fn forward_pingpong(
        &self,
        a: Batch<'_, '_, B>,
        b: Batch<'_, '_, B>,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        self.check_batch(a.tokens, a.spans, a.seqs, a.logit_rows)?;
        self.check_batch(b.tokens, b.spans, b.seqs, b.logit_rows)?;
        let _step = StepGuard::begin(&*self.experts);
        let none = &mut None;
        let mut la = self.start(a, none)?;
        let mut lb = self.start(b, none)?;
        let layers = self.weights.layers.len();
        self.attend(&mut la, 0, none)?;
        self.attend(&mut lb, 0, none)?;
        for l in 0..layers {
            self.finish_moe(&mut la, l, none)?;
            if l + 1 < layers {
                self.attend(&mut la, l + 1, none)?;
            }
            self.finish_moe(&mut lb, l, none)?;
            if l + 1 < layers {
                self.attend(&mut lb, l + 1, none)?;
            }
        }
        Ok((self.logits(la, none)?, self.logits(lb, none)?))
    }

    /// Embeds a batch and normalises it for the first mixer.
    fn start<'s, 'q>(
        &self,
        batch: Batch<'s, 'q, B>,
        trace: &mut Option<&mut dyn Trace>,
    ) -> Result<Lane<'s, 'q, B>, EngineError> {
        let b = &*self.backend;
        let (n, h) = (batch.tokens.len(), self.config.hidden_size);
        let mut x = b.zeros(n, h);
        b.embed(&self.weights.embed, batch.tokens, &mut x)?;
        if let Some(t) = tensors(trace) {
            t.embeddings(&b.download(&x));
        }
        let mut u = b.zeros(n, h);
        b.rms_norm(&x, &self.weights.layers[0].input_norm, self.eps(), &mut u);
        Ok(Lane {
            batch,
            x,
            u,
            pending: None,
        })
    }

    /// Layer `l` up to the routed experts: mixer, residual + post-attention norm, router, and
    /// the routed experts submitted.
    fn attend(
        &self,
        lane: &mut Lane<'_, '_, B>,
        l: usize,
        trace: &mut Option<&mut dyn Trace>,
    ) -> Result<(), EngineError> {
        let b = &*self.backend;
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (n, h) = (lane.batch.tokens.len(), c.hidden_size);
        let spans = lane.batch.spans;
        // Mixer: fused input projection, the mixer over each sequence's state, output projection.
        let (in_proj, out_proj) = match &lw.mixer {
            MixerWeights::DeltaNet {
                in_proj, out_proj, ..
            } => (in_proj, out_proj),
            MixerWeights::Attention {
                in_proj, out_proj, ..
            } => (in_proj, out_proj),
        };
        let mut proj = b.zeros(n, b.matrix_shape(in_proj).0);
        b.matmul(&lane.u, in_proj, &mut proj);
        let y = match &lw.mixer {
            MixerWeights::DeltaNet { params, .. } => {
                let mut states = layer_states(lane.batch.seqs, l, |s| match s {
                    LayerState::DeltaNet(d) => Some(d),
                    LayerState::Attention(_) => None,
                })?;
                let mut y = b.zeros(n, params.dims.value_dim());
                b.gated_deltanet(params, &proj, spans, &mut states, &mut y);
                y
            }
            MixerWeights::Attention { params, .. } => {
                let mut caches = layer_states(lane.batch.seqs, l, |s| match s {
                    LayerState::Attention(kv) => Some(kv),
                    LayerState::DeltaNet(_) => None,
                })?;
                let mut y = b.zeros(n, params.dims.out_dim());
                b.gated_attention(params, &proj, spans, &mut caches, &mut y);
                y
            }
        };
        let mut mixed = b.zeros(n, h);
        b.matmul(&y, out_proj, &mut mixed);
        if let Some(t) = tensors(trace) {
            t.mixer_out(l, &b.download(&mixed));
        }
        // x' = x + mixer; v = norm(x').
        let mut v = b.zeros(n, h);
        b.add_rms_norm(&mut lane.x, &mixed, &lw.post_norm, self.eps(), &mut v);
        // Route, then start the routed experts (possibly on other nodes).
        let mut logits = b.zeros(n, c.num_experts);
        b.matmul(&v, &lw.router, &mut logits);
        let routes = b.route(&logits, c.num_experts_per_tok, c.norm_topk_prob);
        if let Some(t) = trace.as_deref_mut() {
            t.routes(l, &routes);
        }
        if let Some(t) = tensors(trace) {
            t.router_logits(l, &b.download(&logits));
        }
        let ticket = self.experts.submit(l, &v, &routes, b.zeros(n, h))?;
        lane.pending = Some(PendingMoe { v, ticket });
        Ok(())
    }

    /// Layer `l` from the routed experts on: the shared expert (computed while the routed
    /// experts are in flight), the combine, and the residual add fused with the next norm.
    fn finish_moe(
        &self,
        lane: &mut Lane<'_, '_, B>,
        l: usize,
        trace: &mut Option<&mut dyn Trace>,
    ) -> Result<(), EngineError> {
        let b = &*self.backend;
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (n, h) = (lane.batch.tokens.len(), c.hidden_size);
        let Some(PendingMoe { v, ticket }) = lane.pending.take() else {
            return Err(EngineError::Batch(format!(
                "layer {l}: no routed experts in flight"
            )));
        };
        let is = c.shared_expert_intermediate_size;
        let mut sgu = b.zeros(n, 2 * is + 1);
        b.matmul(&v, &lw.shared_gate_up, &mut sgu);
        let mut act = b.zeros(n, is);
        b.swiglu(&sgu, &mut act);
        let mut shared = b.zeros(n, h);
        b.matmul(&act, &lw.shared_down, &mut shared);
        let mut moe = ticket.wait()?;
        b.add_sigmoid_gated(&mut moe, &shared, &sgu, 2 * is);
        if let Some(t) = tensors(trace) {
            let g = b.download(&sgu);
            let gates: Vec<f32> = g
                .chunks_exact(2 * is + 1)
                .map(|r| 1.0 / (1.0 + (-r[2 * is]).exp()))
                .collect();
            t.shared_expert_gate(l, &gates);
            t.moe_out(l, &b.download(&moe));
        }
        // Residual; the next layer's input norm is fused into the add.
        if let Some(next) = self.weights.layers.get(l + 1) {
            b.add_rms_norm(&mut lane.x, &moe, &next.input_norm, self.eps(), &mut lane.u);
        } else {
            b.add(&mut lane.x, &moe);
        }
        if let Some(t) = tensors(trace) {
            t.layer_output(l, &b.download(&lane.x));
        }
        Ok(())
    }

    /// Advances the sequences and computes the requested logits.
    fn logits(
        &self,
        lane: Lane<'_, '_, B>,
        trace: &mut Option<&mut dyn Trace>,
    ) -> Result<Vec<f32>, EngineError> {
        let b = &*self.backend;
        let c = &self.config;
        let Lane { batch, x, .. } = lane;
        for (s, seq) in batch.spans.iter().zip(batch.seqs.iter_mut()) {
            seq.len += s.len;
        }
        if batch.logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let sel = b.gather_rows(&x, batch.logit_rows);
        let mut normed = b.zeros(batch.logit_rows.len(), c.hidden_size);
        b.rms_norm(&sel, &self.weights.final_norm, self.eps(), &mut normed);
        if let Some(t) = tensors(trace) {
            t.final_norm(&b.download(&normed));
        }
        let mut logits = b.zeros(batch.logit_rows.len(), c.vocab_size);
        b.matmul(&normed, &self.weights.lm_head, &mut logits);
        Ok(b.download(&logits))
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Total bytes of dense weights one decode step reads for `rows` tokens (every dense
    /// matrix once, one embedding row per token).
    pub fn dense_bytes_per_step(&self, rows: usize) -> usize {
        let b = &*self.backend;
        let (vocab, _) = b.matrix_shape(&self.weights.embed);
        let row = b.matrix_bytes(&self.weights.embed) / vocab.max(1);
        self.weights.bytes_per_token(b) - row + rows * row
    }

    fn check_batch(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        seqs: &[&mut SequenceState<B>],
        logit_rows: &[usize],
    ) -> Result<(), EngineError> {
        if spans.len() != seqs.len() {
            return Err(EngineError::Batch(format!(
                "{} spans for {} sequences",
                spans.len(),
                seqs.len()
            )));
        }
        let mut next = 0;
        for (i, (s, q)) in spans.iter().zip(seqs).enumerate() {
            if s.start != next || s.len == 0 {
                return Err(EngineError::Batch(format!(
                    "span {i} does not continue the packed batch"
                )));
            }
            if s.past != q.len {
                return Err(EngineError::Batch(format!(
                    "span {i} starts at {} but its sequence holds {} tokens",
                    s.past, q.len
                )));
            }
            if s.past + s.len > self.config.max_position_embeddings {
                return Err(EngineError::Batch(format!(
                    "sequence {i} would reach {} tokens, beyond the context of {}",
                    s.past + s.len,
                    self.config.max_position_embeddings
                )));
            }
            next += s.len;
        }
        if next != tokens.len() {
            return Err(EngineError::Batch(format!(
                "spans cover {next} rows of {}",
                tokens.len()
            )));
        }
        if let Some(&r) = logit_rows.iter().find(|&&r| r >= tokens.len()) {
            return Err(EngineError::Batch(format!(
                "logit row {r} outside the batch of {}",
                tokens.len()
            )));
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Batch(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }
}

/// The trace, if it wants tensor copies.
fn tensors<'a>(trace: &'a mut Option<&mut dyn Trace>) -> Option<&'a mut dyn Trace> {
    match trace.as_deref_mut() {
        Some(t) if t.wants_tensors() => Some(t),
        _ => None,
    }
}

/// Layer `l`'s state of every sequence, as `pick` selects it for the layer's mixer kind (an
/// error if a sequence was built for another model).
fn layer_states<'s, B: Backend, T>(
    seqs: &'s mut [&mut SequenceState<B>],
    l: usize,
    pick: impl Fn(&'s mut LayerState<B>) -> Option<&'s mut T>,
) -> Result<Vec<&'s mut T>, EngineError> {
    seqs.iter_mut()
        .map(|s| {
            pick(&mut s.layers[l]).ok_or_else(|| {
                EngineError::Batch(format!(
                    "layer {l}: sequence state does not match the layer's mixer"
                ))
            })
        })
        .collect()
}
