//! The paged KV cache on the real (tiny) models of both families: the block size never
//! changes a result (blocks of 100 000 tokens hold a whole sequence in one block, the old
//! per-sequence cache), and under a pool too small for every sequence at once the newest are
//! preempted and recomputed, every request still completes with the tokens it has alone, and
//! the pool is empty afterwards.

#![allow(clippy::unwrap_used)]

use myriad_attention::{
    Completion, Engine, EngineConfig, Generate, Request, Scheduler, SchedulerConfig,
};
use myriad_kernels::Backend;
use myriad_kernels::cpu::CpuBackend;

mod common;

use common::{FAMILIES, engine, f32_blocks, requests};

#[test]
fn the_block_size_never_changes_a_result() {
    for family in FAMILIES {
        let reqs = requests();
        let whole = engine(family, f32_blocks(100_000), EngineConfig::default());
        let want = whole.generate(&reqs).unwrap();
        for bt in [1, 5, 32] {
            let paged = engine(family, f32_blocks(bt), EngineConfig::default());
            let got = paged.generate(&reqs).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.token_ids, w.token_ids,
                    "{family}, blocks of {bt}, request {i}"
                );
                // Log-probabilities too, bit for bit.
                assert_eq!(
                    format!("{:?}", g.logprobs),
                    format!("{:?}", w.logprobs),
                    "{family}, blocks of {bt}, request {i}"
                );
            }
            assert_eq!(paged.model().backend().kv_blocks_live(), 0);
        }
    }
}

/// What `r` produces with the engine to itself.
fn alone(engine: &Engine<CpuBackend>, r: &Request) -> Completion {
    engine.generate(std::slice::from_ref(r)).unwrap().remove(0)
}

/// Token ids equal; log-probabilities equal up to the reassociation a recompute brings (a
/// recomputed position comes from a prefill chunk instead of a decode step).
fn assert_same_completion(got: &Completion, want: &Completion, what: &str) {
    assert_eq!(got.token_ids, want.token_ids, "{what}");
    assert_eq!(got.finish_reason, want.finish_reason, "{what}");
    let (Some(g), Some(w)) = (&got.logprobs, &want.logprobs) else {
        assert_eq!(got.logprobs.is_some(), want.logprobs.is_some(), "{what}");
        return;
    };
    assert_eq!(g.len(), w.len(), "{what}: log-probability positions");
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                assert_eq!(a.token_id, b.token_id, "{what}: position {i}");
                assert!(
                    (a.logprob - b.logprob).abs() < 1e-4,
                    "{what}: position {i}: {} vs {}",
                    a.logprob,
                    b.logprob
                );
            }
            (None, None) => {}
            _ => panic!("{what}: position {i} present in only one run"),
        }
    }
}

#[test]
fn preempted_sequences_finish_with_their_uncontended_tokens() {
    for family in FAMILIES {
        let spec = f32_blocks(4);
        let free = engine(family, spec, EngineConfig::default());
        let reqs = requests();
        let want: Vec<Completion> = reqs.iter().map(|r| alone(&free, r)).collect();
        // A pool that holds the longest request's whole context, and little more.
        let model = free.model();
        let longest = reqs
            .iter()
            .map(|r| model.kv_blocks_for(r.prompt.len() + r.max_tokens))
            .max()
            .unwrap();

        // Through `generate` (every request admitted at once, the pool bounds the steps).
        let tight = engine(
            family,
            spec,
            EngineConfig {
                kv_blocks: Some(longest),
                max_batch_tokens: 16,
                ..EngineConfig::default()
            },
        );
        let got = tight.generate(&reqs).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_same_completion(g, w, &format!("{family} generate, request {i}"));
        }
        assert_eq!(tight.model().backend().kv_blocks_live(), 0);

        // Through the scheduler, which admits by blocks and reports what it preempted.
        let served = engine(family, spec, EngineConfig::default());
        let block_bytes = served.model().kv_block_bytes() as u64;
        let s = Scheduler::start(
            served.clone(),
            SchedulerConfig {
                kv_cache_bytes: longest as u64 * block_bytes,
                max_waiting: 16,
            },
        );
        let subs: Vec<_> = reqs.iter().map(|r| s.submit(r.clone()).unwrap()).collect();
        for (i, (mut sub, (r, w))) in subs.into_iter().zip(reqs.iter().zip(&want)).enumerate() {
            let got = common::collect(&mut sub.events, r);
            assert_same_completion(&got, w, &format!("{family} scheduler, request {i}"));
        }
        let st = s.stats();
        assert!(
            st.preemptions > 0,
            "{family}: nothing was preempted: {st:?}"
        );
        assert_eq!(st.kv_blocks_total, longest as u64);
        common::wait_idle(&s);
        assert_eq!(s.stats().kv_blocks_used, 0);
        drop(s);
        assert_eq!(served.model().backend().kv_blocks_live(), 0);
    }
}
