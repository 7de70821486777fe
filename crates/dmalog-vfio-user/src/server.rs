//! The vfio-user server: adapts any [`Device`] to the wire, with DMA mappings from fds, DMA
//! logging through the logging core (vfio-user dialect), and migration v2.
//!
//! One client at a time; when it disconnects, logging stops, every mapping goes, IRQ
//! eventfds are dropped, any migration in progress is abandoned (the device is RUNNING
//! again, partial migration data dropped), and the server waits for the next client. The
//! device's registers live on.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmalog::logging_core::{check_access, check_feature_header, is_logging_feature};
use dmalog::uapi::{
    DeviceState, FeatureHeader, MigDeviceStatePayload, FEATURE_GET, FEATURE_HEADER_BYTES,
    FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE, FEATURE_SET,
};
use dmalog::{Dialect, IovaRange, LiveLog, LogDriver, LoggingCore, SoftDriver};
use dmalog_device::{
    Device, DeviceError, DmaBacking, DmaRegion, DmaSpace, MessageDma, MigrationMachine,
    SharedMapping,
};
use dmalog_models::mlx5::{CapsError, Mlx5Faults};
use dmalog_models::pds::{PdsDriver, PDS_DEFAULT_MAX_REGIONS};
use dmalog_models::{Mlx5Caps, Mlx5Driver};
use tracing::{debug, info, warn};

use crate::transport::{Message, RecvError, Transport};
use crate::wire::*;

/// Which tracker logs the device's DMA writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerKind {
    /// No DMA logging (the logging features are ENOTTY).
    None,
    /// The software tracker.
    Soft,
    /// The mlx5 model with these capabilities.
    Mlx5(Mlx5Caps),
    /// The pds (AMD/Pensando) model with this many regions.
    Pds(usize),
}

/// Why a tracker name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrackerKindError {
    /// Not one of the tracker names.
    #[error("unknown tracker {0:?} (known: soft, none, pds, pds:REGIONS, mlx5, mlx5:PRESET[,field=value...])")]
    Unknown(String),
    /// `pds:` followed by something other than a region count of at least 1.
    #[error("bad pds region count {0:?} (a number of at least 1)")]
    PdsRegions(String),
    /// The mlx5 capabilities did not parse.
    #[error(transparent)]
    Mlx5(#[from] CapsError),
}

impl std::str::FromStr for TrackerKind {
    type Err = TrackerKindError;

    /// `soft`, `none`, `pds`, `pds:REGIONS`, `mlx5`, or `mlx5:PRESET[,field=value...]`.
    fn from_str(text: &str) -> Result<Self, TrackerKindError> {
        match text {
            "soft" => Ok(TrackerKind::Soft),
            "none" => Ok(TrackerKind::None),
            "mlx5" => Ok(TrackerKind::Mlx5(Mlx5Caps::cx7())),
            "pds" => Ok(TrackerKind::Pds(PDS_DEFAULT_MAX_REGIONS)),
            other => {
                if let Some(regions) = other.strip_prefix("pds:") {
                    return match regions.parse::<usize>() {
                        Ok(count) if count > 0 => Ok(TrackerKind::Pds(count)),
                        _ => Err(TrackerKindError::PdsRegions(regions.to_string())),
                    };
                }
                match other.strip_prefix("mlx5:") {
                    Some(spec) => Ok(TrackerKind::Mlx5(Mlx5Caps::parse(spec)?)),
                    None => Err(TrackerKindError::Unknown(other.to_string())),
                }
            }
        }
    }
}

