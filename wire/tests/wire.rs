//! The wire protocol: every message survives encode → decode and encode → frame → decode
//! (property tests); garbage never panics; every malformed or oversize input is rejected with
//! an error naming the field; bf16 tensors round like `half::bf16::from_f32`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fmt::Debug;

use half::bf16;
use myriad_wire::{
    AnyMessage, ChunkBody, ErrorCode, ErrorReply, ExpertRequest, ExpertResponse, FrameKind,
    HEADER_LEN, Hello, HelloAck, KvBlock, KvDtype, LayerShape, Limits, Message, Ping, Pong, Routes,
    STATE_FORMAT_VERSION, StateBegin, StateChunk, StateEnd, TensorDtype, VERSION, WireError,
    WireTensor, decode_frame, encode_frame, encode_header,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Strategies

fn arb_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

fn arb_dtype() -> impl Strategy<Value = TensorDtype> {
    prop_oneof![Just(TensorDtype::F32), Just(TensorDtype::BF16)]
}

fn arb_tensor(rows: u32) -> impl Strategy<Value = WireTensor> {
    (arb_dtype(), 0u32..12).prop_flat_map(move |(dtype, cols)| {
        let n = rows as usize * cols as usize * dtype.size();
        prop::collection::vec(any::<u8>(), n).prop_map(move |data| WireTensor {
            dtype,
            rows,
            cols,
            data,
        })
    })
}

fn arb_weight() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<f32>().prop_filter("finite", |w| w.is_finite()),
        Just(0.0),
        Just(-0.0),
        Just(f32::MAX)
    ]
}

fn arb_routes(rows: u32) -> impl Strategy<Value = Routes> {
    let limits = Limits::default();
    let pair = (0..=limits.max_expert_id, arb_weight());
    let row = prop::collection::vec(pair, 0..=12);
    prop::collection::vec(row, rows as usize).prop_map(|rows| {
        let mut routes = Routes::new();
        for row in rows {
            let (e, w): (Vec<u32>, Vec<f32>) = row.into_iter().unzip();
            routes.push_row(&e, &w);
        }
        routes
    })
}

fn arb_request() -> impl Strategy<Value = ExpertRequest> {
    (any::<u64>(), 0u32..4096, 0u32..10).prop_flat_map(|(id, layer, rows)| {
        (arb_tensor(rows), arb_routes(rows)).prop_map(move |(hidden, routes)| ExpertRequest {
            id,
            layer,
            hidden,
            routes,
        })
    })
}

fn arb_response() -> impl Strategy<Value = ExpertResponse> {
    (any::<u64>(), 0u32..10).prop_flat_map(|(id, rows)| {
        arb_tensor(rows).prop_map(move |output| ExpertResponse { id, output })
    })
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (arb_text(), any::<u64>()).prop_map(|(client, model_fingerprint)| Hello {
        client,
        model_fingerprint,
    })
}

fn arb_hello_ack() -> impl Strategy<Value = HelloAck> {
    (
        arb_text(),
        any::<u64>(),
        0u32..=4096,
        0u32..=600,
        0u32..=65536,
    )
        .prop_flat_map(
            |(node, model_fingerprint, num_layers, num_experts, hidden)| {
                let held = if num_experts == 0 {
                    Just(BTreeSet::new()).boxed()
                } else {
                    prop::collection::btree_set(0..num_experts, 0..40).boxed()
                };
                held.prop_map(move |held| HelloAck {
                    node: node.clone(),
                    model_fingerprint,
                    num_layers,
                    num_experts,
                    hidden,
                    held: held.into_iter().collect(),
                })
            },
        )
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    // Decoding maps known codes to their names, so `Unknown` only ever holds unknown ones.
    (0u16..=u16::MAX).prop_map(ErrorCode::from_u16)
}

fn arb_error() -> impl Strategy<Value = ErrorReply> {
    (any::<u64>(), arb_code(), arb_text()).prop_map(|(id, code, message)| ErrorReply {
        id,
        code,
        message,
    })
}

// ---------------------------------------------------------------------------------------------
// Round trips

