//! The decode side's QUIC state receiver: a `transport::QuicServer` whose handler assembles
//! the states prefill nodes send, and the table of transfers it expects.
//!
//! A transfer is expected before its prefill is asked for ([`StateReceiver::expect`], which
//! returns the [`Expected`] the hand-off waits on); every frame is answered with an ack or an
//! error frame. Anything wrong (a `StateBegin` for an id nobody expects, a second begin, a
//! header of another model or KV layout or longer than the prompt, a chunk the assembler
//! refuses, an undecodable frame, a bad end) is refused, and when the frame names an expected
//! transfer that transfer is dropped at once: its entry removed, its waiter told why. An
//! [`Expected`] that is dropped (the hand-off finished, moved on or was abandoned) removes its
//! entry too, so nothing outlives the request that wanted it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result};
use myriad_transport::{BoxFuture, Frame, Handler, QuicLimits, QuicServer, TlsConfig};
use myriad_wire::seq_state::StateLimits;
use myriad_wire::{
    AnyMessage, Assembler, ErrorCode, FrameKind, Limits, Pong, SequenceStateImage, StateBegin,
};
use tokio::sync::oneshot;

use super::protocol::{ack, refusal};

/// Checks a state's header against this node's model and KV layout before anything is
/// allocated for it (`Model::check_state_header`).
pub type HeaderCheck = Arc<dyn Fn(&StateBegin) -> Result<(), String> + Send + Sync>;

/// What an expected transfer ends with: the whole state, or why there is none.
pub type Arrival = Result<SequenceStateImage, String>;

/// The receiver; dropping it stops the server (transfers in flight are refused by the peer's
/// closed connection).
pub struct StateReceiver {
    server: QuicServer,
    table: Arc<Table>,
}

