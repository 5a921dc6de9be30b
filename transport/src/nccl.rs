//! The NCCL transport (feature `nccl`): frames between GPU nodes through NCCL point-to-point
//! send/recv, via cudarc's dynamically loaded `nccl` module.
//!
//! The attention node and the expert nodes are the ranks of one communicator; rank 0 creates
//! the 128-byte unique id ([`nccl_unique_id`]) and hands it to the others out of band (the
//! control plane). A call sends the request frame to the peer's rank, header first (its length
//! field says how many payload bytes follow) and then the payload, and receives the reply the
//! same way; the receiver checks the header against its limit before allocating. Bytes are
//! staged through device buffers on the communicator's stream.
//!
//! Honest limits of this first version:
//! - **It has never run**: it was written and type-checked on a machine with no GPU and no
//!   NCCL library (only the "unavailable" path is exercised there). Treat it as untested until
//!   it has been run where a GPU is lent.
//! - One communicator serialises everything: calls to different ranks do not overlap (a later
//!   version should group the sends and receives of one layer step with `ncclGroupStart/End`).
//! - NCCL operations cannot be cancelled: a call past its deadline returns
//!   [`TransportError::Timeout`], but its worker thread stays blocked until the peer shows up,
//!   and the communicator is marked dead ([`Connection::is_closed`]), since the byte streams
//!   of the two ranks are no longer in step. The same holds after any error.
//! - cudarc looks for `libnccl.so`, not `libnccl.so.2` (the runtime package's name): link
//!   `libnccl.so -> libnccl.so.2` into a directory on `LD_LIBRARY_PATH` where needed.
//!
//! Construction probes for the CUDA driver and NCCL libraries before calling into them (a
//! missing library would panic inside cudarc) and returns [`TransportError::Unavailable`] when
//! either, or a GPU, is missing.

use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cudarc::driver::CudaContext;
use cudarc::nccl::{Comm, Id};
use myriad_wire::{HEADER_LEN, WireError, decode_header, encode_header};

use crate::error_reply::error_frame;
use crate::{BoxFuture, Connection, Connector, Frame, Handler, TransportError};

/// Checks that the CUDA driver, the NCCL library and a GPU are present, without calling
/// anything that panics when they are not.
fn probe() -> Result<(), TransportError> {
    // SAFETY: these only try to dlopen the libraries (and close them again); no symbol is called.
    let (driver, nccl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    };
    if !driver || !nccl {
        return Err(TransportError::Unavailable(format!(
            "NCCL transport: no GPU / NCCL library found (CUDA driver library {}, NCCL library {}; \
             NCCL is looked up as libnccl.so: symlink it to libnccl.so.2 if only that is installed)",
            if driver { "found" } else { "missing" },
            if nccl { "found" } else { "missing" },
        )));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(TransportError::Unavailable(
            "NCCL transport: no GPU found (0 CUDA devices)".into(),
        )),
        Err(e) => Err(TransportError::Unavailable(format!(
            "NCCL transport: no GPU found (CUDA: {e})"
        ))),
    }
}

/// A fresh NCCL unique id (on rank 0), to be handed to every other rank.
pub fn nccl_unique_id() -> Result<[u8; 128], TransportError> {
    probe()?;
    let id = Id::new()
        .map_err(|e| TransportError::Unavailable(format!("ncclGetUniqueId failed: {:?}", e.0)))?;
    Ok(id.internal().map(|c| c as u8))
}

