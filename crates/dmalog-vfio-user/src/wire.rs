//! The vfio-user wire format (SPEC 4; QEMU `docs/interop/vfio-user.rst`): the 16-byte
//! header, command numbers, and typed payloads decoded from untrusted bytes with errors,
//! never panics. All fields little-endian, packed.

use dmalog::uapi::{read_u32, read_u64, DecodeError};

/// A fixed-layout field of a payload: a little-endian integer.
trait WireInt: Sized {
    const BYTES: usize;
    fn read(bytes: &[u8], at: usize) -> Result<Self, DecodeError>;
    fn put(self, out: &mut Vec<u8>);
}

impl WireInt for u32 {
    const BYTES: usize = 4;
    fn read(bytes: &[u8], at: usize) -> Result<Self, DecodeError> {
        read_u32(bytes, at)
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl WireInt for u64 {
    const BYTES: usize = 8;
    fn read(bytes: &[u8], at: usize) -> Result<Self, DecodeError> {
        read_u64(bytes, at)
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// A packed little-endian payload struct whose fields are listed once: the struct, its
/// size on the wire (checked against the fields at compile time), `decode` (an error when
/// the bytes are short, never a panic) and `encode`, in field order.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident [$bytes:literal] {
            $( $(#[$field_meta:meta])* $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// Bytes on the wire.
            pub const BYTES: usize = $bytes;

            /// Decodes the first [`Self::BYTES`] of `b`.
            #[allow(unused_assignments)] // the offset after the last field
            pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
                let mut at = 0;
                Ok($name {
                    $( $field: {
                        let value = <$ty as WireInt>::read(b, at)?;
                        at += <$ty as WireInt>::BYTES;
                        value
                    }, )*
                })
            }

            /// Encodes into [`Self::BYTES`] bytes.
            pub fn encode(&self) -> Vec<u8> {
                let mut out = Vec::with_capacity(Self::BYTES);
                $( WireInt::put(self.$field, &mut out); )*
                out
            }
        }

        const _: () = assert!(0 $(+ <$ty as WireInt>::BYTES)* == $bytes);
    };
}

/// Bytes of the message header.
pub const HEADER_BYTES: usize = 16;

/// Command numbers.
pub mod cmd {
    /// Version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// Map guest memory for DMA.
    pub const DMA_MAP: u16 = 2;
    /// Unmap it.
    pub const DMA_UNMAP: u16 = 3;
    /// Device info.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// Region info.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// Region I/O fds (not offered).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// IRQ info.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// IRQ eventfds.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Region read.
    pub const REGION_READ: u16 = 9;
    /// Region write.
    pub const REGION_WRITE: u16 = 10;
    /// Server to client: read guest memory.
    pub const DMA_READ: u16 = 11;
    /// Server to client: write guest memory.
    pub const DMA_WRITE: u16 = 12;
    /// Device reset.
    pub const DEVICE_RESET: u16 = 13;
    /// Legacy dirty pages (answered ENOTSUP).
    pub const DIRTY_PAGES: u16 = 14;
    /// Several region writes in one message.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// DEVICE_FEATURE (migration, DMA logging).
    pub const DEVICE_FEATURE: u16 = 16;
    /// Migration data read.
    pub const MIG_DATA_READ: u16 = 17;
    /// Migration data write.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flags: message type mask.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Type: command.
pub const TYPE_COMMAND: u32 = 0;
/// Type: reply.
pub const TYPE_REPLY: u32 = 1;
/// No reply wanted.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// The reply is an error (`error_no` set).
pub const FLAG_ERROR: u32 = 0x20;

/// The message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Matches a reply to its command.
    pub msg_id: u16,
    /// The command.
    pub cmd: u16,
    /// Bytes of the whole message, header included.
    pub msg_size: u32,
    /// Type and flags.
    pub flags: u32,
    /// Errno of an error reply.
    pub error_no: u32,
}

impl Header {
    /// The header of command `cmd` with id `msg_id` (`msg_size` is filled in on sending).
    pub fn command(msg_id: u16, cmd: u16) -> Self {
        Header {
            msg_id,
            cmd,
            flags: TYPE_COMMAND,
            ..Header::default()
        }
    }

    /// The header of a successful reply to `command`.
    pub fn reply_to(command: &Header) -> Self {
        Header {
            msg_id: command.msg_id,
            cmd: command.cmd,
            flags: TYPE_REPLY,
            ..Header::default()
        }
    }

    /// The header of an error reply to `command`, carrying `errno`.
    pub fn error_reply_to(command: &Header, errno: i32) -> Self {
        Header {
            flags: TYPE_REPLY | FLAG_ERROR,
            error_no: errno as u32,
            ..Header::reply_to(command)
        }
    }

    /// Decodes 16 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(Header {
            msg_id: u16::from_le_bytes([
                *bytes
                    .first()
                    .ok_or(DecodeError::Truncated { need: 16, have: 0 })?,
                bytes.get(1).copied().unwrap_or(0),
            ]),
            cmd: u16::from_le_bytes([
                bytes.get(2).copied().unwrap_or(0),
                bytes.get(3).copied().unwrap_or(0),
            ]),
            msg_size: read_u32(bytes, 4)?,
            flags: read_u32(bytes, 8)?,
            error_no: read_u32(bytes, 12)?,
        })
    }

    /// Encodes 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        out[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        out[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error_no.to_le_bytes());
        out
    }

    /// The message type (`TYPE_COMMAND`, `TYPE_REPLY`).
    pub fn kind(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }
}

