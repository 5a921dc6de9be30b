//! The sequence state format: any valid state survives to_frames → decode_frame → Assembler
//! (property test, every frame canonical); every inconsistent header, chunk or end is refused
//! with an error naming the problem; truncated and hostile payloads never panic and never
//! allocate what they announce.
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;

use myriad_wire::{
    AnyMessage, Assembler, Checksum, ChunkBody, ChunkWriter, FrameKind, HEADER_LEN, KvBlock,
    KvDtype, LayerImage, LayerShape, Limits, Message, STATE_FORMAT_VERSION, SequenceStateImage,
    StateBegin, StateChunk, StateEnd, StateLimits, WireError, decode_frame, encode_frame,
    layer_chunks,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Building valid states

/// A small deterministic generator (splitmix64), so a state's data follows from one seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A finite f32 of any magnitude or sign (both zeros included).
    fn f32(&mut self) -> f32 {
        loop {
            let v = f32::from_bits(self.next() as u32);
            if v.is_finite() {
                return v;
            }
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random data of exactly the shape's sizes: finite DeltaNet values; KV blocks with zeroed
/// unused slots in the last block, scales 1.0 unless fp8.
fn layer_image(shape: &LayerShape, position: u64, g: &mut Gen) -> LayerImage {
    match *shape {
        LayerShape::DeltaNet { .. } => LayerImage::DeltaNet {
            conv: (0..shape.conv_len()).map(|_| g.f32()).collect(),
            recurrent: (0..shape.recurrent_len()).map(|_| g.f32()).collect(),
        },
        LayerShape::Attention {
            block_tokens,
            dtype,
            ..
        } => {
            let n = shape.blocks_for(position);
            let data_bytes = shape.block_data_bytes() as usize;
            let token_bytes = data_bytes / (2 * block_tokens as usize);
            let blocks = (0..n)
                .map(|b| {
                    let mut data = g.bytes(data_bytes);
                    let used = (position - b * u64::from(block_tokens)).min(block_tokens.into());
                    let half = data_bytes / 2;
                    let from = used as usize * token_bytes;
                    data[from..half].fill(0);
                    data[half + from..].fill(0);
                    let scale = |g: &mut Gen| match dtype {
                        KvDtype::Fp8E4M3 => g.f32(),
                        _ => 1.0,
                    };
                    KvBlock {
                        key_scale: scale(g),
                        value_scale: scale(g),
                        data,
                    }
                })
                .collect();
            LayerImage::Attention { blocks }
        }
    }
}

fn begin(position: u64, layers: Vec<LayerShape>) -> StateBegin {
    StateBegin {
        transfer_id: 1,
        state_version: STATE_FORMAT_VERSION,
        model_fingerprint: 0xfeed,
        position,
        tokens: (0..position as u32).map(|t| t * 7 + 1).collect(),
        rng: [1, 2, 3, 4],
        generated: position.min(2) as u32,
        layers,
    }
}

fn image(begin: StateBegin, seed: u64) -> SequenceStateImage {
    let mut g = Gen(seed);
    let layers = begin
        .layers
        .iter()
        .map(|s| layer_image(s, begin.position, &mut g))
        .collect();
    SequenceStateImage { begin, layers }
}

const DELTANET: LayerShape = LayerShape::DeltaNet {
    conv_rows: 3,
    conv_dim: 4,
    v_heads: 2,
    k_head_dim: 2,
    v_head_dim: 3,
};

const fn attention(block_tokens: u32, dtype: KvDtype) -> LayerShape {
    LayerShape::Attention {
        kv_heads: 2,
        head_dim: 3,
        block_tokens,
        dtype,
    }
}

/// DeltaNet, bf16 attention of 4-token blocks, DeltaNet, fp8 attention of 3-token blocks;
/// 10 tokens (3 and 4 blocks, both last ones partly filled).
fn hybrid() -> SequenceStateImage {
    image(
        begin(
            10,
            vec![
                DELTANET,
                attention(4, KvDtype::Bf16),
                DELTANET,
                attention(3, KvDtype::Fp8E4M3),
            ],
        ),
        9,
    )
}

fn arb_dtype() -> impl Strategy<Value = KvDtype> {
    prop_oneof![
        Just(KvDtype::F32),
        Just(KvDtype::Bf16),
        Just(KvDtype::Fp8E4M3)
    ]
}

fn arb_shape() -> impl Strategy<Value = LayerShape> {
    prop_oneof![
        (0u32..4, 0u32..6, 0u32..3, 0u32..4, 0u32..4).prop_map(|(a, b, c, d, e)| {
            LayerShape::DeltaNet {
                conv_rows: a,
                conv_dim: b,
                v_heads: c,
                k_head_dim: d,
                v_head_dim: e,
            }
        }),
        (1u32..3, 1u32..5, 1u32..6, arb_dtype()).prop_map(|(kv_heads, head_dim, bt, dtype)| {
            LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens: bt,
                dtype,
            }
        }),
    ]
}

fn arb_image() -> impl Strategy<Value = SequenceStateImage> {
    (
        0u64..40,
        prop::collection::vec(arb_shape(), 0..6),
        any::<u64>(),
        any::<[u64; 4]>(),
        any::<u64>(),
    )
        .prop_map(|(position, layers, fingerprint, rng, seed)| {
            let mut b = begin(position, layers);
            b.model_fingerprint = fingerprint;
            b.rng = rng;
            b.generated = (seed % (position + 1)) as u32;
            image(b, seed)
        })
}

// ---------------------------------------------------------------------------------------------
// Sending and receiving

/// Decodes every frame (each must re-encode to the same bytes) and runs them through an
/// assembler.
fn receive(frames: &[Vec<u8>], limits: &StateLimits) -> Result<SequenceStateImage, WireError> {
    let l = Limits::default();
    let mut messages = frames.iter().map(|f| {
        let m = decode_frame(f, &l).unwrap();
        assert_eq!(&m.to_frame().unwrap(), f, "canonical");
        m
    });
    let Some(AnyMessage::StateBegin(b)) = messages.next() else {
        panic!("no begin")
    };
    let fingerprint = b.model_fingerprint;
    let mut a = Assembler::new(b, fingerprint, limits)?;
    for m in messages {
        match m {
            AnyMessage::StateChunk(c) => a.push(c)?,
            AnyMessage::StateEnd(e) => return a.finish(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no end")
}

fn chunks_of(frames: &[Vec<u8>]) -> Vec<StateChunk> {
    frames
        .iter()
        .filter_map(|f| match decode_frame(f, &Limits::default()).unwrap() {
            AnyMessage::StateChunk(c) => Some(c),
            _ => None,
        })
        .collect()
}

proptest! {
    #[test]
    fn states_survive_frames_and_the_assembler(
        img in arb_image(),
        max_chunk in prop_oneof![Just(0usize), 1usize..200, Just(1 << 20)],
        tid in any::<u64>(),
    ) {
        let frames = img.to_frames(tid, max_chunk).unwrap();
        let got = receive(&frames, &StateLimits::default()).unwrap();
        let mut want = img.clone();
        want.begin.transfer_id = tid;
        prop_assert_eq!(&got, &want);
        // One frame per DeltaNet layer, none for an empty attention layer; every attention
        // chunk within max_chunk unless it holds a single block.
        let chunks = chunks_of(&frames);
        prop_assert_eq!(frames.len(), chunks.len() + 2);
        let Ok(AnyMessage::StateEnd(end)) = decode_frame(frames.last().unwrap(), &Limits::default()) else {
            panic!("no end")
        };
        prop_assert_eq!(end.chunks as usize, chunks.len());
        for c in &chunks {
            prop_assert_eq!(c.payload_len(), c.encode().len());
            if let ChunkBody::Attention { blocks, .. } = &c.body {
                prop_assert!(c.payload_len() <= max_chunk || blocks.len() == 1, "{} > {max_chunk}", c.payload_len());
            }
        }
        // The checksum is over the chunk payloads exactly as framed.
        let mut sum = Checksum::new();
        for f in &frames[1..frames.len() - 1] {
            sum.update(&f[HEADER_LEN..]);
        }
        prop_assert_eq!(sum.finish(), end.checksum);
        // The state's size, from the header alone.
        let bytes: usize = want.layers.iter().map(|l| match l {
            LayerImage::DeltaNet { conv, recurrent } => 4 * (conv.len() + recurrent.len()),
            LayerImage::Attention { blocks } => blocks.iter().map(|b| 8 + b.data.len()).sum(),
        }).sum();
        prop_assert_eq!(want.begin.state_bytes(), bytes as u64);
    }

    /// A wrong chunk is refused and changes nothing: the transfer then completes as if it had
    /// never been pushed.
    #[test]
    fn a_refused_chunk_changes_nothing(seed in any::<u64>(), at in any::<prop::sample::Index>()) {
        let img = hybrid();
        let frames = img.to_frames(1, 40).unwrap();
        let chunks = chunks_of(&frames);
        let at = at.index(chunks.len());
        let mut a = Assembler::new(img.begin.clone(), img.begin.model_fingerprint, &StateLimits::default()).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            if i == at {
                let mut bad = c.clone();
                match seed % 3 {
                    0 => bad.transfer_id ^= 1,
                    1 => bad.layer ^= 1,
                    _ => match &mut bad.body {
                        ChunkBody::DeltaNet { conv, .. } => conv.push(1.0),
                        ChunkBody::Attention { first_block, .. } => *first_block += 1,
                    },
                }
                prop_assert!(a.push(bad).is_err());
            }
            a.push(c.clone()).unwrap();
        }
        let end = match decode_frame(frames.last().unwrap(), &Limits::default()).unwrap() {
            AnyMessage::StateEnd(e) => e,
            _ => panic!(),
        };
        prop_assert_eq!(a.finish(end).unwrap(), img);
    }

    /// Garbage as the payload of each new kind, and behind its header, never panics; what
    /// decodes re-encodes to the same bytes.
    #[test]
    fn garbage_never_panics(kind in 8u16..=10, body in prop::collection::vec(any::<u8>(), 0..160)) {
        let kind = FrameKind::from_u16(kind).unwrap();
        if let Ok(m) = AnyMessage::decode(kind, &body, &Limits::default()) {
            prop_assert_eq!(m.encode(), body.clone());
        }
        let frame = encode_frame(kind, &body).unwrap();
        if let Ok(m) = decode_frame(&frame, &Limits::default()) {
            prop_assert_eq!(m.to_frame().unwrap(), frame);
        }
    }

    /// Single bytes flipped in a valid transfer are refused somewhere (decode, push or finish)
    /// or, if they land in data or a value, caught by nothing but never panic.
    #[test]
    fn flipped_bytes_never_panic(frame in 0usize..16, at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut frames = hybrid().to_frames(3, 64).unwrap();
        let i = frame % frames.len();
        let j = at.index(frames[i].len());
        frames[i][j] ^= 1 << bit;
        let l = Limits::default();
        let mut a = None;
        for f in &frames {
            match decode_frame(f, &l) {
                Ok(AnyMessage::StateBegin(b)) => a = Assembler::new(b, 0xfeed, &StateLimits::default()).ok(),
                Ok(AnyMessage::StateChunk(c)) => if let Some(asm) = a.as_mut() { let _ = asm.push(c); },
                Ok(AnyMessage::StateEnd(e)) => if let Some(asm) = a.take() { let _ = asm.finish(e); },
                _ => {}
            }
        }
    }
}

#[test]
fn a_hybrid_state_round_trips_at_every_chunk_size() {
    let img = hybrid();
    for max_chunk in [0, 1, 50, 60, 100, 1000] {
        let frames = img.to_frames(77, max_chunk).unwrap();
        let mut want = img.clone();
        want.begin.transfer_id = 77;
        assert_eq!(
            receive(&frames, &StateLimits::default()).unwrap(),
            want,
            "{max_chunk}"
        );
    }
    // 2 DeltaNet chunks, then 3 + 4 blocks one per chunk.
    assert_eq!(chunks_of(&img.to_frames(1, 0).unwrap()).len(), 2 + 3 + 4);
    assert_eq!(chunks_of(&img.to_frames(1, 1 << 20).unwrap()).len(), 4);
}

#[test]
fn sizes_follow_from_the_header() {
    let b = begin(
        10,
        vec![
            DELTANET,
            attention(4, KvDtype::Bf16),
            DELTANET,
            attention(3, KvDtype::Fp8E4M3),
        ],
    );
    assert_eq!(b.blocks_for_layer(0), 0);
    assert_eq!(b.blocks_for_layer(1), 3);
    assert_eq!(b.blocks_for_layer(3), 4);
    assert_eq!(b.blocks_for_layer(4), 0, "out of range");
    assert_eq!(b.blocks_for_layer(u32::MAX), 0);
    let deltanet = 4 * (3 * 4 + 2 * 2 * 3);
    let bf16 = 3 * (2 * 4 * 2 * 3 * 2 + 8);
    let fp8 = 4 * (2 * 3 * 2 * 3 + 8);
    assert_eq!(b.state_bytes(), 2 * deltanet + bf16 + fp8);
    assert_eq!(
        attention(16, KvDtype::F32).block_data_bytes(),
        2 * 16 * 2 * 3 * 4
    );
    // An 80B hybrid model at 1M tokens: 12 attention layers of 2 heads × 256 in bf16, 16-token
    // blocks; 36 DeltaNet layers.
    let mut layers = vec![
        LayerShape::DeltaNet {
            conv_rows: 3,
            conv_dim: 8192,
            v_heads: 32,
            k_head_dim: 128,
            v_head_dim: 128,
        };
        36
    ];
    layers.extend(
        [LayerShape::Attention {
            kv_heads: 2,
            head_dim: 256,
            block_tokens: 16,
            dtype: KvDtype::Bf16,
        }; 12],
    );
    let shapes_only = StateBegin {
        tokens: Vec::new(),
        ..begin(0, layers)
    };
    let big = StateBegin {
        position: 1 << 20,
        ..shapes_only
    };
    assert_eq!(
        big.state_bytes(),
        36 * (3 * 8192 + 32 * 128 * 128) * 4 + 12 * (1 << 16) * (2 * 16 * 2 * 256 * 2 + 8)
    );
    assert!(big.state_bytes() < StateLimits::default().max_state_bytes);
    // Hostile dimensions saturate instead of overflowing.
    let huge = LayerShape::Attention {
        kv_heads: u32::MAX,
        head_dim: u32::MAX,
        block_tokens: u32::MAX,
        dtype: KvDtype::F32,
    };
    assert_eq!(huge.block_data_bytes(), u64::MAX);
    assert_eq!(huge.state_bytes(u64::MAX), u64::MAX);
    let huge_dn = LayerShape::DeltaNet {
        conv_rows: u32::MAX,
        conv_dim: u32::MAX,
        v_heads: u32::MAX,
        k_head_dim: u32::MAX,
        v_head_dim: u32::MAX,
    };
    assert_eq!(huge_dn.state_bytes(0), u64::MAX);
    let b = StateBegin {
        position: u64::MAX,
        tokens: Vec::new(),
        ..begin(0, vec![huge, huge_dn, attention(1, KvDtype::F32)])
    };
    assert_eq!(b.state_bytes(), u64::MAX);
    assert_eq!(b.blocks_for_layer(2), u64::MAX);
}

#[test]
fn kv_dtype_codes_are_stable() {
    for (d, code, size) in [
        (KvDtype::F32, 0, 4),
        (KvDtype::Bf16, 1, 2),
        (KvDtype::Fp8E4M3, 2, 1),
    ] {
        assert_eq!(d.to_u8(), code);
        assert_eq!(d.size(), size);
        assert_eq!(KvDtype::from_u8(code), Some(d));
    }
    assert_eq!(KvDtype::from_u8(3), None);
}

#[test]
fn each_message_round_trips_and_its_prefixes_fail() {
    let img = hybrid();
    let frames = img.to_frames(12, 70).unwrap();
    let l = Limits::default();
    for f in &frames {
        let m = decode_frame(f, &l).unwrap();
        let payload = &f[HEADER_LEN..];
        assert_eq!(AnyMessage::decode(m.kind(), payload, &l).unwrap(), m);
        for cut in 0..f.len() {
            assert!(
                decode_frame(&f[..cut], &l).is_err(),
                "frame prefix of {cut} decoded"
            );
        }
        for cut in 0..payload.len() {
            assert!(
                AnyMessage::decode(m.kind(), &payload[..cut], &l).is_err(),
                "{:?} payload prefix of {cut} decoded",
                m.kind()
            );
        }
        let mut longer = payload.to_vec();
        longer.push(0);
        assert!(matches!(
            AnyMessage::decode(m.kind(), &longer, &l),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
    }
    // The typed decoders agree.
    let b = StateBegin::decode(&frames[0][HEADER_LEN..], &l).unwrap();
    assert_eq!(b.to_frame().unwrap(), frames[0]);
    let e = StateEnd::decode(&frames.last().unwrap()[HEADER_LEN..], &l).unwrap();
    assert_eq!(e.to_frame().unwrap(), *frames.last().unwrap());
}

#[test]
fn the_checksum_is_xxh64_of_the_chunk_payloads() {
    let chunks = chunks_of(&hybrid().to_frames(1, 50).unwrap());
    let (mut streamed, mut buffered) = (Checksum::new(), Checksum::new());
    for c in &chunks {
        streamed.add_chunk(c);
        buffered.update(&c.encode());
    }
    assert_eq!(streamed.finish(), buffered.finish());
    let mut abc = Checksum::default();
    abc.update(b"abc");
    assert_eq!(abc.finish(), 0x44bc_2cf5_ad77_0999);
}

// ---------------------------------------------------------------------------------------------
// Refusals, each naming the problem

/// Asserts that `got` is a Malformed error for `what` whose detail contains `needle`.
#[track_caller]
fn assert_malformed<T: Debug>(got: Result<T, WireError>, what: &str, needle: &str) {
    match got {
        Err(e @ WireError::Malformed { what: w, .. }) if w == what => {
            let text = e.to_string();
            assert!(
                text.contains(needle),
                "`{text}` does not contain `{needle}`"
            );
            assert!(text.starts_with(what));
        }
        other => panic!("expected Malformed {what} ({needle}), got {other:?}"),
    }
}

#[track_caller]
fn assert_over<T: Debug>(got: Result<T, WireError>, what: &str, value: u64, max: u64) {
    match got {
        Err(WireError::OverLimit {
            what: w,
            value: v,
            max: m,
        }) if w == what && v == value && m == max => {}
        other => panic!("expected OverLimit {what} = {value} > {max}, got {other:?}"),
    }
}

#[track_caller]
fn assert_truncated<T: Debug>(got: Result<T, WireError>, what: &str, needed: u64) {
    match got {
        Err(WireError::Truncated {
            what: w, needed: n, ..
        }) if w == what && n == needed => {}
        other => panic!("expected Truncated {what} needing {needed}, got {other:?}"),
    }
}

fn assembler(img: &SequenceStateImage) -> Assembler {
    Assembler::new(
        img.begin.clone(),
        img.begin.model_fingerprint,
        &StateLimits::default(),
    )
    .unwrap()
}

fn chunk(layer: u32, body: ChunkBody) -> StateChunk {
    StateChunk {
        transfer_id: 1,
        layer,
        body,
    }
}

/// The attention chunk of `img`'s layer `layer` holding blocks `from..to`.
fn blocks(img: &SequenceStateImage, layer: u32, from: usize, to: usize) -> StateChunk {
    let LayerShape::Attention {
        kv_heads,
        head_dim,
        block_tokens,
        dtype,
    } = img.begin.layers[layer as usize]
    else {
        panic!("not attention")
    };
    let LayerImage::Attention { blocks } = &img.layers[layer as usize] else {
        panic!("not attention")
    };
    chunk(
        layer,
        ChunkBody::Attention {
            first_block: from as u64,
            block_tokens,
            kv_heads,
            head_dim,
            dtype,
            blocks: blocks[from..to].to_vec(),
        },
    )
}

fn deltanet(img: &SequenceStateImage, layer: u32) -> StateChunk {
    let LayerImage::DeltaNet { conv, recurrent } = &img.layers[layer as usize] else {
        panic!("not DeltaNet")
    };
    chunk(
        layer,
        ChunkBody::DeltaNet {
            conv: conv.clone(),
            recurrent: recurrent.clone(),
        },
    )
}

#[test]
fn headers_are_refused_on_version_fingerprint_and_limits() {
    let img = hybrid();
    let l = Limits::default();

    let mut v2 = img.begin.clone();
    v2.state_version = 2;
    assert_malformed(
        StateBegin::decode(&v2.encode(), &l),
        "StateBegin.state_version",
        "state format version 2 is not supported (this node reads version 1)",
    );
    assert_malformed(
        Assembler::new(v2, 0xfeed, &StateLimits::default()),
        "StateBegin.state_version",
        "version 2",
    );

    assert_malformed(
        Assembler::new(img.begin.clone(), 0xbeef, &StateLimits::default()),
        "StateBegin.model_fingerprint",
        "a state of model 000000000000feed, this node runs 000000000000beef",
    );

    let small = StateLimits {
        max_state_bytes: img.begin.state_bytes() - 1,
        ..StateLimits::default()
    };
    let bytes = img.begin.state_bytes();
    assert_over(
        Assembler::new(img.begin.clone(), 0xfeed, &small),
        "StateBegin.state_bytes",
        bytes,
        bytes - 1,
    );
    let short = StateLimits {
        max_position: 9,
        ..StateLimits::default()
    };
    assert_over(
        Assembler::new(img.begin.clone(), 0xfeed, &short),
        "StateBegin.position",
        10,
        9,
    );
    let few = StateLimits {
        max_layers: 3,
        ..StateLimits::default()
    };
    assert_over(
        Assembler::new(img.begin.clone(), 0xfeed, &few),
        "StateBegin.layers.count",
        4,
        3,
    );

    // A header whose state would be far beyond the limit is refused on its numbers alone:
    // 64 Ki heads of 64 Ki dims per token (the allocation counterpart is in
    // tests/seq_state_alloc.rs).
    let huge = StateBegin {
        layers: vec![LayerShape::Attention {
            kv_heads: 65536,
            head_dim: 65536,
            block_tokens: 1,
            dtype: KvDtype::F32,
        }],
        ..img.begin.clone()
    };
    assert_over(
        Assembler::new(huge.clone(), 0xfeed, &StateLimits::default()),
        "StateBegin.state_bytes",
        10 * (2 * 65536 * 65536 * 4 + 8),
        64 << 30,
    );
    // The decoder refuses it too: not even one of its blocks fits a frame.
    assert_malformed(
        StateBegin::decode(&huge.encode(), &l),
        "StateBegin.layers",
        "layer 0: its smallest chunk (34359738414 bytes) exceeds the frame limit of 268435456",
    );
}

#[test]
fn headers_are_refused_when_inconsistent() {
    let img = hybrid();
    let l = Limits::default();
    let mut b = img.begin.clone();
    b.tokens.pop();
    assert_malformed(
        StateBegin::decode(&b.encode(), &l),
        "StateBegin.tokens",
        "9 token ids for a state of position 10",
    );
    assert_malformed(b.validate(), "StateBegin.tokens", "9 token ids");
    assert_malformed(
        Assembler::new(b, 0xfeed, &StateLimits::default()),
        "StateBegin.tokens",
        "position 10",
    );

    let mut b = img.begin.clone();
    b.generated = 11;
    assert_malformed(
        StateBegin::decode(&b.encode(), &l),
        "StateBegin.generated",
        "11 generated tokens, but the state covers only 10",
    );

    let mut b = img.begin.clone();
    b.layers[1] = attention(0, KvDtype::Bf16);
    assert_malformed(
        StateBegin::decode(&b.encode(), &l),
        "StateBegin.layers",
        "layer 1: block_tokens = 0 is not in 1..=65536",
    );
    assert_malformed(b.validate(), "StateBegin.layers", "block_tokens = 0");

    let mut b = img.begin.clone();
    b.layers[0] = LayerShape::DeltaNet {
        conv_rows: 3,
        conv_dim: 65537,
        v_heads: 1,
        k_head_dim: 1,
        v_head_dim: 1,
    };
    assert_malformed(
        StateBegin::decode(&b.encode(), &l),
        "StateBegin.layers",
        "layer 0: conv_dim = 65537 is not in 0..=65536",
    );

    let mut b = img.begin.clone();
    b.position = (1 << 21) + 1;
    assert_over(
        StateBegin::decode(&b.encode(), &l),
        "StateBegin.position",
        (1 << 21) + 1,
        1 << 21,
    );

    // Unknown codes, in a hand-patched payload: the last layer's dtype byte, then its kind.
    let mut p = img.begin.encode();
    *p.last_mut().unwrap() = 3;
    assert_malformed(
        StateBegin::decode(&p, &l),
        "StateBegin.layers.dtype",
        "unknown KV dtype 3",
    );
    let n = p.len();
    p[n - 14] = 2;
    assert_malformed(
        StateBegin::decode(&p, &l),
        "StateBegin.layers.kind",
        "unknown layer kind 2",
    );
}

#[test]
fn chunks_of_the_wrong_shape_are_refused() {
    let img = hybrid();
    let mut a = assembler(&img);
    a.push(deltanet(&img, 0)).unwrap();

    // Block dimensions, dtype and size against the header's layer 1 (bf16, 4 × 2 × 3).
    let good = blocks(&img, 1, 0, 2);
    let with = |f: &dyn Fn(&mut ChunkBody)| {
        let mut c = good.clone();
        f(&mut c.body);
        c
    };
    let cases: Vec<(StateChunk, &str, &str)> = vec![
        (
            with(&|b| {
                if let ChunkBody::Attention { block_tokens, .. } = b {
                    *block_tokens = 8;
                }
            }),
            "StateChunk.block_tokens",
            "layer 1: 8, the header says 4",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { kv_heads, .. } = b {
                    *kv_heads = 1;
                }
            }),
            "StateChunk.kv_heads",
            "layer 1: 1, the header says 2",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { head_dim, .. } = b {
                    *head_dim = 4;
                }
            }),
            "StateChunk.head_dim",
            "layer 1: 4, the header says 3",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { dtype, .. } = b {
                    *dtype = KvDtype::F32;
                }
            }),
            "StateChunk.dtype",
            "layer 1: F32, the header says Bf16",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { blocks, .. } = b {
                    blocks[1].data.pop();
                }
            }),
            "StateChunk.data",
            "layer 1, block 1: 95 bytes, a block of this layer has 96",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { blocks, .. } = b {
                    blocks[0].key_scale = 0.5;
                }
            }),
            "StateChunk.key_scale",
            "layer 1, block 0: 0.5, must be 1.0 for Bf16",
        ),
        (
            with(&|b| {
                if let ChunkBody::Attention { blocks, .. } = b {
                    blocks.clear();
                }
            }),
            "StateChunk.blocks",
            "layer 1: a chunk of no blocks",
        ),
        (
            deltanet(&img, 0).with_layer(1),
            "StateChunk.kind",
            "layer 1 is an attention layer, the chunk carries a DeltaNet state",
        ),
    ];
    for (c, what, needle) in cases {
        assert_malformed(c.check_against(&img.begin), what, needle);
        assert_malformed(a.push(c), what, needle);
    }
    a.push(good).unwrap();
    a.push(blocks(&img, 1, 2, 3)).unwrap();

    // DeltaNet layer 2: element counts and finite values.
    let mut c = deltanet(&img, 2);
    if let ChunkBody::DeltaNet { conv, .. } = &mut c.body {
        conv.pop();
    }
    assert_malformed(
        a.push(c),
        "StateChunk.conv",
        "layer 2: 11 values, the layer's state [3, 4] has 12",
    );
    let mut c = deltanet(&img, 2);
    if let ChunkBody::DeltaNet { recurrent, .. } = &mut c.body {
        recurrent.push(0.0);
    }
    assert_malformed(
        a.push(c),
        "StateChunk.recurrent",
        "layer 2: 13 values, the layer's state [2, 2, 3] has 12",
    );
    let mut c = deltanet(&img, 2);
    if let ChunkBody::DeltaNet { recurrent, .. } = &mut c.body {
        recurrent[5] = f32::NAN;
    }
    assert_malformed(
        a.push(c),
        "StateChunk.recurrent",
        "layer 2: value 5 is NaN, not finite",
    );
    assert_malformed(
        a.push(blocks(&img, 1, 0, 1).with_layer(2)),
        "StateChunk.kind",
        "layer 2 is a DeltaNet layer, the chunk carries KV blocks",
    );
    a.push(deltanet(&img, 2)).unwrap();

    // fp8 layer 3: scales must be finite (any finite value), unused slots of the last block
    // (10 tokens in 3-token blocks: 2 of block 3's slots) zero.
    let mut c = blocks(&img, 3, 0, 4);
    if let ChunkBody::Attention { blocks, .. } = &mut c.body {
        blocks[2].value_scale = f32::INFINITY;
    }
    assert_malformed(
        a.push(c),
        "StateChunk.value_scale",
        "layer 3, block 2: inf, must be finite for Fp8E4M3",
    );
    // Block 3 holds token 9 only: keys are bytes 0..18 (6 a token), values 18..36.
    for byte in [6, 17, 24, 35] {
        let mut c = blocks(&img, 3, 0, 4);
        if let ChunkBody::Attention { blocks, .. } = &mut c.body {
            blocks[3].data[byte] = 1;
        }
        assert_malformed(
            c.check_against(&img.begin),
            "StateChunk.data",
            "layer 3, block 3: its 2 unused token slots (of 3) are not zero",
        );
        assert_malformed(
            a.push(c),
            "StateChunk.data",
            "layer 3, block 3: its 2 unused token slots (of 3) are not zero",
        );
    }
    // The used slots may hold anything.
    let mut c = blocks(&img, 3, 0, 4);
    if let ChunkBody::Attention { blocks, .. } = &mut c.body {
        blocks[3].data[5] ^= 0xff;
        blocks[3].data[18] ^= 0xff;
    }
    c.check_against(&img.begin).unwrap();
    a.push(blocks(&img, 3, 0, 4)).unwrap();
    // Only the accepted chunks count.
    let end = end_for(&[
        deltanet(&img, 0),
        blocks(&img, 1, 0, 2),
        blocks(&img, 1, 2, 3),
        deltanet(&img, 2),
        blocks(&img, 3, 0, 4),
    ]);
    assert_eq!(a.finish(end).unwrap(), img);
}