/// The communicator, movable between threads.
struct CommCell(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every use goes through the `Mutex` in `Inner`.
unsafe impl Send for CommCell {}

struct Inner {
    comm: Mutex<CommCell>,
    rank: usize,
    world_size: usize,
    max_frame: u32,
    dead: AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, CommCell> {
        self.comm.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// This process's rank in an NCCL communicator.
#[derive(Clone)]
pub struct NcclTransport {
    inner: Arc<Inner>,
}

/// Why a transfer failed.
enum Failure {
    Cuda(String),
    Wire(WireError),
}

impl NcclTransport {
    /// Joins the communicator `unique_id` as `rank` of `world_size`, on GPU `device`, accepting
    /// frames of up to `max_frame` payload bytes. Blocks until every rank has joined: call it
    /// from a blocking context (`spawn_blocking`).
    pub fn new(
        unique_id: &[u8; 128],
        rank: usize,
        world_size: usize,
        device: usize,
        max_frame: u32,
    ) -> Result<NcclTransport, TransportError> {
        probe()?;
        if rank >= world_size {
            return Err(TransportError::Config(format!(
                "NCCL rank {rank} is not below the world size {world_size}"
            )));
        }
        let unavailable = |what: &str, e: String| {
            TransportError::Unavailable(format!("NCCL transport: {what}: {e}"))
        };
        let ctx = CudaContext::new(device)
            .map_err(|e| unavailable(&format!("GPU {device}"), e.to_string()))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable("creating a CUDA stream", e.to_string()))?;
        let id = Id::uninit(unique_id.map(|b| b as c_char));
        let comm = Comm::from_rank(stream, rank, world_size, id)
            .map_err(|e| unavailable("joining the communicator", format!("{:?}", e.0)))?;
        Ok(NcclTransport {
            inner: Arc::new(Inner {
                comm: Mutex::new(CommCell(comm)),
                rank,
                world_size,
                max_frame,
                dead: AtomicBool::new(false),
            }),
        })
    }

    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    pub fn world_size(&self) -> usize {
        self.inner.world_size
    }

    /// A connector that reaches the ranks named in `peers` (address → rank).
    pub fn connector(&self, peers: impl IntoIterator<Item = (String, usize)>) -> NcclConnector {
        NcclConnector {
            transport: self.clone(),
            peers: peers.into_iter().collect(),
        }
    }

    /// Serves the requests of rank `client` with `handler` until a transfer fails (the error
    /// says why). A bad frame is answered with an error frame and ends serving, since the byte
    /// streams are then out of step.
    pub async fn serve(
        &self,
        client: usize,
        handler: Arc<dyn Handler>,
    ) -> Result<(), TransportError> {
        let peer = format!("NCCL rank {client}");
        loop {
            let inner = self.inner.clone();
            let received = tokio::task::spawn_blocking(move || {
                recv_frame(&inner.lock().0, client, inner.max_frame)
            })
            .await;
            let request = match received {
                Ok(Ok(frame)) => frame,
                Ok(Err(Failure::Wire(source))) => {
                    self.inner.dead.store(true, Ordering::Relaxed);
                    let _ = self
                        .send_blocking(client, error_frame(&format!("bad frame header: {source}")))
                        .await;
                    return Err(TransportError::Wire { peer, source });
                }
                Ok(Err(Failure::Cuda(reason))) => return Err(self.kill(&peer, reason)),
                Err(e) => return Err(self.kill(&peer, e.to_string())),
            };
            let mut reply = handler.handle(request).await;
            if reply.payload.len() > self.inner.max_frame as usize {
                reply = error_frame(&format!(
                    "the node's reply of {} bytes exceeds the frame limit of {}",
                    reply.payload.len(),
                    self.inner.max_frame
                ));
            }
            if let Err(reason) = self.send_blocking(client, reply).await {
                return Err(self.kill(&peer, reason));
            }
        }
    }

    async fn send_blocking(&self, peer: usize, frame: Frame) -> Result<(), String> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || send_frame(&inner.lock().0, peer, &frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failure::Cuda(reason))) => Err(reason),
            Ok(Err(Failure::Wire(e))) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn kill(&self, peer: &str, reason: String) -> TransportError {
        self.inner.dead.store(true, Ordering::Relaxed);
        TransportError::Closed {
            peer: peer.to_owned(),
            reason,
        }
    }
}

/// Sends `frame` to rank `peer`: the header, then the payload.
fn send_frame(comm: &Comm, peer: usize, frame: &Frame) -> Result<(), Failure> {
    let cuda = |what: &str, e: String| Failure::Cuda(format!("{what}: {e}"));
    let len = u32::try_from(frame.payload.len()).map_err(|_| {
        Failure::Wire(WireError::FrameTooLarge {
            len: u32::MAX,
            max: u32::MAX,
        })
    })?;
    let peer = peer as i32;
    let stream = comm.stream();
    comm.context()
        .bind_to_thread()
        .map_err(|e| cuda("binding the CUDA context", e.to_string()))?;
    let header = stream
        .clone_htod(&encode_header(frame.kind, len)[..])
        .map_err(|e| cuda("staging the header", e.to_string()))?;
    comm.send(&header, peer)
        .map_err(|e| cuda("ncclSend", format!("{:?}", e.0)))?;
    let payload = if len > 0 {
        let payload = stream
            .clone_htod(&frame.payload[..])
            .map_err(|e| cuda("staging the payload", e.to_string()))?;
        comm.send(&payload, peer)
            .map_err(|e| cuda("ncclSend", format!("{:?}", e.0)))?;
        Some(payload)
    } else {
        None
    };
    // The device buffers must outlive the sends.
    stream
        .synchronize()
        .map_err(|e| cuda("waiting for the send", e.to_string()))?;
    drop((header, payload));
    Ok(())
}

/// Receives one frame from rank `peer`, checking its header before allocating the payload.
fn recv_frame(comm: &Comm, peer: usize, max_frame: u32) -> Result<Frame, Failure> {
    let cuda = |what: &str, e: String| Failure::Cuda(format!("{what}: {e}"));
    let peer = peer as i32;
    let stream = comm.stream();
    comm.context()
        .bind_to_thread()
        .map_err(|e| cuda("binding the CUDA context", e.to_string()))?;
    let mut staged = stream
        .alloc_zeros::<u8>(HEADER_LEN)
        .map_err(|e| cuda("staging the header", e.to_string()))?;
    comm.recv(&mut staged, peer)
        .map_err(|e| cuda("ncclRecv", format!("{:?}", e.0)))?;
    let bytes = stream
        .clone_dtoh(&staged)
        .map_err(|e| cuda("copying the header", e.to_string()))?;
    stream
        .synchronize()
        .map_err(|e| cuda("waiting for the header", e.to_string()))?;
    let header: [u8; HEADER_LEN] = bytes
        .try_into()
        .map_err(|_| Failure::Cuda("the header copy has the wrong length".into()))?;
    let header = decode_header(&header, max_frame).map_err(Failure::Wire)?;
    if header.len == 0 {
        return Ok(Frame::new(header.kind, Vec::new()));
    }
    let mut staged = stream
        .alloc_zeros::<u8>(header.len as usize)
        .map_err(|e| cuda("staging the payload", e.to_string()))?;
    comm.recv(&mut staged, peer)
        .map_err(|e| cuda("ncclRecv", format!("{:?}", e.0)))?;
    let payload = stream
        .clone_dtoh(&staged)
        .map_err(|e| cuda("copying the payload", e.to_string()))?;
    stream
        .synchronize()
        .map_err(|e| cuda("waiting for the payload", e.to_string()))?;
    Ok(Frame::new(header.kind, payload))
}

/// Dials ranks of an [`NcclTransport`] by address.
pub struct NcclConnector {
    transport: NcclTransport,
    peers: HashMap<String, usize>,
}

impl Connector for NcclConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'_, Result<Arc<dyn Connection>, TransportError>> {
        let result = match self.peers.get(addr) {
            Some(_) if self.transport.inner.dead.load(Ordering::Relaxed) => {
                Err(TransportError::Connect {
                    peer: addr.to_owned(),
                    reason: "the NCCL communicator is dead after an earlier failure".into(),
                })
            }
            Some(&rank) => Ok(Arc::new(NcclConnection {
                transport: self.transport.clone(),
                peer: addr.to_owned(),
                rank,
            }) as Arc<dyn Connection>),
            None => Err(TransportError::Connect {
                peer: addr.to_owned(),
                reason: "no NCCL rank is known for this address".into(),
            }),
        };
        Box::pin(std::future::ready(result))
    }
}

