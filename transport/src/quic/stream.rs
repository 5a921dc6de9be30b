//! One frame on one QUIC stream: writing it (header and payload, then finishing the stream) and
//! reading it (the header is decoded and checked against the limit before anything is
//! allocated for the payload; the stream must end right after the frame).

use std::fmt;
use std::time::Duration;

use myriad_wire::{FrameHeader, HEADER_LEN, WireError, decode_header, encode_header};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::time::timeout;

use crate::Frame;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum ReadFailure {
    /// The header is not a frame this side accepts (magic, version, kind, length over the limit).
    Header(WireError),
    /// The stream ended after `got` of the `wanted` bytes of the frame (header included).
    Truncated { got: usize, wanted: usize },
    /// No progress for the allowed time (`header`: while waiting for the header).
    Stalled { header: bool, after: Duration },
    /// More bytes followed the frame (one frame per stream direction).
    Trailing,
    /// The stream was reset or the connection was lost: nobody to answer.
    Stream(ReadError),
}

impl fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadFailure::Header(e) => write!(f, "bad frame header: {e}"),
            ReadFailure::Truncated { got, wanted } => {
                write!(
                    f,
                    "the stream ended after {got} of the frame's {wanted} bytes"
                )
            }
            ReadFailure::Stalled {
                header: true,
                after,
            } => write!(f, "no frame header within {after:?}"),
            ReadFailure::Stalled {
                header: false,
                after,
            } => write!(f, "the frame stalled for {after:?}"),
            ReadFailure::Trailing => {
                write!(f, "bytes after the end of the frame (one frame per stream)")
            }
            ReadFailure::Stream(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one frame whose payload is at most `max_frame` bytes. `header_within` bounds the wait
/// for the header and `stall` each wait for more payload and for the end of the stream (`None`:
/// no bound; the caller has a deadline around the whole read).
pub async fn read_frame(
    recv: &mut RecvStream,
    max_frame: u32,
    header_within: Option<Duration>,
    stall: Option<Duration>,
) -> Result<Frame, ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let filled = bounded(header_within, true, async {
        while got < HEADER_LEN {
            match recv
                .read(&mut header[got..])
                .await
                .map_err(ReadFailure::Stream)?
            {
                Some(n) => got += n,
                None => {
                    return Err(ReadFailure::Truncated {
                        got,
                        wanted: HEADER_LEN,
                    });
                }
            }
        }
        Ok(())
    })
    .await;
    filled?;
    let FrameHeader { kind, len } =
        decode_header(&header, max_frame).map_err(ReadFailure::Header)?;
    let len = len as usize;
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let chunk = bounded(stall, false, async {
            recv.read_chunk(len - payload.len(), true)
                .await
                .map_err(ReadFailure::Stream)
        });
        match chunk.await? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(ReadFailure::Truncated {
                    got: HEADER_LEN + payload.len(),
                    wanted: HEADER_LEN + len,
                });
            }
        }
    }
    let end = bounded(stall, false, async {
        recv.read_chunk(1, true).await.map_err(ReadFailure::Stream)
    });
    match end.await? {
        None => Ok(Frame { kind, payload }),
        Some(_) => Err(ReadFailure::Trailing),
    }
}

async fn bounded<T>(
    limit: Option<Duration>,
    header: bool,
    work: impl Future<Output = Result<T, ReadFailure>>,
) -> Result<T, ReadFailure> {
    match limit {
        None => work.await,
        Some(after) => timeout(after, work)
            .await
            .unwrap_or(Err(ReadFailure::Stalled { header, after })),
    }
}

/// Writes `frame` (whose payload the caller has checked against the limit, so its length fits
/// the header) and finishes the stream. The payload is handed to quinn without a copy.
pub async fn write_frame(send: &mut SendStream, frame: Frame) -> Result<(), WriteError> {
    let header = encode_header(frame.kind, frame.payload.len() as u32);
    send.write_all_chunks(&mut [header.to_vec().into(), frame.payload.into()])
        .await?;
    send.finish().map_err(|_| WriteError::ClosedStream)
}