trait WithLayer {
    fn with_layer(self, layer: u32) -> Self;
}

impl WithLayer for StateChunk {
    fn with_layer(mut self, layer: u32) -> Self {
        self.layer = layer;
        self
    }
}

/// The end of transfer 1 after `chunks`.
fn end_for(chunks: &[StateChunk]) -> StateEnd {
    let mut sum = Checksum::new();
    chunks.iter().for_each(|c| sum.add_chunk(c));
    StateEnd {
        transfer_id: 1,
        chunks: chunks.len() as u32,
        checksum: sum.finish(),
    }
}

/// The end a sender of `img` as transfer 1 writes, in chunks of at most `max_chunk` bytes.
fn end_of(img: &SequenceStateImage, max_chunk: usize) -> StateEnd {
    let mut chunks = Vec::new();
    for (l, image) in img.layers.iter().enumerate() {
        chunks.extend(layer_chunks(1, l as u32, image, &img.begin.layers[l], max_chunk).unwrap());
    }
    end_for(&chunks)
}

#[test]
fn chunks_out_of_order_are_refused() {
    let img = hybrid();
    let mut a = assembler(&img);
    assert_malformed(
        a.push(blocks(&img, 1, 0, 1)),
        "StateChunk.layer",
        "layer 1 arrives before layer 0 is complete (layers arrive in order)",
    );
    a.push(deltanet(&img, 0)).unwrap();
    assert_malformed(
        a.push(deltanet(&img, 0)),
        "StateChunk.layer",
        "layer 0 is already complete (layers arrive in order)",
    );
    assert_malformed(
        a.push(blocks(&img, 1, 1, 2)),
        "StateChunk.first_block",
        "layer 1: block 1 arrives first (expected 0)",
    );
    a.push(blocks(&img, 1, 0, 1)).unwrap();
    // A gap, a duplicate, an overlap.
    assert_malformed(
        a.push(blocks(&img, 1, 2, 3)),
        "StateChunk.first_block",
        "layer 1: block 2 arrives after block 0 (expected 1)",
    );
    assert_malformed(
        a.push(blocks(&img, 1, 0, 1)),
        "StateChunk.first_block",
        "layer 1: block 0 arrives again (blocks up to 0 are in; expected 1)",
    );
    a.push(blocks(&img, 1, 1, 2)).unwrap();
    assert_malformed(
        a.push(blocks(&img, 1, 1, 3)),
        "StateChunk.first_block",
        "layer 1: block 1 arrives again (blocks up to 1 are in; expected 2)",
    );
    assert_malformed(
        a.push(deltanet(&img, 2)),
        "StateChunk.layer",
        "layer 2 arrives before layer 1 is complete",
    );
    // More blocks than the position fills: 10 tokens are 3 blocks of 4.
    let mut extra = blocks(&img, 1, 2, 3);
    if let ChunkBody::Attention { blocks, .. } = &mut extra.body {
        blocks.push(blocks[0].clone());
    }
    assert_malformed(
        a.push(extra),
        "StateChunk.blocks",
        "layer 1: blocks 2..4, but 10 tokens fill 3 blocks of 4",
    );
    // Another transfer's chunk; a layer the state does not have.
    let mut other = blocks(&img, 1, 2, 3);
    other.transfer_id = 2;
    assert_malformed(
        a.push(other),
        "StateChunk.transfer_id",
        "a chunk of transfer 2 in transfer 1",
    );
    assert_malformed(
        a.push(deltanet(&img, 0).with_layer(4)),
        "StateChunk.layer",
        "layer 4, but the state has 4 layers",
    );
    assert_eq!(a.layers_complete(), 1);
    a.push(blocks(&img, 1, 2, 3)).unwrap();
    assert_eq!(a.layers_complete(), 2);
}

