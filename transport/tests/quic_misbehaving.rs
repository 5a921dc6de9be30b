//! Peers that break the frame protocol (raw quinn clients with valid TLS writing bytes by
//! hand): each gets an error frame where the stream allows and loses its connection, while a
//! well-behaved client connected throughout keeps getting correct replies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{handler, loopback, raw_connect, request, reversed, temp_dir, within};
use myriad_transport::quic::CLOSE_BAD_FRAME;
use myriad_transport::{Connector, QuicConnector, QuicLimits, QuicServer};
use myriad_wire::{FrameKind, HEADER_LEN, MAGIC, decode_header, encode_header};

const MAX_FRAME: u32 = 1 << 20;

fn header(version: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Whether the misbehaving client finishes its stream after the bytes.
    finish: bool,
    /// Text the error frame must contain.
    says: &'static str,
}

fn cases() -> Vec<Case> {
    let valid = |payload: &[u8]| {
        let mut f = encode_header(FrameKind::ExpertRequest, payload.len() as u32).to_vec();
        f.extend_from_slice(payload);
        f
    };
    let mut trailing = valid(b"abc");
    trailing.extend_from_slice(b"more");
    let mut truncated = header(1, FrameKind::ExpertRequest as u16, 100);
    truncated.extend_from_slice(&[1; 10]);
    let mut oversize = header(1, FrameKind::ExpertRequest as u16, MAX_FRAME + 1);
    oversize.extend_from_slice(&[0; 4096]);
    vec![
        Case {
            name: "garbage",
            bytes: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            finish: true,
            says: "not a Myriad frame",
        },
        Case {
            name: "wrong version",
            bytes: header(9, FrameKind::ExpertRequest as u16, 0),
            finish: true,
            says: "version 9",
        },
        Case {
            name: "unknown kind",
            bytes: header(1, 99, 0),
            finish: true,
            says: "kind 99",
        },
        Case {
            name: "oversize",
            bytes: oversize,
            finish: false,
            says: "exceeds the limit",
        },
        Case {
            name: "truncated payload",
            bytes: truncated,
            finish: true,
            says: "ended after 22 of the frame's 112 bytes",
        },
        Case {
            name: "truncated header",
            bytes: b"MYR".to_vec(),
            finish: true,
            says: "ended after 3 of the frame's 12 bytes",
        },
        Case {
            name: "stalled header",
            bytes: b"MYRD\x01".to_vec(),
            finish: false,
            says: "no frame header within",
        },
        Case {
            name: "bytes after the frame",
            bytes: trailing,
            finish: true,
            says: "after the end of the frame",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_error_and_lose_their_connection_only() {
    within(120, async {
        let dir = temp_dir("misbehaving");
        let pki = generate(&dir);
        let limits = QuicLimits {
            max_frame: MAX_FRAME,
            header_timeout: Duration::from_millis(300),
            ..QuicLimits::default()
        };
        let server = QuicServer::bind(
            loopback(),
            &pki.config("server").expect("server"),
            limits,
            handler(),
        )
        .expect("bind");
        let addr = server.local_addr();
        let client_tls = pki.config("client").expect("client");

        // The well-behaved client, connected throughout and calling concurrently.
        let good = Arc::new(QuicConnector::new(&client_tls, limits).expect("connector"));
        let good_conn = good.connect(&addr.to_string()).await.expect("connect");
        let background = {
            let conn = good_conn.clone();
            tokio::spawn(async move {
                let mut calls = 0u32;
                loop {
                    let payload = format!("call {calls}").into_bytes();
                    let reply = conn
                        .call(request(&payload), Duration::from_secs(5))
                        .await
                        .expect("the good client failed");
                    assert_eq!(reply.payload, reversed(&payload));
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };

        let cases = cases();
        for case in &cases {
            let conn = raw_connect(&client_tls, addr).await;
            let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
            send.write_all(&case.bytes).await.expect("write");
            if case.finish {
                send.finish().expect("finish");
            }
            let reply = recv
                .read_to_end(1 << 20)
                .await
                .unwrap_or_else(|e| panic!("{}: no error frame: {e}", case.name));
            assert!(
                reply.len() >= HEADER_LEN,
                "{}: reply of {} bytes",
                case.name,
                reply.len()
            );
            let head = decode_header(reply[..HEADER_LEN].try_into().expect("12 bytes"), 1 << 20)
                .expect("a valid header");
            assert_eq!(head.kind, FrameKind::Error, "{}", case.name);
            let message = String::from_utf8(reply[HEADER_LEN..].to_vec()).expect("UTF-8");
            assert!(
                message.contains(case.says),
                "{}: error frame says {message:?}",
                case.name
            );
            match conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    assert_eq!(close.error_code, CLOSE_BAD_FRAME.into(), "{}", case.name)
                }
                other => panic!("{}: connection ended with {other:?}", case.name),
            }
            eprintln!("{:>22}: {message}", case.name);
            // The good client is unaffected.
            let reply = good_conn
                .call(request(b"still here"), Duration::from_secs(5))
                .await
                .expect("good client");
            assert_eq!(reply.payload, reversed(b"still here"));
        }
        assert!(
            !background.is_finished(),
            "the good client's background calls stopped"
        );
        background.abort();
        assert!(!good_conn.is_closed());
        assert_eq!(server.stats().bad_frames(), cases.len() as u64);
        assert_eq!(server.stats().connections(), 1 + cases.len() as u64);

        // A bad frame on one stream closes the offender's other streams too.
        let conn = raw_connect(&client_tls, addr).await;
        let (mut slow_send, mut slow_recv) = conn.open_bi().await.expect("open");
        let mut slow = encode_header(FrameKind::ExpertRequest, 10).to_vec();
        slow.extend_from_slice(b"sleep:3000");
        slow_send.write_all(&slow).await.expect("write");
        slow_send.finish().expect("finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut bad_send, mut bad_recv) = conn.open_bi().await.expect("open");
        bad_send
            .write_all(b"garbage garbage!")
            .await
            .expect("write");
        bad_send.finish().expect("finish");
        let _ = bad_recv.read_to_end(1 << 20).await;
        assert!(
            slow_recv.read_to_end(1 << 20).await.is_err(),
            "the slow call on the closed connection was answered"
        );
        let reply = good_conn
            .call(request(b"ok"), Duration::from_secs(5))
            .await
            .expect("good client");
        assert_eq!(reply.payload, b"ko");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

fn generate(dir: &std::path::Path) -> myriad_transport::GeneratedPki {
    myriad_transport::generate_pki(dir, &["server", "client"], "myriad-node").expect("pki")
}
