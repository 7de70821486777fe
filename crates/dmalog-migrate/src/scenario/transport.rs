//! The migration stream's links: TLS 1.3 with mutual certificate authentication, or
//! plaintext TCP only when the caller asks for it (SPEC 8: otherwise whoever reaches the
//! destination's port writes the guest's memory); the connect and accept that make them,
//! with bounded socket buffers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use super::{chain_text, ScenarioError, StepContext};
use crate::stream::{IoTimeouts, Transport};
use crate::tls::{self, TlsConfig, TlsError, TlsStream};
use crate::Incoming;

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
    /// Plaintext, unauthenticated.
    Plaintext,
}

/// How the destination accepts.
#[derive(Clone)]
pub enum ServerSide {
    /// TLS, a client certificate required.
    Tls(Arc<tls::ServerConfig>),
    /// Plaintext, unauthenticated.
    Plaintext,
}

impl ClientSide {
    /// TLS with `config`'s identity, checking `server_name` (default: the host).
    pub fn tls(config: &TlsConfig, server_name: Option<&str>) -> Result<Self, TlsError> {
        Ok(ClientSide::Tls {
            config: config.client_config()?,
            server_name: server_name.map(str::to_owned),
        })
    }

    /// Secures a connection to `address`.
    pub fn secure(
        &self,
        tcp: TcpStream,
        address: &str,
        timeout: Duration,
    ) -> Result<Link, TlsError> {
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
    /// TLS with `config`'s identity, a client certificate required.
    pub fn tls(config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(ServerSide::Tls(config.server_config()?))
    }

    /// Secures an accepted connection: a source without a valid certificate is refused
    /// here, before any frame is read.
    pub fn secure(&self, tcp: TcpStream, timeout: Duration) -> Result<Link, ScenarioError> {
        Ok(match self {
            ServerSide::Tls(config) => Link::Tls(
                tls::accept(config, tcp, timeout).step(|| "refused the migration source".into())?,
            ),
            ServerSide::Plaintext => Link::Plain(tcp),
        })
    }
}

/// A migration stream, TLS or plaintext.
pub enum Link {
    /// Plaintext.
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

/// Forwards a call to the link's stream, whichever it is.
macro_rules! either {
    ($link:expr, $s:ident => $call:expr) => {
        match $link {
            Link::Plain($s) => $call,
            Link::Tls($s) => $call,
        }
    };
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        either!(self, s => s.read(buf))
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        either!(self, s => s.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        either!(self, s => s.flush())
    }
}

impl Transport for Link {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        either!(self, s => s.vectored_fd())
    }
    fn shut_down(&self) {
        either!(self, s => s.shut_down())
    }
    fn read_into_piece(
        &self,
        piece: &dmalog_device::IoPieceMut<'_>,
    ) -> Option<std::io::Result<usize>> {
        either!(self, s => s.read_into_piece(piece))
    }
}

impl IoTimeouts for Link {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        either!(self, s => s.bound_reads(timeout))
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        either!(self, s => s.bound_writes(timeout))
    }
}

/// Bounds the bytes in flight on `stream` (or every socket a listener accepts) to about
/// `len_bytes` each way (0: leaves the kernel's autotuning): the destination applies what
/// is in flight at the stop inside the downtime, and autotuned buffers on loopback hold
/// tens of MiB.
pub fn bound_stream_buffers(
    stream: impl rustix::fd::AsFd,
    len_bytes: u64,
) -> Result<(), ScenarioError> {
    if len_bytes == 0 {
        return Ok(());
    }
    let bytes = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    rustix::net::sockopt::set_socket_send_buffer_size(&stream, bytes)
        .step(|| "setting the migration stream's send buffer".into())?;
    rustix::net::sockopt::set_socket_recv_buffer_size(&stream, bytes)
        .step(|| "setting the migration stream's receive buffer".into())?;
    Ok(())
}

/// A connection to `address` (each of its resolved addresses in turn), each attempt
/// bounded by `timeout`.
pub fn connect_within(address: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{address} resolves to no address"))))
}

/// The kind of I/O failure under `err` (whether the destination hung up: then the engine
/// looks for the reason it sent on the first channel), `Other` when none is.
pub fn io_kind(err: &ScenarioError) -> std::io::ErrorKind {
    super::causes(err)
        .find_map(|cause| {
            cause.downcast_ref::<std::io::Error>().or_else(|| {
                match cause.downcast_ref::<TlsError>() {
                    Some(TlsError::Handshake { cause, .. }) => Some(cause),
                    _ => None,
                }
            })
        })
        .map_or(std::io::ErrorKind::Other, std::io::Error::kind)
}