impl StateReceiver {
    /// Serves on `listen` (port 0: any free port). Must be called within a tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        tls: &TlsConfig,
        fingerprint: u64,
        check: HeaderCheck,
    ) -> Result<StateReceiver> {
        let table = Arc::new(Table {
            transfers: Mutex::default(),
            fingerprint,
            check,
        });
        let server = QuicServer::bind(
            listen,
            tls,
            QuicLimits::default(),
            Arc::new(Receive(table.clone())),
        )
        .with_context(|| format!("starting the state receiver on {listen}"))?;
        Ok(StateReceiver { server, table })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Registers transfer `id` of a state after `prompt_tokens` tokens (its header may cover
    /// no more); wait on the result, drop it to unregister.
    pub fn expect(&self, id: u64, prompt_tokens: usize) -> Expected {
        let (deliver, arrival) = oneshot::channel();
        self.table.lock().insert(
            id,
            Arc::new(Mutex::new(Transfer {
                max_position: prompt_tokens as u64,
                assembler: None,
                deliver: Some(deliver),
            })),
        );
        Expected {
            id,
            arrival,
            table: self.table.clone(),
        }
    }
}

/// One expected transfer, as the hand-off waits on it.
pub struct Expected {
    id: u64,
    arrival: oneshot::Receiver<Arrival>,
    table: Arc<Table>,
}

impl Expected {
    /// The assembled state, or why the transfer was dropped.
    pub async fn arrival(&mut self) -> Arrival {
        (&mut self.arrival)
            .await
            .unwrap_or_else(|_| Err("the state receiver stopped".into()))
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// The expected transfers. Each has its own lock, so one transfer's chunk is assembled without
/// holding up the others.
struct Table {
    transfers: Mutex<HashMap<u64, Arc<Mutex<Transfer>>>>,
    fingerprint: u64,
    check: HeaderCheck,
}

struct Transfer {
    /// The prompt's length: the state must cover exactly the prompt.
    max_position: u64,
    /// Set by the transfer's `StateBegin`.
    assembler: Option<Assembler>,
    /// Taken when the transfer ends either way.
    deliver: Option<oneshot::Sender<Arrival>>,
}

/// Locks a mutex whose data stays meaningful even if a holder panicked (an entry is inserted
/// or removed whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Mutex<Transfer>>>> {
        lock(&self.transfers)
    }

    fn get(&self, id: u64) -> Option<Arc<Mutex<Transfer>>> {
        self.lock().get(&id).cloned()
    }

    /// Ends transfer `id` (if still expected) with `outcome`: its entry is removed and its
    /// waiter told.
    fn end(&self, id: u64, outcome: Arrival) {
        if let Some(t) = self.lock().remove(&id)
            && let Some(deliver) = lock(&t).deliver.take()
        {
            // A waiter that is gone needs no state.
            let _ = deliver.send(outcome);
        }
    }

    /// Refuses a frame of transfer `id` and drops the transfer.
    fn fail(&self, id: u64, code: ErrorCode, message: String) -> Frame {
        self.end(id, Err(format!("the state transfer broke: {message}")));
        refusal(id, code, message)
    }

    fn unknown(id: u64, what: &str) -> Frame {
        refusal(
            id,
            ErrorCode::BadRequest,
            format!(
                "{what} for transfer {id}, which this node does not expect (never announced, \
                 already complete, or abandoned)"
            ),
        )
    }

    fn handle(&self, frame: &Frame) -> Frame {
        let message = match AnyMessage::decode(frame.kind, &frame.payload, &Limits::default()) {
            Ok(m) => m,
            Err(e) => {
                let id = transfer_id_hint(frame).unwrap_or(0);
                return self.fail(
                    id,
                    ErrorCode::BadFrame,
                    format!("an undecodable {:?} frame: {e}", frame.kind),
                );
            }
        };
        match message {
            AnyMessage::StateBegin(begin) => self.begin(begin),
            AnyMessage::StateChunk(chunk) => {
                let id = chunk.transfer_id;
                let Some(t) = self.get(id) else {
                    return Self::unknown(id, "a StateChunk");
                };
                let pushed = match lock(&t).assembler.as_mut() {
                    None => Err("a StateChunk before the transfer's StateBegin".to_string()),
                    Some(a) => a.push(chunk).map_err(|e| e.to_string()),
                };
                match pushed {
                    Ok(()) => ack(id),
                    Err(m) => self.fail(id, ErrorCode::BadRequest, m),
                }
            }
            AnyMessage::StateEnd(end) => {
                let id = end.transfer_id;
                let Some(t) = self.get(id) else {
                    return Self::unknown(id, "a StateEnd");
                };
                let assembler = lock(&t).assembler.take();
                match assembler.map(|a| a.finish(end)) {
                    None => self.fail(
                        id,
                        ErrorCode::BadRequest,
                        "a StateEnd before the transfer's StateBegin".into(),
                    ),
                    Some(Err(e)) => self.fail(id, ErrorCode::BadRequest, e.to_string()),
                    Some(Ok(image)) => {
                        self.end(id, Ok(image));
                        ack(id)
                    }
                }
            }
            AnyMessage::Ping(p) => Frame::new(
                FrameKind::Pong,
                myriad_wire::Message::encode(&Pong { nonce: p.nonce }),
            ),
            other => refusal(
                0,
                ErrorCode::BadRequest,
                format!(
                    "this is a state receiver: it takes StateBegin, StateChunk and StateEnd, not \
                     {:?}",
                    other.kind()
                ),
            ),
        }
    }

    fn begin(&self, begin: StateBegin) -> Frame {
        let id = begin.transfer_id;
        let Some(t) = self.get(id) else {
            return Self::unknown(id, "a StateBegin");
        };
        let mut t = lock(&t);
        if t.assembler.is_some() {
            drop(t);
            return self.fail(
                id,
                ErrorCode::BadRequest,
                "a second StateBegin for the transfer".into(),
            );
        }
        if begin.position != t.max_position {
            let message = format!(
                "the state covers {} tokens, the request's prompt {}",
                begin.position, t.max_position
            );
            drop(t);
            return self.fail(id, ErrorCode::BadRequest, message);
        }
        if let Err(m) = (self.check)(&begin) {
            drop(t);
            return self.fail(id, ErrorCode::ModelMismatch, m);
        }
        let limits = StateLimits {
            max_position: t.max_position,
            ..StateLimits::default()
        };
        match Assembler::new(begin, self.fingerprint, &limits) {
            Ok(a) => {
                t.assembler = Some(a);
                ack(id)
            }
            Err(e) => {
                drop(t);
                self.fail(id, ErrorCode::BadRequest, e.to_string())
            }
        }
    }
}

/// The transfer id an undecodable state frame names, read where its message keeps it
/// (`StateBegin`: after the u16 version; `StateChunk`, `StateEnd`: first), so that the transfer
/// it breaks is dropped at once rather than left to time out.
fn transfer_id_hint(frame: &Frame) -> Option<u64> {
    let at = match frame.kind {
        FrameKind::StateBegin => 2,
        FrameKind::StateChunk | FrameKind::StateEnd => 0,
        _ => return None,
    };
    let bytes = frame.payload.get(at..at + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The server's handler.
struct Receive(Arc<Table>);

impl Handler for Receive {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        let table = self.0.clone();
        // Assembling copies at most one chunk (8 MiB): short enough for the I/O runtime.
        Box::pin(async move { table.handle(&request) })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use myriad_wire::seq_state::{LayerImage, LayerShape, STATE_FORMAT_VERSION};

    fn image(tokens: usize) -> SequenceStateImage {
        SequenceStateImage {
            begin: StateBegin {
                transfer_id: 0,
                state_version: STATE_FORMAT_VERSION,
                model_fingerprint: 42,
                position: tokens as u64,
                tokens: (0..tokens as u32).collect(),
                rng: [1, 2, 3, 4],
                generated: 0,
                layers: vec![LayerShape::DeltaNet {
                    conv_rows: 1,
                    conv_dim: 2,
                    v_heads: 1,
                    k_head_dim: 1,
                    v_head_dim: 2,
                }],
            },
            layers: vec![LayerImage::DeltaNet {
                conv: vec![0.5, 1.5],
                recurrent: vec![2.0, 3.0],
            }],
        }
    }

    fn table() -> Arc<Table> {
        Arc::new(Table {
            transfers: Mutex::default(),
            fingerprint: 42,
            check: Arc::new(|_| Ok(())),
        })
    }

    fn expect(table: &Arc<Table>, id: u64, tokens: usize) -> Expected {
        let (deliver, arrival) = oneshot::channel();
        table.lock().insert(
            id,
            Arc::new(Mutex::new(Transfer {
                max_position: tokens as u64,
                assembler: None,
                deliver: Some(deliver),
            })),
        );
        Expected {
            id,
            arrival,
            table: table.clone(),
        }
    }

    fn frames(image: &SequenceStateImage, id: u64) -> Vec<Frame> {
        image
            .to_frames(id, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|f| {
                let header = myriad_wire::decode_header(
                    f[..myriad_wire::HEADER_LEN].try_into().unwrap(),
                    u32::MAX,
                )
                .unwrap();
                Frame::new(header.kind, f[myriad_wire::HEADER_LEN..].to_vec())
            })
            .collect()
    }

    fn is_ack(f: &Frame) -> bool {
        f.kind == FrameKind::Pong
    }

    #[test]
    fn a_whole_transfer_is_delivered_and_its_entry_removed() {
        let t = table();
        let mut e = expect(&t, 5, 3);
        for f in frames(&image(3), 5) {
            assert!(is_ack(&t.handle(&f)));
        }
        assert!(t.lock().is_empty());
        let got = futures_now(e.arrival()).unwrap();
        assert_eq!(got.begin.tokens, vec![0, 1, 2]);
    }

    #[test]
    fn unknown_broken_and_abandoned_transfers_leave_nothing() {
        let t = table();
        // Nobody expects transfer 9.
        let f = frames(&image(3), 9);
        let r = t.handle(&f[0]);
        assert_eq!(r.kind, FrameKind::Error);
        assert!(super::super::protocol::error_text(&r).contains("does not expect"));
        // A garbage chunk for an expected transfer drops it.
        let mut e = expect(&t, 5, 3);
        assert!(is_ack(&t.handle(&frames(&image(3), 5)[0])));
        let mut garbage = 5u64.to_le_bytes().to_vec();
        garbage.extend([0xff; 7]);
        let r = t.handle(&Frame::new(FrameKind::StateChunk, garbage));
        assert_eq!(r.kind, FrameKind::Error);
        assert!(t.lock().is_empty());
        assert!(
            futures_now(e.arrival())
                .unwrap_err()
                .contains("undecodable")
        );
        // A state longer than the prompt is refused before anything is assembled.
        let mut e = expect(&t, 6, 2);
        assert_eq!(t.handle(&frames(&image(3), 6)[0]).kind, FrameKind::Error);
        assert!(futures_now(e.arrival()).unwrap_err().contains("prompt 2"));
        assert!(t.lock().is_empty());
        // A dropped expectation unregisters.
        let e = expect(&t, 7, 3);
        drop(e);
        assert!(t.lock().is_empty());
    }

    /// Polls a future that is already complete.
    fn futures_now<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}
