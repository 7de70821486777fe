//! The migration stream's security (SPEC 8): TLS 1.3 with mutual certificate
//! authentication. Whoever reaches the destination's port could otherwise write the guest's
//! memory, so the destination refuses a peer without a certificate from its CA during the
//! handshake, before a single frame is read; the source refuses a destination whose
//! certificate does not match the CA and the expected name.
//!
//! [`TlsStream`] carries one TLS session for both directions; [`TlsStream::try_clone`] gives a
//! second handle on it, so the engine gets its reader and writer as with a `TcpStream`.
//! Both handles share one lock: the engine alternates reading and writing and never does
//! both at once, so a read never holds up a write that it waits for.
//!
//! Trust is the CA: the destination takes any client certificate the CA signed, so the CA
//! should sign only the hosts that may migrate to each other.

use std::io::{BufRead, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{ConnectionCommon, RootCertStore, SideData, StreamOwned};
use tracing::{debug, warn};

use crate::stream::IoTimeouts;
use dmalog_device::IoPieceMut;

pub use rustls::{ClientConfig, ServerConfig};

/// The byte the destination sends once it has verified the source's certificate. In TLS 1.3
/// the client finishes its handshake before the server has checked the client's
/// certificate; waiting for this byte makes a refusal an error at connect time, with the
/// destination's reason, rather than a broken pipe in the middle of round 0.
const ACCEPTED: u8 = 0xa5;

/// What went wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading the {what} {}: {cause}", path.display())]
    Read {
        /// Which file: "CA certificate", "certificate", "private key".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// A PEM file holds no usable item of the kind wanted.
    #[error("the {what} {}: {why}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration (for example, a key that does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client certificate verifier could not be built (for example, no CA).
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The name to check the destination's certificate against is not a DNS name or IP.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The handshake failed: a missing, untrusted or mismatched certificate, a peer that
    /// does not speak TLS 1.3, or a link that failed or timed out.
    #[error("TLS handshake with {peer} failed: {cause}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why (a rustls error is wrapped with kind `InvalidData`).
        cause: std::io::Error,
    },
}

/// This host's TLS identity and the CA it trusts, from PEM.
pub struct TlsConfig {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        what,
        path: path.to_owned(),
        cause,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |why: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Reads the CA certificate(s) to trust, this host's certificate chain (leaf first) and
    /// its private key, each a PEM file.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_pem = read_file("CA certificate", ca)?;
        let cert_pem = read_file("certificate", cert)?;
        let key_pem = read_file("private key", key)?;
        Self::parse([(ca, &ca_pem), (cert, &cert_pem), (key, &key_pem)])
    }

    /// As [`TlsConfig::from_pem_files`], from PEM text in memory.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let here = Path::new("(in memory)");
        Self::parse([
            (here, ca.as_bytes()),
            (here, cert.as_bytes()),
            (here, key.as_bytes()),
        ])
    }

    /// `[CA, chain, key]`, each with its path for errors.
    fn parse(
        [(ca, ca_pem), (cert, cert_pem), (key, key_pem)]: [(&Path, &[u8]); 3],
    ) -> Result<Self, TlsError> {
        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "private key",
            path: key.to_owned(),
            why: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for ca_cert in certificates("CA certificate", ca, ca_pem)? {
            roots.add(ca_cert).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                path: ca.to_owned(),
                why: e.to_string(),
            })?;
        }
        Ok(TlsConfig {
            roots: Arc::new(roots),
            chain: certificates("certificate", cert, cert_pem)?,
            key: key_der,
        })
    }

    /// The destination's configuration: TLS 1.3 only, a client certificate from the CA
    /// required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
                .build()?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// The source's configuration: TLS 1.3 only, the destination verified against the CA,
    /// this host's certificate presented.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// ring: it builds with a C compiler alone. TLS 1.3's suites only, AES-128-GCM first: on
/// a CPU with AES instructions it encrypts the stream about a third faster than
/// AES-256-GCM (10 rounds, not 14), and it is TLS 1.3's mandatory suite; the others stay
/// for a peer that insists.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A server name from the host part of `HOST:PORT` (`[v6]:PORT` too), the name the
/// destination's certificate must carry unless one is given.
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Accepts a source on `tcp`: the handshake, the source's certificate verified, and the
/// acceptance byte sent, all within `timeout`. Nothing is read from a refused peer beyond
/// its handshake.
pub fn accept(
    config: &Arc<ServerConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let peer = peer_of(&tcp);
    let failed = handshake_failed(&peer);
    let conn = ServerConnection::new(Arc::clone(config))?;
    let mut stream = established(conn, tcp, timeout).map_err(failed)?;
    stream
        .write_all(&[ACCEPTED])
        .and_then(|()| stream.flush())
        .map_err(failed)?;
    debug!(%peer, "TLS peer accepted");
    TlsStream::new(Inner::Server(stream)).map_err(failed)
}

