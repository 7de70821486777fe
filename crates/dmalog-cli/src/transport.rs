//! The migration stream's transport for `dmalog demo` and `dmalog migrate`: TLS 1.3 with
//! mutual certificate authentication, or plaintext TCP only when asked for by
//! `--insecure-plaintext` (SPEC 8: otherwise whoever reaches the destination's port writes
//! the guest's memory).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dmalog_migrate::stream::{IoTimeouts, Transport};
use dmalog_migrate::tls::{self, TlsConfig, TlsStream};

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
            Some(config) => ClientSide::Tls {
                config: config.client_config()?,
                server_name: server_name.map(str::to_owned),
            },
            None => ClientSide::Plaintext,
        })
    }

    /// The destination's side, checked before anything starts.
    pub fn server(&self) -> anyhow::Result<ServerSide> {
        Ok(match self.load()? {
            Some(config) => ServerSide::Tls(config.server_config()?),
            None => ServerSide::Plaintext,
        })
    }
}

/// How the source connects.
pub enum ClientSide {
    /// TLS; the destination's certificate must carry `server_name` (default: the host in
    /// `HOST:PORT`).
    Tls {
        /// The rustls configuration.
        config: Arc<tls::ClientConfig>,
        /// The name to check, if not the host connected to.
        server_name: Option<String>,
    },
    /// `--insecure-plaintext`.
    Plaintext,
}

/// How the destination accepts.
pub enum ServerSide {
    /// TLS, a client certificate required.
    Tls(Arc<tls::ServerConfig>),
    /// `--insecure-plaintext`.
    Plaintext,
}

impl ClientSide {
    /// Secures a connection to `address`.
    pub fn secure(&self, tcp: TcpStream, address: &str, timeout: Duration) -> anyhow::Result<Link> {
        Ok(match self {
            ClientSide::Tls {
                config,
                server_name,
            } => {
                let name = server_name.as_deref().unwrap_or(tls::host_of(address));
                Link::Tls(tls::connect(config, name, tcp, timeout)?)
            }
            ClientSide::Plaintext => Link::Plain(tcp),
        })
    }
}

impl ServerSide {
    /// Secures an accepted connection: a source without a valid certificate is refused
    /// here, before any frame is read.
    pub fn secure(&self, tcp: TcpStream, timeout: Duration) -> anyhow::Result<Link> {
        Ok(match self {
            ServerSide::Tls(config) => Link::Tls(
                tls::accept(config, tcp, timeout).context("refused the migration source")?,
            ),
            ServerSide::Plaintext => Link::Plain(tcp),
        })
    }
}

/// A migration stream, TLS or plaintext.
pub enum Link {
    /// `--insecure-plaintext`.
    Plain(TcpStream),
    /// TLS 1.3.
    Tls(TlsStream),
}

impl Link {
    /// A second handle (the engine's reader and writer).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Link::Plain(s) => Link::Plain(s.try_clone()?),
            Link::Tls(s) => Link::Tls(s.try_clone()?),
        })
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Tls(s) => s.flush(),
        }
    }
}

impl Transport for Link {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Link::Plain(s) => s.vectored_fd(),
            Link::Tls(s) => s.vectored_fd(),
        }
    }
    fn shut_down(&self) {
        match self {
            Link::Plain(s) => s.shut_down(),
            Link::Tls(s) => s.shut_down(),
        }
    }
}

impl IoTimeouts for Link {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.bound_reads(timeout),
            Link::Tls(s) => s.bound_reads(timeout),
        }
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.bound_writes(timeout),
            Link::Tls(s) => s.bound_writes(timeout),
        }
    }
}

/// The destination's acceptor of a migration's further channels: each connection on
/// `listener` within `timeout`, secured as the first one. It owns the listener, so the
/// destination stops listening once it drops the acceptor (every channel joined) and any
/// later connection is refused.
pub fn acceptor(
    listener: std::net::TcpListener,
    security: &ServerSide,
    timeout: Duration,
) -> impl FnMut() -> std::io::Result<dmalog_migrate::Incoming> + '_ {
    move || {
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + timeout;
        let tcp = loop {
            match listener.accept() {
                Ok((tcp, _)) => break tcp,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no connection within {} ms", timeout.as_millis()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(err) => return Err(err),
            }
        };
        tcp.set_nonblocking(false)?;
        tcp.set_nodelay(true)?;
        let link = security
            .secure(tcp, timeout)
            .map_err(|err| std::io::Error::other(format!("{err:#}")))?;
        Ok(dmalog_migrate::Incoming {
            reader: Box::new(link.try_clone()?),
            handle: Box::new(link),
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
