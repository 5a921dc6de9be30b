//! The in-process transport: a registry of handlers by address ([`LocalNetwork`]) and a
//! [`Connector`] that calls them directly, with no serialisation.
//!
//! It behaves like the network transports where callers can tell: a call runs under its
//! deadline ([`TransportError::Timeout`] naming the peer), frames over the size limit are
//! refused the same way, dialling an unknown address fails with [`TransportError::Connect`],
//! and [`LocalNetwork::unregister`] simulates a node dying: calls in flight and later calls on
//! its connections fail with [`TransportError::Closed`], and new dials fail with `Connect`.
//! Registering an address again is a restarted node: old connections stay dead, new dials
//! reach the new handler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use myriad_wire::WireError;
use tokio::sync::watch;

use crate::quic::DEFAULT_MAX_FRAME;
use crate::{BoxFuture, Connection, Connector, Frame, Handler, TransportError};

/// Handlers by address; clones share the registry.
#[derive(Clone)]
pub struct LocalNetwork {
    nodes: Arc<Mutex<HashMap<String, Arc<Registration>>>>,
    max_frame: u32,
}

/// One registered node; `down` turns true when it is unregistered or replaced.
struct Registration {
    handler: Arc<dyn Handler>,
    down: watch::Sender<bool>,
}

impl Registration {
    fn kill(&self) {
        self.down.send_replace(true);
    }
}

impl Default for LocalNetwork {
    fn default() -> Self {
        LocalNetwork::new()
    }
}

impl LocalNetwork {
    /// An empty network whose frames may be up to [`DEFAULT_MAX_FRAME`] bytes.
    pub fn new() -> Self {
        LocalNetwork::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// An empty network with a payload limit of `max_frame` bytes in each direction.
    pub fn with_max_frame(max_frame: u32) -> Self {
        LocalNetwork {
            nodes: Arc::default(),
            max_frame,
        }
    }

    /// Serves `addr` with `handler`, replacing (and killing) any node registered there.
    pub fn register(&self, addr: impl Into<String>, handler: Arc<dyn Handler>) {
        let registration = Arc::new(Registration {
            handler,
            down: watch::Sender::new(false),
        });
        if let Some(old) = self.lock().insert(addr.into(), registration) {
            old.kill();
        }
    }

    /// Removes the node at `addr` as if it died; returns whether one was registered.
    pub fn unregister(&self, addr: &str) -> bool {
        let removed = self.lock().remove(addr);
        removed.map(|r| r.kill()).is_some()
    }

    /// Whether a node is registered at `addr`.
    pub fn is_registered(&self, addr: &str) -> bool {
        self.lock().contains_key(addr)
    }

    /// A connector that dials nodes of this network.
    pub fn connector(&self) -> LocalConnector {
        LocalConnector {
            network: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Registration>>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Dials nodes of a [`LocalNetwork`].
#[derive(Clone)]
pub struct LocalConnector {
    network: LocalNetwork,
}

impl Connector for LocalConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'_, Result<Arc<dyn Connection>, TransportError>> {
        let registration = self.network.lock().get(addr).cloned();
        let result = match registration {
            Some(registration) => Ok(Arc::new(LocalConnection {
                peer: addr.to_owned(),
                down: registration.down.subscribe(),
                registration,
                max_frame: self.network.max_frame,
            }) as Arc<dyn Connection>),
            None => Err(TransportError::Connect {
                peer: addr.to_owned(),
                reason: "no node is registered at this address".into(),
            }),
        };
        Box::pin(std::future::ready(result))
    }
}

/// A connection to one node of a [`LocalNetwork`] (to the registration it dialled: a node
/// registered again later is not reached through it).
pub struct LocalConnection {
    peer: String,
    registration: Arc<Registration>,
    down: watch::Receiver<bool>,
    max_frame: u32,
}

impl LocalConnection {
    fn closed_error(&self) -> TransportError {
        TransportError::Closed {
            peer: self.peer.clone(),
            reason: "the node went away".into(),
        }
    }
}

impl Connection for LocalConnection {
    fn call(
        &self,
        request: Frame,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Frame, TransportError>> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(self.closed_error());
            }
            if request.payload.len() > self.max_frame as usize {
                return Err(TransportError::FrameTooLarge {
                    peer: self.peer.clone(),
                    len: request.payload.len(),
                    max: self.max_frame,
                });
            }
            let mut down = self.down.clone();
            let reply = self.registration.handler.handle(request);
            let outcome = tokio::time::timeout(deadline, async {
                tokio::select! {
                    reply = reply => Some(reply),
                    _ = down.wait_for(|down| *down) => None,
                }
            })
            .await;
            match outcome {
                Err(_) => Err(TransportError::Timeout {
                    peer: self.peer.clone(),
                    after: deadline,
                }),
                Ok(None) => Err(self.closed_error()),
                Ok(Some(reply)) if reply.payload.len() > self.max_frame as usize => {
                    Err(TransportError::Wire {
                        peer: self.peer.clone(),
                        source: WireError::FrameTooLarge {
                            len: reply.payload.len().min(u32::MAX as usize) as u32,
                            max: self.max_frame,
                        },
                    })
                }
                Ok(Some(reply)) => Ok(reply),
            }
        })
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn is_closed(&self) -> bool {
        *self.down.borrow()
    }
}
