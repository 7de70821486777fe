//! iommufd and VFIO-cdev structures that the consumers do not need in production, but a
//! rig against a real kernel does (the VFIO ones are `vfio-bindings`', the iommufd ones
//! defined here, the crate has none): allocating an IO address space,
//! mapping memory into it, allocating a dirty-tracking HWPT, attaching a VFIO cdev, and the
//! iommufd self-test command (`IOMMU_TEST_CMD`, kernels with `CONFIG_IOMMUFD_TEST`) whose
//! mock domain has dirty tracking without an IOMMU.
//!
//! Layouts follow Linux 6.12 `include/uapi/linux/iommufd.h`, `include/uapi/linux/vfio.h`
//! and `drivers/iommu/iommufd/iommufd_test.h`; the unit tests pin every field's offset and
//! the size. All fields are little-endian (the `dmalog::uapi` codec), which is native on
//! every supported host.

use std::mem::{offset_of, size_of};

use dmalog::uapi::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, UapiStruct, VFIO_BASE, VFIO_TYPE,
};

use crate::seam::IoctlNr;
use crate::uapi::{io, IOMMUFD_TYPE};

/// `IOMMU_DESTROY` = `_IO(';', 0x80)`.
pub const IOMMU_DESTROY: IoctlNr = io(IOMMUFD_TYPE, 0x80);
/// `IOMMU_IOAS_ALLOC` = `_IO(';', 0x81)`.
pub const IOMMU_IOAS_ALLOC: IoctlNr = io(IOMMUFD_TYPE, 0x81);
/// `IOMMU_IOAS_MAP` = `_IO(';', 0x85)`.
pub const IOMMU_IOAS_MAP: IoctlNr = io(IOMMUFD_TYPE, 0x85);
/// `IOMMU_HWPT_ALLOC` = `_IO(';', 0x89)`.
pub const IOMMU_HWPT_ALLOC: IoctlNr = io(IOMMUFD_TYPE, 0x89);
/// `IOMMU_TEST_CMD` = `_IO(';', 0x80 + 32)`: one ioctl, `op` selects the test operation.
pub const IOMMU_TEST_CMD: IoctlNr = io(IOMMUFD_TYPE, 0x80 + 32);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` = `_IO(';', 100 + 19)`.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: IoctlNr = io(VFIO_TYPE, VFIO_BASE + 19);
/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` = `_IO(';', 100 + 20)`.
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: IoctlNr = io(VFIO_TYPE, VFIO_BASE + 20);

/// `struct iommu_destroy` (8 bytes).
pub const DESTROY_BYTES: usize = size_of::<Destroy>();
/// `struct iommu_ioas_alloc` (12 bytes).
pub const IOAS_ALLOC_BYTES: usize = size_of::<IoasAlloc>();
/// `struct iommu_ioas_map` (40 bytes).
pub const IOAS_MAP_BYTES: usize = size_of::<IoasMap>();
/// `struct iommu_hwpt_alloc` (48 bytes; 6.12 accepts 24 and up).
pub const HWPT_ALLOC_BYTES: usize = size_of::<HwptAlloc>();
/// `struct iommu_test_cmd` (72 bytes; the kernel accepts 68, the end of `last`).
pub const TEST_CMD_BYTES: usize = 72;
/// `struct vfio_device_attach_iommufd_pt` without `pasid` (12 bytes: 6.12 has no pasid).
pub const ATTACH_PT_BYTES: usize = offset_of!(vfio_device_attach_iommufd_pt, pasid);

/// `IOMMU_IOAS_MAP_FIXED_IOVA`.
pub const IOAS_MAP_FIXED_IOVA: u32 = 1;
/// `IOMMU_IOAS_MAP_WRITEABLE`.
pub const IOAS_MAP_WRITEABLE: u32 = 2;
/// `IOMMU_IOAS_MAP_READABLE`.
pub const IOAS_MAP_READABLE: u32 = 4;
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
pub const HWPT_ALLOC_DIRTY_TRACKING: u32 = 2;

