//! What only QUIC's TLS does: with mutual TLS, calls to one address share one connection and
//! untrusted peers are refused; insecure dev certificates work end to end; bad certificate
//! files are named. What every transport does (calls of every size, limits, deadlines, nodes
//! going away) is in `conformance.rs`, which runs it over mutual TLS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{handler, loopback, request, reversed, temp_dir, within};
use myriad_transport::{
    Connector, QuicConnector, QuicLimits, QuicServer, TlsConfig, TransportError, generate_pki,
};

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_calls_to_one_address_share_one_connection() {
    within(60, async {
        let dir = temp_dir("mtls");
        let pki = generate_pki(&dir, &["expert0", "attn"], "myriad-node").expect("pki");
        let server_tls = pki.config("expert0").expect("expert0");
        let client_tls = pki.config("attn").expect("attn");
        assert!(client_tls.warning().is_none());
        let server = QuicServer::bind(loopback(), &server_tls, QuicLimits::default(), handler())
            .expect("bind");
        let addr = server.local_addr().to_string();
        let connector =
            Arc::new(QuicConnector::new(&client_tls, QuicLimits::default()).expect("connector"));

        let conn = connector.connect(&addr).await.expect("connect");
        for i in 0..10u32 {
            let payload = format!("request number {i}").into_bytes();
            let reply = conn.call(request(&payload), DEADLINE).await.expect("call");
            assert_eq!(reply.payload, reversed(&payload));
        }
        // Dialling the address again gives the same connection…
        let again = connector.connect(&addr).await.expect("connect again");
        assert!(
            Arc::ptr_eq(&conn, &again),
            "the connector dialled a second connection"
        );
        // …and concurrent calls share it.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20u32 {
            let conn = again.clone();
            tasks.spawn(async move {
                let payload = vec![i as u8; 100 * i as usize];
                let reply = conn
                    .call(request(&payload), DEADLINE)
                    .await
                    .expect("concurrent call");
                assert_eq!(reply.payload, reversed(&payload));
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        assert_eq!(server.stats().connections(), 1);
        assert_eq!(server.stats().bad_frames(), 0);
        assert_eq!(server.stats().requests(), 10 + 20);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peers_are_refused() {
    within(60, async {
        let dir = temp_dir("untrusted");
        let pki =
            generate_pki(&dir.join("good"), &["server", "client"], "myriad-node").expect("pki");
        let rogue = generate_pki(&dir.join("rogue"), &["server", "client"], "myriad-node")
            .expect("rogue pki");
        let limits = QuicLimits {
            connect_timeout: Duration::from_secs(3),
            ..QuicLimits::default()
        };
        let server = QuicServer::bind(
            loopback(),
            &pki.config("server").expect("server"),
            limits,
            handler(),
        )
        .expect("bind");
        let addr = server.local_addr().to_string();

        // A call through `tls` must fail: either the dial or the first call (with TLS 1.3 the
        // client may finish its handshake before the server has checked its certificate).
        let attempt = |tls: TlsConfig| {
            let addr = addr.clone();
            async move {
                let connector = QuicConnector::new(&tls, limits).expect("connector");
                let conn = connector.connect(&addr).await?;
                conn.call(request(b"hello"), Duration::from_secs(3)).await
            }
        };

        // A client whose certificate is signed by another CA (it trusts our CA, though: only
        // its own certificate is foreign).
        let rogue_client = TlsConfig::Files {
            cert: rogue.dir.join("client.pem"),
            key: rogue.dir.join("client.key"),
            ca: pki.ca.clone(),
            server_name: "myriad-node".into(),
        };
        // Loading checks our own certificate against the CA, so this config is refused up front…
        let err = QuicConnector::new(&rogue_client, limits)
            .err()
            .expect("a foreign certificate is refused at load");
        eprintln!("foreign certificate: {err}");
        assert!(err.to_string().contains("client.pem"), "{err}");
        // …and a client that bypasses the check (rustls by hand) is refused by the server.
        let err = foreign_client_call(&pki.ca, &rogue.dir, server.local_addr()).await;
        eprintln!("client with a foreign certificate: {err}");
        assert!(err.contains("handshake failed"), "{err}");
        // A client that trusts another CA refuses our server.
        let err = attempt(rogue.config("client").expect("rogue client"))
            .await
            .expect_err("rogue client");
        eprintln!("client trusting another CA: {err}");
        assert!(err.is_peer_failure(), "{err}");
        // A client with no certificate at all (insecure dev mode) is refused too.
        let err = attempt(TlsConfig::InsecureDev)
            .await
            .expect_err("client without certificate");
        eprintln!("client without certificate: {err}");
        assert!(err.is_peer_failure(), "{err}");

        // A server with a foreign certificate is refused by a mutual-TLS client.
        let rogue_server = QuicServer::bind(
            loopback(),
            &rogue.config("server").expect("rogue server"),
            limits,
            handler(),
        )
        .expect("bind");
        let connector =
            QuicConnector::new(&pki.config("client").expect("client"), limits).expect("connector");
        let err = connector
            .connect(&rogue_server.local_addr().to_string())
            .await
            .err()
            .expect("rogue server");
        eprintln!("rogue server: {err}");
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );

        // The good client still works.
        let conn = connector.connect(&addr).await.expect("connect");
        assert_eq!(
            conn.call(request(b"abc"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"cba"
        );
        // The server saw both refused handshakes (they may be counted a moment after the
        // client gave up).
        for _ in 0..50 {
            if server.stats().failed_handshakes() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            server.stats().failed_handshakes() >= 2,
            "failed handshakes: {}",
            server.stats().failed_handshakes()
        );
        assert_eq!(server.stats().requests(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_dev_mode_works_end_to_end() {
    within(60, async {
        let tls = TlsConfig::InsecureDev;
        let warning = tls.warning().expect("a warning");
        assert!(
            warning.contains("INSECURE") && warning.lines().count() >= 5,
            "{warning}"
        );
        let server =
            QuicServer::bind(loopback(), &tls, QuicLimits::default(), handler()).expect("bind");
        let connector = QuicConnector::new(&tls, QuicLimits::default()).expect("connector");
        let conn = connector
            .connect(&server.local_addr().to_string())
            .await
            .expect("connect");
        for i in 0..20 {
            let payload = vec![i as u8; 1000 * i];
            assert_eq!(
                conn.call(request(&payload), DEADLINE)
                    .await
                    .expect("call")
                    .payload,
                reversed(&payload)
            );
        }
    })
    .await;
}

#[test]
fn certificate_file_errors_name_the_file() {
    let dir = temp_dir("files");
    let pki = generate_pki(&dir, &["a", "b"], "myriad-node").expect("pki");
    let other = generate_pki(&dir.join("other"), &["a"], "myriad-node").expect("pki");
    let good = pki.config("a").expect("a");
    assert!(good.server_config().is_ok() && good.client_config().is_ok());
    let TlsConfig::Files {
        cert,
        key,
        ca,
        server_name,
    } = good
    else {
        panic!("files config")
    };

    let check = |config: TlsConfig, needle: &str| {
        let err = config
            .server_config()
            .err()
            .unwrap_or_else(|| panic!("{config:?} loaded"));
        assert!(
            err.to_string().contains(needle),
            "error {err} does not name {needle}"
        );
        let err = config
            .client_config()
            .err()
            .unwrap_or_else(|| panic!("{config:?} loaded"));
        assert!(
            err.to_string().contains(needle),
            "error {err} does not name {needle}"
        );
    };
    let missing = dir.join("missing.pem");
    check(
        TlsConfig::Files {
            cert: missing.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: server_name.clone(),
        },
        "missing.pem",
    );
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: dir.join("nokey.key"),
            ca: ca.clone(),
            server_name: server_name.clone(),
        },
        "nokey.key",
    );
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    check(
        TlsConfig::Files {
            cert: garbage.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: server_name.clone(),
        },
        "garbage.pem",
    );
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: garbage.clone(),
            ca: ca.clone(),
            server_name: server_name.clone(),
        },
        "garbage.pem",
    );
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: garbage.clone(),
            server_name: server_name.clone(),
        },
        "garbage.pem",
    );
    // A certificate of another CA, a name the certificate does not carry, a key of another node.
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: other.ca.clone(),
            server_name: server_name.clone(),
        },
        "a.pem",
    );
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: "other-name".into(),
        },
        "other-name",
    );
    check(
        TlsConfig::Files {
            cert: cert.clone(),
            key: dir.join("b.key"),
            ca: ca.clone(),
            server_name,
        },
        "b.key",
    );

    assert!(generate_pki(&dir, &["ca"], "x").is_err());
    assert!(generate_pki(&dir, &["../evil"], "x").is_err());
    assert!(generate_pki(&dir, &["a", "a"], "x").is_err());
    assert!(pki.config("nobody").is_none());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "private key is readable by others: {mode:o}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A call by a client that trusts `ca` but presents `rogue_dir/client.pem` (signed by another
/// CA); returns the error it got.
async fn foreign_client_call(
    ca: &std::path::Path,
    rogue_dir: &std::path::Path,
    server: std::net::SocketAddr,
) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("ca"))
        .expect("root");
    let cert = CertificateDer::from_pem_file(rogue_dir.join("client.pem")).expect("cert");
    let key = PrivateKeyDer::from_pem_file(rogue_dir.join("client.key")).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![cert], key)
    .expect("client cert");
    config.alpn_protocols = vec![myriad_transport::tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic config");
    let endpoint = quinn::Endpoint::client(loopback()).expect("endpoint");
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            server,
            "myriad-node",
        )
        .expect("connect");
    let outcome = async {
        let conn = connecting.await.map_err(|e| e.to_string())?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            send.write_all(b"hello").await.ok()?;
            let _ = send.finish();
            recv.read_to_end(1 << 20).await.ok()
        };
        match exchange.await {
            Some(reply) => Ok(reply),
            None => Err(conn.closed().await.to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), outcome).await {
        Ok(Ok(reply)) => panic!("a client with a foreign certificate got a reply: {reply:?}"),
        Ok(Err(e)) => e,
        Err(_) => panic!("a client with a foreign certificate got no answer at all"),
    }
}
