//! The DMA logging uAPI: kernel structs and constants (SPEC section 2) and the vfio-user
//! inline forms, with safe encode/decode from byte slices of any length and alignment.
//!
//! The kernel structs are `vfio-bindings`' own types (re-exported under the names dmalog
//! uses); [`UapiStruct`] gives each a codec whose field offsets come from the C layout
//! (`offset_of!`), so no layout is written down twice. Project-defined structs remain only
//! where the crate has none: the feature header (its binding carries the flexible `data[]`
//! member, so it is neither `Copy` nor a plain value) and the vfio-user inline forms.
//!
//! Decoding never panics and never reads past the slice: a short slice is a
//! [`DecodeError`]. All values are little-endian (the kernel and vfio-user both use host
//! order, and every supported host is little-endian).

use std::mem::{offset_of, size_of};

use vfio_bindings::bindings::vfio as vb;

pub use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_feature_mig_data_size,
    vfio_device_feature_migration, vfio_precopy_info, VFIO_BASE, VFIO_TYPE,
};

/// Feature index mask of the `flags` word.
pub const FEATURE_MASK: u32 = vb::VFIO_DEVICE_FEATURE_MASK;
/// Read access.
pub const FEATURE_GET: u32 = vb::VFIO_DEVICE_FEATURE_GET;
/// Write access.
pub const FEATURE_SET: u32 = vb::VFIO_DEVICE_FEATURE_SET;
/// Ask whether the feature (and the access in GET/SET) is supported.
pub const FEATURE_PROBE: u32 = vb::VFIO_DEVICE_FEATURE_PROBE;
/// Bits 19..31 are reserved and must be zero.
pub const FEATURE_RESERVED_MASK: u32 = !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE);

/// Feature index: migration capabilities (GET).
pub const FEATURE_MIGRATION: u32 = vb::VFIO_DEVICE_FEATURE_MIGRATION;
/// Feature index: migration device state (GET/SET).
pub const FEATURE_MIG_DEVICE_STATE: u32 = vb::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
/// Feature index: start DMA logging (SET).
pub const FEATURE_DMA_LOGGING_START: u32 = vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
/// Feature index: stop DMA logging (SET).
pub const FEATURE_DMA_LOGGING_STOP: u32 = vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
/// Feature index: report and clear the DMA log (GET).
pub const FEATURE_DMA_LOGGING_REPORT: u32 = vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
/// Feature index: size of the pending migration data (GET).
pub const FEATURE_MIG_DATA_SIZE: u32 = vb::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE;
/// Feature index: pre-copy info, version 2.
pub const FEATURE_MIG_PRECOPY_INFO_V2: u32 = vb::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2;

/// MIGRATION flag: STOP_COPY supported.
pub const MIGRATION_STOP_COPY: u64 = vb::VFIO_MIGRATION_STOP_COPY as u64;
/// MIGRATION flag: P2P states supported.
pub const MIGRATION_P2P: u64 = vb::VFIO_MIGRATION_P2P as u64;
/// MIGRATION flag: PRE_COPY supported.
pub const MIGRATION_PRE_COPY: u64 = vb::VFIO_MIGRATION_PRE_COPY as u64;

/// Size of the feature header (`argsz`, `flags`) in bytes.
pub const FEATURE_HEADER_BYTES: usize = size_of::<vb::vfio_device_feature>();
/// Size of the kernel START payload in bytes.
pub const KERNEL_CONTROL_BYTES: usize = size_of::<KernelLoggingControl>();
/// Size of one `{iova, length}` range in bytes.
pub const RANGE_BYTES: usize = size_of::<LoggingRange>();
/// Size of the kernel REPORT payload in bytes.
pub const KERNEL_REPORT_BYTES: usize = size_of::<KernelLoggingReport>();
/// Size of the vfio-user START payload before its inline ranges, in bytes: the kernel's
/// control without its `ranges` pointer.
pub const USER_CONTROL_BYTES: usize = offset_of!(KernelLoggingControl, ranges);
/// Size of the vfio-user REPORT request payload (before the reply's bitmap), in bytes.
pub const USER_REPORT_BYTES: usize = size_of::<UserLoggingReport>();

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

/// The byte range `offset..offset + width` of a slice of `len` bytes, or why it is not there.
fn span(len: usize, offset: usize, width: usize) -> Result<std::ops::Range<usize>, DecodeError> {
    let end = offset.checked_add(width).ok_or(DecodeError::Truncated {
        need: usize::MAX,
        have: len,
    })?;
    if end > len {
        return Err(DecodeError::Truncated {
            need: end,
            have: len,
        });
    }
    Ok(offset..end)
}

/// The `N` bytes at `offset`.
fn read_array<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], DecodeError> {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[span(bytes.len(), offset, N)?]);
    Ok(out)
}

/// Reads a little-endian u32 at `offset`, any alignment.
pub fn read_u32(bytes: &[u8], offset: usize) -> Result<u32, DecodeError> {
    read_array(bytes, offset).map(u32::from_le_bytes)
}

