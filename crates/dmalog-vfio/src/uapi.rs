//! Kernel structures and ioctl numbers the kernel consumers use beyond the core's
//! DEVICE_FEATURE forms. The iommufd ones are defined here because the system headers on
//! our machines predate them; tests check sizes against the kernel's documented layouts and
//! the VFIO ones against `vfio-bindings` and the system header.

use dmalog::uapi::{read_u32, read_u64, DecodeError, VFIO_BASE, VFIO_TYPE};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

use crate::seam::IoctlNr;

/// `_IO(type, nr)`: no direction or size bits. `vmm-sys-util`'s `ioctl_expr` rather than its
/// `ioctl_io_nr!` macro, which declares functions: constants can be matched on (the fakes
/// dispatch on them) and used in `const` items.
pub const fn io(ty: u8, nr: u32) -> IoctlNr {
    ioctl_expr(_IOC_NONE, ty as u32, nr, 0)
}

/// `VFIO_DEVICE_FEATURE` = `_IO(';', 100 + 17)`. The one definition: the core decodes the
/// feature payloads but issues no ioctl.
pub const VFIO_DEVICE_FEATURE: IoctlNr = io(VFIO_TYPE, VFIO_BASE + 17);
/// `VFIO_DEVICE_BIND_IOMMUFD` = `_IO(';', 100 + 18)`.
pub const VFIO_DEVICE_BIND_IOMMUFD: IoctlNr = io(VFIO_TYPE, VFIO_BASE + 18);
/// `VFIO_MIG_GET_PRECOPY_INFO` = `_IO(';', 100 + 21)`, issued on the migration data fd.
pub const VFIO_MIG_GET_PRECOPY_INFO: IoctlNr = io(VFIO_TYPE, VFIO_BASE + 21);
/// `IOMMUFD_TYPE`, the ioctl type of `/dev/iommu`.
pub const IOMMUFD_TYPE: u8 = b';';
/// `IOMMU_HWPT_SET_DIRTY_TRACKING` = `_IO(';', 0x8b)`.
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: IoctlNr = io(IOMMUFD_TYPE, 0x8b);
/// `IOMMU_HWPT_GET_DIRTY_BITMAP` = `_IO(';', 0x8c)`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: IoctlNr = io(IOMMUFD_TYPE, 0x8c);
/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read without clearing.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

/// `struct vfio_precopy_info` (24 bytes).
pub const PRECOPY_INFO_BYTES: usize = 24;
/// `struct vfio_device_bind_iommufd` without the token pointer (16 bytes; kernels accept
/// it, the token form is 24).
pub const BIND_IOMMUFD_BYTES: usize = 16;
/// `struct iommu_hwpt_set_dirty_tracking` (16 bytes).
pub const SET_DIRTY_TRACKING_BYTES: usize = 16;
/// `struct iommu_hwpt_get_dirty_bitmap` (48 bytes).
pub const GET_DIRTY_BITMAP_BYTES: usize = 48;

/// `struct vfio_precopy_info`: what PRE_COPY still has to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Initial data not yet read.
    pub initial_bytes: u64,
    /// Data that changed and is not yet read.
    pub dirty_bytes: u64,
}

impl PrecopyInfo {
    /// A request (argsz set, flags 0).
    pub fn request() -> [u8; PRECOPY_INFO_BYTES] {
        let mut out = [0u8; PRECOPY_INFO_BYTES];
        out[0..4].copy_from_slice(&(PRECOPY_INFO_BYTES as u32).to_le_bytes());
        out
    }

    /// Decodes the kernel's answer.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(PrecopyInfo {
            initial_bytes: read_u64(bytes, 8)?,
            dirty_bytes: read_u64(bytes, 16)?,
        })
    }

    /// Encodes an answer (argsz 24, flags 0).
    pub fn encode(&self) -> [u8; PRECOPY_INFO_BYTES] {
        let mut out = Self::request();
        out[8..16].copy_from_slice(&self.initial_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.dirty_bytes.to_le_bytes());
        out
    }
}

/// `struct iommu_hwpt_set_dirty_tracking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetDirtyTracking {
    /// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE` or 0.
    pub flags: u32,
    /// The HWPT object.
    pub hwpt_id: u32,
}

impl SetDirtyTracking {
    /// Encodes the request (size 16, reserved 0).
    pub fn encode(&self) -> [u8; SET_DIRTY_TRACKING_BYTES] {
        let mut out = [0u8; SET_DIRTY_TRACKING_BYTES];
        out[0..4].copy_from_slice(&(SET_DIRTY_TRACKING_BYTES as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.hwpt_id.to_le_bytes());
        out
    }

    /// Decodes a request: `(size, self, reserved)`.
    pub fn decode(bytes: &[u8]) -> Result<(u32, Self, u32), DecodeError> {
        Ok((
            read_u32(bytes, 0)?,
            SetDirtyTracking {
                flags: read_u32(bytes, 4)?,
                hwpt_id: read_u32(bytes, 8)?,
            },
            read_u32(bytes, 12)?,
        ))
    }
}

/// `struct iommu_hwpt_get_dirty_bitmap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetDirtyBitmap {
    /// The HWPT object.
    pub hwpt_id: u32,
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` or 0.
    pub flags: u32,
    /// Must be 0.
    pub reserved: u32,
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Bitmap page size in bytes.
    pub page_size: u64,
    /// User address of the bitmap.
    pub data: u64,
}

impl GetDirtyBitmap {
    /// Encodes the request (size 48).
    pub fn encode(&self) -> [u8; GET_DIRTY_BITMAP_BYTES] {
        let mut out = [0u8; GET_DIRTY_BITMAP_BYTES];
        out[0..4].copy_from_slice(&(GET_DIRTY_BITMAP_BYTES as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.hwpt_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.reserved.to_le_bytes());
        out[16..24].copy_from_slice(&self.iova.to_le_bytes());
        out[24..32].copy_from_slice(&self.length.to_le_bytes());
        out[32..40].copy_from_slice(&self.page_size.to_le_bytes());
        out[40..48].copy_from_slice(&self.data.to_le_bytes());
        out
    }

    /// Decodes a request: `(size, self)`.
    pub fn decode(bytes: &[u8]) -> Result<(u32, Self), DecodeError> {
        Ok((
            read_u32(bytes, 0)?,
            GetDirtyBitmap {
                hwpt_id: read_u32(bytes, 4)?,
                flags: read_u32(bytes, 8)?,
                reserved: read_u32(bytes, 12)?,
                iova: read_u64(bytes, 16)?,
                length: read_u64(bytes, 24)?,
                page_size: read_u64(bytes, 32)?,
                data: read_u64(bytes, 40)?,
            },
        ))
    }
}

/// `struct vfio_device_bind_iommufd` (16-byte form): binds a VFIO cdev to an iommufd.
pub fn bind_iommufd_request(iommufd: i32) -> [u8; BIND_IOMMUFD_BYTES] {
    let mut out = [0u8; BIND_IOMMUFD_BYTES];
    out[0..4].copy_from_slice(&(BIND_IOMMUFD_BYTES as u32).to_le_bytes());
    out[8..12].copy_from_slice(&iommufd.to_le_bytes());
    out
}