/// Server limits and choices.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The tracker.
    pub tracker: TrackerKind,
    /// Largest data payload of one message the server accepts (REGION_READ/WRITE, MIG_DATA);
    /// REPORT replies and server-to-client DMA also respect the client's limit.
    pub max_data_xfer_size: u32,
    /// Most fds per message.
    pub max_msg_fds: u32,
    /// Most DMA mappings.
    pub max_dma_maps: u32,
    /// mlx5 tracker only: inject this fault before the n-th REPORT (1-based) the server
    /// handles, once, for testing consumers' error paths.
    pub fault_plan: Option<(u64, dmalog_models::Mlx5Fault)>,
    /// How long a client may keep the server waiting (the reply to a server
    /// DMA_READ/DMA_WRITE, the rest of a message it began, reading the server's reply)
    /// before it is dropped; a DMA waiting for it fails (EIO). An idle client (between
    /// messages, nothing owed) may stay as long as it likes.
    pub peer_timeout: Duration,
    /// The memory budget of the tracker's state (`--max-log-mib`), ranges added after
    /// START included: a START above it fails with ENOMEM, leaving logging stopped.
    pub max_log_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tracker: TrackerKind::Soft,
            max_data_xfer_size: 1 << 20,
            max_msg_fds: 8,
            max_dma_maps: 65535,
            fault_plan: None,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            max_log_bytes: dmalog::budget::DEFAULT_MAX_LOG_BYTES,
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

/// Most client messages kept while the server waits for the client's reply to its own
/// DMA_READ/DMA_WRITE (SPEC 8: per-client queues are bounded). A client that sends more
/// before answering is dropped: the reply it owes is behind its flood in the stream, so
/// back-pressure (not reading) would only stall until the reply timeout.
pub const DEFERRED_MAX_MESSAGES: usize = 64;
/// Most payload bytes kept in those messages (16 one-MiB writes).
pub const DEFERRED_MAX_BYTES: usize = 16 << 20;
/// How long the server waits by default for a client that owes it something: the reply to
/// a DMA_READ/DMA_WRITE, the rest of a message it began, room in the socket for a reply.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Server-to-client DMA over the connection: DMA_READ/DMA_WRITE commands, split at the
/// negotiated transfer size. Client commands that arrive meanwhile are kept for later, up
/// to [`DEFERRED_MAX_MESSAGES`] and [`DEFERRED_MAX_BYTES`]. A client that exceeds them, or
/// does not answer within the reply timeout, has its DMA failed (EIO to the device) and
/// the connection dropped (`broken`): after a timeout a late reply would be out of step.
struct ConnectionDma<'a> {
    transport: &'a mut Transport,
    deferred: &'a mut VecDeque<Message>,
    deferred_bytes: usize,
    next_id: u16,
    max_xfer: u32,
    reply_timeout: Duration,
    broken: bool,
}

impl ConnectionDma<'_> {
    fn exchange(&mut self, command: u16, payload: &[u8]) -> Result<Vec<u8>, DeviceError> {
        if self.broken {
            return Err(DeviceError::Io("connection lost"));
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let header = Header {
            msg_id: id,
            cmd: command,
            msg_size: 0,
            flags: TYPE_COMMAND,
            error_no: 0,
        };
        if self.transport.send(header, payload, &[]).is_err() {
            self.broken = true;
            return Err(DeviceError::Io("connection lost"));
        }
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let message = match self.recv_before(deadline) {
                Ok(message) => message,
                Err(err) => {
                    self.broken = true;
                    return Err(err);
                }
            };
            if message.header.kind() == TYPE_REPLY
                && message.header.msg_id == id
                && message.header.cmd == command
            {
                if message.header.flags & FLAG_ERROR != 0 {
                    return Err(DeviceError::Io("the client refused the DMA"));
                }
                return Ok(message.payload);
            }
            self.deferred_bytes = self.deferred_bytes.saturating_add(message.payload.len());
            self.deferred.push_back(message);
            if self.deferred.len() > DEFERRED_MAX_MESSAGES
                || self.deferred_bytes > DEFERRED_MAX_BYTES
            {
                warn!(
                    messages = self.deferred.len(),
                    bytes = self.deferred_bytes,
                    "the client keeps sending instead of answering the server's DMA request; \
                     dropping the connection"
                );
                self.broken = true;
                return Err(DeviceError::Io("the client flooded instead of answering"));
            }
        }
    }

    /// The next message, or an error if none has come whole by `deadline`.
    fn recv_before(&mut self, deadline: Instant) -> Result<Message, DeviceError> {
        let timed_out = || {
            warn!("the client did not answer the server's DMA request in time; dropping it");
            DeviceError::Io("the client did not answer a DMA request in time")
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match wait_readable(self.transport.stream(), left) {
                Ok(true) => break,
                Ok(false) => {} // the deadline, or a signal: look again
                Err(_) => return Err(DeviceError::Io("connection lost")),
            }
        }
        // The message has begun: the socket's read timeout (the peer timeout, set in
        // `serve`) ends a client that stops half-way.
        match self.transport.recv() {
            Ok(message) => Ok(message),
            Err(RecvError::Stalled) => Err(timed_out()),
            Err(_) => Err(DeviceError::Io("connection lost")),
        }
    }
}

