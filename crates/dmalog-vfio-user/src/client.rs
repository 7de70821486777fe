//! The vfio-user client: a VMM's handle on a device server. It negotiates, maps guest
//! memory with fds, reads regions and IRQ info, and is both a [`DirtyTracker`] (DMA logging
//! with REPORTs larger than one message split transparently into the caller's buffer) and a
//! [`MigrationDevice`].

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use dmalog::error::LogError;
use dmalog::tracker::{checked_report_words, report_words};
use dmalog::uapi::{
    feature_request, DeviceState, LoggingRange, MigDeviceStatePayload, UapiStruct,
    UserLoggingControl, UserLoggingReport, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_HEADER_BYTES, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE, FEATURE_SET, USER_REPORT_BYTES,
};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, PendingBytes, TrackerError, TrackerResult};

use crate::transport::{Message, Received, RecvError, Transport};
use crate::wire::*;

/// A reply's payload and fds.
type ReplyBody = (Vec<u8>, Vec<OwnedFd>);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("command {cmd} refused: {}", std::io::Error::from_raw_os_error(*errno))]
    Refused {
        /// The command.
        cmd: u16,
        /// The errno.
        errno: i32,
    },
    /// The server answered something that does not fit the protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

impl ClientError {
    /// The errno this error stands for.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Io(err) => err.raw_os_error().unwrap_or(libc::EIO),
            ClientError::Refused { errno, .. } => *errno,
            ClientError::Protocol(_) => libc::EPROTO,
        }
    }
}

impl From<RecvError> for ClientError {
    fn from(err: RecvError) -> Self {
        match err {
            RecvError::Io(err) => ClientError::Io(err),
            RecvError::Closed => {
                ClientError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            }
            _ => ClientError::Protocol("oversized or malformed reply"),
        }
    }
}

impl From<ClientError> for TrackerError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Io(err) => TrackerError::Transport(err),
            ClientError::Refused { errno, .. } => LogError::from_errno(errno).into(),
            ClientError::Protocol(why) => LogError::TrackerError(why).into(),
        }
    }
}

/// A region as the server describes it.
#[derive(Debug)]
pub struct Region {
    /// The fixed part of the info.
    pub info: RegionInfoWire,
    /// Sparse mmap areas.
    pub sparse_mmap: Vec<(u64, u64)>,
    /// The fd to mmap, if the region is mappable.
    pub fd: Option<OwnedFd>,
}

/// Guest memory the client lent the server, kept to serve the server's DMA_READ/DMA_WRITE
/// and to log the pages those writes dirty (they are the client's to track).
#[derive(Debug)]
struct ClientMapping {
    iova: u64,
    size: u64,
    fd: Option<OwnedFd>,
    offset: u64,
    writes: dmalog::DirtyLog,
}

/// How long the client waits for the server by default (a reply, room in the socket for a
/// request): a silent server must not hang the VMM. [`Client::set_reply_timeout`] changes it.
pub const DEFAULT_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to a vfio-user server.
#[derive(Debug)]
pub struct Client {
    transport: Transport,
    /// A wait timed out or a send failed part-way: a late reply would be taken for the
    /// next request's, so every later request fails (ETIMEDOUT) instead.
    out_of_step: bool,
    next_id: u16,
    server_version: Version,
    max_data_xfer_size: u32,
    logging_page_size: Option<u64>,
    mappings: Vec<ClientMapping>,
    served_dma: u64,
}

/// The client's own limit on data per message.
pub const CLIENT_MAX_DATA_XFER: u32 = 1 << 20;