/// Connects to a destination on `tcp`: the handshake, the destination's certificate
/// verified for `server_name`, and the destination's word that it took ours, all within
/// `timeout`.
pub fn connect(
    config: &Arc<ClientConfig>,
    server_name: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let peer = peer_of(&tcp);
    let failed = handshake_failed(&peer);
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
    let conn = ClientConnection::new(Arc::clone(config), name)?;
    let mut stream = established(conn, tcp, timeout).map_err(failed)?;
    let mut accepted = [0u8; 1];
    match stream.read_exact(&mut accepted) {
        Ok(()) if accepted[0] == ACCEPTED => {}
        Ok(()) => {
            return Err(failed(std::io::Error::new(
                ErrorKind::InvalidData,
                "the destination did not confirm the handshake",
            )))
        }
        Err(err) if err.kind() == ErrorKind::UnexpectedEof => {
            return Err(failed(std::io::Error::new(
                ErrorKind::ConnectionAborted,
                "the destination closed the connection (did it refuse our certificate?)",
            )))
        }
        Err(err) => return Err(failed(err)),
    }
    debug!(%peer, "TLS destination verified");
    TlsStream::new(Inner::Client(stream)).map_err(failed)
}

/// `conn`'s handshake on `tcp`, within `timeout`; then the stream of both, its socket
/// reads and writes bounded by what is left of `timeout` (for the last handshake byte).
fn established<C, D>(
    mut conn: C,
    mut tcp: TcpStream,
    timeout: Duration,
) -> std::io::Result<StreamOwned<C, Socket>>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    let deadline = Instant::now() + timeout;
    handshake(&mut conn, &mut tcp, deadline, timeout)?;
    conn.set_buffer_limit(Some(TLS_BUFFER_BYTES));
    let stream = StreamOwned::new(conn, Socket::new(tcp));
    arm(&stream.sock.tcp, deadline, timeout)?;
    Ok(stream)
}

/// The error of a handshake with `peer` that `cause` ended.
fn handshake_failed(peer: &str) -> impl Fn(std::io::Error) -> TlsError + Copy + '_ {
    move |cause| TlsError::Handshake {
        peer: peer.to_owned(),
        cause,
    }
}

fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".into(), |addr| addr.to_string())
}

/// Bounds each socket read and write by the time left before `deadline`.
fn arm(tcp: &TcpStream, deadline: Instant, timeout: Duration) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            format!(
                "the peer did not complete the handshake within {} ms",
                timeout.as_millis()
            ),
        ));
    }
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

/// Runs the handshake to its end under one deadline (rustls' own `complete_io` would let
/// a peer that trickles bytes stretch it without end). A TLS error is sent to the peer as
/// an alert, best effort, and returned with kind `InvalidData`.
fn handshake<D: SideData>(
    conn: &mut ConnectionCommon<D>,
    tcp: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> std::io::Result<()> {
    while conn.is_handshaking() || conn.wants_write() {
        arm(tcp, deadline, timeout)?;
        if conn.wants_write() {
            conn.write_tls(tcp)?;
            continue;
        }
        if conn.read_tls(tcp)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the peer closed the connection during the handshake",
            ));
        }
        if let Err(err) = conn.process_new_packets() {
            // The alert tells the peer why.
            while conn.wants_write() {
                if conn.write_tls(tcp).is_err() {
                    break;
                }
            }
            if matches!(err, rustls::Error::InvalidMessage(_)) {
                // What a plaintext migration stream looks like to TLS.
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("{err} (the peer does not speak TLS: a plaintext peer?)"),
                ));
            }
            return Err(std::io::Error::new(ErrorKind::InvalidData, err));
        }
    }
    Ok(())
}

/// Plaintext rustls may buffer to send: a cap well above the frame writer's chunks
/// ([`crate::stream::COPY_CHUNK_BYTES`]), so that each is taken whole in one call.
const TLS_BUFFER_BYTES: usize = 4 << 20;
/// Bytes read from the socket at once: rustls asks for 4 KiB at a time, which would be a
/// `recv` per 4 KiB of guest memory.
const SOCKET_READ_BYTES: usize = 256 << 10;

