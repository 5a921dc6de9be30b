//! Certificates and rustls configurations for the QUIC transport.
//!
//! Two modes ([`TlsConfig`]):
//!
//! - **Files: mutual TLS.** Every node has one certificate and key, used both as its server
//!   identity and as its client identity, and every node trusts one cluster CA. A server
//!   requires a client certificate that chains to the CA; a client checks that the server's
//!   certificate chains to the CA and is valid for the cluster's server name (all nodes share
//!   that name as their SAN, so any node can serve as any other's peer). Loading checks the node's
//!   own certificate against the CA and the name at start-up, so a wrong file is reported there,
//!   naming the file, instead of as a failed handshake later.
//! - **InsecureDev.** A server generates a self-signed certificate at start-up and asks for no
//!   client certificate; a client accepts any server certificate (it still checks that the
//!   server holds the certificate's key, so the session is encrypted, but nobody is
//!   authenticated). [`TlsConfig::warning`] is the text the binary prints at start-up.
//!
//! Configurations are built with `rustls::crypto::ring::default_provider()` explicitly; no
//! process-wide crypto provider is installed. Only TLS 1.3 is offered (QUIC requires it), with
//! the ALPN protocol [`ALPN`].
//!
//! Submodules: `insecure` (the InsecureDev client's verifier), `pki` ([`generate_pki`], which
//! writes a CA and node certificates for tests and deploy scripts).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::TransportError;

mod insecure;
mod pki;

use insecure::AcceptAnyServerCert;
pub use pki::{GeneratedPki, generate_pki};

/// The ALPN protocol both sides offer; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"myriad/1";

/// The name a server's self-signed certificate carries in [`TlsConfig::InsecureDev`] mode (and
/// that clients ask for; they do not check it).
const DEV_SERVER_NAME: &str = "localhost";

const INSECURE_WARNING: &str = "\
##########################################################################
##  WARNING: INSECURE DEVELOPMENT CERTIFICATES (--insecure-dev-certs)   ##
##                                                                      ##
##  This node uses a self-signed certificate generated at start-up and  ##
##  accepts ANY certificate from the nodes it connects to. Traffic is   ##
##  encrypted but NOBODY IS AUTHENTICATED: anyone who can reach this    ##
##  node can send it requests, and anyone on the path can pose as a     ##
##  peer. Use only on a trusted machine or network, never in            ##
##  production. Give certificates (--tls-cert/--tls-key/--tls-ca) for   ##
##  mutual TLS.                                                         ##
##########################################################################";

/// How a node authenticates itself and its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsConfig {
    /// Mutual TLS: this node's certificate and private key (PEM), the cluster CA (PEM), and
    /// the name every node's certificate carries as its subject alternative name.
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        server_name: String,
    },
    /// Self-signed certificates and no verification of peers (development only).
    InsecureDev,
}

impl TlsConfig {
    /// The files [`generate_pki`] writes for node `name` in `dir`: `<name>.pem`, `<name>.key`
    /// and `ca.pem`.
    pub fn files(dir: &Path, name: &str, server_name: &str) -> TlsConfig {
        TlsConfig::Files {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
            server_name: server_name.to_owned(),
        }
    }

    /// The warning to print at start-up, if this mode is insecure.
    pub fn warning(&self) -> Option<&'static str> {
        match self {
            TlsConfig::InsecureDev => Some(INSECURE_WARNING),
            TlsConfig::Files { .. } => None,
        }
    }

    /// The name a client asks for when it dials a node.
    pub fn server_name(&self) -> &str {
        match self {
            TlsConfig::Files { server_name, .. } => server_name,
            TlsConfig::InsecureDev => DEV_SERVER_NAME,
        }
    }

    /// The rustls configuration of a node's server side.
    pub fn server_config(&self) -> Result<ServerConfig, TransportError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(format!("TLS 1.3 with the ring provider: {e}")))?;
        let mut config = match self {
            TlsConfig::Files {
                cert,
                key,
                ca,
                server_name,
            } => {
                let id = Identity::load(cert, key, ca, server_name)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(id.roots, provider)
                    .build()
                    .map_err(|e| {
                        tls(format!(
                            "{}: cannot verify clients against this CA: {e}",
                            ca.display()
                        ))
                    })?;
                builder
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(id.chain, id.key)
                    .map_err(|e| {
                        tls(format!(
                            "{} with key {}: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?
            }
            TlsConfig::InsecureDev => {
                let ck = rcgen::generate_simple_self_signed(vec![DEV_SERVER_NAME.to_owned()])
                    .map_err(|e| tls(format!("generating a self-signed certificate: {e}")))?;
                let key =
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
                builder
                    .with_no_client_auth()
                    .with_single_cert(vec![ck.cert.der().clone()], key)
                    .map_err(|e| tls(format!("self-signed certificate: {e}")))?
            }
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The rustls configuration of a node's client side.
    pub fn client_config(&self) -> Result<ClientConfig, TransportError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(format!("TLS 1.3 with the ring provider: {e}")))?;
        let mut config = match self {
            TlsConfig::Files {
                cert,
                key,
                ca,
                server_name,
            } => {
                let id = Identity::load(cert, key, ca, server_name)?;
                builder
                    .with_root_certificates(id.roots)
                    .with_client_auth_cert(id.chain, id.key)
                    .map_err(|e| {
                        tls(format!(
                            "{} with key {}: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?
            }
            TlsConfig::InsecureDev => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn tls(message: String) -> TransportError {
    TransportError::Tls(message)
}

/// A node's certificate chain, key and trusted roots, loaded and cross-checked.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl Identity {
    fn load(
        cert: &Path,
        key: &Path,
        ca: &Path,
        server_name: &str,
    ) -> Result<Identity, TransportError> {
        let chain = read_certs(cert, "certificate")?;
        let key_der = read_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "CA certificate")? {
            roots.add(c).map_err(|e| {
                tls(format!(
                    "CA certificate file {}: unusable as a trust anchor: {e}",
                    ca.display()
                ))
            })?;
        }
        let roots = Arc::new(roots);

        // Check our own certificate now, as a peer will check it, so that a wrong file is
        // reported at start-up with its name.
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            tls(format!(
                "server name {server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let now = UnixTime::now();
        let (leaf, intermediates) = (&chain[0], &chain[1..]);
        let as_server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| tls(format!("CA certificate file {}: {e}", ca.display())))?;
        as_server.verify_server_cert(leaf, intermediates, &name, &[], now).map_err(|e| {
            tls(format!(
                "certificate file {}: not accepted as a server certificate for {server_name:?} under the CA in {}: {e}",
                cert.display(),
                ca.display()
            ))
        })?;
        let as_client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| tls(format!("CA certificate file {}: {e}", ca.display())))?;
        as_client.verify_client_cert(leaf, intermediates, now).map_err(|e| {
            tls(format!(
                "certificate file {}: not accepted as a client certificate under the CA in {}: {e}",
                cert.display(),
                ca.display()
            ))
        })?;
        Ok(Identity {
            chain,
            key: key_der,
            roots,
        })
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|e| tls(format!("{what} file {}: {e}", path.display())))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(format!("{what} file {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls(format!(
            "{what} file {}: no PEM certificate (BEGIN CERTIFICATE) in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let bytes = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => tls(format!(
            "private key file {}: no PEM private key in it",
            path.display()
        )),
        e => tls(format!("private key file {}: bad PEM: {e}", path.display())),
    })
}