/// Reads a little-endian u64 at `offset`, any alignment.
pub fn read_u64(bytes: &[u8], offset: usize) -> Result<u64, DecodeError> {
    read_array(bytes, offset).map(u64::from_le_bytes)
}

/// Writes a little-endian u32 at `offset`; a slice too short is an error.
pub fn write_u32(bytes: &mut [u8], offset: usize, value: u32) -> Result<(), DecodeError> {
    let range = span(bytes.len(), offset, 4)?;
    bytes[range].copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// Writes a little-endian u64 at `offset`; a slice too short is an error.
pub fn write_u64(bytes: &mut [u8], offset: usize, value: u64) -> Result<(), DecodeError> {
    let range = span(bytes.len(), offset, 8)?;
    bytes[range].copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// `struct vfio_device_feature`: the 8-byte header of every DEVICE_FEATURE request (and of
/// vfio-user's). Project-defined: the binding ends in the flexible `data[]` member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct FeatureHeader {
    /// Bytes of header plus payload (vfio-user: the largest reply the sender accepts).
    pub argsz: u32,
    /// Feature index (bits 0..15) and access flags.
    pub flags: u32,
}

impl FeatureHeader {
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

/// `struct vfio_device_feature_dma_logging_range`: one `[iova, iova+length)` range (both
/// dialects; vfio-user puts them inline).
pub type LoggingRange = vb::vfio_device_feature_dma_logging_range;

/// `struct vfio_device_feature_dma_logging_control` (kernel dialect, 24 bytes): `page_size`
/// (hint in, chosen out, bytes), `num_ranges`, `__reserved` (ignored: the kernel does not
/// check it) and `ranges`, the user address of `num_ranges` x 16-byte ranges.
pub type KernelLoggingControl = vb::vfio_device_feature_dma_logging_control;

/// `struct vfio_device_feature_dma_logging_report` (kernel dialect, 32 bytes): `iova`,
/// `length` (bytes), `page_size` (a power of two, at least 4096) and `bitmap`, the user
/// address of `ceil(length / page_size)` bits.
pub type KernelLoggingReport = vb::vfio_device_feature_dma_logging_report;

/// `struct vfio_device_feature_mig_state` (8 bytes): `device_state` (a [`DeviceState`]
/// number) and `data_fd` (kernel: the data fd a transition returns; vfio-user: unused, -1).
pub type MigDeviceStatePayload = vb::vfio_device_feature_mig_state;

/// A field of a uAPI struct: read and written little-endian at a byte offset.
pub trait UapiField: Sized + Copy {
    /// Reads the field at `offset`.
    fn read_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError>;
    /// Writes the field at `offset` of a buffer known to hold it.
    fn write_at(self, bytes: &mut [u8], offset: usize);
}

impl UapiField for u32 {
    fn read_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError> {
        read_u32(bytes, offset)
    }
    fn write_at(self, bytes: &mut [u8], offset: usize) {
        bytes[offset..offset + 4].copy_from_slice(&self.to_le_bytes());
    }
}

impl UapiField for i32 {
    fn read_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError> {
        Ok(read_u32(bytes, offset)? as i32)
    }
    fn write_at(self, bytes: &mut [u8], offset: usize) {
        bytes[offset..offset + 4].copy_from_slice(&self.to_le_bytes());
    }
}

impl UapiField for u64 {
    fn read_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError> {
        read_u64(bytes, offset)
    }
    fn write_at(self, bytes: &mut [u8], offset: usize) {
        bytes[offset..offset + 8].copy_from_slice(&self.to_le_bytes());
    }
}

/// A fixed-size uAPI struct with a safe codec: every field at its C offset, little-endian,
/// from or into byte slices of any alignment. Implemented with [`uapi_struct!`](crate::uapi_struct).
pub trait UapiStruct: Sized {
    /// `sizeof` the C struct, in bytes.
    const BYTES: usize;
    /// The encoded struct, `[u8; BYTES]`.
    type Bytes: AsRef<[u8]> + AsMut<[u8]>;

    /// Decodes the struct starting at byte `offset` of `bytes`; fields are read in order, so
    /// a short slice reports the end of the first field it lacks.
    fn decode_at(bytes: &[u8], offset: usize) -> Result<Self, DecodeError>;

    /// Encodes the struct into `BYTES` bytes.
    fn encode(&self) -> Self::Bytes;

    /// Decodes the struct from the first `BYTES` bytes.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_at(bytes, 0)
    }

    /// The first `N` bytes of the encoding: an older kernel's shorter form of a struct that
    /// grew at its end (its size field set to `N` by the caller). `N > BYTES` does not
    /// compile.
    fn encode_prefix<const N: usize>(&self) -> [u8; N] {
        const { assert!(N <= Self::BYTES) };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.encode().as_ref()[..N]);
        out
    }
}