/// `IOMMU_TEST_OP_MOCK_DOMAIN`: a mock device attached to an IOAS or HWPT.
pub const TEST_OP_MOCK_DOMAIN: u32 = 2;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS`: the same with `dev_flags`.
pub const TEST_OP_MOCK_DOMAIN_FLAGS: u32 = 12;
/// `IOMMU_TEST_OP_DIRTY`: marks mapped mock IO pages dirty from a bitmap.
pub const TEST_OP_DIRTY: u32 = 13;
/// `MOCK_FLAGS_DEVICE_NO_DIRTY`: a mock device whose domains have no dirty tracking.
pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1;
/// `MOCK_APERTURE_START`: the first IOVA a mock domain maps.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// `MOCK_APERTURE_LAST`: the last IOVA a mock domain maps.
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;
/// The mock domain's IO page: `PAGE_SIZE / 2` (2 KiB with 4 KiB CPU pages). OP_DIRTY's
/// `page_size` must be this, and IOVAs must be aligned to it.
pub const MOCK_IO_PAGE_SIZE: u64 = 2048;

fn put_u32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(out: &mut [u8], at: usize, value: u64) {
    out[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Reads the u32 at `at` of a reply (the caller's buffer is the fixed-size request).
pub fn get_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

/// Reads the u64 at `at` of a reply.
pub fn get_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(word)
}

/// `struct iommu_destroy`: destroys object `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Destroy {
    /// Bytes of the struct.
    pub size: u32,
    /// The object.
    pub id: u32,
}

/// `struct iommu_ioas_alloc`: a new IO address space, returned in `out_ioas_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct IoasAlloc {
    /// Bytes of the struct.
    pub size: u32,
    /// Must be 0.
    pub flags: u32,
    /// The IOAS allocated.
    pub out_ioas_id: u32,
}

/// `struct iommu_ioas_map`: maps `length` bytes of this process at `user_va` to `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct IoasMap {
    /// Bytes of the struct.
    pub size: u32,
    /// `IOAS_MAP_*` flags.
    pub flags: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Start of the memory to map, in this process.
    pub user_va: u64,
    /// Bytes.
    pub length: u64,
    /// The IOVA (with `IOAS_MAP_FIXED_IOVA`; otherwise the kernel's choice comes back here).
    pub iova: u64,
}

/// `struct iommu_hwpt_alloc`; the rig sends no driver data and no fault object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct HwptAlloc {
    /// Bytes of the struct.
    pub size: u32,
    /// `HWPT_ALLOC_*` flags.
    pub flags: u32,
    /// The device object (from BIND or a mock domain's `out_idev_id`).
    pub dev_id: u32,
    /// The IOAS the HWPT translates.
    pub pt_id: u32,
    /// The HWPT allocated.
    pub out_hwpt_id: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Driver data type (0: none).
    pub data_type: u32,
    /// Driver data bytes.
    pub data_len: u32,
    /// User address of the driver data.
    pub data_uptr: u64,
    /// Fault object (with `FAULT_ID_VALID`).
    pub fault_id: u32,
    /// Must be 0.
    pub reserved2: u32,
}

dmalog::uapi_struct! {
    Destroy { size, id }
    IoasAlloc { size, flags, out_ioas_id }
    IoasMap { size, flags, ioas_id, reserved, user_va, length, iova }
    HwptAlloc {
        size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len, data_uptr,
        fault_id, reserved2,
    }
}

/// A request of a struct that starts with its own `size`: every other field 0.
macro_rules! sized_request {
    ($($ty:ident),+) => {$(
        impl $ty {
            /// The request with `size` set and every other field 0 (fill in what it needs
            /// with `..Self::request()`).
            pub fn request() -> Self {
                $ty {
                    size: size_of::<$ty>() as u32,
                    ..Default::default()
                }
            }
        }
    )+};
}

sized_request!(Destroy, IoasAlloc, IoasMap, HwptAlloc);

