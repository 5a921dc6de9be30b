//! Loopback timing of the QUIC transport (mutual TLS): the median and tail of 1000 sequential
//! small calls, and the throughput of 8 MiB frames; the in-process transport for comparison.
//! Printed (run with `--nocapture`); asserted only loosely, since CI machines are noisy.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{loopback, temp_dir, within};
use myriad_transport::{
    BoxFuture, Connection, Connector, Frame, Handler, LocalNetwork, QuicConnector, QuicLimits,
    QuicServer, generate_pki,
};
use myriad_wire::FrameKind;

/// Echoes the payload (no work, so the transport is what is timed).
struct Echo;

impl Handler for Echo {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        Box::pin(std::future::ready(Frame::new(
            FrameKind::ExpertResponse,
            request.payload,
        )))
    }
}

async fn time_calls(conn: &dyn Connection, payload: &[u8], n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let reply = conn
            .call(
                Frame::new(FrameKind::ExpertRequest, payload.to_vec()),
                Duration::from_secs(10),
            )
            .await
            .expect("call");
        times.push(started.elapsed());
        assert_eq!(reply.payload.len(), payload.len());
    }
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_call_latency() {
    within(120, async {
        let dir = temp_dir("latency");
        let pki = generate_pki(&dir, &["server", "client"], "myriad-node").expect("pki");
        let server =
            QuicServer::bind(loopback(), &pki.config("server").expect("server"), QuicLimits::default(), Arc::new(Echo)).expect("bind");
        let connector = QuicConnector::new(&pki.config("client").expect("client"), QuicLimits::default()).expect("connector");
        let quic_conn = connector.dial(&server.local_addr().to_string()).await.expect("connect");
        let conn: Arc<dyn Connection> = quic_conn.clone();

        time_calls(&*conn, &[0; 64], 100).await; // warm-up
        let quic = time_calls(&*conn, &[0; 64], 1000).await;
        eprintln!(
            "QUIC loopback, 64-byte calls: median {:?}, p90 {:?}, p99 {:?}, max {:?}",
            percentile(&quic, 0.5),
            percentile(&quic, 0.9),
            percentile(&quic, 0.99),
            quic[quic.len() - 1]
        );
        let row = time_calls(&*conn, &[0; 4096 * 4], 200).await;
        eprintln!("QUIC loopback, 16 KiB calls: median {:?}", percentile(&row, 0.5));
        let big = time_calls(&*conn, &vec![0; 8 << 20], 10).await;
        let median = percentile(&big, 0.5);
        eprintln!(
            "QUIC loopback, 8 MiB each way: median {median:?} ({:.0} MiB/s of payload, both directions)",
            16.0 / median.as_secs_f64()
        );

        let stats = quic_conn.quinn().stats();
        eprintln!("path: mtu {}, cwnd {}, rtt {:?}, lost packets {}, sent packets {}", stats.path.current_mtu, stats.path.cwnd, stats.path.rtt, stats.path.lost_packets, stats.path.sent_packets);
        let network = LocalNetwork::new();
        network.register("echo", Arc::new(Echo));
        let local = network.connector().connect("echo").await.expect("connect");
        let inproc = time_calls(&*local, &[0; 64], 1000).await;
        eprintln!("in-process, 64-byte calls: median {:?}", percentile(&inproc, 0.5));

        // Loose bounds: a debug build on a busy 2-core machine.
        assert!(percentile(&quic, 0.5) < Duration::from_millis(20), "median {:?}", percentile(&quic, 0.5));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
