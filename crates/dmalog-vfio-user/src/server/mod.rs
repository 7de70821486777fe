//! The vfio-user server: adapts any [`Device`] to the wire, with DMA mappings from fds, DMA
//! logging through the logging core (vfio-user dialect), and migration v2.
//!
//! One client at a time; when it disconnects, logging stops, every mapping goes, IRQ
//! eventfds are dropped, any migration in progress is abandoned (the device is RUNNING
//! again, partial migration data dropped), and the server waits for the next client. The
//! device's registers live on.
//!
//! One module per protocol concern, as libvfio-user's `lib/`: this one accepts clients,
//! reads messages and sends replies ([`Server::serve`]), and hands each command to its
//! module: `dma` (DMA_MAP/UNMAP), `region` (device and region info, region access),
//! `irq` (IRQ info, SET_IRQS), `feature` (DEVICE_FEATURE through the core's
//! dispatcher), `migration` (migration data, DEVICE_RESET) and `message_dma` (the
//! server's own DMA_READ/DMA_WRITE to the client).

mod dma;
mod feature;
mod irq;
mod message_dma;
mod migration;
mod region;
mod tracker;

pub use message_dma::{DEFERRED_MAX_BYTES, DEFERRED_MAX_MESSAGES};
pub use tracker::ServedTracker;

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmalog::{LiveLog, LogDriver, LoggingCore};
use dmalog_device::{Device, DeviceError, DmaSpace, MigrationMachine};
use tracing::{debug, info, warn};

use crate::transport::{Message, RecvError, Transport};
use crate::wire::*;

/// Server limits and choices.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest data payload of one message the server accepts (REGION_READ/WRITE, MIG_DATA);
    /// REPORT replies and server-to-client DMA also respect the client's limit.
    pub max_data_xfer_size: u32,
    /// Most fds per message.
    pub max_msg_fds: u32,
    /// Most DMA mappings.
    pub max_dma_maps: u32,
    /// How long a client may keep the server waiting (the reply to a server
    /// DMA_READ/DMA_WRITE, the rest of a message it began, reading the server's reply)
    /// before it is dropped; a DMA waiting for it fails (EIO). An idle client (between
    /// messages, nothing owed) may stay as long as it likes.
    pub peer_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: 1 << 20,
            max_msg_fds: 8,
            max_dma_maps: 65535,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
        }
    }
}

/// What a command handler answers.
struct Reply {
    payload: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl Reply {
    fn payload(payload: Vec<u8>) -> Result<Reply, i32> {
        Ok(Reply {
            payload,
            fds: Vec::new(),
        })
    }
}

fn dev_err(err: DeviceError) -> i32 {
    err.errno()
}

/// How long the server waits by default for a client that owes it something: the reply to
/// a DMA_READ/DMA_WRITE, the rest of a message it began, room in the socket for a reply.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// A vfio-user server for one device.
pub struct Server {
    config: ServerConfig,
    device: Box<dyn Device>,
    space: DmaSpace,
    core: LoggingCore<Box<dyn LogDriver>>,
    machine: MigrationMachine,
    /// The tracker's hook before each REPORT.
    before_report: Option<Box<dyn FnMut() + Send>>,
    negotiated_xfer: u32,
    versioned: bool,
    /// The last REPORT reply's buffer, reused by the next so large bitmaps are not
    /// allocated again.
    spare_reply: Vec<u8>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("device", &self.device.name())
            .field("logging", &self.core.is_supported())
            .finish()
    }
}

impl Server {
    /// A server whose device `make_device` builds over the server's DMA space, its DMA
    /// writes logged by the software tracker ([`ServedTracker::soft`]).
    pub fn new(
        config: ServerConfig,
        make_device: impl FnOnce(&DmaSpace) -> Box<dyn Device>,
    ) -> Self {
        Self::with_tracker(config, ServedTracker::soft, make_device)
    }

    /// As [`Server::new`] with a device constructor that can fail.
    pub fn try_new<E>(
        config: ServerConfig,
        make_device: impl FnOnce(&DmaSpace) -> Result<Box<dyn Device>, E>,
    ) -> Result<Self, E> {
        Self::try_with_tracker(config, ServedTracker::soft, make_device)
    }

