//! The migration stream's links: TLS 1.3 with mutual certificate authentication, or
//! plaintext TCP only when the caller asks for it (SPEC 8: otherwise whoever reaches the
//! destination's port writes the guest's memory); the connect and accept that make them,
//! with bounded socket buffers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::{chain_text, ScenarioError, StepContext};
use crate::destination::decode_hello;
use crate::stream::{
    Frame, FrameReader, FrameWriter, IoTimeouts, Kind, Transport, FRAME_HEADER_BYTES, MAX_CHANNELS,
};
use crate::tls::{self, TlsConfig, TlsError, TlsStream};
use crate::Incoming;

mod first_frame;
mod pending;
mod warn_budget;
use first_frame::FirstFrame;
pub use first_frame::Replayed;
use pending::Pending;
use warn_budget::WarnBudget;

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

/// Connections the destination holds at one time before the migration takes them (each in
/// its TLS handshake, its first frame, or waiting to be taken); a connection past this
/// bound is closed at once, so a flood of them costs neither threads nor fds without
/// bound.
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// Of the [`MAX_PENDING_HANDSHAKES`], those one host (one IP address) holds at most: a
/// stranger's flood from one host leaves room for the real source's connections (all
/// [`MAX_CHANNELS`] of them at once) from another.
pub const MAX_PENDING_PER_HOST: usize = MAX_PENDING_HANDSHAKES / 2;
const _: () = assert!(MAX_CHANNELS as usize <= MAX_PENDING_PER_HOST);

/// The destination's listening for a migration: every connection secured and its first
/// frame read on a thread of its own (at most [`MAX_PENDING_HANDSHAKES`] at once,
/// [`MAX_PENDING_PER_HOST`] of them from one host), each step within `timeout`, so that a
/// stranger who stalls (anyone who can reach the port can) delays no other connection. A connection that fails a step (no valid certificate,
/// garbage, silence, a first frame larger than any Hello) is dropped with a warning naming
/// the peer (at most 16 such warnings a second, the rest counted and logged with the next). The first that opens with a valid Hello is the main connection; one that
/// opens with any other frame is offered as a further channel (the migration checks its
/// Join), and dropped if not taken within `timeout`. A stranger thus holds a connection
/// for at most three timeouts. Listening stops (the port closes) when this is dropped.
pub struct Listening {
    /// Connections that opened with a valid Hello, until the main one is taken.
    mains: Option<Receiver<Proven>>,
    channels: Receiver<Proven>,
    timeout: Duration,
    stop: Arc<AtomicBool>,
}

/// A connection secured and its first frame read.
struct Proven {
    link: Link,
    first: Frame,
}