/// A little-endian writer for payloads.
#[derive(Debug, Default)]
pub struct Payload(pub Vec<u8>);

impl Payload {
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// DMA_MAP flags: device may read.
pub const DMA_FLAG_READ: u32 = 1;
/// DMA_MAP flags: device may write.
pub const DMA_FLAG_WRITE: u32 = 2;
/// DMA_UNMAP flags: legacy dirty bitmap (refused).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1;
/// DMA_UNMAP flags: unmap everything.
pub const DMA_UNMAP_FLAG_ALL: u32 = 2;

wire_struct! {
    /// DMA_MAP request (32 bytes).
    pub struct DmaMap [32] {
        /// 32.
        argsz: u32,
        /// `DMA_FLAG_*` (libvfio-user adds MMAP 4, FILE_IO 8: accepted).
        flags: u32,
        /// Offset into the fd.
        offset: u64,
        /// IOVA.
        addr: u64,
        /// Bytes.
        size: u64,
    }
}

wire_struct! {
    /// DMA_UNMAP request and reply (24 bytes).
    pub struct DmaUnmap [24] {
        /// 24.
        argsz: u32,
        /// `DMA_UNMAP_FLAG_*`.
        flags: u32,
        /// IOVA.
        addr: u64,
        /// Bytes.
        size: u64,
    }
}

wire_struct! {
    /// DEVICE_GET_INFO reply (16 bytes).
    pub struct DeviceInfo [16] {
        /// 16.
        argsz: u32,
        /// `DEVICE_FLAGS_*`.
        flags: u32,
        /// Regions.
        num_regions: u32,
        /// IRQ indexes.
        num_irqs: u32,
    }
}

/// Region info capability id: sparse mmap areas.
pub const CAP_SPARSE_MMAP: u16 = 1;

wire_struct! {
    /// DEVICE_GET_REGION_INFO request/reply header (32 bytes); capabilities follow.
    pub struct RegionInfoWire [32] {
        /// Request: room for the reply; reply: the full size.
        argsz: u32,
        /// `REGION_*`.
        flags: u32,
        /// Region index.
        index: u32,
        /// Offset of the first capability (0: none).
        cap_offset: u32,
        /// Bytes.
        size: u64,
        /// Offset for mmap of the region fd.
        offset: u64,
    }
}

/// Encodes a sparse mmap capability (header id/version/next, nr_areas, reserved, areas).
pub fn sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut p = Payload::default()
        .u16(CAP_SPARSE_MMAP)
        .u16(1)
        .u32(0)
        .u32(areas.len() as u32)
        .u32(0);
    for &(offset, size) in areas {
        p = p.u64(offset).u64(size);
    }
    p.0
}

/// Decodes a sparse mmap capability at `offset` of a region info reply.
pub fn decode_sparse_mmap(reply: &[u8], offset: usize) -> Result<Vec<(u64, u64)>, DecodeError> {
    let count = read_u32(reply, offset + 8)? as usize;
    let mut areas = Vec::with_capacity(count.min(64));
    for i in 0..count {
        let at = offset + 16 + 16 * i;
        areas.push((read_u64(reply, at)?, read_u64(reply, at + 8)?));
    }
    Ok(areas)
}

wire_struct! {
    /// DEVICE_GET_IRQ_INFO request/reply (16 bytes).
    pub struct IrqInfoWire [16] {
        /// 16.
        argsz: u32,
        /// `IRQ_INFO_*`.
        flags: u32,
        /// IRQ index.
        index: u32,
        /// Vectors.
        count: u32,
    }
}

/// SET_IRQS flags: no data (with count 0: disable the index).
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// SET_IRQS flags: bool data.
pub const IRQ_SET_DATA_BOOL: u32 = 2;
/// SET_IRQS flags: eventfds in the message's fds.
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// SET_IRQS flags: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 8;
/// SET_IRQS flags: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
/// SET_IRQS flags: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;

wire_struct! {
    /// DEVICE_SET_IRQS request (20 bytes).
    pub struct SetIrqs [20] {
        /// 20 (+ data).
        argsz: u32,
        /// `IRQ_SET_*`.
        flags: u32,
        /// IRQ index.
        index: u32,
        /// First vector.
        start: u32,
        /// Vectors.
        count: u32,
    }
}

wire_struct! {
    /// REGION_READ/REGION_WRITE header (16 bytes); data follows.
    pub struct RegionAccess [16] {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// Bytes.
        count: u32,
    }
}

