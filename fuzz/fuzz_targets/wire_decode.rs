//! Wire frames from arbitrary bytes: decode errors are fine, panics and allocations beyond the
//! limits are not; whatever decodes must re-encode to the same bytes and decode to an equal
//! message.
//!
//! The input is tried twice: as a whole frame (header checks included), and with its first
//! byte choosing a frame kind and the rest as that kind's payload, so the fuzzer reaches the
//! payload decoders without first having to find the magic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myriad_wire::{AnyMessage, FrameKind, Limits, decode_frame};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(m) = decode_frame(data, &limits) {
        let frame = m.to_frame().expect("a decoded message fits a frame");
        assert_eq!(frame, data, "encoding is canonical");
        assert_eq!(decode_frame(&frame, &limits).expect("re-decodes"), m);
    }
    if let Some((&k, payload)) = data.split_first() {
        // 1..=10 name every kind (the state transfer's included), 0 none.
        let Some(kind) = FrameKind::from_u16(u16::from(k % 11)) else { return };
        if let Ok(m) = AnyMessage::decode(kind, payload, &limits) {
            assert_eq!(m.kind(), kind);
            let again = m.encode();
            assert_eq!(again, payload, "encoding is canonical");
            assert_eq!(AnyMessage::decode(kind, &again, &limits).expect("re-decodes"), m);
        }
    }
});