/// Calls to one rank.
pub struct NcclConnection {
    transport: NcclTransport,
    peer: String,
    rank: usize,
}

impl Connection for NcclConnection {
    fn call(
        &self,
        request: Frame,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Frame, TransportError>> {
        Box::pin(async move {
            let inner = &self.transport.inner;
            if self.is_closed() {
                return Err(TransportError::Closed {
                    peer: self.peer.clone(),
                    reason: "the NCCL communicator is dead".into(),
                });
            }
            if request.payload.len() > inner.max_frame as usize {
                return Err(TransportError::FrameTooLarge {
                    peer: self.peer.clone(),
                    len: request.payload.len(),
                    max: inner.max_frame,
                });
            }
            let (worker, rank) = (inner.clone(), self.rank);
            let job = tokio::task::spawn_blocking(move || {
                let comm = worker.lock();
                send_frame(&comm.0, rank, &request)?;
                recv_frame(&comm.0, rank, worker.max_frame)
            });
            match tokio::time::timeout(deadline, job).await {
                Ok(Ok(Ok(reply))) => Ok(reply),
                Err(_) => {
                    inner.dead.store(true, Ordering::Relaxed);
                    Err(TransportError::Timeout {
                        peer: self.peer.clone(),
                        after: deadline,
                    })
                }
                Ok(Ok(Err(Failure::Wire(source)))) => {
                    inner.dead.store(true, Ordering::Relaxed);
                    Err(TransportError::Wire {
                        peer: self.peer.clone(),
                        source,
                    })
                }
                Ok(Ok(Err(Failure::Cuda(reason)))) => Err(self.transport.kill(&self.peer, reason)),
                Ok(Err(e)) => Err(self.transport.kill(&self.peer, e.to_string())),
            }
        })
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn is_closed(&self) -> bool {
        self.transport.inner.dead.load(Ordering::Relaxed)
    }
}
