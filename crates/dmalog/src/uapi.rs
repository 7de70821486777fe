//! The DMA logging uAPI: kernel structs and constants (SPEC section 2) and the vfio-user
//! inline forms, with safe encode/decode from byte slices of any length and alignment.
//!
//! Decoding never panics and never reads past the slice: a short slice is a
//! [`DecodeError`]. All values are little-endian (the kernel and vfio-user both use host
//! order, and every supported host is little-endian).

/// `VFIO_TYPE`, the ioctl type byte `';'`.
pub const VFIO_TYPE: u8 = b';';
/// `VFIO_BASE`, the first VFIO ioctl number.
pub const VFIO_BASE: u32 = 100;

/// Feature index mask of the `flags` word.
pub const FEATURE_MASK: u32 = 0xffff;
/// Read access.
pub const FEATURE_GET: u32 = 1 << 16;
/// Write access.
pub const FEATURE_SET: u32 = 1 << 17;
/// Ask whether the feature (and the access in GET/SET) is supported.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// Bits 19..31 are reserved and must be zero.
pub const FEATURE_RESERVED_MASK: u32 = !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE);

/// Feature index: migration capabilities (GET).
pub const FEATURE_MIGRATION: u32 = 1;
/// Feature index: migration device state (GET/SET).
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature index: start DMA logging (SET).
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature index: stop DMA logging (SET).
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature index: report and clear the DMA log (GET).
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Feature index: size of the pending migration data (GET).
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;
/// Feature index: pre-copy info, version 2.
pub const FEATURE_MIG_PRECOPY_INFO_V2: u32 = 12;

/// MIGRATION flag: STOP_COPY supported.
pub const MIGRATION_STOP_COPY: u64 = 1;
/// MIGRATION flag: P2P states supported.
pub const MIGRATION_P2P: u64 = 2;
/// MIGRATION flag: PRE_COPY supported.
pub const MIGRATION_PRE_COPY: u64 = 4;

/// Size of the feature header (`argsz`, `flags`) in bytes.
pub const FEATURE_HEADER_BYTES: usize = 8;
/// Size of the kernel START payload in bytes.
pub const KERNEL_CONTROL_BYTES: usize = 24;
/// Size of one `{iova, length}` range in bytes.
pub const RANGE_BYTES: usize = 16;
/// Size of the kernel REPORT payload in bytes.
pub const KERNEL_REPORT_BYTES: usize = 32;
/// Size of the vfio-user START payload before its inline ranges, in bytes.
pub const USER_CONTROL_BYTES: usize = 16;
/// Size of the vfio-user REPORT request payload (before the reply's bitmap), in bytes.
pub const USER_REPORT_BYTES: usize = 24;

/// A decode of untrusted bytes failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The slice ends before the structure does.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the structure needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// Reads a little-endian u32 at `offset`, any alignment.
pub fn read_u32(bytes: &[u8], offset: usize) -> Result<u32, DecodeError> {
    let end = offset.checked_add(4).ok_or(DecodeError::Truncated {
        need: usize::MAX,
        have: bytes.len(),
    })?;
    match bytes.get(offset..end) {
        Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(DecodeError::Truncated {
            need: end,
            have: bytes.len(),
        }),
    }
}

/// Reads a little-endian u64 at `offset`, any alignment.
pub fn read_u64(bytes: &[u8], offset: usize) -> Result<u64, DecodeError> {
    let end = offset.checked_add(8).ok_or(DecodeError::Truncated {
        need: usize::MAX,
        have: bytes.len(),
    })?;
    match bytes.get(offset..end) {
        Some(b) => {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            Ok(u64::from_le_bytes(word))
        }
        None => Err(DecodeError::Truncated {
            need: end,
            have: bytes.len(),
        }),
    }
}