/// The source's link to `destination`: connected within `timeout`, Nagle off, buffers
/// bounded to `buffer_bytes`, secured as `security` says.
pub fn connect_link(
    destination: &str,
    security: &ClientSide,
    timeout: Duration,
    buffer_bytes: u64,
) -> Result<Link, ScenarioError> {
    let stream = connect_within(destination, timeout)
        .step(|| format!("connecting to the destination {destination}"))?;
    stream.set_nodelay(true)?;
    bound_stream_buffers(&stream, buffer_bytes)?;
    security
        .secure(stream, destination, timeout)
        .step(|| format!("securing the link to {destination}"))
}

/// Further-channel connections whose handshake runs at one time; a connection past this
/// bound is closed at once, so a flood of them costs neither threads nor memory without
/// bound.
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// The destination's acceptor of a migration's further channels: each connection on
/// `listener` secured as the first one, the next one whose handshake succeeded handed out
/// within `timeout` of the call. Handshakes run each on a thread of its own (at most
/// [`MAX_PENDING_HANDSHAKES`]), so a connection that stalls its handshake (anyone who can
/// reach the port can open one) delays no other: the real channels join while it waits
/// out its own timeout. The listening starts at the first call and stops when the
/// acceptor is dropped (every channel joined), and any later connection is refused.
pub fn acceptor(
    listener: TcpListener,
    security: &ServerSide,
    timeout: Duration,
) -> impl FnMut() -> std::io::Result<Incoming> {
    let security = security.clone();
    let mut listening: Option<ListeningThread> = None;
    let mut listener = Some(listener);
    move || {
        if let Some(listener) = listener.take() {
            listening = Some(ListeningThread::start(listener, security.clone(), timeout)?);
        }
        let Some(listening) = &listening else {
            return Err(std::io::Error::other("the listener failed"));
        };
        let link = match listening.secured.recv_timeout(timeout) {
            Ok(secured) => secured?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms", timeout.as_millis()),
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the listener stopped",
                ))
            }
        };
        Ok(Incoming {
            reader: Box::new(link.try_clone()?),
            handle: Box::new(link),
        })
    }
}

/// The thread that takes connections for [`acceptor`] and starts their handshakes; it
/// stops (closing the listener) when this is dropped.
struct ListeningThread {
    secured: std::sync::mpsc::Receiver<std::io::Result<Link>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ListeningThread {
    fn start(
        listener: TcpListener,
        security: ServerSide,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        listener.set_nonblocking(true)?;
        // A rendezvous: a secured connection waits in its thread (and counts as pending)
        // until the migration takes it, so a flood of them (plaintext: no handshake to
        // slow it) holds at most MAX_PENDING_HANDSHAKES fds.
        let (send, secured) = std::sync::mpsc::sync_channel(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let pending = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    let tcp = match listener.accept() {
                        Ok((tcp, _)) => tcp,
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        // A connection that died in the backlog, or no fd left for now:
                        // one refused connection, and the listening goes on.
                        Err(err) => {
                            if send.send(Err(err)).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    };
                    if pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!("closed a connection: too many handshakes under way");
                        continue;
                    }
                    pending.fetch_add(1, Ordering::AcqRel);
                    let (send, security, pending) =
                        (send.clone(), security.clone(), Arc::clone(&pending));
                    let handshake = move || {
                        let link = tcp
                            .set_nonblocking(false)
                            .and_then(|()| tcp.set_nodelay(true))
                            .map_err(|err| std::io::Error::other(err.to_string()))
                            .and_then(|()| {
                                security
                                    .secure(tcp, timeout)
                                    .map_err(|err| std::io::Error::other(chain_text(&err)))
                            });
                        // The migration may be done with its channels: then this one goes.
                        let _ = send.send(link);
                        pending.fetch_sub(1, Ordering::AcqRel);
                    };
                    if std::thread::Builder::new()
                        .name("migrate-handshake".into())
                        .spawn(handshake)
                        .is_err()
                    {
                        tracing::warn!("closed a connection: no thread for its handshake");
                    }
                }
            })?;
        Ok(ListeningThread { secured, stop })
    }
}

impl Drop for ListeningThread {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}