#[test]
fn ends_are_checked() {
    let img = hybrid();
    let full = |a: &mut Assembler| {
        a.push(deltanet(&img, 0)).unwrap();
        a.push(blocks(&img, 1, 0, 3)).unwrap();
        a.push(deltanet(&img, 2)).unwrap();
        a.push(blocks(&img, 3, 0, 4)).unwrap();
    };
    let end = end_of(&img, usize::MAX);

    let mut a = assembler(&img);
    full(&mut a);
    assert_malformed(
        a.finish(StateEnd {
            transfer_id: 9,
            ..end
        }),
        "StateEnd.transfer_id",
        "the end of transfer 9 in transfer 1",
    );
    let mut a = assembler(&img);
    full(&mut a);
    assert_malformed(
        a.finish(StateEnd { chunks: 5, ..end }),
        "StateEnd.chunks",
        "5 chunks sent, 4 arrived",
    );
    let mut a = assembler(&img);
    full(&mut a);
    assert_malformed(
        a.finish(StateEnd {
            checksum: end.checksum ^ 1,
            ..end
        }),
        "StateEnd.checksum",
        "sent,",
    );
    // The same chunks split differently make another checksum.
    let mut a = assembler(&img);
    a.push(deltanet(&img, 0)).unwrap();
    a.push(blocks(&img, 1, 0, 1)).unwrap();
    a.push(blocks(&img, 1, 1, 3)).unwrap();
    a.push(deltanet(&img, 2)).unwrap();
    a.push(blocks(&img, 3, 0, 4)).unwrap();
    assert_malformed(
        a.finish(StateEnd { chunks: 5, ..end }),
        "StateEnd.checksum",
        "over the chunks that arrived",
    );

    // Missing layers, with an end that matches what was sent.
    let partial = |pushed: &[StateChunk]| {
        let mut a = assembler(&img);
        for c in pushed {
            a.push(c.clone()).unwrap();
        }
        a.finish(end_for(pushed))
    };
    assert_malformed(
        partial(&[]),
        "StateEnd",
        "layer 0 (of 4) is missing: its DeltaNet state never arrived",
    );
    assert_malformed(
        partial(&[deltanet(&img, 0), blocks(&img, 1, 0, 2)]),
        "StateEnd",
        "layer 1 (of 4) is incomplete: 2 of its 3 KV blocks arrived",
    );
    assert_malformed(
        partial(&[deltanet(&img, 0), blocks(&img, 1, 0, 3), deltanet(&img, 2)]),
        "StateEnd",
        "layer 3 (of 4) is incomplete: 0 of its 4 KV blocks arrived",
    );
}

