//! The migration stream's security flags for `dmalog demo` and `dmalog migrate`: TLS 1.3
//! with mutual certificate authentication, or plaintext TCP only when asked for by
//! `--insecure-plaintext` (SPEC 8: otherwise whoever reaches the destination's port writes
//! the guest's memory). The links themselves are `dmalog_migrate::scenario::transport`'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dmalog_migrate::scenario::{ClientSide, ServerSide};
use dmalog_migrate::tls::TlsConfig;

/// TLS options shared by `migrate source` and `migrate destination`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The CA certificate (PEM) that signed the peer's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This host's certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Send the migration stream in plaintext, unauthenticated: anyone who can reach the
    /// destination's port can write the guest's memory. For tests on a trusted link only.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure_plaintext: bool,
}

const PLAINTEXT_WARNING: &str = "warning: --insecure-plaintext: the migration stream is \
    unencrypted and unauthenticated; anyone who can reach the destination's port can write \
    the guest's memory";

/// Says on stderr what `--insecure-plaintext` gives away.
pub fn warn_plaintext() {
    eprintln!("{PLAINTEXT_WARNING}");
}

impl TlsArgs {
    /// TLS from these PEM files (the demo's own throwaway set).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Self {
        TlsArgs {
            tls_ca: Some(ca.to_owned()),
            tls_cert: Some(cert.to_owned()),
            tls_key: Some(key.to_owned()),
            insecure_plaintext: false,
        }
    }

    /// The TLS identity, `None` for plaintext (after the warning); an error when neither
    /// was asked for, so that no one migrates in plaintext by forgetting a flag.
    fn load(&self) -> anyhow::Result<Option<TlsConfig>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Ok(Some(TlsConfig::from_pem_files(ca, cert, key)?))
            }
            _ if self.insecure_plaintext => {
                warn_plaintext();
                Ok(None)
            }
            _ => bail!(
                "the migration stream needs TLS: give --tls-ca, --tls-cert and --tls-key \
                 (`dmalog migrate gen-certs` makes a set), or --insecure-plaintext to send \
                 guest memory unencrypted and unauthenticated"
            ),
        }
    }

    /// The source's side, checked before anything starts.
    pub fn client(&self, server_name: Option<&str>) -> anyhow::Result<ClientSide> {
        Ok(match self.load()? {
            Some(config) => ClientSide::tls(&config, server_name)?,
            None => ClientSide::Plaintext,
        })
    }

    /// The destination's side, checked before anything starts.
    pub fn server(&self) -> anyhow::Result<ServerSide> {
        Ok(match self.load()? {
            Some(config) => ServerSide::tls(&config)?,
            None => ServerSide::Plaintext,
        })
    }
}

/// `dmalog migrate gen-certs`: a CA and the two leaf certificates, for users.
pub fn gen_certs(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    dmalog_migrate::pki::write_set(dir, names)?;
    println!(
        "wrote {dir}/: ca.pem (both hosts' --tls-ca), server.pem + server-key.pem (the \
         destination's --tls-cert/--tls-key, valid for {names}), client.pem + client-key.pem \
         (the source's). The CA key is not kept.",
        dir = dir.display(),
        names = names.join(", ")
    );
    Ok(())
}