/// decode(encode(m)) == m; the frame decodes to the same message; every strict prefix of the
/// payload and the payload plus one byte are rejected.
fn round_trip<M>(m: &M)
where
    M: Message + PartialEq + Debug + Clone + Into<AnyMessage>,
{
    let limits = Limits::default();
    let payload = m.encode();
    assert_eq!(&M::decode(&payload, &limits).unwrap(), m);
    let frame = m.to_frame().unwrap();
    assert_eq!(frame.len(), HEADER_LEN + payload.len());
    assert_eq!(frame[HEADER_LEN..], payload[..]);
    assert_eq!(frame, encode_frame(M::KIND, &payload).unwrap());
    let any: AnyMessage = m.clone().into();
    assert_eq!(any.kind(), M::KIND);
    assert_eq!(decode_frame(&frame, &limits).unwrap(), any);
    assert_eq!(any.to_frame().unwrap(), frame);
    for cut in 0..payload.len() {
        assert!(
            M::decode(&payload[..cut], &limits).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
    let mut longer = payload.clone();
    longer.push(0);
    assert!(matches!(
        M::decode(&longer, &limits),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
}

proptest! {
    #[test]
    fn expert_requests_round_trip(m in arb_request()) {
        prop_assert_eq!(m.routes.rows(), m.hidden.rows as usize);
        round_trip(&m);
    }

    #[test]
    fn expert_responses_round_trip(m in arb_response()) {
        round_trip(&m);
    }

    #[test]
    fn hellos_round_trip(m in arb_hello()) {
        round_trip(&m);
    }

    #[test]
    fn hello_acks_round_trip(m in arb_hello_ack()) {
        round_trip(&m);
    }

    #[test]
    fn error_replies_round_trip(m in arb_error()) {
        round_trip(&m);
    }

    #[test]
    fn pings_and_pongs_round_trip(nonce in any::<u64>()) {
        round_trip(&Ping { nonce });
        round_trip(&Pong { nonce });
    }

    /// Random bytes never panic, as a frame or as any kind's payload; whatever decodes
    /// re-encodes to exactly the same bytes (encoding is canonical).
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let limits = Limits::default();
        if let Ok(m) = decode_frame(&bytes, &limits) {
            prop_assert_eq!(m.to_frame().unwrap(), bytes.clone());
        }
        for kind in 1..=10 {
            let kind = FrameKind::from_u16(kind).unwrap();
            if let Ok(m) = AnyMessage::decode(kind, &bytes, &limits) {
                prop_assert_eq!(m.encode(), bytes.clone());
            }
        }
    }

    /// Garbage behind a valid header, so the payload decoders see it.
    #[test]
    fn garbage_behind_a_valid_header_never_panics(kind in 1u16..=10, body in prop::collection::vec(any::<u8>(), 0..128)) {
        let kind = FrameKind::from_u16(kind).unwrap();
        let frame = encode_frame(kind, &body).unwrap();
        if let Ok(m) = decode_frame(&frame, &Limits::default()) {
            prop_assert_eq!(m.to_frame().unwrap(), frame);
        }
    }

    #[test]
    fn bf16_tensors_round_like_half(values in prop::collection::vec(any::<f32>(), 0..64)) {
        let t = WireTensor::from_f32(1, values.len() as u32, &values, TensorDtype::BF16);
        let want: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
        prop_assert_eq!(&t.data, &want);
        let back: Vec<u32> = t.to_f32().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = values.iter().map(|v| bf16::from_f32(*v).to_f32().to_bits()).collect();
        prop_assert_eq!(back, want);
        let f = WireTensor::from_f32(1, values.len() as u32, &values, TensorDtype::F32);
        let exact: Vec<u32> = f.to_f32().iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(exact, values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}

#[test]
fn bf16_ties_round_to_even() {
    let one = 1.0f32;
    let ulp = 2f32.powi(-7); // bf16 keeps 7 fraction bits
    let values = [
        one + ulp / 2.0,
        one + 3.0 * ulp / 2.0,
        one + ulp * 0.75,
        -(one + ulp / 2.0),
    ];
    let t = WireTensor::from_f32(2, 2, &values, TensorDtype::BF16);
    assert_eq!(t.to_f32(), [one, one + 2.0 * ulp, one + ulp, -one]);
}

#[test]
fn an_empty_request_round_trips() {
    let m = ExpertRequest {
        id: 0,
        layer: 0,
        hidden: WireTensor::from_f32(0, 128, &[], TensorDtype::F32),
        routes: Routes::new(),
    };
    round_trip(&m);
}

#[test]
fn a_realistic_request_round_trips_with_values() {
    let (rows, cols) = (3u32, 8u32);
    let values: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 2.0).collect();
    let mut routes = Routes::new();
    routes.push_row(&[5, 1, 300], &[0.5, 0.3, 0.2]);
    routes.push_row(&[7], &[1.0]);
    routes.push_row(&[511, 0], &[0.9, 0.1]);
    let m = ExpertRequest {
        id: 42,
        layer: 3,
        hidden: WireTensor::from_f32(rows, cols, &values, TensorDtype::F32),
        routes,
    };
    round_trip(&m);
    let AnyMessage::ExpertRequest(back) =
        decode_frame(&m.to_frame().unwrap(), &Limits::default()).unwrap()
    else {
        panic!("wrong kind")
    };
    assert_eq!(back.hidden.to_f32(), values);
    assert_eq!(back.routes.row(0), (&[5, 1, 300][..], &[0.5, 0.3, 0.2][..]));
}

// ---------------------------------------------------------------------------------------------
// Rejections, each naming its field

/// Little-endian payload builder for hand-made (mal)formed messages.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn f32(mut self, v: f32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// An ExpertRequest prefix: id 1, layer 0, an f32 tensor of `rows × cols` zeros.
    fn request(rows: u32, cols: u32) -> Self {
        B::default()
            .u64(1)
            .u32(0)
            .u8(0)
            .u32(rows)
            .u32(cols)
            .bytes(&vec![0; (rows * cols * 4) as usize])
    }
}

/// Asserts the error and that its message names the field.
fn rejects<M: Message + Debug>(payload: &[u8], limits: &Limits, want: WireError) {
    let got = M::decode(payload, limits).unwrap_err();
    assert_eq!(got, want);
    let what = match &want {
        WireError::Malformed { what, .. }
        | WireError::OverLimit { what, .. }
        | WireError::Truncated { what, .. }
        | WireError::TrailingBytes { what, .. } => *what,
        _ => "",
    };
    assert!(got.to_string().contains(what), "{got} does not name {what}");
}

fn malformed(what: &'static str, detail: &str) -> WireError {
    WireError::Malformed {
        what,
        detail: detail.into(),
    }
}

fn over(what: &'static str, value: u64, max: u64) -> WireError {
    WireError::OverLimit { what, value, max }
}

#[test]
fn truncated_and_trailing_payloads() {
    let l = Limits::default();
    rejects::<Ping>(
        &[0; 7],
        &l,
        WireError::Truncated {
            what: "Ping.nonce",
            needed: 8,
            left: 7,
        },
    );
    rejects::<Pong>(
        &[0; 9],
        &l,
        WireError::TrailingBytes {
            what: "Pong",
            extra: 1,
        },
    );
    rejects::<Hello>(
        &B::default().u32(5).bytes(b"abc").0,
        &l,
        WireError::Truncated {
            what: "Hello.client",
            needed: 5,
            left: 3,
        },
    );
    let ok = B::request(1, 2).u32(1).u16(1).u32(3).f32(1.0);
    rejects::<ExpertRequest>(
        &ok.bytes(&[9, 9]).0,
        &l,
        WireError::TrailingBytes {
            what: "ExpertRequest",
            extra: 2,
        },
    );
    rejects::<ExpertRequest>(
        &B::request(1, 2).u32(1).u16(2).u32(3).f32(1.0).0,
        &l,
        WireError::Truncated {
            what: "ExpertRequest.routes.expert",
            needed: 16,
            left: 8,
        },
    );
}

#[test]
fn counts_above_limits() {
    let l = Limits::default();
    rejects::<Hello>(
        &B::default().u32(4097).0,
        &l,
        over("Hello.client", 4097, 4096),
    );
    rejects::<ErrorReply>(
        &B::default().u64(0).u16(1).u32(u32::MAX).0,
        &l,
        over("ErrorReply.message", u32::MAX.into(), 4096),
    );
    rejects::<ExpertRequest>(
        &B::default().u64(1).u32(4096).0,
        &l,
        over("ExpertRequest.layer", 4096, 4095),
    );
    rejects::<ExpertRequest>(
        &B::default().u64(1).u32(0).u8(0).u32(65537).0,
        &l,
        over("ExpertRequest.hidden.rows", 65537, 65536),
    );
    rejects::<ExpertRequest>(
        &B::default().u64(1).u32(0).u8(0).u32(1).u32(1 << 20).0,
        &l,
        over("ExpertRequest.hidden.cols", 1 << 20, 65536),
    );
    rejects::<ExpertResponse>(
        &B::default().u64(1).u8(1).u32(u32::MAX).0,
        &l,
        over("ExpertResponse.output.rows", u32::MAX.into(), 65536),
    );
    rejects::<ExpertRequest>(
        &B::request(1, 1).u32(1).u16(65).0,
        &l,
        over("ExpertRequest.routes.count", 65, 64),
    );
    rejects::<ExpertRequest>(
        &B::request(1, 1).u32(1).u16(1).u32((1 << 20) + 1).f32(1.0).0,
        &l,
        over("ExpertRequest.routes.expert", (1 << 20) + 1, 1 << 20),
    );
    let ack = |b: B| b.u32(0).u64(7);
    rejects::<HelloAck>(
        &ack(B::default()).u32(4097).0,
        &l,
        over("HelloAck.num_layers", 4097, 4096),
    );
    rejects::<HelloAck>(
        &ack(B::default()).u32(4).u32((1 << 20) + 2).0,
        &l,
        over("HelloAck.num_experts", (1 << 20) + 2, (1 << 20) + 1),
    );
    rejects::<HelloAck>(
        &ack(B::default()).u32(4).u32(64).u32(65537).0,
        &l,
        over("HelloAck.hidden", 65537, 65536),
    );
    rejects::<HelloAck>(
        &ack(B::default()).u32(4).u32(64).u32(64).u32(65).0,
        &l,
        over("HelloAck.held.count", 65, 64),
    );
    // A count within the limits but beyond the payload is refused before allocating.
    rejects::<HelloAck>(
        &ack(B::default()).u32(4).u32(1 << 20).u32(64).u32(1 << 20).0,
        &l,
        WireError::Truncated {
            what: "HelloAck.held",
            needed: 4 << 20,
            left: 0,
        },
    );
    // Limits are the receiver's: a smaller one rejects what the default accepts.
    let small = Limits {
        max_rows: 2,
        ..Limits::default()
    };
    rejects::<ExpertResponse>(
        &B::default().u64(1).u8(0).u32(3).u32(1).0,
        &small,
        over("ExpertResponse.output.rows", 3, 2),
    );
}

#[test]
fn inconsistent_fields() {
    let l = Limits::default();
    rejects::<ExpertRequest>(
        &B::request(2, 1).u32(3).0,
        &l,
        malformed(
            "ExpertRequest.routes.rows",
            "routes for 3 rows, but the tensor has 2",
        ),
    );
    // A row count within the limits but beyond the payload is refused before allocating.
    rejects::<ExpertRequest>(
        &B::default()
            .u64(1)
            .u32(0)
            .u8(0)
            .u32(60000)
            .u32(0)
            .u32(60000)
            .0,
        &l,
        WireError::Truncated {
            what: "ExpertRequest.routes.count",
            needed: 120000,
            left: 0,
        },
    );
    for w in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let got =
            ExpertRequest::decode(&B::request(1, 1).u32(1).u16(1).u32(3).f32(w).0, &l).unwrap_err();
        assert!(
            matches!(
                got,
                WireError::Malformed {
                    what: "ExpertRequest.routes.weight",
                    ..
                }
            ),
            "{got}"
        );
    }
    let ack = || B::default().u32(0).u64(7).u32(4).u32(64).u32(64);
    rejects::<HelloAck>(
        &ack().u32(2).u32(5).u32(5).0,
        &l,
        malformed(
            "HelloAck.held",
            "expert 5 after 5: ids must be strictly increasing",
        ),
    );
    rejects::<HelloAck>(
        &ack().u32(1).u32(64).0,
        &l,
        malformed("HelloAck.held", "expert 64 is not below num_experts = 64"),
    );
}

#[test]
fn tensor_sizes_are_checked_before_allocating() {
    // rows × cols × 4 overflows u64 once a receiver raises its limits to the maximum.
    let huge = Limits {
        max_rows: u32::MAX,
        max_cols: u32::MAX,
        ..Limits::default()
    };
    rejects::<ExpertResponse>(
        &B::default().u64(1).u8(0).u32(u32::MAX).u32(u32::MAX).0,
        &huge,
        malformed(
            "ExpertResponse.output.data",
            "4294967295 × 4294967295 × 4 bytes overflows",
        ),
    );
    // Within the limits, but more data than the payload holds.
    let l = Limits::default();
    rejects::<ExpertResponse>(
        &B::default()
            .u64(1)
            .u8(1)
            .u32(65536)
            .u32(65536)
            .bytes(&[0; 10])
            .0,
        &l,
        WireError::Truncated {
            what: "ExpertResponse.output.data",
            needed: 65536 * 65536 * 2,
            left: 10,
        },
    );
    rejects::<ExpertRequest>(
        &B::default()
            .u64(1)
            .u32(0)
            .u8(0)
            .u32(2)
            .u32(2)
            .bytes(&[0; 15])
            .0,
        &l,
        WireError::Truncated {
            what: "ExpertRequest.hidden.data",
            needed: 16,
            left: 15,
        },
    );
    rejects::<ExpertResponse>(
        &B::default().u64(1).u8(2).0,
        &l,
        malformed("ExpertResponse.output.dtype", "unknown dtype 2"),
    );
}

#[test]
fn strings_must_be_utf8() {
    let got = Hello::decode(
        &B::default().u32(2).bytes(&[0xc3, 0x28]).u64(0).0,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&got, WireError::Malformed { what: "Hello.client", detail } if detail.starts_with("not UTF-8")),
        "{got}"
    );
    assert!(got.to_string().starts_with("Hello.client: not UTF-8"));
}

#[test]
fn frame_headers_are_checked_first() {
    let l = Limits::default();
    let frame = Ping { nonce: 9 }.to_frame().unwrap();
    assert_eq!(
        decode_frame(&frame, &l),
        Ok(AnyMessage::Ping(Ping { nonce: 9 }))
    );

    let mut bad = frame.clone();
    bad[0] = b'X';
    assert_eq!(decode_frame(&bad, &l), Err(WireError::BadMagic(*b"XYRD")));
    let mut bad = frame.clone();
    bad[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(
        decode_frame(&bad, &l),
        Err(WireError::Version {
            got: VERSION + 1,
            supported: VERSION
        })
    );
    let mut bad = frame.clone();
    bad[6..8].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(decode_frame(&bad, &l), Err(WireError::UnknownKind(0)));
    let mut bad = frame.clone();
    bad[6..8].copy_from_slice(&(FrameKind::Hello as u16).to_le_bytes());
    assert!(matches!(
        decode_frame(&bad, &l),
        Err(WireError::Truncated {
            what: "Hello.client",
            ..
        })
    ));

    // A header claiming more than max_frame is refused on the header alone.
    let big = encode_header(FrameKind::ExpertRequest, (256 << 20) + 1);
    assert_eq!(
        decode_frame(&big, &l),
        Err(WireError::FrameTooLarge {
            len: (256 << 20) + 1,
            max: 256 << 20
        })
    );
    let small = Limits { max_frame: 4, ..l };
    assert_eq!(
        decode_frame(&frame, &small),
        Err(WireError::FrameTooLarge { len: 8, max: 4 })
    );
    assert_eq!(
        Ping::decode(&[0; 8], &small),
        Err(WireError::FrameTooLarge { len: 8, max: 4 })
    );

    // The announced length must match what follows.
    assert_eq!(
        decode_frame(&frame[..5], &l),
        Err(WireError::Truncated {
            what: "frame header",
            needed: 12,
            left: 5
        })
    );
    assert_eq!(
        decode_frame(&frame[..15], &l),
        Err(WireError::Truncated {
            what: "frame payload",
            needed: 8,
            left: 3
        })
    );
    let mut long = frame.clone();
    long.extend_from_slice(&[0, 0]);
    assert_eq!(
        decode_frame(&long, &l),
        Err(WireError::TrailingBytes {
            what: "frame",
            extra: 2
        })
    );
}

#[test]
fn error_codes_survive_unknown_values() {
    for code in [
        ErrorCode::BadFrame,
        ErrorCode::BadRequest,
        ErrorCode::UnknownLayer,
        ErrorCode::ExpertNotHeld,
        ErrorCode::ModelMismatch,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ] {
        assert_eq!(ErrorCode::from_u16(code.to_u16()), code);
        assert!((1..=7).contains(&code.to_u16()));
    }
    let m = ErrorReply {
        id: 3,
        code: ErrorCode::Unknown(99),
        message: "from the future".into(),
    };
    round_trip(&m);
    assert_eq!(ErrorCode::from_u16(0), ErrorCode::Unknown(0));
}

#[test]
fn long_error_messages_are_cut_to_fit() {
    let m = ErrorReply::new(1, ErrorCode::Internal, "é".repeat(3000));
    assert_eq!(m.message.len(), 4096);
    round_trip(&m);
    let m = ErrorReply::new(1, ErrorCode::Internal, format!("x{}", "é".repeat(3000)));
    assert_eq!(m.message.len(), 4095, "cut at a character boundary");
    round_trip(&m);
    assert_eq!(
        ErrorReply::new(2, ErrorCode::Overloaded, "busy").message,
        "busy"
    );
}

#[test]
fn errors_name_the_field_in_their_message() {
    let e =
        ExpertRequest::decode(&B::request(1, 1).u32(1).u16(65).0, &Limits::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ExpertRequest.routes.count = 65 exceeds the limit of 64"
    );
    let e = Ping::decode(&[1, 2], &Limits::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ping.nonce: needs 8 bytes, only 2 left in the payload"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds

/// Writes one encoded message of each kind into `$MYRIAD_WIRE_SEEDS` (the `wire_decode` fuzz
/// corpus): each as a whole frame, and as a kind byte followed by its payload (the target's
/// second mode). Does nothing unless the variable is set.
#[test]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("MYRIAD_WIRE_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut routes = Routes::new();
    routes.push_row(&[5, 1], &[0.75, 0.25]);
    routes.push_row(&[], &[]);
    let messages: Vec<AnyMessage> = vec![
        Hello {
            client: "attention-0".into(),
            model_fingerprint: 7,
        }
        .into(),
        HelloAck {
            node: "expert-1".into(),
            model_fingerprint: 7,
            num_layers: 4,
            num_experts: 512,
            hidden: 128,
            held: vec![0, 1, 2, 300],
        }
        .into(),
        ExpertRequest {
            id: 1,
            layer: 2,
            hidden: WireTensor::from_f32(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], TensorDtype::F32),
            routes,
        }
        .into(),
        ExpertResponse {
            id: 1,
            output: WireTensor::from_f32(2, 2, &[0.5, -1.0, 2.0, 0.0], TensorDtype::BF16),
        }
        .into(),
        ErrorReply::new(1, ErrorCode::ExpertNotHeld, "expert 9 is not held here").into(),
        Ping { nonce: 11 }.into(),
        Pong { nonce: 11 }.into(),
        StateBegin {
            transfer_id: 3,
            state_version: STATE_FORMAT_VERSION,
            model_fingerprint: 7,
            position: 3,
            tokens: vec![1, 2, 3],
            rng: [4, 5, 6, 7],
            generated: 1,
            layers: vec![
                LayerShape::DeltaNet {
                    conv_rows: 1,
                    conv_dim: 2,
                    v_heads: 1,
                    k_head_dim: 1,
                    v_head_dim: 2,
                },
                LayerShape::Attention {
                    kv_heads: 1,
                    head_dim: 2,
                    block_tokens: 2,
                    dtype: KvDtype::Fp8E4M3,
                },
            ],
        }
        .into(),
        StateChunk {
            transfer_id: 3,
            layer: 0,
            body: ChunkBody::DeltaNet {
                conv: vec![0.5, -1.0],
                recurrent: vec![2.0, 0.25],
            },
        }
        .into(),
        StateChunk {
            transfer_id: 3,
            layer: 1,
            body: ChunkBody::Attention {
                first_block: 0,
                block_tokens: 2,
                kv_heads: 1,
                head_dim: 2,
                dtype: KvDtype::Fp8E4M3,
                blocks: vec![
                    KvBlock {
                        key_scale: 0.5,
                        value_scale: 2.0,
                        data: vec![1, 2, 3, 4, 5, 6, 7, 8],
                    },
                    KvBlock {
                        key_scale: 1.0,
                        value_scale: 1.0,
                        data: vec![9, 10, 0, 0, 11, 12, 0, 0],
                    },
                ],
            },
        }
        .into(),
        StateEnd {
            transfer_id: 3,
            chunks: 2,
            checksum: 0x0123_4567_89ab_cdef,
        }
        .into(),
    ];
    for (i, m) in messages.iter().enumerate() {
        let frame = m.to_frame().unwrap();
        assert_eq!(
            &decode_frame(&frame, &Limits::default()).unwrap(),
            m,
            "seed {i}"
        );
        std::fs::write(dir.join(format!("frame-{i}")), frame).unwrap();
        let mut payload = vec![m.kind() as u8];
        payload.extend_from_slice(&m.encode());
        std::fs::write(dir.join(format!("payload-{i}")), payload).unwrap();
    }
}