#[test]
fn empty_layers_need_no_chunks() {
    // Position 0: attention layers have no blocks; only the DeltaNet state is sent.
    let img = image(
        begin(
            0,
            vec![
                attention(4, KvDtype::F32),
                DELTANET,
                attention(2, KvDtype::Fp8E4M3),
            ],
        ),
        3,
    );
    assert_eq!(img.layers[0], LayerImage::Attention { blocks: vec![] });
    let frames = img.to_frames(1, 100).unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(receive(&frames, &StateLimits::default()).unwrap(), img);
    // No layers at all.
    let img = image(begin(5, vec![]), 3);
    assert_eq!(
        receive(&img.to_frames(1, 100).unwrap(), &StateLimits::default()).unwrap(),
        img
    );
}

#[test]
fn senders_refuse_what_receivers_would() {
    let img = hybrid();
    // Too few blocks.
    let mut short = img.clone();
    if let LayerImage::Attention { blocks } = &mut short.layers[1] {
        blocks.pop();
    }
    assert_malformed(
        short.to_frames(1, 100),
        "LayerImage",
        "layer 1: 2 KV blocks, but 10 tokens fill 3",
    );
    // Too many.
    let mut long = img.clone();
    if let LayerImage::Attention { blocks } = &mut long.layers[3] {
        blocks.push(blocks[0].clone());
    }
    assert_malformed(
        long.to_frames(1, usize::MAX),
        "StateChunk.blocks",
        "layer 3: blocks 0..5, but 10 tokens fill 4 blocks of 3",
    );
    assert_malformed(
        long.to_frames(1, 0),
        "StateChunk.blocks",
        "layer 3: blocks 4..5",
    );
    // A layer of the wrong kind, a missing layer, garbage in unused slots.
    let mut swapped = img.clone();
    swapped.layers.swap(0, 1);
    assert_malformed(
        swapped.to_frames(1, 100),
        "LayerImage",
        "layer 0: KV blocks for a DeltaNet layer",
    );
    let mut missing = img.clone();
    missing.layers.pop();
    assert_malformed(
        missing.to_frames(1, 100),
        "SequenceStateImage.layers",
        "3 layer images for a header of 4 layers",
    );
    let mut dirty = img.clone();
    if let LayerImage::Attention { blocks } = &mut dirty.layers[1] {
        *blocks[2].data.last_mut().unwrap() = 1;
    }
    assert_malformed(
        dirty.to_frames(1, 100),
        "StateChunk.data",
        "layer 1, block 2: its 2 unused token slots (of 4) are not zero",
    );

    // A writer streams layer by layer and ends only when all are written.
    let mut w = ChunkWriter::new(&img.begin).unwrap();
    let f0 = w.layer_frames(0, &img.layers[0], 100).unwrap();
    assert_eq!(f0.len(), 1);
    assert_malformed(w.end(), "StateEnd", "layer 1 (of 4) is incomplete");
    assert_malformed(
        w.layer_frames(2, &img.layers[2], 100),
        "StateChunk.layer",
        "layer 2 arrives before layer 1 is complete",
    );
    assert_malformed(
        w.layer_frames(9, &img.layers[2], 100),
        "StateChunk.layer",
        "layer 9, but the state has 4 layers",
    );
    for l in 1..4 {
        w.layer_frames(l, &img.layers[l as usize], 100).unwrap();
    }
    assert_eq!(w.end().unwrap(), end_of(&img, 100));
    let mut bad = img.begin.clone();
    bad.tokens.clear();
    assert_malformed(ChunkWriter::new(&bad), "StateBegin.tokens", "0 token ids");
}

