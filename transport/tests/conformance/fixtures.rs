//! The conformance suite's fixtures (one per transport: in-process, QUIC with mutual TLS,
//! NCCL on request) and the handlers its properties serve.

use super::*;

// ---- fixtures -----------------------------------------------------------------------------

/// One transport under test: the nodes it serves and one caller's connector.
pub(crate) trait Fixture: Sized {
    /// How long dialling an address where nobody answers may take to fail.
    const DIAL_GIVES_UP_WITHIN: Duration;

    /// A fresh transport whose caller refuses frames over `max_frame` payload bytes. Nodes
    /// accept larger frames where the transport allows, so that a node's reply can exceed the
    /// caller's limit.
    async fn new(max_frame: u32) -> Self;

    /// Starts a node serving `handler`; returns the address callers dial.
    fn start(&mut self, handler: Arc<dyn Handler>) -> String;

    /// Takes the node at `addr` away, as a crash would.
    fn stop(&mut self, addr: &str);

    fn connector(&self) -> &dyn Connector;

    /// An address where no node serves.
    fn nobody(&self) -> String;

    /// Checks what the transport itself saw, once a property has run.
    fn check(&self) {}
}

/// The in-process transport: one network, nodes named `node-0`, `node-1`, …
pub(crate) struct Local {
    network: LocalNetwork,
    connector: LocalConnector,
    started: usize,
}

impl Fixture for Local {
    const DIAL_GIVES_UP_WITHIN: Duration = PROMPTLY;

    async fn new(max_frame: u32) -> Self {
        // The local limit is the network's, in both directions.
        let network = LocalNetwork::with_max_frame(max_frame);
        Local {
            connector: network.connector(),
            network,
            started: 0,
        }
    }

    fn start(&mut self, handler: Arc<dyn Handler>) -> String {
        let addr = format!("node-{}", self.started);
        self.started += 1;
        self.network.register(addr.clone(), handler);
        addr
    }

    fn stop(&mut self, addr: &str) {
        assert!(self.network.unregister(addr), "no node at {addr} to stop");
    }

    fn connector(&self) -> &dyn Connector {
        &self.connector
    }

    fn nobody(&self) -> String {
        "nobody-home".into()
    }
}

/// How long the QUIC caller waits for a handshake: long enough for a loaded 2-core machine,
/// short enough that the tests dialling nobody stay quick.
pub(crate) const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// QUIC with mutual TLS on loopback: one PKI per fixture (`server` and `client`), a server per
/// node with the default limits, one client endpoint with the fixture's frame limit.
pub(crate) struct Quic {
    dir: std::path::PathBuf,
    server_tls: TlsConfig,
    connector: QuicConnector,
    /// Stopped servers stay here (shut down) so that their ports are not handed out again
    /// while a test still dials them.
    servers: Vec<QuicServer>,
    /// A bound UDP socket that never answers: an address where nobody serves QUIC.
    silent: std::net::UdpSocket,
}

impl Fixture for Quic {
    const DIAL_GIVES_UP_WITHIN: Duration = Duration::from_secs(4);

    async fn new(max_frame: u32) -> Self {
        let dir = temp_dir("conformance");
        let pki = generate_pki(&dir, &["server", "client"], "myriad-node").expect("pki");
        let client_tls = pki.config("client").expect("client");
        assert!(
            client_tls.warning().is_none(),
            "mutual TLS is not a dev mode"
        );
        let limits = QuicLimits {
            max_frame,
            connect_timeout: QUIC_CONNECT_TIMEOUT,
            ..QuicLimits::default()
        };
        Quic {
            server_tls: pki.config("server").expect("server"),
            connector: QuicConnector::new(&client_tls, limits).expect("connector"),
            servers: Vec::new(),
            silent: std::net::UdpSocket::bind(loopback()).expect("udp"),
            dir,
        }
    }

    fn start(&mut self, handler: Arc<dyn Handler>) -> String {
        let server = QuicServer::bind(loopback(), &self.server_tls, QuicLimits::default(), handler)
            .expect("bind");
        let addr = server.local_addr().to_string();
        self.servers.push(server);
        addr
    }

    fn stop(&mut self, addr: &str) {
        let server = self
            .servers
            .iter()
            .find(|s| s.local_addr().to_string() == addr)
            .unwrap_or_else(|| panic!("no server at {addr} to stop"));
        server.shutdown();
    }

    fn connector(&self) -> &dyn Connector {
        &self.connector
    }

    fn nobody(&self) -> String {
        self.silent.local_addr().expect("udp address").to_string()
    }

    fn check(&self) {
        // Calls the client gave up on (deadlines) reset their streams; a server must not take
        // them, or anything else a well-behaved client sends, for bad frames.
        for server in &self.servers {
            assert_eq!(
                server.stats().bad_frames(),
                0,
                "the server at {} saw bad frames from a well-behaved client",
                server.local_addr()
            );
        }
    }
}

