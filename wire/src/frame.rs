//! The frame layer of the wire protocol: every message between Myriad nodes is one frame, a
//! fixed 12-byte header followed by a payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic   b"MYRD"
//!      4     2  version u16 LE (currently 1)
//!      6     2  kind    u16 LE (FrameKind)
//!      8     4  length  u32 LE, payload bytes that follow
//! ```
//!
//! A reader decodes the header first and checks the length against its limit before it
//! allocates anything for the payload, so a peer cannot make a node allocate more than the
//! limit by lying about sizes.

use super::WireError;

pub const MAGIC: [u8; 4] = *b"MYRD";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;

/// What a frame's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Client → node: who I am, what I expect (model fingerprint, protocol limits).
    Hello = 1,
    /// Node → client: the node's identity, model and held experts.
    HelloAck = 2,
    /// Run rows through routed experts of one layer.
    ExpertRequest = 3,
    /// The per-row weighted sums of an [`FrameKind::ExpertRequest`].
    ExpertResponse = 4,
    /// A request failed; the payload says why.
    Error = 5,
    /// Liveness probe and its answer.
    Ping = 6,
    Pong = 7,
    /// Opens the transfer of one sequence's state: its header (shapes, position, tokens,
    /// sampler), from which the receiver knows the whole state's size.
    StateBegin = 8,
    /// Part of one layer of a sequence state (a DeltaNet state, or a run of KV blocks).
    StateChunk = 9,
    /// Closes a state transfer: how many chunks were sent and their checksum.
    StateEnd = 10,
}

impl FrameKind {
    pub fn from_u16(v: u16) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloAck,
            3 => FrameKind::ExpertRequest,
            4 => FrameKind::ExpertResponse,
            5 => FrameKind::Error,
            6 => FrameKind::Ping,
            7 => FrameKind::Pong,
            8 => FrameKind::StateBegin,
            9 => FrameKind::StateChunk,
            10 => FrameKind::StateEnd,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Payload bytes that follow the header.
    pub len: u32,
}

/// The header of a frame of `kind` with `len` payload bytes.
pub fn encode_header(kind: FrameKind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// Checks and decodes a header; `max_len` is the largest payload the reader accepts.
pub fn decode_header(h: &[u8; HEADER_LEN], max_len: u32) -> Result<FrameHeader, WireError> {
    if h[0..4] != MAGIC {
        return Err(WireError::BadMagic([h[0], h[1], h[2], h[3]]));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(WireError::Version {
            got: version,
            supported: VERSION,
        });
    }
    let raw = u16::from_le_bytes([h[6], h[7]]);
    let kind = FrameKind::from_u16(raw).ok_or(WireError::UnknownKind(raw))?;
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > max_len {
        return Err(WireError::FrameTooLarge { len, max: max_len });
    }
    Ok(FrameHeader { kind, len })
}

/// A whole frame (header + payload) as one buffer.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = u32::try_from(payload.len()).map_err(|_| WireError::FrameTooLarge {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(kind, len));
    out.extend_from_slice(payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        let h = encode_header(FrameKind::ExpertRequest, 1234);
        assert_eq!(
            decode_header(&h, 2000),
            Ok(FrameHeader {
                kind: FrameKind::ExpertRequest,
                len: 1234
            })
        );
        assert_eq!(
            decode_header(&h, 1000),
            Err(WireError::FrameTooLarge {
                len: 1234,
                max: 1000
            })
        );
        let mut v = h;
        v[4] = 9;
        assert_eq!(
            decode_header(&v, 2000),
            Err(WireError::Version {
                got: 9,
                supported: VERSION
            })
        );
        let mut m = h;
        m[0] = b'X';
        assert!(matches!(
            decode_header(&m, 2000),
            Err(WireError::BadMagic(_))
        ));
        let mut k = h;
        k[6] = 99;
        assert_eq!(decode_header(&k, 2000), Err(WireError::UnknownKind(99)));
    }
}