/// Implements [`UapiStruct`] for `#[repr(C)]` structs of [`UapiField`] fields: list every
/// field (a missing one does not compile), in offset order.
#[macro_export]
macro_rules! uapi_struct {
    ($($ty:ty { $($field:ident),+ $(,)? })+) => {$(
        impl $crate::uapi::UapiStruct for $ty {
            const BYTES: usize = ::std::mem::size_of::<$ty>();
            type Bytes = [u8; ::std::mem::size_of::<$ty>()];

            fn decode_at(
                bytes: &[u8],
                offset: usize,
            ) -> Result<Self, $crate::uapi::DecodeError> {
                let at = |field: usize| {
                    offset.checked_add(field).ok_or($crate::uapi::DecodeError::Truncated {
                        need: usize::MAX,
                        have: bytes.len(),
                    })
                };
                Ok(Self {
                    $($field: $crate::uapi::UapiField::read_at(
                        bytes,
                        at(::std::mem::offset_of!($ty, $field))?,
                    )?,)+
                })
            }

            fn encode(&self) -> Self::Bytes {
                let mut out = [0u8; ::std::mem::size_of::<$ty>()];
                $($crate::uapi::UapiField::write_at(
                    self.$field,
                    &mut out,
                    ::std::mem::offset_of!($ty, $field),
                );)+
                out
            }
        }
    )+};
}

uapi_struct! {
    FeatureHeader { argsz, flags }
    LoggingRange { iova, length }
    KernelLoggingControl { page_size, num_ranges, __reserved, ranges }
    KernelLoggingReport { iova, length, page_size, bitmap }
    MigDeviceStatePayload { device_state, data_fd }
    UserLoggingReport { iova, length, page_size }
    vb::vfio_device_feature_migration { flags }
    vb::vfio_device_feature_mig_data_size { stop_copy_length }
    vb::vfio_precopy_info { argsz, flags, initial_bytes, dirty_bytes }
    vb::vfio_device_bind_iommufd { argsz, flags, iommufd, out_devid, token_uuid_ptr }
    vb::vfio_device_attach_iommufd_pt { argsz, flags, pt_id, pasid }
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
        // Whole chunks of exactly RANGE_BYTES: the decode cannot fail.
        bytes
            .chunks_exact(RANGE_BYTES)
            .map(|chunk| LoggingRange::decode(chunk).unwrap_or_default())
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
#[repr(C)]
pub struct UserLoggingReport {
    /// First IOVA reported.
    pub iova: u64,
    /// Bytes reported.
    pub length: u64,
    /// Report page size in bytes (a power of two).
    pub page_size: u64,
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

    /// Every byte of `T` belongs to exactly one field at its offset (a pattern decodes and
    /// encodes back unchanged, also from a misaligned copy), and every short slice fails.
    fn check_codec<T: UapiStruct + PartialEq + std::fmt::Debug>(name: &str) {
        let pattern: Vec<u8> = (1..=T::BYTES as u8).collect();
        let value = T::decode(&pattern).unwrap();
        assert_eq!(value.encode().as_ref(), pattern.as_slice(), "{name}");
        let mut shifted = vec![0u8; 1 + T::BYTES];
        shifted[1..].copy_from_slice(&pattern);
        assert_eq!(
            T::decode(&shifted[1..]).unwrap(),
            value,
            "{name} misaligned"
        );
        assert_eq!(T::decode_at(&shifted, 1).unwrap(), value, "{name} at 1");
        for len in 0..T::BYTES {
            assert!(T::decode(&pattern[..len]).is_err(), "{name} len {len}");
        }
        assert!(
            T::decode_at(&pattern, usize::MAX).is_err(),
            "{name} offset past usize"
        );
    }

    #[test]
    fn decoders_reject_every_short_slice_and_accept_any_alignment() {
        check_codec::<FeatureHeader>("vfio_device_feature");
        check_codec::<LoggingRange>("dma_logging_range");
        check_codec::<KernelLoggingControl>("dma_logging_control");
        check_codec::<KernelLoggingReport>("dma_logging_report");
        check_codec::<MigDeviceStatePayload>("mig_state");
        check_codec::<UserLoggingReport>("vfio-user report");
        check_codec::<vfio_device_feature_migration>("migration");
        check_codec::<vfio_device_feature_mig_data_size>("mig_data_size");
        check_codec::<vfio_precopy_info>("precopy_info");
        check_codec::<vfio_device_bind_iommufd>("bind_iommufd");
        check_codec::<vfio_device_attach_iommufd_pt>("attach_iommufd_pt");
        // Little-endian, and a short read names the end of the first missing field.
        let report = KernelLoggingReport::decode(&[0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        assert_eq!(report, Err(DecodeError::Truncated { need: 16, have: 8 }));
        let range = LoggingRange::decode(&[0x34, 0x12, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            range,
            Ok(LoggingRange {
                iova: 0x1234,
                length: 1
            })
        );
        // The shorter form of a struct is its encoding cut at `N`.
        let prefix: [u8; 9] = range.unwrap().encode_prefix();
        assert_eq!(prefix, [0x34, 0x12, 0, 0, 0, 0, 0, 0, 1]);
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
