//! What the attention-node tests share: the tiny fixtures of both families, loaded on one
//! CPU thread with every expert in process, and request builders.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, Instant};

use myriad_attention::{
    Completion, Engine, EngineConfig, Event, FinishReason, Generate, Model, Request,
    SamplingParams, Scheduler,
};
use myriad_expert::ExpertShard;
use myriad_kernels::cpu::CpuBackend;
use myriad_kernels::{KvCacheSpec, KvDtype};
use myriad_model::{Checkpoint, ExpertSet, GenerationConfig, ModelConfig};

pub const FAMILIES: [&str; 2] = ["qwen3_5_moe-tiny", "qwen3_next-tiny"];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

/// The fixture on one CPU thread, its KV caches in blocks of `spec`.
pub fn engine(name: &str, spec: KvCacheSpec, config: EngineConfig) -> Arc<Engine<CpuBackend>> {
    let dir = fixture(name);
    let model_config = ModelConfig::from_dir(&dir).unwrap();
    let generation = GenerationConfig::from_dir(&dir, &model_config).unwrap();
    let ckpt = Checkpoint::open(&dir, &model_config).unwrap();
    let backend = Arc::new(CpuBackend::new(1));
    let all = ExpertSet::all(model_config.num_experts);
    let shard = ExpertShard::load(backend.clone(), &model_config, &ckpt, &all).unwrap();
    let model = Model::load(model_config, backend, &ckpt, Arc::new(shard))
        .unwrap()
        .with_kv_spec(spec);
    Arc::new(Engine::new(model, config, generation.eos_token_ids))
}

pub fn f32_blocks(block_tokens: usize) -> KvCacheSpec {
    KvCacheSpec {
        block_tokens,
        dtype: KvDtype::F32,
    }
}

pub fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((seed * 7919 + i * 104_729 + 13) % 1000) as u32)
        .collect()
}

/// Greedy and seeded-sampling requests of assorted lengths, with log-probabilities (every
/// other one with the prompt's too).
pub fn requests() -> Vec<Request> {
    (0..6)
        .map(|i| {
            let mut r = Request::greedy(prompt(i, 3 + 9 * i), 12 + 3 * i);
            r.ignore_eos = true;
            r.logprobs = Some(2);
            r.echo = i % 2 == 0;
            if i % 3 == 1 {
                r.sampling = SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    top_k: 0,
                    seed: Some(100 + i as u64),
                };
            }
            r
        })
        .collect()
}

/// A streamed request's events as the completion `generate` would return.
pub fn collect(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    r: &Request,
) -> Completion {
    let mut out = Completion {
        prompt_token_ids: r.prompt.clone(),
        token_ids: Vec::new(),
        logprobs: r.logprobs.map(|_| Vec::new()),
        finish_reason: FinishReason::Length,
    };
    loop {
        match events
            .blocking_recv()
            .expect("the stream ended without Finished")
        {
            Event::PromptLogprobs(p) => {
                if let Some(v) = out.logprobs.as_mut() {
                    v.extend(p);
                }
            }
            Event::Token { id, logprobs } => {
                out.token_ids.push(id);
                if let Some(v) = out.logprobs.as_mut() {
                    v.push(logprobs);
                }
            }
            Event::Finished { reason, .. } => {
                out.finish_reason = reason;
                return out;
            }
            Event::Failed(m) | Event::Unavailable(m) => panic!("request failed: {m}"),
        }
    }
}

/// Waits until the scheduler runs and queues nothing (generous deadline: only a hung
/// scheduler reaches it).
pub fn wait_idle(s: &Scheduler) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = s.stats();
        if st.running == 0 && st.waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler never went idle: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