impl Client {
    /// Connects to the server at `path` and negotiates.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::with_stream(UnixStream::connect(path)?, CLIENT_MAX_DATA_XFER)
    }

    /// Negotiates over a connected stream, proposing `max_data_xfer_size`.
    pub fn with_stream(stream: UnixStream, max_data_xfer_size: u32) -> Result<Self, ClientError> {
        stream.set_read_timeout(Some(DEFAULT_REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_REPLY_TIMEOUT))?;
        let mut client = Client {
            out_of_step: false,
            transport: Transport::new(stream, max_data_xfer_size as usize + 4096),
            next_id: 0,
            server_version: Version {
                major: 0,
                minor: 0,
                json: None,
            },
            max_data_xfer_size,
            logging_page_size: None,
            mappings: Vec::new(),
            served_dma: 0,
        };
        let ours = Version {
            major: 0,
            minor: 2,
            json: Some(
                serde_json::json!({"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": max_data_xfer_size}}),
            ),
        };
        let (reply, _) = client.request(cmd::VERSION, &ours.encode(), &[])?;
        let version =
            Version::decode(&reply).map_err(|_| ClientError::Protocol("bad VERSION reply"))?;
        if version.major != 0 {
            return Err(ClientError::Protocol("server speaks another major version"));
        }
        if let Some(xfer) = version.capability("max_data_xfer_size") {
            // Clamped before the cast: 2^32 as u32 would be 0 (and 0-byte chunks).
            let theirs = xfer.clamp(64, u64::from(u32::MAX)) as u32;
            client.max_data_xfer_size = client.max_data_xfer_size.min(theirs);
        }
        client
            .transport
            .set_max_message_bytes(client.max_data_xfer_size as usize + 4096);
        client.server_version = version;
        Ok(client)
    }

    /// How long to wait for the server (each reply, and room to send) before the request
    /// fails with ETIMEDOUT; after that the connection is out of step and every later
    /// request fails too. Zero is EINVAL.
    pub fn set_reply_timeout(&mut self, timeout: std::time::Duration) -> Result<(), ClientError> {
        let stream = self.transport.stream();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    fn timed_out() -> ClientError {
        ClientError::Io(std::io::Error::from_raw_os_error(libc::ETIMEDOUT))
    }

    /// The next message from the server; a timeout leaves the connection out of step.
    fn recv(&mut self) -> Result<Message, ClientError> {
        match self.recv_into(&mut [], &mut [], |_| false)? {
            Received::Whole(message) => Ok(message),
            Received::Direct { header, fds } => Ok(Message {
                header,
                payload: Vec::new(),
                fds,
            }),
        }
    }

    /// [`Transport::recv_into`], with the client's handling of timeouts.
    fn recv_into(
        &mut self,
        prefix: &mut [u8],
        direct: &mut [u8],
        accept: impl FnOnce(&Header) -> bool,
    ) -> Result<Received, ClientError> {
        match self.transport.recv_into(prefix, direct, accept) {
            Ok(received) => Ok(received),
            Err(RecvError::Stalled) => {
                self.out_of_step = true;
                Err(Self::timed_out())
            }
            Err(RecvError::Io(err)) if err.kind() == std::io::ErrorKind::WouldBlock => {
                self.out_of_step = true;
                Err(Self::timed_out())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The server's VERSION reply (capabilities).
    pub fn server_version(&self) -> &Version {
        &self.server_version
    }

    /// The negotiated data size per message.
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size
    }

    /// Sends a command and waits for its reply: `(payload, fds)` or the server's errno.
    pub fn request(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), ClientError> {
        let id = self.send_command(command, payload, fds)?;
        self.await_reply(command, id)
    }

    /// Sends a command without waiting; its reply must be taken with
    /// [`Client::await_reply`], replies arriving in the order the commands were sent.
    fn send_command(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u16, ClientError> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let header = Header::command(id, command);
        if self.out_of_step {
            return Err(Self::timed_out());
        }
        if let Err(err) = self.transport.send(header, payload, fds) {
            // Part of the message may have gone: nothing after it can be trusted.
            self.out_of_step = true;
            return Err(if err.kind() == std::io::ErrorKind::WouldBlock {
                Self::timed_out()
            } else {
                err.into()
            });
        }
        Ok(id)
    }

    /// The reply to command `id`, serving the server's own commands that come first.
    fn await_reply(&mut self, command: u16, id: u16) -> Result<ReplyBody, ClientError> {
        self.await_reply_into(command, id, &mut [], &mut [])
            .map(|reply| reply.unwrap_or_default())
    }

    /// [`Client::await_reply`], but a successful reply whose payload is exactly
    /// `prefix.len() + direct.len()` bytes is read straight into them: `None` then.
    fn await_reply_into(
        &mut self,
        command: u16,
        id: u16,
        prefix: &mut [u8],
        direct: &mut [u8],
    ) -> Result<Option<ReplyBody>, ClientError> {
        let awaited = |header: &Header| {
            header.kind() == TYPE_REPLY
                && header.msg_id == id
                && header.cmd == command
                && header.flags & FLAG_ERROR == 0
        };
        loop {
            let Message {
                header,
                payload,
                fds,
            } = match self.recv_into(prefix, direct, awaited)? {
                Received::Direct { fds, .. } if prefix.is_empty() && direct.is_empty() => {
                    return Ok(Some((Vec::new(), fds)))
                }
                Received::Direct { .. } => return Ok(None),
                Received::Whole(message) => message,
            };
            if header.kind() == TYPE_COMMAND {
                self.serve_server_command(header, &payload)?;
                continue;
            }
            if header.msg_id != id || header.cmd != command {
                return Err(ClientError::Protocol("reply to another command"));
            }
            if header.flags & FLAG_ERROR != 0 {
                // An error reply must carry an errno, but some servers send 0 (rust-vmm's
                // `vfio_user` crate does for every backend error but EINVAL): report EIO
                // rather than an "error 0" a caller could take for success.
                let errno = match header.error_no as i32 {
                    0 => libc::EIO,
                    errno => errno,
                };
                return Err(ClientError::Refused {
                    cmd: command,
                    errno,
                });
            }
            return Ok(Some((payload, fds)));
        }
    }

    /// DMA_MAP `[iova, iova+size)` from `fd` at `offset`. With `fd` the server maps the
    /// memory; the client keeps a duplicate to serve the server's DMA_READ/DMA_WRITE.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        writable: bool,
    ) -> Result<(), ClientError> {
        self.dma_map_as(iova, size, fd, offset, writable, true)
    }

    /// DMA_MAP where the server gets no fd ("message-only": every device access to it is a
    /// DMA_READ/DMA_WRITE message the client serves from `fd`).
    pub fn dma_map_message_only(
        &mut self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        writable: bool,
    ) -> Result<(), ClientError> {
        self.dma_map_as(iova, size, Some(fd), offset, writable, false)
    }

    fn dma_map_as(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        writable: bool,
        send_fd: bool,
    ) -> Result<(), ClientError> {
        let flags = DMA_FLAG_READ | if writable { DMA_FLAG_WRITE } else { 0 };
        let request = DmaMap {
            argsz: DmaMap::BYTES as u32,
            flags,
            offset,
            addr: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = if send_fd {
            fd.into_iter().collect()
        } else {
            Vec::new()
        };
        self.request(cmd::DMA_MAP, &request.encode(), &fds)?;
        let writes = dmalog::DirtyLog::new(iova, size, 4096)
            .map_err(|_| ClientError::Protocol("mapping too large to log"))?;
        let fd = fd.map(|fd| fd.try_clone_to_owned()).transpose()?;
        self.mappings.push(ClientMapping {
            iova,
            size,
            fd,
            offset,
            writes,
        });
        Ok(())
    }

    /// Answers one server command (DMA_READ/DMA_WRITE from the lent memory).
    fn serve_server_command(&mut self, header: Header, payload: &[u8]) -> Result<(), ClientError> {
        let result = self.serve_dma(header.cmd, payload);
        self.served_dma += 1;
        let sent = match result {
            Ok(reply) => self.transport.send(Header::reply_to(&header), &reply, &[]),
            Err(errno) => self
                .transport
                .send(Header::error_reply_to(&header, errno), &[], &[]),
        };
        sent.map_err(|err| {
            self.out_of_step = true;
            if err.kind() == std::io::ErrorKind::WouldBlock {
                Self::timed_out()
            } else {
                err.into()
            }
        })
    }

    fn serve_dma(&mut self, command: u16, payload: &[u8]) -> Result<Vec<u8>, i32> {
        let access = DmaAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        let count = usize::try_from(access.count).map_err(|_| libc::EINVAL)?;
        if count > self.max_data_xfer_size as usize {
            return Err(libc::E2BIG);
        }
        let end = access.addr.checked_add(access.count).ok_or(libc::EFAULT)?;
        let mapping = self
            .mappings
            .iter()
            .find(|m| access.addr >= m.iova && m.iova.checked_add(m.size).is_some_and(|e| end <= e))
            .ok_or(libc::EFAULT)?;
        let fd = mapping.fd.as_ref().ok_or(libc::EFAULT)?;
        let at = mapping
            .offset
            .checked_add(access.addr - mapping.iova)
            .ok_or(libc::EFAULT)?;
        match command {
            cmd::DMA_WRITE => {
                let data = &payload[DmaAccess::BYTES.min(payload.len())..];
                if data.len() != count {
                    return Err(libc::EINVAL);
                }
                let written = rustix::io::pwrite(fd, data, at).map_err(|e| e.raw_os_error())?;
                if written != count {
                    return Err(libc::EIO);
                }
                mapping.writes.record_write(access.addr, access.count);
                Ok(access.encode())
            }
            cmd::DMA_READ => {
                let mut reply = access.encode();
                reply.resize(DmaAccess::BYTES + count, 0);
                let read = rustix::io::pread(fd, &mut reply[DmaAccess::BYTES..], at)
                    .map_err(|e| e.raw_os_error())?;
                if read != count {
                    return Err(libc::EIO);
                }
                Ok(reply)
            }
            _ => Err(libc::ENOSYS),
        }
    }

    /// Serves the server's DMA requests until none arrives for `idle`; returns how many.
    /// (Requests that arrive while a command waits for its reply are served there too.)
    pub fn serve_requests(&mut self, idle: std::time::Duration) -> Result<u64, ClientError> {
        let before = self.served_dma;
        while wait_readable(self.transport.stream(), idle)? {
            let Message {
                header, payload, ..
            } = self.recv()?;
            if header.kind() != TYPE_COMMAND {
                return Err(ClientError::Protocol("a reply nobody asked for"));
            }
            self.serve_server_command(header, &payload)?;
        }
        Ok(self.served_dma - before)
    }

    /// Server DMA requests served so far.
    pub fn served_dma_requests(&self) -> u64 {
        self.served_dma
    }

    /// DMA_UNMAP of exactly `[iova, iova+size)`.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), ClientError> {
        let request = DmaUnmap {
            argsz: DmaUnmap::BYTES as u32,
            flags: 0,
            addr: iova,
            size,
        };
        self.request(cmd::DMA_UNMAP, &request.encode(), &[])?;
        self.mappings
            .retain(|m| !(m.iova == iova && m.size == size));
        Ok(())
    }

    /// DMA_UNMAP of everything.
    pub fn dma_unmap_all(&mut self) -> Result<(), ClientError> {
        let request = DmaUnmap {
            argsz: DmaUnmap::BYTES as u32,
            flags: DMA_UNMAP_FLAG_ALL,
            addr: 0,
            size: 0,
        };
        self.request(cmd::DMA_UNMAP, &request.encode(), &[])?;
        self.mappings.clear();
        Ok(())
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        let request = DeviceInfo {
            argsz: DeviceInfo::BYTES as u32,
            ..DeviceInfo::default()
        };
        let (reply, _) = self.request(cmd::DEVICE_GET_INFO, &request.encode(), &[])?;
        DeviceInfo::decode(&reply).map_err(|_| ClientError::Protocol("short GET_INFO reply"))
    }

    /// DEVICE_GET_REGION_INFO, retrying with room for the capabilities.
    pub fn region_info(&mut self, index: u32) -> Result<Region, ClientError> {
        let mut argsz = RegionInfoWire::BYTES as u32;
        loop {
            let request = RegionInfoWire {
                argsz,
                index,
                ..RegionInfoWire::default()
            };
            let (reply, mut fds) =
                self.request(cmd::DEVICE_GET_REGION_INFO, &request.encode(), &[])?;
            let info = RegionInfoWire::decode(&reply)
                .map_err(|_| ClientError::Protocol("short region info"))?;
            if info.argsz > argsz && argsz == RegionInfoWire::BYTES as u32 {
                argsz = info.argsz;
                continue;
            }
            let sparse_mmap = if info.cap_offset != 0 {
                decode_sparse_mmap(&reply, info.cap_offset as usize)
                    .map_err(|_| ClientError::Protocol("bad capability"))?
            } else {
                Vec::new()
            };
            return Ok(Region {
                info,
                sparse_mmap,
                fd: fds.pop(),
            });
        }
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfoWire, ClientError> {
        let request = IrqInfoWire {
            argsz: IrqInfoWire::BYTES as u32,
            index,
            ..IrqInfoWire::default()
        };
        let (reply, _) = self.request(cmd::DEVICE_GET_IRQ_INFO, &request.encode(), &[])?;
        IrqInfoWire::decode(&reply).map_err(|_| ClientError::Protocol("short IRQ info"))
    }

    /// DEVICE_SET_IRQS with eventfds for vectors `[start, start + fds.len())` of `index`.
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let request = SetIrqs {
            argsz: SetIrqs::BYTES as u32,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count: fds.len() as u32,
        };
        self.request(cmd::DEVICE_SET_IRQS, &request.encode(), fds)
            .map(|_| ())
    }

    /// REGION_READ into `out`.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        let request = RegionAccess {
            offset,
            region,
            count: out.len() as u32,
        };
        let (reply, _) = self.request(cmd::REGION_READ, &request.encode(), &[])?;
        let data = reply
            .get(RegionAccess::BYTES..)
            .filter(|d| d.len() == out.len())
            .ok_or(ClientError::Protocol("short REGION_READ reply"))?;
        out.copy_from_slice(data);
        Ok(())
    }

    /// REGION_WRITE of `data`.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let mut payload = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        }
        .encode();
        payload.extend_from_slice(data);
        self.request(cmd::REGION_WRITE, &payload, &[]).map(|_| ())
    }

    /// Reads a 64-bit register of region `region`.
    pub fn read_u64(&mut self, region: u32, offset: u64) -> Result<u64, ClientError> {
        let mut out = [0u8; 8];
        self.region_read(region, offset, &mut out)?;
        Ok(u64::from_le_bytes(out))
    }

    /// Writes a 64-bit register of region `region`.
    pub fn write_u64(&mut self, region: u32, offset: u64, value: u64) -> Result<(), ClientError> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    /// DEVICE_RESET: the device is RUNNING afterwards, with logging stopped.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.request(cmd::DEVICE_RESET, &[], &[])?;
        self.logging_page_size = None;
        Ok(())
    }

    /// DEVICE_FEATURE with a raw feature payload (argsz, flags, data); returns the reply's.
    pub fn device_feature(&mut self, request: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.request(cmd::DEVICE_FEATURE, request, &[])
            .map(|(reply, _)| reply)
    }

    /// Whether the device supports DMA logging.
    pub fn probe_dma_logging(&mut self) -> Result<bool, ClientError> {
        match self.device_feature(&feature_request(
            8,
            FEATURE_DMA_LOGGING_START | FEATURE_SET | FEATURE_PROBE,
            &[],
        )) {
            Ok(_) => Ok(true),
            Err(ClientError::Refused {
                errno: libc::ENOTTY,
                ..
            }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// START with raw ranges (empty: log all DMA-mapped space); returns the chosen page size.
    pub fn start_logging(
        &mut self,
        ranges: &[LoggingRange],
        page_size: u64,
    ) -> Result<u64, ClientError> {
        let payload = UserLoggingControl::encode(page_size, ranges);
        let request = feature_request(
            (FEATURE_HEADER_BYTES + payload.len()) as u32,
            FEATURE_DMA_LOGGING_START | FEATURE_SET,
            &payload,
        );
        let reply = self.device_feature(&request)?;
        let chosen = dmalog::uapi::read_u64(&reply, FEATURE_HEADER_BYTES)
            .map_err(|_| ClientError::Protocol("short START reply"))?;
        // Callers divide by it and shift by its log: only a power of two is a page size.
        if !chosen.is_power_of_two() {
            return Err(ClientError::Protocol(
                "START reply: page size not a power of two",
            ));
        }
        self.logging_page_size = Some(chosen);
        Ok(chosen)
    }

    /// Sends one REPORT request for `[iova, iova+length)` whose bitmap is `bitmap_words`
    /// long; returns its message id.
    fn send_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap_words: usize,
    ) -> Result<u16, ClientError> {
        let argsz = (FEATURE_HEADER_BYTES + USER_REPORT_BYTES + bitmap_words * 8) as u32;
        let request = feature_request(
            argsz,
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            &UserLoggingReport {
                iova,
                length,
                page_size,
            }
            .encode(),
        );
        self.send_command(cmd::DEVICE_FEATURE, &request, &[])
    }

    /// Takes the reply to REPORT `id` and ORs its bitmap into `words`.
    fn take_report(&mut self, id: u16, words: &mut [u64]) -> Result<(), ClientError> {
        // Where the caller's bitmap is still all zeros (a fresh bitmap, the usual case), ORing
        // the reply in is a copy: the kernel writes the bitmap straight into the caller's
        // words, with no pass over a receive buffer. (The feature header and the echoed
        // request before it are not checked on either path.)
        // (The wire's bitmap is little-endian words: only there are they the host's bytes.)
        let fresh = cfg!(target_endian = "little")
            && words
                .chunks(512)
                .all(|chunk| chunk.iter().fold(0, |acc, &word| acc | word) == 0);
        let reply = if fresh {
            let mut prefix = [0u8; FEATURE_HEADER_BYTES + USER_REPORT_BYTES];
            let direct = dmalog::tracker::words_as_bytes(words);
            self.await_reply_into(cmd::DEVICE_FEATURE, id, &mut prefix, direct)?
        } else {
            Some(self.await_reply(cmd::DEVICE_FEATURE, id)?)
        };
        let Some((reply, _)) = reply else {
            return Ok(());
        };
        let bitmap = reply
            .get(FEATURE_HEADER_BYTES + USER_REPORT_BYTES..)
            .ok_or(ClientError::Protocol("short REPORT reply"))?;
        if bitmap.len() != words.len() * 8 {
            return Err(ClientError::Protocol("REPORT bitmap of the wrong size"));
        }
        for (word, bytes) in words.iter_mut().zip(bitmap.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            *word |= u64::from_le_bytes(le);
        }
        self.transport.recycle(reply);
        Ok(())
    }
}

/// REPORT requests a split report keeps in flight: the server builds the next part while
/// this side copies the last one. Small, so that the requests always fit in the socket's
/// buffer while the server blocks on sending a reply.
const REPORT_PIPELINE_DEPTH: usize = 4;

impl DirtyTracker for Client {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(self.probe_dma_logging()?)
    }

    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        let raw: Vec<LoggingRange> = ranges.iter().map(|r| LoggingRange::from(*r)).collect();
        Ok(self.start_logging(&raw, page_size)?)
    }

    /// Splits reports whose reply would exceed `max_data_xfer_size` at 64-page boundaries.
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        let (iova, length) = (range.iova(), range.length());
        let need_words = checked_report_words(length, page_size, bitmap.len())?;
        let room_words = (self.max_data_xfer_size as u64)
            .saturating_sub((FEATURE_HEADER_BYTES + USER_REPORT_BYTES) as u64)
            / 8;
        let chunk_pages = room_words.max(1).saturating_mul(64);
        let chunk_bytes = chunk_pages.saturating_mul(page_size);
        // Pipelined: up to REPORT_PIPELINE_DEPTH parts in flight. After a refusal no more
        // parts are sent; the ones in flight are still taken so the stream stays in step.
        let mut in_flight = std::collections::VecDeque::with_capacity(REPORT_PIPELINE_DEPTH);
        let mut refused: Option<ClientError> = None;
        let mut done = 0u64;
        while done < length || !in_flight.is_empty() {
            if done < length && refused.is_none() && in_flight.len() < REPORT_PIPELINE_DEPTH {
                let part = chunk_bytes.min(length - done);
                let first_word = (done / page_size / 64) as usize;
                let words = report_words(part, page_size)? as usize;
                let id = self.send_report(iova + done, part, page_size, words)?;
                in_flight.push_back((id, first_word, words));
                done += part;
                continue;
            }
            let Some((id, first_word, words)) = in_flight.pop_front() else {
                break; // refused, nothing left in flight
            };
            match self.take_report(id, &mut bitmap[first_word..first_word + words]) {
                Ok(()) => {}
                Err(err @ ClientError::Refused { .. }) => {
                    refused.get_or_insert(err);
                }
                Err(err) => return Err(err.into()),
            }
        }
        if let Some(err) = refused {
            return Err(err.into());
        }
        // Pages this client wrote for the server (DMA_WRITE messages) are dirty too.
        let bytes = dmalog::tracker::words_as_bytes(&mut bitmap[..need_words as usize]);
        let mut merged = dmalog::IovaBitmap::new(iova, length, page_size, bytes)?;
        for mapping in &self.mappings {
            mapping.writes.read_and_clear(iova, length, &mut merged);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        self.logging_page_size = None;
        self.device_feature(&feature_request(
            8,
            FEATURE_DMA_LOGGING_STOP | FEATURE_SET,
            &[],
        ))?;
        Ok(())
    }
}

