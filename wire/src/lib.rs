//! The contracts between Myriad's nodes, in one versioned place (as TGI keeps `proto/`):
//!
//! - The wire protocol, version 1 ([`VERSION`]): versioned, length-delimited frames
//!   ([`frame`]) whose payloads are the messages in [`messages`] ([`control`] for the
//!   handshake, liveness and errors, [`expert`] for expert requests and responses). Tensors
//!   travel as raw little-endian bytes with dtype and shape headers ([`tensor`]), routes as
//!   per-row (expert, weight) lists ([`routes`]). Every size a peer sends is checked against
//!   [`Limits`] before anything is allocated; a decoder error names the field that was wrong.
//! - The sequence state format ([`seq_state`], versioned on its own by
//!   [`STATE_FORMAT_VERSION`]): one sequence's per-layer Gated DeltaNet states and paged KV
//!   caches, position, tokens and sampler state, as a [`StateBegin`] header, layer-ordered
//!   [`StateChunk`]s and a [`StateEnd`]. It moves a finished prefill to a decode node (streamed
//!   layer by layer, reassembled and checked by an [`Assembler`]), and is meant for prefix
//!   caches and live migration too.
//! - What the messages carry and the control plane publishes: [`Routes`] (which experts each
//!   row goes to), [`ExpertSet`] (which experts a node holds, `0-127,300`) and [`Placement`]
//!   (which node serves which experts).
//!
//! This crate depends on no other Myriad crate, so transports, the router and the control
//! plane can share it without linking kernels or model code.

mod codec;
pub mod control;
pub mod expert;
pub mod expert_set;
pub mod frame;
pub mod limits;
pub mod messages;
pub mod placement;
pub mod route_table;
pub mod routes;
pub mod seq_state;
pub mod tensor;

use thiserror::Error;

pub use expert_set::{ExpertSet, ExpertSetError};
pub use placement::{NodeSpec, Placement, PlacementError};
pub use route_table::Routes;

pub use control::{ErrorCode, ErrorReply, Hello, HelloAck, Ping, Pong};
pub use expert::{ExpertRequest, ExpertResponse};
pub use frame::{
    FrameHeader, FrameKind, HEADER_LEN, MAGIC, VERSION, decode_header, encode_frame, encode_header,
};
pub use limits::Limits;
pub use messages::{AnyMessage, Message, decode_frame};
pub use seq_state::{
    Assembler, Checksum, ChunkBody, ChunkWriter, KvBlock, KvDtype, LayerImage, LayerShape,
    STATE_FORMAT_VERSION, SequenceStateImage, StateBegin, StateChunk, StateEnd, StateLimits,
    layer_chunks,
};
pub use tensor::{TensorDtype, WireTensor};

/// Why bytes from a peer were rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a Myriad frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("protocol version {got} is not supported (this node speaks {supported})")]
    Version { got: u16, supported: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("{what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} = {value} exceeds the limit of {max}")]
    OverLimit {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{what}: needs {needed} bytes, only {left} left in the payload")]
    Truncated {
        what: &'static str,
        needed: u64,
        left: u64,
    },
    #[error("{what}: {extra} bytes left over after the message")]
    TrailingBytes { what: &'static str, extra: u64 },
}