    /// A server whose tracker `make_tracker` builds over the live log the server's DMA
    /// space records the device's writes on (any [`dmalog::LogDriver`], or none), and whose
    /// device `make_device` builds over that DMA space.
    pub fn with_tracker(
        config: ServerConfig,
        make_tracker: impl FnOnce(&Arc<LiveLog>) -> ServedTracker,
        make_device: impl FnOnce(&DmaSpace) -> Box<dyn Device>,
    ) -> Self {
        let made = Self::try_with_tracker(config, make_tracker, |space| {
            Ok::<_, std::convert::Infallible>(make_device(space))
        });
        match made {
            Ok(server) => server,
            Err(never) => match never {},
        }
    }

    /// As [`Server::with_tracker`] with a device constructor that can fail.
    pub fn try_with_tracker<E>(
        config: ServerConfig,
        make_tracker: impl FnOnce(&Arc<LiveLog>) -> ServedTracker,
        make_device: impl FnOnce(&DmaSpace) -> Result<Box<dyn Device>, E>,
    ) -> Result<Self, E> {
        let live = LiveLog::new();
        let ServedTracker {
            driver,
            before_report,
        } = make_tracker(&live);
        let core = match driver {
            Some(driver) => LoggingCore::new(driver),
            None => LoggingCore::unsupported(),
        };
        let space = DmaSpace::with_max_maps(live, config.max_dma_maps as usize);
        let device = make_device(&space)?;
        let negotiated_xfer = config.max_data_xfer_size;
        Ok(Server {
            config,
            device,
            space,
            core,
            machine: MigrationMachine::default(),
            before_report,
            negotiated_xfer,
            versioned: false,
            spare_reply: Vec::new(),
        })
    }

    /// A recorder on the server's tracker, for DMA writes made outside the device (an
    /// embedding library's own DMA engine; benchmarks that dirty the log directly).
    pub fn recorder(&self) -> dmalog::WriteRecorder {
        self.space.recorder()
    }

    /// Serves clients one after the other until `stop` is set (checked between clients).
    pub fn run(&mut self, listener: &UnixListener, stop: &AtomicBool) -> std::io::Result<()> {
        while !stop.load(Ordering::SeqCst) {
            let (stream, _) = listener.accept()?;
            info!(device = self.device.name(), "client connected");
            self.serve(stream);
            info!("client disconnected; logging stopped, mappings removed");
        }
        Ok(())
    }

    fn max_message_bytes(&self) -> usize {
        self.config.max_data_xfer_size as usize + 4096
    }