/// `struct iommu_test_cmd` for the operations a dirty-tracking rig uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestCmd {
    /// MOCK_DOMAIN (or MOCK_DOMAIN_FLAGS when `dev_flags` is not 0) on IOAS or HWPT `id`.
    MockDomain {
        /// IOAS or HWPT.
        id: u32,
        /// `MOCK_FLAGS_DEVICE_*`.
        dev_flags: u32,
    },
    /// OP_DIRTY: for each set bit i of the host-order `unsigned long` bitmap at `uptr`,
    /// marks the mapped mock IO page at `iova + i * page_size` of HWPT `hwpt_id` dirty.
    Dirty {
        /// The mock HWPT.
        hwpt_id: u32,
        /// First IOVA.
        iova: u64,
        /// Bytes.
        length: u64,
        /// Must be [`MOCK_IO_PAGE_SIZE`].
        page_size: u64,
        /// User address of `ceil(length / page_size / 8)` bitmap bytes.
        uptr: u64,
    },
}

/// What MOCK_DOMAIN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockDomain {
    /// The self-test device object (IOMMU_DESTROY removes the mock device).
    pub stdev_id: u32,
    /// The HWPT the device was attached to (for an IOAS: an automatic domain).
    pub hwpt_id: u32,
    /// The device object, for HWPT_ALLOC's `dev_id`.
    pub idev_id: u32,
}

impl TestCmd {
    /// Encodes the command (size 72).
    pub fn encode(&self) -> [u8; TEST_CMD_BYTES] {
        let mut out = [0u8; TEST_CMD_BYTES];
        put_u32(&mut out, 0, TEST_CMD_BYTES as u32);
        match *self {
            TestCmd::MockDomain { id, dev_flags } => {
                let op = if dev_flags == 0 {
                    TEST_OP_MOCK_DOMAIN
                } else {
                    TEST_OP_MOCK_DOMAIN_FLAGS
                };
                put_u32(&mut out, 4, op);
                put_u32(&mut out, 8, id);
                put_u32(&mut out, 28, dev_flags);
            }
            TestCmd::Dirty {
                hwpt_id,
                iova,
                length,
                page_size,
                uptr,
            } => {
                put_u32(&mut out, 4, TEST_OP_DIRTY);
                put_u32(&mut out, 8, hwpt_id);
                put_u64(&mut out, 24, iova);
                put_u64(&mut out, 32, length);
                put_u64(&mut out, 40, page_size);
                put_u64(&mut out, 48, uptr);
            }
        }
        out
    }

    /// MOCK_DOMAIN's answer.
    pub fn decode_mock_domain(reply: &[u8; TEST_CMD_BYTES]) -> MockDomain {
        MockDomain {
            stdev_id: get_u32(reply, 16),
            hwpt_id: get_u32(reply, 20),
            idev_id: get_u32(reply, 24),
        }
    }

    /// OP_DIRTY's answer: how many mapped pages it marked.
    pub fn decode_nr_dirty(reply: &[u8; TEST_CMD_BYTES]) -> u64 {
        get_u64(reply, 56)
    }
}

/// `struct vfio_device_attach_iommufd_pt {argsz, flags = 0, pt_id}` (12-byte form).
pub fn attach_pt_request(pt_id: u32) -> [u8; ATTACH_PT_BYTES] {
    vfio_device_attach_iommufd_pt {
        argsz: ATTACH_PT_BYTES as u32,
        pt_id,
        ..Default::default()
    }
    .encode_prefix()
}