impl MessageDma for ConnectionDma<'_> {
    fn dma_read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let chunk = self.max_xfer.max(1) as usize;
        for (i, piece) in out.chunks_mut(chunk).enumerate() {
            let addr = iova
                .checked_add((i * chunk) as u64)
                .ok_or(DeviceError::Invalid("IOVA wraps"))?;
            let reply = self.exchange(
                cmd::DMA_READ,
                &DmaAccess {
                    addr,
                    count: piece.len() as u64,
                }
                .encode(),
            )?;
            let data = reply
                .get(DmaAccess::BYTES..)
                .filter(|d| d.len() == piece.len())
                .ok_or(DeviceError::Io("short DMA_READ reply"))?;
            piece.copy_from_slice(data);
        }
        Ok(())
    }

    fn dma_write(&mut self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        let chunk = self.max_xfer.max(1) as usize;
        for (i, piece) in data.chunks(chunk).enumerate() {
            let addr = iova
                .checked_add((i * chunk) as u64)
                .ok_or(DeviceError::Invalid("IOVA wraps"))?;
            let mut payload = DmaAccess {
                addr,
                count: piece.len() as u64,
            }
            .encode();
            payload.extend_from_slice(piece);
            self.exchange(cmd::DMA_WRITE, &payload)?;
        }
        Ok(())
    }
}

/// A vfio-user server for one device.
pub struct Server {
    config: ServerConfig,
    device: Box<dyn Device>,
    space: DmaSpace,
    core: LoggingCore<Box<dyn LogDriver>>,
    machine: MigrationMachine,
    faults: Option<Mlx5Faults>,
    negotiated_xfer: u32,
    versioned: bool,
    reports_seen: u64,
    /// The last REPORT reply's buffer, reused by the next so large bitmaps are not
    /// allocated again.
    spare_reply: Vec<u8>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("device", &self.device.name())
            .field("tracker", &self.config.tracker)
            .finish()
    }
}

impl Server {
    /// A server whose device `make_device` builds over the server's DMA space.
    pub fn new(
        config: ServerConfig,
        make_device: impl FnOnce(&DmaSpace) -> Box<dyn Device>,
    ) -> Self {
        match Self::try_new(config, |space| {
            Ok::<_, std::convert::Infallible>(make_device(space))
        }) {
            Ok(server) => server,
            Err(never) => match never {},
        }
    }