// ---------------------------------------------------------------------------------------------
// Hostile payloads

/// Little-endian payload builder.
#[derive(Default, Clone)]
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
    fn f32(self, v: f32) -> Self {
        self.u32(v.to_bits())
    }
    /// A StateBegin up to its token count: version 1, position `position`, nothing generated.
    fn begin(position: u64) -> Self {
        B::default()
            .u16(1)
            .u64(1)
            .u64(7)
            .u64(position)
            .u32(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
    }
    /// An attention StateChunk up to its block count: layer 0, blocks from `first`, 1 × 1 × 1 f32.
    fn attention(first: u64) -> Self {
        B::default()
            .u64(1)
            .u32(0)
            .u8(1)
            .u64(first)
            .u32(1)
            .u32(1)
            .u32(1)
            .u8(0)
    }
}

#[test]
fn huge_announced_counts_with_tiny_payloads() {
    let l = Limits::default();
    // Token ids: the count must equal the position, and then be in the payload.
    assert_truncated(
        StateBegin::decode(&B::begin(1 << 21).u64(1 << 21).0, &l),
        "StateBegin.tokens",
        4 << 21,
    );
    assert_malformed(
        StateBegin::decode(&B::begin(5).u64(u64::MAX).0, &l),
        "StateBegin.tokens",
        "18446744073709551615 token ids for a state of position 5",
    );
    assert_over(
        StateBegin::decode(&B::begin(u64::MAX).0, &l),
        "StateBegin.position",
        u64::MAX,
        1 << 21,
    );
    // Layers: at most max_layers, and in the payload.
    assert_over(
        StateBegin::decode(&B::begin(0).u64(0).u32(4097).0, &l),
        "StateBegin.layers.count",
        4097,
        4096,
    );
    assert_truncated(
        StateBegin::decode(&B::begin(0).u64(0).u32(4096).u8(0).0, &l),
        "StateBegin.layers",
        4096 * 14,
    );

    // Chunks: DeltaNet value counts against the payload.
    let dn = B::default().u64(1).u32(0).u8(0);
    assert_truncated(
        StateChunk::decode(&dn.clone().u32(u32::MAX).f32(1.0).0, &l),
        "StateChunk.conv",
        4 * u64::from(u32::MAX),
    );
    assert_truncated(
        StateChunk::decode(&dn.clone().u32(0).u32(1 << 20).0, &l),
        "StateChunk.recurrent",
        4 << 20,
    );
    assert_malformed(
        StateChunk::decode(
            &dn.clone().u32(2).f32(1.0).f32(f32::NEG_INFINITY).u32(0).0,
            &l,
        ),
        "StateChunk.conv",
        "layer 0: value 1 is -inf, not finite",
    );
    // Block counts: against the token limit, then against the payload.
    assert_over(
        StateChunk::decode(&B::attention(0).u32(u32::MAX).0, &l),
        "StateChunk.first_block + count",
        u64::from(u32::MAX),
        1 << 21,
    );
    assert_over(
        StateChunk::decode(&B::attention(u64::MAX).u32(1).0, &l),
        "StateChunk.first_block + count",
        u64::MAX,
        1 << 21,
    );
    assert_truncated(
        StateChunk::decode(&B::attention(0).u32(1 << 20).f32(1.0).0, &l),
        "StateChunk.blocks",
        (1 << 20) * (8 + 8),
    );
    // Block dimensions: at least 1, at most max_state_dim; overflow with raised limits.
    let dims = |bt: u32, kvh: u32, hd: u32| {
        B::default()
            .u64(1)
            .u32(0)
            .u8(1)
            .u64(0)
            .u32(bt)
            .u32(kvh)
            .u32(hd)
            .u8(0)
            .u32(0)
    };
    assert_malformed(
        StateChunk::decode(&dims(0, 1, 1).0, &l),
        "StateChunk.block_tokens",
        "0, must be at least 1",
    );
    assert_over(
        StateChunk::decode(&dims(1, 65537, 1).0, &l),
        "StateChunk.kv_heads",
        65537,
        65536,
    );
    let raised = Limits {
        max_state_dim: u32::MAX,
        ..l
    };
    assert_malformed(
        StateChunk::decode(&dims(u32::MAX, u32::MAX, u32::MAX).0, &raised),
        "StateChunk.data",
        "overflows",
    );
    // Scales of an f32 block; an unknown dtype and kind; a layer over the limit.
    assert_malformed(
        StateChunk::decode(&B::attention(0).u32(1).f32(1.0).f32(2.0).u64(0).0, &l),
        "StateChunk.value_scale",
        "layer 0, block 0: 2, must be 1.0 for F32",
    );
    let mut p = B::attention(0).u32(0).0;
    p[33] = 7;
    assert_malformed(
        StateChunk::decode(&p, &l),
        "StateChunk.dtype",
        "unknown KV dtype 7",
    );
    assert_malformed(
        StateChunk::decode(&B::default().u64(1).u32(0).u8(5).0, &l),
        "StateChunk.kind",
        "unknown layer kind 5",
    );
    assert_over(
        StateChunk::decode(&B::default().u64(1).u32(4096).0, &l),
        "StateChunk.layer",
        4096,
        4095,
    );
    // A well-formed block decodes; the same with a byte missing does not.
    let one = B::attention(3).u32(1).f32(1.0).f32(1.0).u64(0).0;
    let c = StateChunk::decode(&one, &l).unwrap();
    assert_eq!(c.encode(), one);
    assert_truncated(
        StateChunk::decode(&one[..one.len() - 1], &l),
        "StateChunk.blocks",
        16,
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds

/// Writes whole transfers into `$MYRIAD_STATE_SEEDS` (the `seq_state` fuzz corpus), in that
/// target's input format: a frame count byte, then per frame a kind byte and a u32 payload
/// length and the payload. Does nothing unless the variable is set.
#[test]
fn write_state_fuzz_seeds() {
    let Some(dir) = std::env::var_os("MYRIAD_STATE_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let small = image(begin(3, vec![attention(2, KvDtype::Fp8E4M3), DELTANET]), 1);
    let tiny = image(
        begin(
            5,
            vec![
                LayerShape::DeltaNet {
                    conv_rows: 1,
                    conv_dim: 2,
                    v_heads: 1,
                    k_head_dim: 1,
                    v_head_dim: 2,
                },
                attention(4, KvDtype::Bf16),
            ],
        ),
        2,
    );
    for (i, (img, max_chunk)) in [(hybrid(), 60), (small, 0), (tiny, 1000)]
        .iter()
        .enumerate()
    {
        let frames = img.to_frames(1, *max_chunk).unwrap();
        let mut input = vec![frames.len() as u8];
        for f in &frames {
            input.push(f[6]);
            input.extend_from_slice(&((f.len() - HEADER_LEN) as u32).to_le_bytes());
            input.extend_from_slice(&f[HEADER_LEN..]);
        }
        std::fs::write(dir.join(format!("transfer-{i}")), input).unwrap();
    }
}