/// The TCP socket under a TLS session, its reads buffered ([`SOCKET_READ_BYTES`]).
struct Socket {
    tcp: TcpStream,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Socket {
    fn new(tcp: TcpStream) -> Self {
        Socket {
            tcp,
            buffer: vec![0u8; SOCKET_READ_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = self.tcp.read(&mut self.buffer)?;
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.buffer[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.tcp.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Copies the front of `plaintext` into `piece` and consumes it: the bytes copied.
fn copy_front(plaintext: &mut impl BufRead, piece: &IoPieceMut<'_>) -> std::io::Result<usize> {
    let record = plaintext.fill_buf()?;
    let n = record.len().min(piece.len());
    piece
        .copy_from(&record[..n])
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
    plaintext.consume(n);
    Ok(n)
}

/// [`TlsStream`]'s `read_into_piece` on one side's stream.
fn records_into<C, D>(
    stream: &mut StreamOwned<C, Socket>,
    piece: &IoPieceMut<'_>,
) -> std::io::Result<usize>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<D>>,
    D: SideData + 'static,
{
    let mut done = copy_front(stream, piece)?;
    while done > 0 && done < piece.len() {
        let rest = piece.skip(done);
        // Decrypted already (the reader has nothing: WouldBlock, or Ok(0) once closed).
        match copy_front(&mut stream.conn.reader(), &rest) {
            Ok(n) if n > 0 => {
                done += n;
                continue;
            }
            _ => {}
        }
        if stream.sock.start == stream.sock.end {
            // More would wait on the socket: the caller arms its deadline first.
            break;
        }
        // From the socket buffer only (Socket reads the socket when it is empty, and it is
        // not): every round consumes buffered bytes or plaintext, so this ends.
        stream.conn.read_tls(&mut stream.sock)?;
        stream
            .conn
            .process_new_packets()
            .map_err(|err| std::io::Error::new(ErrorKind::InvalidData, err))?;
    }
    Ok(done)
}

/// One side's TLS session.
enum Inner {
    Client(StreamOwned<ClientConnection, Socket>),
    Server(StreamOwned<ServerConnection, Socket>),
}

impl Inner {
    fn tcp(&self) -> &TcpStream {
        match self {
            Inner::Client(s) => &s.sock.tcp,
            Inner::Server(s) => &s.sock.tcp,
        }
    }
}

/// A TLS 1.3 migration stream over TCP: `Read + Write + IoTimeouts`, like the
/// `TcpStream` it wraps, so the engine runs on it unchanged.
#[derive(Clone)]
pub struct TlsStream {
    inner: Arc<Mutex<Inner>>,
    /// The socket beside the session's lock, to shut it down while a reader holds the lock.
    tcp: Arc<TcpStream>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl TlsStream {
    fn new(inner: Inner) -> std::io::Result<Self> {
        let tcp = Arc::new(inner.tcp().try_clone()?);
        Ok(TlsStream {
            inner: Arc::new(Mutex::new(inner)),
            tcp,
        })
    }

    /// A second handle on the same session (the engine's reader and writer). Unlike
    /// `TcpStream::try_clone` it cannot fail; the name keeps call sites alike.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(self.clone())
    }

    fn lock(&self) -> std::io::Result<MutexGuard<'_, Inner>> {
        // A panic while holding the lock leaves the session in an unknown state.
        self.inner
            .lock()
            .map_err(|_| std::io::Error::other("the TLS session was poisoned by a panic"))
    }

    /// The protocol version and cipher suite the handshake settled on.
    pub fn negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        let inner = self.lock().ok()?;
        let (version, suite) = match &*inner {
            Inner::Client(s) => (s.conn.protocol_version(), s.conn.negotiated_cipher_suite()),
            Inner::Server(s) => (s.conn.protocol_version(), s.conn.negotiated_cipher_suite()),
        };
        Some((version?, suite?.suite()))
    }

    /// Sends close_notify, best effort: the peer can tell an orderly end from a cut link.
    pub fn close(&self) {
        if let Ok(mut inner) = self.lock() {
            let result = match &mut *inner {
                Inner::Client(s) => {
                    s.conn.send_close_notify();
                    s.flush()
                }
                Inner::Server(s) => {
                    s.conn.send_close_notify();
                    s.flush()
                }
            };
            if let Err(err) = result {
                warn!(%err, "could not send TLS close_notify");
            }
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut *self.lock()? {
            Inner::Client(s) => s.read(buf),
            Inner::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.lock()? {
            Inner::Client(s) => s.write(buf),
            Inner::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut *self.lock()? {
            Inner::Client(s) => s.flush(),
            Inner::Server(s) => s.flush(),
        }
    }
}

impl crate::stream::Transport for TlsStream {
    /// None: page bytes must go through the session to be encrypted.
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// From the session's decrypted records straight into `piece`: the first may wait for
    /// the socket (once, under the caller's deadline), then as many more as need no
    /// further socket read (decrypted already, or whole in the socket buffer), so that a
    /// piece of guest memory costs one lock and one deadline per socket read, not per
    /// 16 KiB record.
    fn read_into_piece(&self, piece: &IoPieceMut<'_>) -> Option<std::io::Result<usize>> {
        Some(self.lock().and_then(|mut inner| match &mut *inner {
            Inner::Client(s) => records_into(s, piece),
            Inner::Server(s) => records_into(s, piece),
        }))
    }
    fn shut_down(&self) {
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

impl IoTimeouts for TlsStream {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.lock()?.tcp().set_read_timeout(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.lock()?.tcp().set_write_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("localhost:7000"), "localhost");
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("host"), "host");
    }
}
