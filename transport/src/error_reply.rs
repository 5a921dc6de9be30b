//! The payload of the [`FrameKind::Error`] frames the transport itself sends (a peer's bad frame,
//! a failed handler, a reply over the size limit).
//!
//! For now the payload is the message as plain UTF-8 text. When the message codec defines an
//! error message, only these two functions change.

use myriad_wire::FrameKind;

use crate::Frame;

/// An error reply carrying `message`.
pub fn error_frame(message: &str) -> Frame {
    Frame::new(FrameKind::Error, message.as_bytes().to_vec())
}

/// The message of an error reply, or `None` if `frame` is not one.
pub fn error_message(frame: &Frame) -> Option<String> {
    (frame.kind == FrameKind::Error).then(|| String::from_utf8_lossy(&frame.payload).into_owned())
}