    /// Serves one client until it disconnects, then cleans up.
    pub fn serve(&mut self, stream: UnixStream) {
        // Reads and writes that stall (a client that stops in the middle of a message or
        // does not read its replies) end after the peer timeout; see `RecvError::Stalled`.
        let timeout = Some(self.config.peer_timeout);
        if let Err(err) = stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
        {
            warn!(%err, "cannot set the socket timeouts; dropping the client");
            self.disconnect();
            return;
        }
        let mut transport = Transport::new(stream, self.max_message_bytes());
        let mut deferred: VecDeque<Message> = VecDeque::new();
        loop {
            if let Some(message) = deferred.pop_front() {
                if !self.dispatch(&mut transport, message) {
                    break;
                }
                continue;
            }
            if let Some(deadline) = self.device.next_event() {
                let now = Instant::now();
                let readable = deadline > now
                    && matches!(wait_readable(transport.stream(), deadline - now), Ok(true));
                if !readable {
                    if !self.run_device_event(&mut transport, &mut deferred) {
                        break;
                    }
                    continue;
                }
            }
            let message = match transport.recv() {
                Ok(message) => message,
                Err(RecvError::Closed) => {
                    debug!("the client closed the connection");
                    break;
                }
                Err(RecvError::Io(err)) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    continue; // idle between messages: the read timeout expired, nothing owed
                }
                Err(RecvError::Io(err)) => {
                    warn!(%err, "socket error");
                    break;
                }
                Err(RecvError::Stalled) => {
                    warn!("the client stopped in the middle of a message; dropping it");
                    break;
                }
                Err(RecvError::TooLarge { header, .. }) => {
                    self.reply_error(&mut transport, &header, libc::E2BIG);
                    continue;
                }
                Err(RecvError::BadSize { header }) => {
                    self.reply_error(&mut transport, &header, libc::EINVAL);
                    continue;
                }
            };
            if !self.dispatch(&mut transport, message) {
                break;
            }
        }
        self.disconnect();
    }

    /// Handles one message and sends its reply; false when the connection broke.
    fn dispatch(&mut self, transport: &mut Transport, message: Message) -> bool {
        {
            let header = message.header;
            if header.kind() != TYPE_COMMAND {
                self.reply_error(transport, &header, libc::EINVAL);
                return true;
            }
            let result = self.handle(message);
            if header.flags & FLAG_NO_REPLY != 0 {
                return true;
            }
            let sent = match result {
                Ok(reply) => {
                    let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|fd| fd.as_fd()).collect();
                    let sent = transport.send(Header::reply_to(&header), &reply.payload, &fds);
                    drop(fds);
                    if reply.payload.capacity() > self.spare_reply.capacity() {
                        self.spare_reply = reply.payload;
                    }
                    sent
                }
                Err(errno) => {
                    debug!(cmd = header.cmd, errno, "command refused");
                    transport.send(Header::error_reply_to(&header, errno), &[], &[])
                }
            };
            if let Err(err) = &sent {
                warn!(%err, "cannot send a reply");
            }
            sent.is_ok()
        }
    }

    fn reply_error(&self, transport: &mut Transport, header: &Header, errno: i32) {
        let _ = transport.send(Header::error_reply_to(header, errno), &[], &[]);
    }

    fn disconnect(&mut self) {
        let _ = self.core.stop();
        self.core.dma_unmapped_all();
        self.space.unmap_all();
        // A migration the client left half-way (a partial load, an unfinished STOP_COPY)
        // must not strand the device for the next client. After the unmap: a device that
        // runs again must not reach the departed client's memory.
        self.machine.abort(self.device.as_mut());
        for index in 0..self.device.num_irqs() {
            if let Some(info) = self.device.irq_info(index) {
                let _ =
                    self.device
                        .set_irq_eventfds(index, 0, (0..info.count).map(|_| None).collect());
            }
        }
        self.versioned = false;
        self.negotiated_xfer = self.config.max_data_xfer_size;
    }

    fn handle(&mut self, message: Message) -> Result<Reply, i32> {
        let Message {
            header,
            payload,
            fds,
        } = message;
        let takes_fds = matches!(header.cmd, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS);
        if !fds.is_empty() && !takes_fds {
            return Err(libc::EINVAL); // the fds are closed as `fds` drops
        }
        if fds.len() > self.config.max_msg_fds as usize {
            return Err(libc::EINVAL);
        }
        if header.cmd != cmd::VERSION && !self.versioned {
            return Err(libc::EINVAL); // VERSION comes first
        }
        match header.cmd {
            cmd::VERSION => self.version(&payload),
            cmd::DMA_MAP => self.dma_map(&payload, fds),
            cmd::DMA_UNMAP => self.dma_unmap(&payload),
            cmd::DEVICE_GET_INFO => self.device_info(&payload),
            cmd::DEVICE_GET_REGION_INFO => self.region_info(&payload),
            cmd::DEVICE_GET_IRQ_INFO => self.irq_info(&payload),
            cmd::DEVICE_SET_IRQS => self.set_irqs(&payload, fds),
            cmd::REGION_READ => self.region_read(&payload),
            cmd::REGION_WRITE => self.region_write(&payload),
            cmd::REGION_WRITE_MULTI => self.region_write_multi(&payload),
            cmd::DEVICE_RESET => self.device_reset(),
            cmd::DEVICE_FEATURE => self.device_feature(&payload),
            cmd::MIG_DATA_READ => self.mig_data_read(&payload),
            cmd::MIG_DATA_WRITE => self.mig_data_write(&payload),
            cmd::DIRTY_PAGES | cmd::DEVICE_GET_REGION_IO_FDS => Err(libc::ENOTSUP),
            _ => Err(libc::ENOSYS),
        }
    }

    fn version(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        if self.versioned {
            return Err(libc::EINVAL);
        }
        let version = Version::decode(payload).map_err(|_| libc::EINVAL)?;
        if version.major != 0 {
            return Err(libc::ENOTSUP);
        }
        if let Some(xfer) = version.capability("max_data_xfer_size") {
            self.negotiated_xfer = self
                .config
                .max_data_xfer_size
                .min(xfer.clamp(8, u64::from(u32::MAX)) as u32);
        }
        let caps = serde_json::json!({
            "capabilities": {
                "max_msg_fds": self.config.max_msg_fds,
                "max_data_xfer_size": self.config.max_data_xfer_size,
                "max_dma_maps": self.config.max_dma_maps,
                "pgsizes": 4096,
                "write_multiple": true,
            }
        });
        self.versioned = true;
        Reply::payload(
            Version {
                major: 0,
                minor: version.minor.min(2),
                json: Some(caps),
            }
            .encode(),
        )
    }
}
