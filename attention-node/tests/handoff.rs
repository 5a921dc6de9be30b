//! Handing a prefilled sequence from one engine to another through the wire format: the
//! decode side continues it bit for bit as if one engine had done both, for both families,
//! greedy and seeded sampling, with prompt and token log-probabilities; and a state of another
//! model or KV layout is refused with an error naming both.

#![allow(clippy::unwrap_used)]

mod common;

use common::{FAMILIES, engine, f32_blocks, requests};
use myriad_attention::{EngineConfig, EngineError};
use myriad_kernels::{Backend, KvCacheSpec, KvDtype};
use myriad_wire::seq_state::{Assembler, StateLimits};
use myriad_wire::{AnyMessage, Limits, decode_frame};

#[test]
fn a_handed_off_sequence_continues_bit_for_bit() {
    for family in FAMILIES {
        let prefill = engine(family, f32_blocks(4), EngineConfig::default());
        let decode = engine(family, f32_blocks(4), EngineConfig::default());
        let fingerprint = decode.model().config().fingerprint();
        for (i, r) in requests().iter().enumerate() {
            let want = prefill.generate(std::slice::from_ref(r)).unwrap().remove(0);
            let handed = prefill.prefill(r).unwrap();
            assert_eq!(prefill.model().backend().kv_blocks_live(), 0);
            // Through frames and the receiver's checks, as it crosses the network.
            let frames = handed.image.to_frames(7, 300).unwrap();
            let mut asm = None;
            for f in &frames {
                match decode_frame(f, &Limits::default()).unwrap() {
                    AnyMessage::StateBegin(b) => {
                        asm = Some(Assembler::new(b, fingerprint, &StateLimits::default()).unwrap())
                    }
                    AnyMessage::StateChunk(c) => asm.as_mut().unwrap().push(c).unwrap(),
                    AnyMessage::StateEnd(e) => {
                        let image = asm.take().unwrap().finish(e).unwrap();
                        let mut moved = handed.clone();
                        moved.image = image;
                        let got = decode.generate_from(r, &moved).unwrap();
                        assert_eq!(got.token_ids, want.token_ids, "{family} request {i}");
                        assert_eq!(
                            format!("{:?}", got.logprobs),
                            format!("{:?}", want.logprobs),
                            "{family} request {i}"
                        );
                        assert_eq!(got.finish_reason, want.finish_reason);
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            assert_eq!(decode.model().backend().kv_blocks_live(), 0);
        }
    }
}

#[test]
fn a_state_of_another_model_or_layout_is_refused() {
    let r = &requests()[2];
    let p = engine(FAMILIES[0], f32_blocks(4), EngineConfig::default());
    let handed = p.prefill(r).unwrap();
    let other_model = engine(FAMILIES[1], f32_blocks(4), EngineConfig::default());
    match other_model.generate_from(r, &handed) {
        Err(EngineError::State(m)) => assert!(m.contains("another model"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let other_layout = engine(
        FAMILIES[0],
        KvCacheSpec {
            block_tokens: 4,
            dtype: KvDtype::BF16,
        },
        EngineConfig::default(),
    );
    match other_layout.generate_from(r, &handed) {
        Err(EngineError::State(m)) => {
            assert!(m.contains("f32") && m.contains("bf16"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another prompt than the state's.
    let mut wrong = r.clone();
    wrong.prompt[0] += 1;
    match p.generate_from(&wrong, &handed) {
        Err(EngineError::State(m)) => assert!(m.contains("prompt"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(other_layout.model().backend().kv_blocks_live(), 0);
}

/// Through two schedulers, as a prefill node and a decode node run it: the decode side
/// reserves before the prefill starts, the stream equals the single engine's, the prefill
/// node's blocks are back in its pool and the decode node's reservation becomes held blocks.
#[test]
fn a_prefill_scheduler_hands_off_to_a_decode_scheduler() {
    use myriad_attention::{Generate, Scheduler, SchedulerConfig};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for family in FAMILIES {
        let p_engine = engine(family, f32_blocks(4), EngineConfig::default());
        let d_engine = engine(family, f32_blocks(4), EngineConfig::default());
        let p = Scheduler::start(p_engine.clone(), SchedulerConfig::default());
        let d = Scheduler::start(d_engine.clone(), SchedulerConfig::default());
        for (i, r) in requests().iter().enumerate() {
            let want = p_engine
                .generate(std::slice::from_ref(r))
                .unwrap()
                .remove(0);
            let (sub, mut slot) = d.submit_handoff(r.clone()).unwrap();
            assert_eq!(sub.path, myriad_attention::ServePath::Disaggregated);
            rt.block_on(slot.admitted()).unwrap();
            let ticket = p.submit_prefill(r.clone()).unwrap();
            let handed = rt.block_on(ticket.wait()).unwrap();
            slot.deliver(Ok(handed));
            let mut events = sub.events;
            let got = common::collect(&mut events, r);
            assert_eq!(got.token_ids, want.token_ids, "{family} request {i}");
            assert_eq!(
                format!("{:?}", got.logprobs),
                format!("{:?}", want.logprobs),
                "{family} request {i}"
            );
        }
        common::wait_idle(&d);
        common::wait_idle(&p);
        assert_eq!((p.stats().kv_blocks_used, d.stats().kv_blocks_used), (0, 0));
        assert_eq!(p_engine.model().backend().kv_blocks_live(), 0);
        assert!(p.stats().prompt_tokens > 0);
        assert_eq!(
            d.stats().prompt_tokens,
            0,
            "the decode node prefilled nothing"
        );
        drop((p, d));
        assert_eq!(d_engine.model().backend().kv_blocks_live(), 0);
    }
}

/// Every way a hand-off can end early frees what it held: a dropped ticket cancels the
/// prefill, a slot dropped without a state fails the request with a message, a failed
/// prefill's message reaches the client, a state that does not fit is refused, and a client
/// that leaves while its request awaits a state frees its reservation.
#[test]
fn an_abandoned_hand_off_frees_everything() {
    use myriad_attention::{Event, Generate, Scheduler, SchedulerConfig};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let family = FAMILIES[0];
    let e = engine(family, f32_blocks(4), EngineConfig::default());
    let s = Scheduler::start(e.clone(), SchedulerConfig::default());
    let r = requests()[3].clone();
    let failed = |mut events: tokio::sync::mpsc::UnboundedReceiver<Event>| loop {
        match events.blocking_recv() {
            Some(Event::Failed(m)) => return m,
            Some(_) => continue,
            None => panic!("the stream ended without a failure"),
        }
    };

    // A prefill whose ticket is dropped is cancelled.
    drop(s.submit_prefill(r.clone()).unwrap());
    common::wait_idle(&s);

    // A slot dropped without a state.
    let (sub, mut slot) = s.submit_handoff(r.clone()).unwrap();
    rt.block_on(slot.admitted()).unwrap();
    assert!(!slot.is_abandoned());
    drop(slot);
    assert!(failed(sub.events).contains("abandoned"));

    // A prefill that failed.
    let (sub, slot) = s.submit_handoff(r.clone()).unwrap();
    slot.deliver(Err("prefill node 10.0.0.7 went away".into()));
    assert!(failed(sub.events).contains("10.0.0.7"));

    // A state of another layout.
    let other = engine(
        family,
        KvCacheSpec {
            block_tokens: 8,
            dtype: KvDtype::F32,
        },
        EngineConfig::default(),
    );
    let (sub, slot) = s.submit_handoff(r.clone()).unwrap();
    slot.deliver(Ok(other.prefill(&r).unwrap()));
    let m = failed(sub.events);
    assert!(
        m.contains("blocks of 8") && m.contains("blocks of 4"),
        "{m}"
    );

    // The client leaves while its request awaits the state.
    let (sub, slot) = s.submit_handoff(r.clone()).unwrap();
    drop(sub);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !slot.is_abandoned() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never abandoned"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    common::wait_idle(&s);
    let st = s.stats();
    assert_eq!((st.running, st.waiting, st.kv_blocks_used), (0, 0, 0));
    drop(s);
    assert_eq!(e.model().backend().kv_blocks_live(), 0);
}
