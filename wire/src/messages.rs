//! The message set: the [`Message`] trait every payload type implements, [`AnyMessage`] for
//! whichever kind a frame names, and [`decode_frame`] for a whole frame.
//!
//! Encoding a payload never fails; decoding checks everything (see [`Limits`]) and consumes the payload
//! exactly. Encoding is canonical: a payload that decodes re-encodes to the same bytes.

use super::WireError;
use super::codec::Reader;
use super::control::{ErrorReply, Hello, HelloAck, Ping, Pong};
use super::expert::{ExpertRequest, ExpertResponse};
use super::frame::{FrameKind, HEADER_LEN, decode_header, encode_header};
use super::limits::Limits;
use super::seq_state::{StateBegin, StateChunk, StateEnd};

/// One payload type of the protocol.
pub trait Message: Sized {
    /// The frame kind that carries this message.
    const KIND: FrameKind;

    /// Appends the payload (without frame header) to `out`.
    fn encode_into(&self, out: &mut Vec<u8>);

    /// The payload (without frame header). A message that breaks its own invariants (a tensor
    /// whose data does not match its shape, routes for another number of rows, …) still
    /// encodes, to bytes the peer rejects.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes a payload of [`Self::KIND`], checking every count against `limits` before
    /// allocating; the payload must be consumed exactly.
    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError>;

    /// Header and payload as one buffer (encoded in place, without copying the payload).
    /// Fails only if the payload exceeds the 4 GiB a header can announce.
    fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        frame_with(Self::KIND, |out| self.encode_into(out))
    }
}

/// Encodes a frame of `kind` whose payload `encode` appends.
fn frame_with(kind: FrameKind, encode: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0; HEADER_LEN];
    encode(&mut out);
    let payload = out.len().saturating_sub(HEADER_LEN);
    let len = u32::try_from(payload).map_err(|_| WireError::OverLimit {
        what: "frame payload",
        value: payload as u64,
        max: u32::MAX.into(),
    })?;
    if let Some(header) = out.get_mut(..HEADER_LEN) {
        header.copy_from_slice(&encode_header(kind, len));
    }
    Ok(out)
}

/// A reader over `payload`, refusing payloads beyond `limits.max_frame` (a transport checks the
/// header first; this covers callers that decode payloads they got some other way).
pub(crate) fn reader<'a>(payload: &'a [u8], limits: &Limits) -> Result<Reader<'a>, WireError> {
    match u32::try_from(payload.len()) {
        Ok(len) if len <= limits.max_frame => Ok(Reader::new(payload)),
        _ => Err(WireError::FrameTooLarge {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            max: limits.max_frame,
        }),
    }
}

/// Any message, as named by its frame's kind.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyMessage {
    Hello(Hello),
    HelloAck(HelloAck),
    ExpertRequest(ExpertRequest),
    ExpertResponse(ExpertResponse),
    Error(ErrorReply),
    Ping(Ping),
    Pong(Pong),
    StateBegin(StateBegin),
    StateChunk(StateChunk),
    StateEnd(StateEnd),
}

impl AnyMessage {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            AnyMessage::Hello(_) => FrameKind::Hello,
            AnyMessage::HelloAck(_) => FrameKind::HelloAck,
            AnyMessage::ExpertRequest(_) => FrameKind::ExpertRequest,
            AnyMessage::ExpertResponse(_) => FrameKind::ExpertResponse,
            AnyMessage::Error(_) => FrameKind::Error,
            AnyMessage::Ping(_) => FrameKind::Ping,
            AnyMessage::Pong(_) => FrameKind::Pong,
            AnyMessage::StateBegin(_) => FrameKind::StateBegin,
            AnyMessage::StateChunk(_) => FrameKind::StateChunk,
            AnyMessage::StateEnd(_) => FrameKind::StateEnd,
        }
    }

    /// Decodes a payload of `kind` (for transports that already split header and payload).
    pub fn decode(kind: FrameKind, payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        Ok(match kind {
            FrameKind::Hello => AnyMessage::Hello(Hello::decode(payload, limits)?),
            FrameKind::HelloAck => AnyMessage::HelloAck(HelloAck::decode(payload, limits)?),
            FrameKind::ExpertRequest => {
                AnyMessage::ExpertRequest(ExpertRequest::decode(payload, limits)?)
            }
            FrameKind::ExpertResponse => {
                AnyMessage::ExpertResponse(ExpertResponse::decode(payload, limits)?)
            }
            FrameKind::Error => AnyMessage::Error(ErrorReply::decode(payload, limits)?),
            FrameKind::Ping => AnyMessage::Ping(Ping::decode(payload, limits)?),
            FrameKind::Pong => AnyMessage::Pong(Pong::decode(payload, limits)?),
            FrameKind::StateBegin => AnyMessage::StateBegin(StateBegin::decode(payload, limits)?),
            FrameKind::StateChunk => AnyMessage::StateChunk(StateChunk::decode(payload, limits)?),
            FrameKind::StateEnd => AnyMessage::StateEnd(StateEnd::decode(payload, limits)?),
        })
    }

    /// Appends the payload to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            AnyMessage::Hello(m) => m.encode_into(out),
            AnyMessage::HelloAck(m) => m.encode_into(out),
            AnyMessage::ExpertRequest(m) => m.encode_into(out),
            AnyMessage::ExpertResponse(m) => m.encode_into(out),
            AnyMessage::Error(m) => m.encode_into(out),
            AnyMessage::Ping(m) => m.encode_into(out),
            AnyMessage::Pong(m) => m.encode_into(out),
            AnyMessage::StateBegin(m) => m.encode_into(out),
            AnyMessage::StateChunk(m) => m.encode_into(out),
            AnyMessage::StateEnd(m) => m.encode_into(out),
        }
    }

    /// The payload (without frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Header and payload as one buffer; see [`Message::to_frame`].
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        frame_with(self.kind(), |out| self.encode_into(out))
    }
}

macro_rules! from_message {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for AnyMessage {
            fn from(m: $ty) -> Self {
                AnyMessage::$variant(m)
            }
        })*
    };
}

from_message!(
    Hello(Hello),
    HelloAck(HelloAck),
    ExpertRequest(ExpertRequest),
    ExpertResponse(ExpertResponse),
    Error(ErrorReply),
    Ping(Ping),
    Pong(Pong),
    StateBegin(StateBegin),
    StateChunk(StateChunk),
    StateEnd(StateEnd),
);

/// Decodes a whole frame (header + payload) into whichever message its kind names: the header
/// (magic, version, kind, announced length against `limits.max_frame`) first, then that exactly
/// the announced number of payload bytes follow, then the payload.
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<AnyMessage, WireError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated {
            what: "frame header",
            needed: HEADER_LEN as u64,
            left: bytes.len() as u64,
        });
    };
    let header = decode_header(header, limits.max_frame)?;
    let (announced, actual) = (u64::from(header.len), payload.len() as u64);
    if actual < announced {
        return Err(WireError::Truncated {
            what: "frame payload",
            needed: announced,
            left: actual,
        });
    }
    if actual > announced {
        return Err(WireError::TrailingBytes {
            what: "frame",
            extra: actual - announced,
        });
    }
    AnyMessage::decode(header.kind, payload, limits)
}