/// Offset of `out_devid` in `struct vfio_device_bind_iommufd`.
pub const BIND_OUT_DEVID: usize = offset_of!(vfio_device_bind_iommufd, out_devid);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_TEST_CMD, 0x3ba0);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3b78);
    }

    #[test]
    fn destroy_and_ioas_alloc_layouts() {
        let d = Destroy {
            id: 0x1234_5678,
            ..Destroy::request()
        }
        .encode();
        assert_eq!(d.len(), 8);
        assert_eq!((get_u32(&d, 0), get_u32(&d, 4)), (8, 0x1234_5678));
        let a = IoasAlloc::request().encode();
        assert_eq!(a.len(), 12);
        assert_eq!(get_u32(&a, 0), 12);
        assert_eq!(a[4..], [0u8; 8]);
        let mut reply = a;
        reply[8] = 0x21;
        assert_eq!(IoasAlloc::decode(&reply).unwrap().out_ioas_id, 0x21);
    }

    #[test]
    fn ioas_map_layout() {
        let m = IoasMap {
            flags: 7,
            ioas_id: 0x11,
            user_va: 0x2222_0000,
            length: 0x3333,
            iova: 0x4444_0000,
            ..IoasMap::request()
        }
        .encode();
        assert_eq!(m.len(), 40);
        assert_eq!(get_u32(&m, 0), 40);
        assert_eq!(get_u32(&m, 4), 7);
        assert_eq!(get_u32(&m, 8), 0x11);
        assert_eq!(get_u32(&m, 12), 0, "__reserved");
        assert_eq!(get_u64(&m, 16), 0x2222_0000);
        assert_eq!(get_u64(&m, 24), 0x3333);
        assert_eq!(get_u64(&m, 32), 0x4444_0000);
    }

    #[test]
    fn hwpt_alloc_layout() {
        let h = HwptAlloc {
            flags: HWPT_ALLOC_DIRTY_TRACKING,
            dev_id: 5,
            pt_id: 6,
            ..HwptAlloc::request()
        }
        .encode();
        assert_eq!(h.len(), 48);
        assert_eq!(get_u32(&h, 0), 48);
        assert_eq!(get_u32(&h, 4), 2);
        assert_eq!(get_u32(&h, 8), 5);
        assert_eq!(get_u32(&h, 12), 6);
        // out_hwpt_id, __reserved, data_type, data_len, data_uptr, fault_id, __reserved2.
        assert_eq!(h[16..], [0u8; 32]);
        assert_eq!(
            [
                offset_of!(HwptAlloc, out_hwpt_id),
                offset_of!(HwptAlloc, data_uptr),
                offset_of!(HwptAlloc, fault_id),
                offset_of!(HwptAlloc, reserved2),
            ],
            [16, 32, 40, 44]
        );
    }

    #[test]
    fn test_cmd_layouts() {
        let mock = TestCmd::MockDomain {
            id: 9,
            dev_flags: 0,
        }
        .encode();
        assert_eq!(mock.len(), 72);
        assert_eq!(
            (get_u32(&mock, 0), get_u32(&mock, 4), get_u32(&mock, 8)),
            (72, 2, 9)
        );
        let flagged = TestCmd::MockDomain {
            id: 9,
            dev_flags: MOCK_FLAGS_DEVICE_NO_DIRTY,
        }
        .encode();
        assert_eq!((get_u32(&flagged, 4), get_u32(&flagged, 28)), (12, 1));
        let dirty = TestCmd::Dirty {
            hwpt_id: 3,
            iova: 0x100_0000,
            length: 0x2000,
            page_size: 2048,
            uptr: 0xdead_b000,
        }
        .encode();
        assert_eq!((get_u32(&dirty, 4), get_u32(&dirty, 8)), (13, 3));
        assert_eq!(get_u32(&dirty, 16), 0, "dirty.flags");
        assert_eq!(get_u64(&dirty, 24), 0x100_0000);
        assert_eq!(get_u64(&dirty, 32), 0x2000);
        assert_eq!(get_u64(&dirty, 40), 2048);
        assert_eq!(get_u64(&dirty, 48), 0xdead_b000);
        assert_eq!(get_u32(&dirty, 64), 0, "last");
        let mut reply = dirty;
        put_u32(&mut reply, 16, 1);
        put_u32(&mut reply, 20, 2);
        put_u32(&mut reply, 24, 3);
        assert_eq!(
            TestCmd::decode_mock_domain(&reply),
            MockDomain {
                stdev_id: 1,
                hwpt_id: 2,
                idev_id: 3
            }
        );
        put_u64(&mut reply, 56, 77);
        assert_eq!(TestCmd::decode_nr_dirty(&reply), 77);
    }

    #[test]
    fn attach_pt_layout() {
        let a = attach_pt_request(0x42);
        assert_eq!(a.len(), 12);
        assert_eq!(
            (get_u32(&a, 0), get_u32(&a, 4), get_u32(&a, 8)),
            (12, 0, 0x42)
        );
        assert_eq!(ATTACH_PT_BYTES, 12);
        assert_eq!(BIND_OUT_DEVID, 12);
    }
}
