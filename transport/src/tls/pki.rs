//! [`generate_pki`]: a fresh cluster CA and node certificates signed by it, written as PEM
//! files (for tests and deploy scripts).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;

use super::{TlsConfig, tls};
use crate::TransportError;

/// What [`generate_pki`] wrote.
#[derive(Clone, Debug)]
pub struct GeneratedPki {
    pub dir: PathBuf,
    /// The CA certificate (`ca.pem`). The CA's key is not written anywhere.
    pub ca: PathBuf,
    pub server_name: String,
    pub names: Vec<String>,
}

impl GeneratedPki {
    /// The mutual-TLS configuration of node `name`, if it was generated.
    pub fn config(&self, name: &str) -> Option<TlsConfig> {
        self.names
            .iter()
            .any(|n| n == name)
            .then(|| TlsConfig::files(&self.dir, name, &self.server_name))
    }
}

/// Writes a fresh cluster CA (`dir/ca.pem`) and, for each of `names`, a certificate signed by
/// it (`dir/<name>.pem`, subject alternative name `server_name`, usable as server and client)
/// and its private key (`dir/<name>.key`, mode 0600). Creates `dir` if needed and overwrites
/// existing files. Keys are ECDSA P-256.
pub fn generate_pki(
    dir: &Path,
    names: &[&str],
    server_name: &str,
) -> Result<GeneratedPki, TransportError> {
    for (i, name) in names.iter().enumerate() {
        let ok = !name.is_empty()
            && !name.starts_with('.')
            && *name != "ca"
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(tls(format!(
                "node name {name:?}: use letters, digits, '-', '_' and '.' (not leading), and not \"ca\""
            )));
        }
        if names[..i].contains(name) {
            return Err(tls(format!("node name {name:?} is given twice")));
        }
    }
    ServerName::try_from(server_name.to_owned()).map_err(|e| {
        tls(format!(
            "server name {server_name:?} is not a DNS name or IP address: {e}"
        ))
    })?;
    fs::create_dir_all(dir)
        .map_err(|e| tls(format!("creating directory {}: {e}", dir.display())))?;

    let rcgen_err = |e: rcgen::Error| tls(format!("generating certificates: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Myriad cluster CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(rcgen_err)?)
        .map_err(rcgen_err)?;
    let ca_path = dir.join("ca.pem");
    write_file(&ca_path, ca.pem().as_bytes(), false)?;

    for name in names {
        let mut params = CertificateParams::new(vec![server_name.to_owned()]).map_err(rcgen_err)?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let cert = params.signed_by(&key, &ca).map_err(rcgen_err)?;
        write_file(
            &dir.join(format!("{name}.key")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(
            &dir.join(format!("{name}.pem")),
            cert.pem().as_bytes(),
            false,
        )?;
    }
    Ok(GeneratedPki {
        dir: dir.to_owned(),
        ca: ca_path,
        server_name: server_name.to_owned(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
    })
}

fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TransportError> {
    let failed = |e: std::io::Error| tls(format!("writing {}: {e}", path.display()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(failed)?;
    // A key file that already existed keeps its mode on open: restrict it before writing.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(failed)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    file.write_all(contents).map_err(failed)
}
