//! The prefill side of a state transfer: dials the decode node's state receiver over QUIC
//! (the node's own TLS settings) and sends one state as `StateBegin`, the chunks layer by
//! layer (each at most [`MAX_CHUNK_BYTES`], encoded one layer at a time so a large state is
//! never copied whole) and `StateEnd`, one call per frame, in order, each acknowledged before
//! the next is sent; an error reply ends the transfer with the receiver's message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use myriad_transport::{Connection, Frame, QuicConnector, QuicLimits, TlsConfig};
use myriad_wire::{
    ChunkWriter, FrameKind, HEADER_LEN, Message, SequenceStateImage, StateBegin, decode_header,
};

use super::protocol::{FRAME_DEADLINE, MAX_CHUNK_BYTES, check_ack};

/// Sends states to decode nodes; one QUIC client endpoint per TLS server name asked for
/// (usually one), kept for the node's life so connections are reused.
pub struct StateSender {
    tls: TlsConfig,
    connectors: Mutex<HashMap<String, Arc<QuicConnector>>>,
}

impl StateSender {
    pub fn new(tls: TlsConfig) -> Self {
        StateSender {
            tls,
            connectors: Mutex::default(),
        }
    }

    /// The client endpoint that asks for `server_name` (default: this node's own). Must be
    /// called within a tokio runtime.
    fn connector(&self, server_name: Option<&str>) -> Result<Arc<QuicConnector>, String> {
        let tls = match (&self.tls, server_name) {
            (TlsConfig::Files { .. }, None) | (TlsConfig::InsecureDev, _) => self.tls.clone(),
            (TlsConfig::Files { cert, key, ca, .. }, Some(name)) => TlsConfig::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                server_name: name.to_string(),
            },
        };
        let mut connectors = self
            .connectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = connectors.get(tls.server_name()) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            QuicConnector::new(&tls, QuicLimits::default())
                .map_err(|e| format!("starting the QUIC client: {e}"))?,
        );
        connectors.insert(tls.server_name().to_string(), c.clone());
        Ok(c)
    }

    /// Sends `image` as transfer `transfer_id` to the receiver at `addr`. Every frame has its
    /// own deadline ([`FRAME_DEADLINE`]), dialling the transport's connect timeout.
    pub async fn send(
        &self,
        addr: &str,
        server_name: Option<&str>,
        image: &SequenceStateImage,
        transfer_id: u64,
    ) -> Result<(), String> {
        let connector = self.connector(server_name)?;
        let conn = connector
            .dial(addr)
            .await
            .map_err(|e| format!("state receiver {addr}: {e}"))?;
        let begin = StateBegin {
            transfer_id,
            ..image.begin.clone()
        };
        let mut writer = ChunkWriter::new(&begin).map_err(|e| format!("the state: {e}"))?;
        call(
            &*conn,
            Frame::new(FrameKind::StateBegin, begin.encode()),
            transfer_id,
        )
        .await?;
        for (l, layer) in image.layers.iter().enumerate() {
            let l = u32::try_from(l).map_err(|_| "the state has too many layers".to_string())?;
            let frames = writer
                .layer_frames(l, layer, MAX_CHUNK_BYTES)
                .map_err(|e| format!("the state's layer {l}: {e}"))?;
            for f in frames {
                call(&*conn, split(f)?, transfer_id).await?;
            }
        }
        let end = writer.end().map_err(|e| format!("the state: {e}"))?;
        call(
            &*conn,
            Frame::new(FrameKind::StateEnd, end.encode()),
            transfer_id,
        )
        .await
    }
}

/// An encoded frame as the transport takes it: kind and payload (the header dropped in place).
fn split(mut frame: Vec<u8>) -> Result<Frame, String> {
    let header: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or("a frame shorter than its header")?;
    let kind = decode_header(header, u32::MAX)
        .map_err(|e| format!("a frame we encoded: {e}"))?
        .kind;
    frame.drain(..HEADER_LEN);
    Ok(Frame::new(kind, frame))
}

/// One frame of the transfer, acknowledged.
async fn call(conn: &dyn Connection, frame: Frame, transfer_id: u64) -> Result<(), String> {
    let kind = frame.kind;
    let reply = conn
        .call(frame, FRAME_DEADLINE)
        .await
        .map_err(|e| format!("sending {kind:?} to the state receiver: {e}"))?;
    check_ack(&reply, transfer_id).map_err(|m| format!("{kind:?}: {m}"))
}