wire_struct! {
    /// DMA_READ/DMA_WRITE header (server to client, 16 bytes); data follows. `count` is a u64,
    /// as libvfio-user sends it.
    pub struct DmaAccess [16] {
        /// IOVA.
        addr: u64,
        /// Bytes.
        count: u64,
    }
}

/// Waits until `fd` is readable or `timeout` passes; Ok(true) when readable.
pub fn wait_readable(
    fd: impl std::os::fd::AsFd,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// One entry of REGION_WRITE_MULTI: offset, region, count (at most 8), 8 data bytes.
pub const WRITE_MULTI_ENTRY_BYTES: usize = 24;
/// Most entries in one REGION_WRITE_MULTI.
pub const WRITE_MULTI_MAX_ENTRIES: u64 = 8;

wire_struct! {
    /// MIG_DATA_READ/WRITE header (8 bytes); data follows.
    pub struct MigData [8] {
        /// Request: room for the reply.
        argsz: u32,
        /// Bytes.
        size: u32,
    }
}

/// VERSION payload: major, minor, then optional NUL-terminated JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// Major (0).
    pub major: u16,
    /// Minor (up to 2).
    pub minor: u16,
    /// `{"capabilities": {...}}`, if sent.
    pub json: Option<serde_json::Value>,
}

/// Why a VERSION payload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Shorter than 4 bytes.
    #[error("VERSION payload shorter than 4 bytes")]
    Truncated,
    /// JSON without its trailing NUL, not UTF-8, or not an object.
    #[error("VERSION capabilities are not NUL-terminated JSON: {0}")]
    BadJson(String),
}

impl Version {
    /// Decodes a VERSION payload.
    pub fn decode(b: &[u8]) -> Result<Self, VersionError> {
        if b.len() < 4 {
            return Err(VersionError::Truncated);
        }
        let major = u16::from_le_bytes([b[0], b[1]]);
        let minor = u16::from_le_bytes([b[2], b[3]]);
        let rest = &b[4..];
        let json = if rest.is_empty() {
            None
        } else {
            let Some((&0, text)) = rest.split_last() else {
                return Err(VersionError::BadJson("missing trailing NUL".into()));
            };
            let text =
                std::str::from_utf8(text).map_err(|e| VersionError::BadJson(e.to_string()))?;
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| VersionError::BadJson(e.to_string()))?;
            if !value.is_object() {
                return Err(VersionError::BadJson("not an object".into()));
            }
            Some(value)
        };
        Ok(Version { major, minor, json })
    }

    /// Encodes (JSON with its trailing NUL).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Payload::default().u16(self.major).u16(self.minor);
        if let Some(json) = &self.json {
            p = p.bytes(json.to_string().as_bytes()).bytes(&[0]);
        }
        p.0
    }

    /// A capability as u64, if present and a number.
    pub fn capability(&self, name: &str) -> Option<u64> {
        self.json.as_ref()?.get("capabilities")?.get(name)?.as_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_truncations() {
        let map = DmaMap {
            argsz: 32,
            flags: 3,
            offset: 4096,
            addr: 1 << 30,
            size: 1 << 20,
        };
        let bytes = map.encode();
        assert_eq!(DmaMap::decode(&bytes).unwrap(), map);
        for len in 0..bytes.len() {
            assert!(DmaMap::decode(&bytes[..len]).is_err());
        }
        let header = Header {
            msg_id: 7,
            cmd: cmd::DMA_MAP,
            msg_size: 48,
            flags: 0,
            error_no: 0,
        };
        assert_eq!(Header::decode(&header.encode()).unwrap(), header);
        assert!(Header::decode(&[1, 2, 3]).is_err());
        let caps = sparse_mmap_cap(&[(0, 0x1000), (0x2000, 0x1000)]);
        assert_eq!(
            decode_sparse_mmap(&caps, 0).unwrap(),
            vec![(0, 0x1000), (0x2000, 0x1000)]
        );
        assert!(decode_sparse_mmap(&caps[..20], 0).is_err());
    }

    #[test]
    fn version_json_rules() {
        let v = Version {
            major: 0,
            minor: 2,
            json: Some(serde_json::json!({"capabilities": {"max_msg_fds": 8}})),
        };
        let bytes = v.encode();
        assert_eq!(
            Version::decode(&bytes).unwrap().capability("max_msg_fds"),
            Some(8)
        );
        assert!(
            Version::decode(&bytes[..bytes.len() - 1]).is_err(),
            "missing NUL"
        );
        assert!(
            Version::decode(b"\0\0\x02\0[1]\0").is_err(),
            "not an object"
        );
        assert!(Version::decode(b"\0\0").is_err());
        // Unknown keys (libvfio-user's migration.pgsize) are fine.
        let lvu = b"\0\0\x02\0{\"capabilities\":{\"migration\":{\"pgsize\":4096},\"max_data_xfer_size\":1024}}\0";
        assert_eq!(
            Version::decode(lvu)
                .unwrap()
                .capability("max_data_xfer_size"),
            Some(1024)
        );
    }
}