    /// As [`Server::new`] with a device constructor that can fail.
    pub fn try_new<E>(
        config: ServerConfig,
        make_device: impl FnOnce(&DmaSpace) -> Result<Box<dyn Device>, E>,
    ) -> Result<Self, E> {
        let live = LiveLog::new();
        let budget = config.max_log_bytes;
        let (core, faults): (LoggingCore<Box<dyn LogDriver>>, _) = match &config.tracker {
            TrackerKind::None => (LoggingCore::unsupported(), None),
            TrackerKind::Soft => (
                LoggingCore::new(Box::new(
                    SoftDriver::with_live_log(Arc::clone(&live)).with_max_log_bytes(budget),
                )),
                None,
            ),
            TrackerKind::Mlx5(caps) => {
                let driver =
                    Mlx5Driver::with_live_log(*caps, Arc::clone(&live)).with_max_log_bytes(budget);
                let faults = driver.faults();
                (LoggingCore::new(Box::new(driver)), Some(faults))
            }
            TrackerKind::Pds(max_regions) => (
                LoggingCore::new(Box::new(
                    PdsDriver::with_live_log(*max_regions, Arc::clone(&live))
                        .with_max_log_bytes(budget),
                )),
                None,
            ),
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
            faults,
            negotiated_xfer,
            versioned: false,
            reports_seen: 0,
            spare_reply: Vec::new(),
        })
    }

    /// A recorder on the server's tracker, for DMA writes made outside the device (an
    /// embedding library's own DMA engine; benchmarks that dirty the log directly).
    pub fn recorder(&self) -> dmalog::WriteRecorder {
        self.space.recorder()
    }

    /// The mlx5 fault-injection handle, when the tracker is the mlx5 model.
    pub fn mlx5_faults(&self) -> Option<&Mlx5Faults> {
        self.faults.as_ref()
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

    /// Runs the device's due event with message DMA over this connection.
    fn run_device_event(
        &mut self,
        transport: &mut Transport,
        deferred: &mut VecDeque<Message>,
    ) -> bool {
        let deferred_bytes = deferred.iter().map(|m| m.payload.len()).sum();
        let mut dma = ConnectionDma {
            transport,
            deferred,
            deferred_bytes,
            next_id: 0x8000,
            max_xfer: self.negotiated_xfer,
            reply_timeout: self.config.peer_timeout,
            broken: false,
        };
        self.device.run_event(&mut dma);
        !dma.broken
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
                    let header = Header {
                        msg_id: header.msg_id,
                        cmd: header.cmd,
                        msg_size: 0,
                        flags: TYPE_REPLY,
                        error_no: 0,
                    };
                    let sent = transport.send(header, &reply.payload, &fds);
                    drop(fds);
                    if reply.payload.capacity() > self.spare_reply.capacity() {
                        self.spare_reply = reply.payload;
                    }
                    sent
                }
                Err(errno) => {
                    debug!(cmd = header.cmd, errno, "command refused");
                    let reply = Header {
                        msg_id: header.msg_id,
                        cmd: header.cmd,
                        msg_size: 0,
                        flags: TYPE_REPLY | FLAG_ERROR,
                        error_no: errno as u32,
                    };
                    transport.send(reply, &[], &[])
                }
            };
            if let Err(err) = &sent {
                warn!(%err, "cannot send a reply");
            }
            sent.is_ok()
        }
    }

    fn reply_error(&self, transport: &mut Transport, header: &Header, errno: i32) {
        let reply = Header {
            msg_id: header.msg_id,
            cmd: header.cmd,
            msg_size: 0,
            flags: TYPE_REPLY | FLAG_ERROR,
            error_no: errno as u32,
        };
        let _ = transport.send(reply, &[], &[]);
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

    /// DEVICE_RESET: registers to defaults, the migration state RUNNING from any state
    /// (ERROR included) with migration data dropped, and logging stopped, as a Linux
    /// driver leaves a device after a reset.
    fn device_reset(&mut self) -> Result<Reply, i32> {
        let _ = self.core.stop(); // EINVAL when logging was off: nothing to stop
        self.machine.reset(self.device.as_mut()).map_err(dev_err)?;
        Reply::payload(Vec::new())
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

    fn dma_map(&mut self, payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let request = DmaMap::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < DmaMap::BYTES || fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        let range = IovaRange::new(request.addr, request.size).map_err(|_| libc::EINVAL)?;
        let backing = match fds.pop() {
            Some(fd) => {
                let len = usize::try_from(request.size).map_err(|_| libc::EINVAL)?;
                // Pages past the end of the file would SIGBUS on access: refuse them now.
                let file_size = rustix::fs::fstat(&fd)
                    .map_err(|e| e.raw_os_error())?
                    .st_size as u64;
                if request
                    .offset
                    .checked_add(request.size)
                    .is_none_or(|end| end > file_size)
                {
                    return Err(libc::EINVAL);
                }
                let writable = request.flags & DMA_FLAG_WRITE != 0;
                // SharedMapping reads the seals: a file sealed against shrinking is copied
                // directly, any other through the kernel (a shrink then faults, no SIGBUS).
                let mapping = SharedMapping::map(&fd, request.offset, len, writable)
                    .map_err(|err| err.raw_os_error().unwrap_or(libc::EINVAL))?;
                debug!(iova = request.addr, size = request.size, path = ?mapping.copy_path(), "DMA_MAP");
                DmaBacking::Mapped(Arc::new(mapping))
            }
            None => DmaBacking::MessageOnly,
        };
        let region = DmaRegion {
            iova: request.addr,
            size: request.size,
            readable: request.flags & DMA_FLAG_READ != 0,
            writable: request.flags & DMA_FLAG_WRITE != 0,
            backing,
        };
        // The log covers the range before any device thread can reach the mapping: a
        // write landing in between would be marked on a log without it.
        self.core.cover_before_map(range);
        self.space.map(region).map_err(|err| err.errno())?;
        self.core.dma_mapped(range);
        Reply::payload(Vec::new())
    }

    fn dma_unmap(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = DmaUnmap::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < DmaUnmap::BYTES
            || request.flags & !(DMA_UNMAP_FLAG_ALL | DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0
        {
            return Err(libc::EINVAL);
        }
        if request.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(libc::ENOTSUP); // the legacy bitmap: use DMA logging REPORT
        }
        if request.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if request.addr != 0 || request.size != 0 {
                return Err(libc::EINVAL);
            }
            self.space.unmap_all();
            self.core.dma_unmapped_all();
        } else {
            self.space
                .unmap(request.addr, request.size)
                .map_err(|err| err.errno())?;
            if let Ok(range) = IovaRange::new(request.addr, request.size) {
                self.core.dma_unmapped(range);
            }
        }
        Reply::payload(request.encode())
    }

    fn device_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let argsz = dmalog::uapi::read_u32(payload, 0).map_err(|_| libc::EINVAL)?;
        if (argsz as usize) < DeviceInfo::BYTES {
            return Err(libc::EINVAL);
        }
        let info = DeviceInfo {
            argsz: DeviceInfo::BYTES as u32,
            flags: self.device.flags(),
            num_regions: self.device.num_regions(),
            num_irqs: self.device.num_irqs(),
        };
        Reply::payload(info.encode())
    }

    fn region_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionInfoWire::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < RegionInfoWire::BYTES {
            return Err(libc::EINVAL);
        }
        let info = self.device.region_info(request.index).ok_or(libc::EINVAL)?;
        let caps = if info.sparse_mmap.is_empty() {
            Vec::new()
        } else {
            sparse_mmap_cap(&info.sparse_mmap)
        };
        let full = RegionInfoWire::BYTES + caps.len();
        let room = request.argsz as usize >= full;
        // A reply without room for the caps is only "ask again with argsz = full": it
        // claims no CAPS (QEMU refuses CAPS with cap_offset 0, which is what the kernel
        // sends) and no MMAP (its fd goes with the full answer only).
        let mut flags = info.flags;
        let mut cap_offset = 0;
        if !room {
            flags &= !dmalog_device::device::REGION_MMAP;
        } else if !caps.is_empty() {
            flags |= dmalog_device::device::REGION_CAPS;
            cap_offset = RegionInfoWire::BYTES as u32;
        }
        if info.mmap_fd.is_none() {
            flags &= !dmalog_device::device::REGION_MMAP; // MMAP means an fd comes with it
        }
        let reply = RegionInfoWire {
            argsz: full as u32,
            flags,
            index: request.index,
            cap_offset,
            size: info.size,
            offset: 0,
        };
        let mut bytes = reply.encode();
        if room {
            bytes.extend_from_slice(&caps);
        }
        // The fd goes with the complete answer only: a client that asked with room for the
        // fixed part alone is not ready to receive fds (libvfio-user's client is not).
        let fds = if room {
            info.mmap_fd.into_iter().collect()
        } else {
            Vec::new()
        };
        Ok(Reply {
            payload: bytes,
            fds,
        })
    }

    fn irq_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = IrqInfoWire::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < IrqInfoWire::BYTES {
            return Err(libc::EINVAL);
        }
        let info = self.device.irq_info(request.index).ok_or(libc::EINVAL)?;
        Reply::payload(
            IrqInfoWire {
                argsz: IrqInfoWire::BYTES as u32,
                flags: info.flags,
                index: request.index,
                count: info.count,
            }
            .encode(),
        )
    }

    fn set_irqs(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let request = SetIrqs::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < SetIrqs::BYTES {
            return Err(libc::EINVAL);
        }
        let data = request.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
        let info = self.device.irq_info(request.index).ok_or(libc::EINVAL)?;
        match data {
            IRQ_SET_DATA_EVENTFD => {
                if fds.len() != request.count as usize {
                    return Err(libc::EINVAL);
                }
                let fds = fds.into_iter().map(Some).collect();
                self.device
                    .set_irq_eventfds(request.index, request.start, fds)
                    .map_err(dev_err)?;
            }
            IRQ_SET_DATA_NONE if request.count == 0 => {
                if !fds.is_empty() {
                    return Err(libc::EINVAL);
                }
                let none = (0..info.count).map(|_| None).collect();
                self.device
                    .set_irq_eventfds(request.index, 0, none)
                    .map_err(dev_err)?;
            }
            IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL if fds.is_empty() => {
                let end = request
                    .start
                    .checked_add(request.count)
                    .ok_or(libc::EINVAL)?;
                if end > info.count {
                    return Err(libc::EINVAL);
                }
            }
            _ => return Err(libc::EINVAL),
        }
        Reply::payload(Vec::new())
    }

    fn region_read(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        if payload.len() != RegionAccess::BYTES || request.count > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        let mut reply = request.encode();
        reply.resize(RegionAccess::BYTES + request.count as usize, 0);
        self.device
            .region_read(
                request.region,
                request.offset,
                &mut reply[RegionAccess::BYTES..],
            )
            .map_err(dev_err)?;
        Reply::payload(reply)
    }

    fn region_write(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        let data = &payload[RegionAccess::BYTES..];
        if data.len() != request.count as usize {
            return Err(libc::EINVAL);
        }
        self.device
            .region_write(request.region, request.offset, data)
            .map_err(dev_err)?;
        Reply::payload(request.encode())
    }

    fn region_write_multi(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let count = dmalog::uapi::read_u64(payload, 0).map_err(|_| libc::EINVAL)?;
        if count == 0
            || count > WRITE_MULTI_MAX_ENTRIES
            || payload.len() != 8 + count as usize * WRITE_MULTI_ENTRY_BYTES
        {
            return Err(libc::EINVAL);
        }
        for entry in payload[8..].chunks_exact(WRITE_MULTI_ENTRY_BYTES) {
            let access = RegionAccess::decode(entry).map_err(|_| libc::EINVAL)?;
            if access.count == 0 || access.count > 8 {
                return Err(libc::EINVAL);
            }
            self.device
                .region_write(
                    access.region,
                    access.offset,
                    &entry[16..16 + access.count as usize],
                )
                .map_err(dev_err)?;
        }
        Reply::payload(payload[..8].to_vec())
    }

    fn device_feature(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let dialect = Dialect::VfioUser {
            max_data_xfer_size: u64::from(self.negotiated_xfer),
        };
        let header = check_feature_header(payload, dialect).map_err(|e| e.errno())?;
        if is_logging_feature(header.index()) {
            if header.index() == dmalog::uapi::FEATURE_DMA_LOGGING_REPORT
                && header.is_get()
                && !header.is_probe()
            {
                self.reports_seen += 1;
                if let (Some((at, fault)), Some(faults)) = (self.config.fault_plan, &self.faults) {
                    if at == self.reports_seen {
                        warn!(?fault, report = at, "injecting an mlx5 fault");
                        faults.inject(fault);
                    }
                }
            }
            let mut reply = std::mem::take(&mut self.spare_reply);
            self.core
                .handle_vfio_user(payload, u64::from(self.negotiated_xfer), &mut reply)
                .map_err(|e| e.errno())?;
            return Reply::payload(reply);
        }
        let data = &payload[FEATURE_HEADER_BYTES..];
        let supported = match header.index() {
            FEATURE_MIGRATION => FEATURE_GET,
            FEATURE_MIG_DEVICE_STATE => FEATURE_GET | FEATURE_SET,
            _ => return Err(libc::ENOTTY),
        };
        if check_access(&header, supported).map_err(|e| e.errno())? {
            return Reply::payload(payload.to_vec());
        }
        let reply_header = |argsz: u32| {
            FeatureHeader {
                argsz,
                flags: header.flags,
            }
            .encode()
        };
        match (header.index(), header.is_set()) {
            (FEATURE_MIGRATION, _) => {
                if (header.argsz as usize) < FEATURE_HEADER_BYTES + 8 {
                    return Err(libc::EINVAL);
                }
                let mut reply = reply_header((FEATURE_HEADER_BYTES + 8) as u32).to_vec();
                reply.extend_from_slice(&self.device.migration_flags().to_le_bytes());
                Reply::payload(reply)
            }
            (_, false) => {
                if (header.argsz as usize) < FEATURE_HEADER_BYTES + 8 {
                    return Err(libc::EINVAL);
                }
                let mut reply = reply_header((FEATURE_HEADER_BYTES + 8) as u32).to_vec();
                reply.extend_from_slice(
                    &MigDeviceStatePayload {
                        device_state: self.machine.state() as u32,
                        data_fd: -1,
                    }
                    .encode(),
                );
                Reply::payload(reply)
            }
            (_, true) => {
                let request = MigDeviceStatePayload::decode(data).map_err(|_| libc::EINVAL)?;
                let target = DeviceState::from_u32(request.device_state).ok_or(libc::EINVAL)?;
                self.machine
                    .set_state(self.device.as_mut(), target)
                    .map_err(dev_err)?;
                debug!(?target, "migration state");
                Reply::payload(payload.to_vec())
            }
        }
    }

    fn mig_data_read(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = MigData::decode(payload).map_err(|_| libc::EINVAL)?;
        if request.size > self.config.max_data_xfer_size
            || (request.argsz as usize) < MigData::BYTES + request.size as usize
        {
            return Err(libc::EINVAL);
        }
        let mut reply = vec![0u8; MigData::BYTES + request.size as usize];
        let n = self
            .machine
            .read_data(self.device.as_mut(), &mut reply[MigData::BYTES..])
            .map_err(dev_err)?;
        // The reply keeps the requested length (zero-padded), with `size` saying how much is
        // data: libvfio-user's client insists on receiving exactly what it asked room for.
        let head = MigData {
            argsz: reply.len() as u32,
            size: n as u32,
        }
        .encode();
        reply[..MigData::BYTES].copy_from_slice(&head);
        Reply::payload(reply)
    }

    fn mig_data_write(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = MigData::decode(payload).map_err(|_| libc::EINVAL)?;
        let data = &payload[MigData::BYTES..];
        if data.len() != request.size as usize || request.size > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        self.machine
            .write_data(self.device.as_mut(), data)
            .map_err(dev_err)?;
        Reply::payload(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_kinds_parse_and_bad_ones_are_errors() {
        assert_eq!("soft".parse(), Ok(TrackerKind::Soft));
        assert_eq!("none".parse(), Ok(TrackerKind::None));
        assert_eq!("pds".parse(), Ok(TrackerKind::Pds(PDS_DEFAULT_MAX_REGIONS)));
        assert_eq!("pds:3".parse(), Ok(TrackerKind::Pds(3)));
        assert_eq!("mlx5".parse(), Ok(TrackerKind::Mlx5(Mlx5Caps::cx7())));
        for bad in ["pds:0", "pds:x", "pds:"] {
            assert!(
                matches!(
                    bad.parse::<TrackerKind>(),
                    Err(TrackerKindError::PdsRegions(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            "hisi".parse::<TrackerKind>(),
            Err(TrackerKindError::Unknown("hisi".into()))
        );
        assert!(matches!(
            "mlx5:nope".parse::<TrackerKind>(),
            Err(TrackerKindError::Mlx5(CapsError::UnknownPreset(_)))
        ));
    }
}
