//! The connection-level messages: the handshake ([`Hello`] / [`HelloAck`]), liveness
//! ([`Ping`] / [`Pong`]) and failure replies ([`ErrorReply`]).
//!
//! ```text
//! Hello      client str | model_fingerprint u64
//! HelloAck   node str | model_fingerprint u64 | num_layers u32 | num_experts u32 | hidden u32
//!            | held_count u32 | held_count × expert u32 (strictly increasing, < num_experts)
//! ErrorReply id u64 | code u16 | message str
//! Ping, Pong nonce u64
//! str        len u32 (≤ max_text) | len bytes of UTF-8
//! ```

use super::WireError;
use super::codec::{Put, Reader, truncate_text};
use super::frame::FrameKind;
use super::limits::Limits;
use super::messages::{Message, reader};

/// Client → node: who is calling and which model it runs
/// (`ModelConfig::fingerprint` in `myriad-model`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub client: String,
    pub model_fingerprint: u64,
}

/// Node → client: the node's identity, its model and the experts it holds (of every layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    pub node: String,
    pub model_fingerprint: u64,
    pub num_layers: u32,
    pub num_experts: u32,
    pub hidden: u32,
    /// Expert ids held, strictly increasing, each below `num_experts`.
    pub held: Vec<u32>,
}

/// Why a request failed.
///
/// Codes this build does not know decode as [`ErrorCode::Unknown`] rather than failing, so a
/// newer peer's error still reaches the caller as an error (not as a broken frame); a decoded
/// `Unknown` never holds one of the known codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request frame could not be decoded.
    BadFrame,
    /// The request decoded but is inconsistent (e.g. wrong hidden size).
    BadRequest,
    UnknownLayer,
    ExpertNotHeld,
    /// The peers run different models (fingerprints differ).
    ModelMismatch,
    Overloaded,
    Internal,
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::BadRequest => 2,
            ErrorCode::UnknownLayer => 3,
            ErrorCode::ExpertNotHeld => 4,
            ErrorCode::ModelMismatch => 5,
            ErrorCode::Overloaded => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Unknown(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::BadRequest,
            3 => ErrorCode::UnknownLayer,
            4 => ErrorCode::ExpertNotHeld,
            5 => ErrorCode::ModelMismatch,
            6 => ErrorCode::Overloaded,
            7 => ErrorCode::Internal,
            v => ErrorCode::Unknown(v),
        }
    }
}

/// A failed request: `id` is the request's id (0 when the request could not be decoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub id: u64,
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    /// An error reply whose message is cut (at a character boundary) to the default
    /// `max_text`, so that a long error chain never makes the reply itself undecodable.
    pub fn new(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        let keep = truncate_text(&message, Limits::default().max_text as usize).len();
        message.truncate(keep);
        ErrorReply { id, code, message }
    }
}

/// Liveness probe; answered by a [`Pong`] with the same nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
}

impl Message for Hello {
    const KIND: FrameKind = FrameKind::Hello;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_text(&self.client);
        out.put_u64(self.model_fingerprint);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let client = r.text("Hello.client", limits.max_text)?;
        let model_fingerprint = r.u64("Hello.model_fingerprint")?;
        r.finish("Hello")?;
        Ok(Hello {
            client,
            model_fingerprint,
        })
    }
}

impl Message for HelloAck {
    const KIND: FrameKind = FrameKind::HelloAck;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_text(&self.node);
        out.put_u64(self.model_fingerprint);
        out.put_u32(self.num_layers);
        out.put_u32(self.num_experts);
        out.put_u32(self.hidden);
        out.put_u32(u32::try_from(self.held.len()).unwrap_or(u32::MAX));
        self.held.iter().for_each(|e| out.put_u32(*e));
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let node = r.text("HelloAck.node", limits.max_text)?;
        let model_fingerprint = r.u64("HelloAck.model_fingerprint")?;
        let num_layers = r.u32_max("HelloAck.num_layers", limits.max_layers)?;
        let num_experts = r.u32("HelloAck.num_experts")?;
        let max_experts = u64::from(limits.max_expert_id) + 1;
        if u64::from(num_experts) > max_experts {
            return Err(WireError::OverLimit {
                what: "HelloAck.num_experts",
                value: num_experts.into(),
                max: max_experts,
            });
        }
        let hidden = r.u32_max("HelloAck.hidden", limits.max_cols)?;
        // Strictly increasing ids below num_experts: at most num_experts of them.
        let count = r.u32_max("HelloAck.held.count", num_experts)?;
        r.require(u64::from(count) * 4, "HelloAck.held")?;
        let mut held = Vec::with_capacity(count as usize);
        let mut previous: Option<u32> = None;
        for _ in 0..count {
            let e = r.u32("HelloAck.held")?;
            if e >= num_experts {
                return Err(WireError::Malformed {
                    what: "HelloAck.held",
                    detail: format!("expert {e} is not below num_experts = {num_experts}"),
                });
            }
            if let Some(p) = previous.filter(|p| *p >= e) {
                return Err(WireError::Malformed {
                    what: "HelloAck.held",
                    detail: format!("expert {e} after {p}: ids must be strictly increasing"),
                });
            }
            previous = Some(e);
            held.push(e);
        }
        r.finish("HelloAck")?;
        Ok(HelloAck {
            node,
            model_fingerprint,
            num_layers,
            num_experts,
            hidden,
            held,
        })
    }
}

impl Message for ErrorReply {
    const KIND: FrameKind = FrameKind::Error;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.id);
        out.put_u16(self.code.to_u16());
        out.put_text(&self.message);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let id = r.u64("ErrorReply.id")?;
        let code = ErrorCode::from_u16(r.u16("ErrorReply.code")?);
        let message = r.text("ErrorReply.message", limits.max_text)?;
        r.finish("ErrorReply")?;
        Ok(ErrorReply { id, code, message })
    }
}

/// Ping and Pong share the layout `nonce u64`.
fn decode_nonce(
    payload: &[u8],
    limits: &Limits,
    what: &'static str,
    message: &'static str,
) -> Result<u64, WireError> {
    let mut r: Reader<'_> = reader(payload, limits)?;
    let nonce = r.u64(what)?;
    r.finish(message)?;
    Ok(nonce)
}

impl Message for Ping {
    const KIND: FrameKind = FrameKind::Ping;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.nonce);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        Ok(Ping {
            nonce: decode_nonce(payload, limits, "Ping.nonce", "Ping")?,
        })
    }
}

impl Message for Pong {
    const KIND: FrameKind = FrameKind::Pong;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.nonce);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        Ok(Pong {
            nonce: decode_nonce(payload, limits, "Pong.nonce", "Pong")?,
        })
    }
}