impl Drop for Quic {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// NCCL needs two GPUs (NCCL refuses two ranks on one device), and its calls cannot be
/// cancelled, so it stays out of the default run: its tests are `#[ignore]`d, and run with
///
/// ```text
/// MYRIAD_NCCL_TESTS=1 cargo test -p myriad-transport --features nccl --test conformance -- --ignored nccl::
/// ```
///
/// Run without `MYRIAD_NCCL_TESTS=1`, or where NCCL or two GPUs are missing, they fail saying
/// so: they never pass without having called through NCCL.
#[cfg(feature = "nccl")]
pub(crate) mod nccl_fixture {
    use std::sync::Arc;
    use std::time::Duration;

    use myriad_transport::quic::DEFAULT_MAX_FRAME;
    use myriad_transport::{
        Connector, Handler, NcclConnector, NcclTransport, TransportError, nccl_unique_id,
    };

    use super::Fixture;

    /// The one serving rank's address.
    const SERVER: &str = "nccl-rank-1";

    /// Rank 0 (GPU 0) calls; rank 1 (GPU 1) serves once started.
    pub struct Nccl {
        connector: NcclConnector,
        server: Option<NcclTransport>,
    }

    /// Joins the communicator as `rank` on a thread of its own, since joining blocks until
    /// every rank has joined.
    fn join(
        id: [u8; 128],
        rank: usize,
        max_frame: u32,
    ) -> tokio::sync::oneshot::Receiver<Result<NcclTransport, TransportError>> {
        let (joined, receiver) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = joined.send(NcclTransport::new(&id, rank, 2, rank, max_frame));
        });
        receiver
    }

    impl Fixture for Nccl {
        const DIAL_GIVES_UP_WITHIN: Duration = super::PROMPTLY;

        async fn new(max_frame: u32) -> Self {
            assert!(
                std::env::var("MYRIAD_NCCL_TESTS").as_deref() == Ok("1"),
                "the NCCL contract tests run on request only: set MYRIAD_NCCL_TESTS=1 on a \
                 machine with two GPUs and the NCCL library"
            );
            let id = nccl_unique_id()
                .unwrap_or_else(|e| panic!("MYRIAD_NCCL_TESTS=1, but NCCL cannot run here: {e}"));
            // Probed above: the driver library is there, so counting devices cannot panic.
            let gpus = cudarc::driver::CudaContext::device_count()
                .unwrap_or_else(|e| panic!("counting CUDA devices: {e}"));
            assert!(
                gpus >= 2,
                "the NCCL contract tests need two GPUs (one per rank); this machine has {gpus}"
            );
            let (client, server) = (join(id, 0, max_frame), join(id, 1, DEFAULT_MAX_FRAME));
            let (client, server) = tokio::time::timeout(Duration::from_secs(60), async {
                (client.await, server.await)
            })
            .await
            .expect("the two NCCL ranks did not join within 60 s");
            let client = client.expect("rank 0 thread").expect("rank 0 joins");
            let server = server.expect("rank 1 thread").expect("rank 1 joins");
            Nccl {
                connector: client.connector([(SERVER.to_owned(), 1)]),
                server: Some(server),
            }
        }

        fn start(&mut self, handler: Arc<dyn Handler>) -> String {
            let server = self
                .server
                .take()
                .expect("the NCCL fixture has one serving rank (two GPUs, two ranks)");
            // Its own runtime on its own thread: an NCCL receive cannot be cancelled, so the
            // serving loop outlives the test, and the test's runtime must not wait for it.
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime for rank 1");
                if let Err(e) = runtime.block_on(server.serve(0, handler)) {
                    eprintln!("NCCL rank 1 stopped serving: {e}");
                }
            });
            SERVER.to_owned()
        }

        fn stop(&mut self, _addr: &str) {
            panic!("NCCL cannot take a rank away mid-use; no property that stops a node runs on it")
        }

        fn connector(&self) -> &dyn Connector {
            &self.connector
        }

        fn nobody(&self) -> String {
            "nccl-rank-9".into()
        }
    }
}

// ---- handlers -----------------------------------------------------------------------------

/// Answers each request with `F(request)`, at once.
pub(crate) struct Reply<F>(pub F);

impl<F: Fn(Frame) -> Frame + Send + Sync + 'static> Handler for Reply<F> {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        Box::pin(std::future::ready((self.0)(request)))
    }
}

/// Counts the requests that reach `inner`.
pub(crate) struct Counting {
    pub inner: Arc<dyn Handler>,
    pub seen: Arc<AtomicUsize>,
}

impl Handler for Counting {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.inner.handle(request)
    }
}

/// Says that a request has arrived, then never answers it.
pub(crate) struct Hold {
    pub arrived: mpsc::UnboundedSender<()>,
}

impl Handler for Hold {
    fn handle(&self, _request: Frame) -> BoxFuture<'static, Frame> {
        let arrived = self.arrived.clone();
        Box::pin(async move {
            let _ = arrived.send(());
            std::future::pending().await
        })
    }
}