/// Writes a little-endian u32 at `offset`; a slice too short is an error.
pub fn write_u32(bytes: &mut [u8], offset: usize, value: u32) -> Result<(), DecodeError> {
    let have = bytes.len();
    let end = offset.checked_add(4).ok_or(DecodeError::Truncated {
        need: usize::MAX,
        have,
    })?;
    let dst = bytes
        .get_mut(offset..end)
        .ok_or(DecodeError::Truncated { need: end, have })?;
    dst.copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// Writes a little-endian u64 at `offset`; a slice too short is an error.
pub fn write_u64(bytes: &mut [u8], offset: usize, value: u64) -> Result<(), DecodeError> {
    let have = bytes.len();
    let end = offset.checked_add(8).ok_or(DecodeError::Truncated {
        need: usize::MAX,
        have,
    })?;
    let dst = bytes
        .get_mut(offset..end)
        .ok_or(DecodeError::Truncated { need: end, have })?;
    dst.copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// `struct vfio_device_feature`: the 8-byte header of every DEVICE_FEATURE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureHeader {
    /// Bytes of header plus payload (vfio-user: the largest reply the sender accepts).
    pub argsz: u32,
    /// Feature index (bits 0..15) and access flags.
    pub flags: u32,
}

impl FeatureHeader {
    /// Decodes the header from the first 8 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(FeatureHeader {
            argsz: read_u32(bytes, 0)?,
            flags: read_u32(bytes, 4)?,
        })
    }

    /// Encodes the header into 8 bytes.
    pub fn encode(&self) -> [u8; FEATURE_HEADER_BYTES] {
        let mut out = [0u8; FEATURE_HEADER_BYTES];
        out[0..4].copy_from_slice(&self.argsz.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out
    }

    /// The feature index, `flags & 0xffff`.
    pub fn index(&self) -> u32 {
        self.flags & FEATURE_MASK
    }

    /// Whether GET is set.
    pub fn is_get(&self) -> bool {
        self.flags & FEATURE_GET != 0
    }

    /// Whether SET is set.
    pub fn is_set(&self) -> bool {
        self.flags & FEATURE_SET != 0
    }

    /// Whether PROBE is set.
    pub fn is_probe(&self) -> bool {
        self.flags & FEATURE_PROBE != 0
    }
}

/// `struct vfio_device_feature_dma_logging_range`: one `[iova, iova+length)` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct LoggingRange {
    /// First IOVA of the range.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

impl LoggingRange {
    /// Decodes a range from 16 bytes at `offset`.
    pub fn decode_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError> {
        Ok(LoggingRange {
            iova: read_u64(bytes, offset)?,
            length: read_u64(bytes, offset.saturating_add(8))?,
        })
    }

    /// Encodes the range into 16 bytes.
    pub fn encode(&self) -> [u8; RANGE_BYTES] {
        let mut out = [0u8; RANGE_BYTES];
        out[0..8].copy_from_slice(&self.iova.to_le_bytes());
        out[8..16].copy_from_slice(&self.length.to_le_bytes());
        out
    }
}

/// `struct vfio_device_feature_dma_logging_control` (kernel dialect, 24 bytes): the
/// ranges are behind a user pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelLoggingControl {
    /// Page size hint on input, chosen page size on output, in bytes.
    pub page_size: u64,
    /// Number of ranges behind `ranges_addr`.
    pub num_ranges: u32,
    /// Must be ignored (the kernel does not check it).
    pub reserved: u32,
    /// User address of `num_ranges` x 16-byte ranges.
    pub ranges_addr: u64,
}

impl KernelLoggingControl {
    /// Decodes the control struct from the first 24 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(KernelLoggingControl {
            page_size: read_u64(bytes, 0)?,
            num_ranges: read_u32(bytes, 8)?,
            reserved: read_u32(bytes, 12)?,
            ranges_addr: read_u64(bytes, 16)?,
        })
    }

    /// Encodes the control struct into 24 bytes.
    pub fn encode(&self) -> [u8; KERNEL_CONTROL_BYTES] {
        let mut out = [0u8; KERNEL_CONTROL_BYTES];
        out[0..8].copy_from_slice(&self.page_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.num_ranges.to_le_bytes());
        out[12..16].copy_from_slice(&self.reserved.to_le_bytes());
        out[16..24].copy_from_slice(&self.ranges_addr.to_le_bytes());
        out
    }
}

