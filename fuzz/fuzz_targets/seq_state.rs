//! State transfers from arbitrary bytes: decode errors and refused transfers are fine, panics
//! and allocations beyond the limits are not; whatever decodes must re-encode to the same
//! bytes.
//!
//! The input is a sequence of frames of the three state kinds: a count byte, then per frame a
//! kind byte (any byte names one: 8, 9 and 10 name themselves), a `u32` LE payload length (cut
//! to what is left) and the payload. The first StateBegin that decodes starts an `Assembler`
//! (expecting its own fingerprint, so the fuzzer need not guess it); later chunks are pushed
//! and a StateEnd finishes it. A finished state must send again (to_frames) as frames that
//! decode and reassemble to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myriad_wire::{AnyMessage, Assembler, FrameKind, Limits, StateLimits, WireError, decode_frame};

/// By `kind byte % 3`, so that 8, 9 and 10 map to themselves.
const KINDS: [FrameKind; 3] = [
    FrameKind::StateChunk,
    FrameKind::StateEnd,
    FrameKind::StateBegin,
];

/// Small enough that libFuzzer's malloc limit would catch an allocation the limits let past.
fn state_limits() -> StateLimits {
    StateLimits {
        max_state_bytes: 64 << 20,
        ..StateLimits::default()
    }
}

fn frames(data: &[u8]) -> Vec<(FrameKind, &[u8])> {
    let Some((&n, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for _ in 0..n {
        let Some((&k, tail)) = rest.split_first() else {
            break;
        };
        let Some((len, tail)) = tail.split_first_chunk::<4>() else {
            break;
        };
        let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        out.push((KINDS[usize::from(k) % 3], payload));
        rest = tail;
    }
    out
}

fn decode(kind: FrameKind, payload: &[u8], limits: &Limits) -> Result<AnyMessage, WireError> {
    let m = AnyMessage::decode(kind, payload, limits)?;
    assert_eq!(m.kind(), kind);
    assert_eq!(m.encode(), payload, "encoding is canonical");
    Ok(m)
}

/// Sends a finished state again and reassembles it: it must come back equal.
fn resend(image: &myriad_wire::SequenceStateImage, limits: &Limits) {
    let frames = image
        .to_frames(image.begin.transfer_id, 64)
        .expect("a received state sends");
    let mut assembler = None;
    for f in &frames {
        match decode_frame(f, limits).expect("sent frames decode") {
            AnyMessage::StateBegin(b) => {
                let fp = b.model_fingerprint;
                assembler = Some(Assembler::new(b, fp, &state_limits()).expect("begin accepted"));
            }
            AnyMessage::StateChunk(c) => {
                assembler
                    .as_mut()
                    .expect("begin first")
                    .push(c)
                    .expect("chunk accepted");
            }
            AnyMessage::StateEnd(e) => {
                let again = assembler
                    .take()
                    .expect("begin first")
                    .finish(e)
                    .expect("end accepted");
                assert_eq!(&again, image, "a state survives a second transfer");
            }
            other => panic!("to_frames wrote a {:?}", other.kind()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut assembler: Option<Assembler> = None;
    for (kind, payload) in frames(data) {
        let Ok(m) = decode(kind, payload, &limits) else {
            continue;
        };
        match m {
            AnyMessage::StateBegin(b) => {
                if assembler.is_none() {
                    let fp = b.model_fingerprint;
                    assembler = Assembler::new(b, fp, &state_limits()).ok();
                }
            }
            AnyMessage::StateChunk(c) => {
                if let Some(a) = assembler.as_mut() {
                    let before = a.layers_complete();
                    if a.push(c).is_err() {
                        assert_eq!(
                            a.layers_complete(),
                            before,
                            "a refused chunk changes nothing"
                        );
                    }
                }
            }
            AnyMessage::StateEnd(e) => {
                if let Some(a) = assembler.take() {
                    if let Ok(image) = a.finish(e) {
                        resend(&image, &limits);
                    }
                }
            }
            _ => unreachable!("only state kinds are decoded"),
        }
    }
});
