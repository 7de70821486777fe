//! The vfio-user client: a VMM's handle on a device server. It negotiates, maps guest
//! memory with fds, reads regions and IRQ info, and is both a [`DirtyTracker`] (DMA logging
//! with REPORTs larger than one message split transparently into the caller's buffer) and a
//! [`MigrationDevice`].
//!
//! One module per concern, like the server's: this one connects, negotiates and exchanges
//! messages, and asks for device, region and IRQ information; `dma` maps guest memory and
//! serves the server's DMA requests, `logging` is the DMA logging side, `migration` the
//! migration side.

mod dma;
mod logging;
mod migration;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use dmalog::error::LogError;
use dmalog::TrackerError;
#[cfg(doc)]
use dmalog::{DirtyTracker, MigrationDevice};

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
    /// next request's, so every later request fails instead, with this errno (ETIMEDOUT
    /// after a timeout, the send's own after a failed send: a server that is gone is
    /// not reported as a silent one).
    out_of_step: Option<i32>,
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
            out_of_step: None,
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

    /// A send that failed (part of the message may have gone): the connection is out of
    /// step from here, and later requests fail as this one did.
    pub(crate) fn send_failed(&mut self, err: std::io::Error) -> ClientError {
        // The transport refuses a message too large (or with too many fds) before sending
        // any of it: the connection is still in step.
        if err.raw_os_error() == Some(libc::E2BIG) {
            return err.into();
        }
        if err.kind() == std::io::ErrorKind::WouldBlock {
            self.out_of_step = Some(libc::ETIMEDOUT);
            return Self::timed_out();
        }
        self.out_of_step = Some(err.raw_os_error().unwrap_or(libc::EPIPE));
        err.into()
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
                self.out_of_step = Some(libc::ETIMEDOUT);
                Err(Self::timed_out())
            }
            Err(RecvError::Io(err)) if err.kind() == std::io::ErrorKind::WouldBlock => {
                self.out_of_step = Some(libc::ETIMEDOUT);
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
        if let Some(errno) = self.out_of_step {
            return Err(ClientError::Io(std::io::Error::from_raw_os_error(errno)));
        }
        if let Err(err) = self.transport.send(header, payload, fds) {
            // Part of the message may have gone: nothing after it can be trusted.
            return Err(self.send_failed(err));
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
}