/// `struct vfio_device_feature_dma_logging_report` (kernel dialect, 32 bytes): the
/// bitmap is behind a user pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelLoggingReport {
    /// First IOVA reported.
    pub iova: u64,
    /// Bytes reported.
    pub length: u64,
    /// Report page size in bytes (a power of two, at least 4096).
    pub page_size: u64,
    /// User address of the bitmap (`ceil(length / page_size)` bits).
    pub bitmap_addr: u64,
}

impl KernelLoggingReport {
    /// Decodes the report struct from the first 32 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(KernelLoggingReport {
            iova: read_u64(bytes, 0)?,
            length: read_u64(bytes, 8)?,
            page_size: read_u64(bytes, 16)?,
            bitmap_addr: read_u64(bytes, 24)?,
        })
    }

    /// Encodes the report struct into 32 bytes.
    pub fn encode(&self) -> [u8; KERNEL_REPORT_BYTES] {
        let mut out = [0u8; KERNEL_REPORT_BYTES];
        out[0..8].copy_from_slice(&self.iova.to_le_bytes());
        out[8..16].copy_from_slice(&self.length.to_le_bytes());
        out[16..24].copy_from_slice(&self.page_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.bitmap_addr.to_le_bytes());
        out
    }
}

/// The vfio-user START payload: `page_size u64, num_ranges u32, reserved u32` followed by
/// `num_ranges` inline ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLoggingControl<'a> {
    /// Page size hint in bytes.
    pub page_size: u64,
    /// Number of inline ranges (0: log all DMA-mapped space).
    pub num_ranges: u32,
    /// Ignored.
    pub reserved: u32,
    ranges_bytes: &'a [u8],
}

impl<'a> UserLoggingControl<'a> {
    /// Decodes the fixed part and borrows exactly `num_ranges` x 16 bytes of ranges.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let page_size = read_u64(bytes, 0)?;
        let num_ranges = read_u32(bytes, 8)?;
        let reserved = read_u32(bytes, 12)?;
        let need = (num_ranges as usize)
            .checked_mul(RANGE_BYTES)
            .and_then(|n| n.checked_add(USER_CONTROL_BYTES))
            .ok_or(DecodeError::Truncated {
                need: usize::MAX,
                have: bytes.len(),
            })?;
        let ranges_bytes = bytes
            .get(USER_CONTROL_BYTES..need)
            .ok_or(DecodeError::Truncated {
                need,
                have: bytes.len(),
            })?;
        Ok(UserLoggingControl {
            page_size,
            num_ranges,
            reserved,
            ranges_bytes,
        })
    }

    /// The inline ranges, in request order.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = LoggingRange> + 'a {
        let bytes = self.ranges_bytes;
        bytes.chunks_exact(RANGE_BYTES).map(|chunk| LoggingRange {
            iova: u64::from_le_bytes(chunk[0..8].try_into().unwrap_or_default()),
            length: u64::from_le_bytes(chunk[8..16].try_into().unwrap_or_default()),
        })
    }

    /// Encodes a START payload with inline ranges.
    pub fn encode(page_size: u64, ranges: &[LoggingRange]) -> Vec<u8> {
        let mut out = Vec::with_capacity(USER_CONTROL_BYTES + ranges.len() * RANGE_BYTES);
        out.extend_from_slice(&page_size.to_le_bytes());
        out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for range in ranges {
            out.extend_from_slice(&range.encode());
        }
        out
    }
}

/// The vfio-user REPORT request payload (24 bytes); the reply repeats it and appends the
/// bitmap as whole u64 words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserLoggingReport {
    /// First IOVA reported.
    pub iova: u64,
    /// Bytes reported.
    pub length: u64,
    /// Report page size in bytes (a power of two).
    pub page_size: u64,
}