impl MigrationDevice for Client {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        let reply =
            self.device_feature(&feature_request(16, FEATURE_MIGRATION | FEATURE_GET, &[]))?;
        Ok(dmalog::uapi::read_u64(&reply, FEATURE_HEADER_BYTES)
            .map_err(|_| ClientError::Protocol("short MIGRATION reply"))?)
    }

    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        let reply = self.device_feature(&feature_request(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_GET,
            &[],
        ))?;
        let state = MigDeviceStatePayload::decode(&reply[FEATURE_HEADER_BYTES.min(reply.len())..])
            .map_err(|_| ClientError::Protocol("short state reply"))?;
        Ok(DeviceState::from_u32(state.device_state)
            .ok_or(ClientError::Protocol("unknown state"))?)
    }

    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        let payload = MigDeviceStatePayload {
            device_state: state as u32,
            data_fd: -1,
        }
        .encode();
        self.device_feature(&feature_request(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            &payload,
        ))?;
        Ok(())
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        let size = buf.len().min(self.max_data_xfer_size as usize) as u32;
        let request = MigData {
            argsz: MigData::BYTES as u32 + size,
            size,
        };
        let (reply, _) = self.request(cmd::MIG_DATA_READ, &request.encode(), &[])?;
        let header = MigData::decode(&reply)
            .map_err(|_| ClientError::Protocol("short MIG_DATA_READ reply"))?;
        // `size` bytes of data; a server may pad the reply to the requested length.
        let data = reply
            .get(MigData::BYTES..MigData::BYTES + header.size as usize)
            .filter(|data| data.len() <= buf.len())
            .ok_or(ClientError::Protocol("MIG_DATA_READ size mismatch"))?;
        buf[..data.len()].copy_from_slice(data);
        Ok(data.len())
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        for chunk in data.chunks(self.max_data_xfer_size as usize) {
            let mut payload = MigData {
                argsz: (MigData::BYTES + chunk.len()) as u32,
                size: chunk.len() as u32,
            }
            .encode();
            payload.extend_from_slice(chunk);
            self.request(cmd::MIG_DATA_WRITE, &payload, &[])?;
        }
        Ok(())
    }

    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        Ok(None) // vfio-user has no PRECOPY_INFO or MIG_DATA_SIZE
    }
}
