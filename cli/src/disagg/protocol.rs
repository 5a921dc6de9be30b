//! What the two sides of a hand-off agree on: the JSON body of `POST /internal/prefill`, the
//! reply frames of a state transfer (an ack is a `Pong` whose nonce is the transfer id; a
//! refusal is an `Error` frame carrying an `ErrorReply`), the chunk size and the deadlines.

use std::time::Duration;

use myriad_attention::Request;
use myriad_transport::Frame;
use myriad_wire::{ErrorCode, ErrorReply, FrameKind, Limits, Message, Pong};
use serde::{Deserialize, Serialize};

/// Where a prefill node serves [`PrefillCall`]s.
pub const PREFILL_PATH: &str = "/internal/prefill";

/// The body of `POST /internal/prefill`: prefill `request`, send its state as transfer
/// `transfer_id` to the QUIC state receiver at `state_addr`, answer with the
/// `myriad_attention::PrefillOutput` as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillCall {
    pub request: Request,
    pub transfer_id: u64,
    /// `host:port` of the decode node's state receiver.
    pub state_addr: String,
    /// The TLS name to ask the receiver for (default: the prefill node's `--tls-server-name`).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Largest payload of one `StateChunk` frame. Big enough that per-frame round trips cost
/// little next to the bytes (8 MiB is milliseconds on a datacentre link), small enough to stay
/// far below the transport's 256 MiB frame limit and to keep the receiver's buffering small.
pub const MAX_CHUNK_BYTES: usize = 8 << 20;

/// How long one frame of a transfer may take to be sent and acknowledged: an 8 MiB chunk over
/// a slow (10 Mbit/s) link takes under 7 s.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// How long a decode node waits for one prefill node to prefill and transfer a prompt of
/// `prompt_tokens` tokens: a floor for the round trip and a slow node's start, plus a
/// generous per-token allowance (CPU prefill of a large model is ~100 tokens/s). A node that
/// is merely slow is given up on only after this; one that dies is noticed at once (its
/// connections close).
pub fn prefill_deadline(prompt_tokens: usize) -> Duration {
    Duration::from_secs(60)
        + Duration::from_millis(20).saturating_mul(u32::try_from(prompt_tokens).unwrap_or(u32::MAX))
}

/// How long reading one prefill node's load may take before it counts as unreadable.
pub const LOAD_DEADLINE: Duration = Duration::from_millis(500);

/// The acknowledgement of one frame of `transfer_id`.
pub fn ack(transfer_id: u64) -> Frame {
    Frame::new(FrameKind::Pong, Pong { nonce: transfer_id }.encode())
}

/// A refusal of a frame of `transfer_id` (0 when the frame named none).
pub fn refusal(transfer_id: u64, code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::new(
        FrameKind::Error,
        ErrorReply::new(transfer_id, code, message).encode(),
    )
}

/// Whether `reply` acknowledges a frame of `transfer_id`; otherwise what it says instead.
pub fn check_ack(reply: &Frame, transfer_id: u64) -> Result<(), String> {
    match reply.kind {
        FrameKind::Pong => match myriad_wire::Pong::decode(&reply.payload, &Limits::default()) {
            Ok(p) if p.nonce == transfer_id => Ok(()),
            Ok(p) => Err(format!(
                "the receiver acknowledged transfer {} instead of {transfer_id}",
                p.nonce
            )),
            Err(e) => Err(format!("the receiver sent an unreadable ack: {e}")),
        },
        FrameKind::Error => Err(error_text(reply)),
        other => Err(format!("the receiver answered with a {other:?} frame")),
    }
}

/// The message of an `Error` frame: an `ErrorReply` from the receiver, or the plain text the
/// transport itself sends for a frame it could not read.
pub fn error_text(frame: &Frame) -> String {
    match ErrorReply::decode(&frame.payload, &Limits::default()) {
        Ok(e) => format!("the receiver refused it ({:?}): {}", e.code, e.message),
        Err(_) => format!(
            "the receiver refused it: {}",
            String::from_utf8_lossy(&frame.payload)
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_refusals_are_told_apart() {
        assert_eq!(check_ack(&ack(7), 7), Ok(()));
        assert!(check_ack(&ack(8), 7).unwrap_err().contains("instead of 7"));
        let m = check_ack(&refusal(7, ErrorCode::BadRequest, "no such transfer"), 7).unwrap_err();
        assert!(
            m.contains("BadRequest") && m.contains("no such transfer"),
            "{m}"
        );
        let plain = myriad_transport::error_frame("bad frame header");
        assert!(
            check_ack(&plain, 7)
                .unwrap_err()
                .contains("bad frame header")
        );
    }

    #[test]
    fn the_deadline_grows_with_the_prompt() {
        assert_eq!(prefill_deadline(0), Duration::from_secs(60));
        assert_eq!(prefill_deadline(100_000), Duration::from_secs(2060));
    }
}