impl Listening {
    /// Starts listening on `listener`, securing connections as `security` says.
    pub fn start(
        listener: TcpListener,
        security: &ServerSide,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        // A blocking accept that returns every 50 ms to see whether to stop (Linux bounds
        // accept by SO_RCVTIMEO): no spinning through hours of waiting for a source.
        rustix::net::sockopt::set_socket_timeout(
            &listener,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_millis(50)),
        )?;
        // Rendezvous: a connection waits in its own thread (and counts as pending) until
        // the migration takes it, so a flood of them holds at most MAX_PENDING_HANDSHAKES
        // fds.
        let (to_main, mains) = sync_channel(0);
        let (to_channels, channels) = sync_channel(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let pending = Pending::default();
        let warnings = WarnBudget::default();
        let security = security.clone();
        std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    let (tcp, peer) = match listener.accept() {
                        Ok(accepted) => accepted,
                        Err(err) if err.kind() == ErrorKind::WouldBlock => continue,
                        // A connection that died in the backlog, or no fd left for now:
                        // the listening goes on.
                        Err(err) => {
                            if let Some(suppressed) = warnings.allow() {
                                warn!(%err, suppressed, "accepting a migration connection failed");
                            }
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let Some(slot) = pending.take(peer.ip()) else {
                        if let Some(suppressed) = warnings.allow() {
                            warn!(
                                %peer,
                                suppressed,
                                "closed a connection: {MAX_PENDING_HANDSHAKES} pending, or \
                                 {MAX_PENDING_PER_HOST} from its host"
                            );
                        }
                        continue;
                    };
                    let (to_main, to_channels) = (to_main.clone(), to_channels.clone());
                    let (security, warnings_here) = (security.clone(), warnings.clone());
                    let prove = move || {
                        let _slot = slot;
                        match secure_and_read_first(tcp, &security, timeout) {
                            Ok(proven) => hand_over(
                                proven,
                                (peer, &warnings_here),
                                timeout,
                                to_main,
                                to_channels,
                            ),
                            Err(why) => {
                                if let Some(suppressed) = warnings_here.allow() {
                                    warn!(%peer, why, suppressed, "dropped a connection: not a migration");
                                }
                            }
                        }
                    };
                    if std::thread::Builder::new()
                        .name("migrate-handshake".into())
                        .spawn(prove)
                        .is_err()
                    {
                        if let Some(suppressed) = warnings.allow() {
                            warn!(%peer, suppressed, "closed a connection: no thread for its handshake");
                        }
                    }
                }
            })?;
        Ok(Listening {
            mains: Some(mains),
            channels,
            timeout,
            stop,
        })
    }

    /// The main connection: the first to open with a valid Hello, waited for without
    /// limit. Returns its reader (the Hello read again first) and the link to reply on.
    /// Later connections that open with a Hello are offered as further channels (which
    /// the migration refuses).
    pub fn main_connection(&mut self) -> std::io::Result<(Replayed, Link)> {
        let mains = self.mains.take().ok_or_else(|| {
            std::io::Error::new(ErrorKind::Unsupported, "the main connection was taken")
        })?;
        let proven = mains
            .recv()
            .map_err(|_| std::io::Error::other("the listener stopped"))?;
        Ok((
            Replayed::new(proven.link.try_clone()?, &proven.first),
            proven.link,
        ))
    }

    /// The next further channel, within the timeout.
    pub fn next_channel(&self) -> std::io::Result<Incoming> {
        let proven = match self.channels.recv_timeout(self.timeout) {
            Ok(proven) => proven,
            Err(RecvTimeoutError::Timeout) => {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no connection within {} ms", self.timeout.as_millis()),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(std::io::Error::new(
                    ErrorKind::Unsupported,
                    "the listener stopped",
                ))
            }
        };
        Ok(Incoming {
            reader: Box::new(Replayed::new(proven.link.try_clone()?, &proven.first)),
            handle: Box::new(proven.link),
        })
    }

    /// The acceptor of further channels the migration takes ([`Listening::next_channel`]);
    /// dropping it stops the listening.
    pub fn into_acceptor(self) -> impl FnMut() -> std::io::Result<Incoming> {
        move || self.next_channel()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The destination's acceptor of a migration's further channels alone (the main
/// connection accepted otherwise): a [`Listening`] that starts at the first call, where
/// every connection, a Hello included, is offered as a channel.
pub fn acceptor(
    listener: TcpListener,
    security: &ServerSide,
    timeout: Duration,
) -> impl FnMut() -> std::io::Result<Incoming> {
    let security = security.clone();
    let mut listening: Option<Listening> = None;
    let mut listener = Some(listener);
    move || {
        if let Some(listener) = listener.take() {
            let mut started = Listening::start(listener, &security, timeout)?;
            started.mains = None;
            listening = Some(started);
        }
        let Some(listening) = &listening else {
            return Err(std::io::Error::other("the listener failed"));
        };
        listening.next_channel()
    }
}

/// Secures `tcp` and reads its first frame, each within `timeout`; why not, if not.
fn secure_and_read_first(
    tcp: TcpStream,
    security: &ServerSide,
    timeout: Duration,
) -> Result<Proven, String> {
    // Small frames (Resumed) go out at once: with Nagle, a frame written in parts waits
    // for the source's delayed ACK (40 ms on Linux), inside the downtime. The listener's
    // accept timeout is not the connection's.
    tcp.set_nodelay(true)
        .and_then(|()| tcp.set_read_timeout(None))
        .map_err(|err| err.to_string())?;
    let mut link = security
        .secure(tcp, timeout)
        .map_err(|err| chain_text(&err))?;
    let first = FrameReader::new(FirstFrame {
        link: &mut link,
        left_bytes: FRAME_HEADER_BYTES + Kind::Hello.max_payload(),
    })
    .with_timeout(timeout)
    .read()
    .map_err(|err| format!("its first frame: {err}"))?;
    Ok(Proven { link, first })
}

/// Offers `proven` to the migration: a valid Hello as the main connection while one is
/// awaited, any other first frame as a further channel; dropped if not taken within
/// `timeout`. Warnings about `peer` spend `warnings`.
fn hand_over(
    proven: Proven,
    (peer, warnings): (SocketAddr, &WarnBudget),
    timeout: Duration,
    to_main: SyncSender<Proven>,
    to_channels: SyncSender<Proven>,
) {
    let mut to = &to_channels;
    if proven.first.kind == Kind::Hello {
        if let Err(err) = decode_hello(&proven.first.payload) {
            if let Some(suppressed) = warnings.allow() {
                warn!(%peer, %err, suppressed, "dropped a connection: its Hello is refused");
            }
            let mut out = FrameWriter::new(proven.link, None).with_timeout(timeout);
            let _ = out
                .write(Kind::Abort, &[err.to_string().as_bytes()])
                .and_then(|()| out.flush());
            return;
        }
        to = &to_main;
    }
    let deadline = Instant::now() + timeout;
    let mut proven = proven;
    loop {
        match to.try_send(proven) {
            Ok(()) => return,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                proven = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TrySendError::Full(_)) => {
                if let Some(suppressed) = warnings.allow() {
                    let waited_ms = timeout.as_millis();
                    warn!(%peer, waited_ms, suppressed, "dropped a connection the migration did not take");
                }
                return;
            }
            // The main connection was taken: the migration refuses this Hello as a channel.
            Err(TrySendError::Disconnected(back)) if std::ptr::eq(to, &to_main) => {
                proven = back;
                to = &to_channels;
            }
            // The migration is done with its channels.
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}