impl UserLoggingReport {
    /// Decodes the request from the first 24 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(UserLoggingReport {
            iova: read_u64(bytes, 0)?,
            length: read_u64(bytes, 8)?,
            page_size: read_u64(bytes, 16)?,
        })
    }

    /// Encodes the request into 24 bytes.
    pub fn encode(&self) -> [u8; USER_REPORT_BYTES] {
        let mut out = [0u8; USER_REPORT_BYTES];
        out[0..8].copy_from_slice(&self.iova.to_le_bytes());
        out[8..16].copy_from_slice(&self.length.to_le_bytes());
        out[16..24].copy_from_slice(&self.page_size.to_le_bytes());
        out
    }
}

/// Migration device states (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DeviceState {
    /// The device failed a transition; only a reset leaves it.
    Error = 0,
    /// Stopped: no DMA, no state change.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, migration data being saved.
    StopCopy = 3,
    /// Stopped, migration data being loaded.
    Resuming = 4,
    /// Running without peer-to-peer DMA.
    RunningP2p = 5,
    /// Running, pre-copy data being saved.
    PreCopy = 6,
    /// Pre-copy without peer-to-peer DMA.
    PreCopyP2p = 7,
}

impl DeviceState {
    /// The state with this uAPI number, if any.
    pub fn from_u32(value: u32) -> Option<DeviceState> {
        Some(match value {
            0 => DeviceState::Error,
            1 => DeviceState::Stop,
            2 => DeviceState::Running,
            3 => DeviceState::StopCopy,
            4 => DeviceState::Resuming,
            5 => DeviceState::RunningP2p,
            6 => DeviceState::PreCopy,
            7 => DeviceState::PreCopyP2p,
            _ => return None,
        })
    }
}

/// `struct vfio_device_feature_mig_state` (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigDeviceStatePayload {
    /// The state (a [`DeviceState`] number).
    pub device_state: u32,
    /// Kernel: the data fd returned by the transition. vfio-user: unused (-1).
    pub data_fd: i32,
}

impl MigDeviceStatePayload {
    /// Decodes the payload from the first 8 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(MigDeviceStatePayload {
            device_state: read_u32(bytes, 0)?,
            data_fd: read_u32(bytes, 4)? as i32,
        })
    }

    /// Encodes the payload into 8 bytes.
    pub fn encode(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[0..4].copy_from_slice(&self.device_state.to_le_bytes());
        out[4..8].copy_from_slice(&(self.data_fd as u32).to_le_bytes());
        out
    }
}

/// Builds a whole DEVICE_FEATURE request: header (with `argsz`) followed by `payload`.
pub fn feature_request(argsz: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FEATURE_HEADER_BYTES + payload.len());
    out.extend_from_slice(&FeatureHeader { argsz, flags }.encode());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_reject_every_short_slice_and_accept_any_alignment() {
        let report = KernelLoggingReport {
            iova: 0x1000,
            length: 0x2000,
            page_size: 4096,
            bitmap_addr: 0xdead_b000,
        };
        let bytes = report.encode();
        for len in 0..bytes.len() {
            assert!(
                KernelLoggingReport::decode(&bytes[..len]).is_err(),
                "len {len}"
            );
        }
        // Misaligned copy: same value.
        let mut shifted = vec![0u8; 1 + bytes.len()];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(KernelLoggingReport::decode(&shifted[1..]).unwrap(), report);
    }

    #[test]
    fn user_control_borrows_exactly_its_ranges() {
        let ranges = [
            LoggingRange {
                iova: 0,
                length: 4096,
            },
            LoggingRange {
                iova: 8192,
                length: 4096,
            },
        ];
        let bytes = UserLoggingControl::encode(4096, &ranges);
        let control = UserLoggingControl::decode(&bytes).unwrap();
        assert_eq!(control.ranges().collect::<Vec<_>>(), ranges);
        assert!(UserLoggingControl::decode(&bytes[..bytes.len() - 1]).is_err());
        // A huge num_ranges is a clean error, not an overflow.
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            UserLoggingControl::decode(&huge),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn offsets_past_usize_are_errors() {
        assert!(read_u64(&[0u8; 8], usize::MAX - 3).is_err());
        assert!(read_u32(&[0u8; 8], usize::MAX).is_err());
        assert!(write_u64(&mut [0u8; 8], usize::MAX - 1, 1).is_err());
    }
}
