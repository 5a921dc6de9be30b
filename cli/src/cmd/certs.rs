//! `myriad certs`: a cluster CA and one certificate per node for mutual TLS between nodes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use myriad_transport::generate_pki;

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Output directory (ca.pem, <name>.pem, <name>.key).
    #[arg(long)]
    pub out: PathBuf,
    /// Node names, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub names: Vec<String>,
    /// The name every certificate carries (nodes dial each other by it).
    #[arg(long, default_value = "myriad-node")]
    pub server_name: String,
}

pub fn run(a: &CertsArgs) -> Result<()> {
    let names: Vec<&str> = a.names.iter().map(String::as_str).collect();
    generate_pki(&a.out, &names, &a.server_name)
        .with_context(|| format!("writing certificates to {}", a.out.display()))?;
    eprintln!(
        "wrote ca.pem and a certificate and key for {} in {}",
        names.join(", "),
        a.out.display()
    );
    Ok(())
}
