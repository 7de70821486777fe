//! Kernel structures and ioctl numbers the kernel consumers use beyond the core's
//! DEVICE_FEATURE forms. The VFIO structs are `vfio-bindings`' (through `dmalog::uapi`);
//! the iommufd ones are defined here because the crate has none; tests check them against
//! the kernel's documented layouts and the system header, where it has them.

use std::mem::{offset_of, size_of};

use dmalog::uapi::{vfio_device_bind_iommufd, UapiStruct, VFIO_BASE, VFIO_TYPE};
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

/// `struct vfio_precopy_info` (24 bytes): what PRE_COPY still has to send.
pub type PrecopyInfo = dmalog::uapi::vfio_precopy_info;
/// Size of [`PrecopyInfo`] in bytes.
pub const PRECOPY_INFO_BYTES: usize = size_of::<PrecopyInfo>();
/// `struct vfio_device_bind_iommufd` without the token pointer (16 bytes; kernels accept
/// it, the token form is 24).
pub const BIND_IOMMUFD_BYTES: usize = offset_of!(vfio_device_bind_iommufd, token_uuid_ptr);
/// `struct iommu_hwpt_set_dirty_tracking` (16 bytes).
pub const SET_DIRTY_TRACKING_BYTES: usize = size_of::<SetDirtyTracking>();
/// `struct iommu_hwpt_get_dirty_bitmap` (48 bytes).
pub const GET_DIRTY_BITMAP_BYTES: usize = size_of::<GetDirtyBitmap>();

/// A PRECOPY_INFO request (argsz set, flags 0), or an answer carrying `initial_bytes` and
/// `dirty_bytes`.
pub fn precopy_info(initial_bytes: u64, dirty_bytes: u64) -> PrecopyInfo {
    PrecopyInfo {
        argsz: PRECOPY_INFO_BYTES as u32,
        flags: 0,
        initial_bytes,
        dirty_bytes,
    }
}

/// `struct iommu_hwpt_set_dirty_tracking` (project-defined: `vfio-bindings` has no iommufd
/// structs; the layout tests pin it to the kernel's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SetDirtyTracking {
    /// Bytes of the struct (16).
    pub size: u32,
    /// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE` or 0.
    pub flags: u32,
    /// The HWPT object.
    pub hwpt_id: u32,
    /// Must be 0.
    pub reserved: u32,
}

impl SetDirtyTracking {
    /// A request: enable (or disable) dirty tracking of `hwpt_id`.
    pub fn new(enable: bool, hwpt_id: u32) -> Self {
        SetDirtyTracking {
            size: SET_DIRTY_TRACKING_BYTES as u32,
            flags: if enable {
                IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id,
            reserved: 0,
        }
    }
}

/// `struct iommu_hwpt_get_dirty_bitmap` (project-defined, like [`SetDirtyTracking`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct GetDirtyBitmap {
    /// Bytes of the struct (48).
    pub size: u32,
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

dmalog::uapi_struct! {
    SetDirtyTracking { size, flags, hwpt_id, reserved }
    GetDirtyBitmap { size, hwpt_id, flags, reserved, iova, length, page_size, data }
}

/// `struct vfio_device_bind_iommufd` (16-byte form): binds a VFIO cdev to an iommufd.
pub fn bind_iommufd_request(iommufd: i32) -> [u8; BIND_IOMMUFD_BYTES] {
    vfio_device_bind_iommufd {
        argsz: BIND_IOMMUFD_BYTES as u32,
        iommufd,
        ..Default::default()
    }
    .encode_prefix()
}
