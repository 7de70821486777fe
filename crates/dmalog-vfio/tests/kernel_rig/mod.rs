//! Rigs against a real Linux kernel (scripts/kernel-vm.sh boots one with the tests as
//! init): the iommufd self-test mock domain with dirty tracking, and mtty mdev instances
//! reached through their VFIO cdev. Every test calls [`real_kernel`] first and returns
//! (skipped, with a message) unless `DMALOG_REAL_KERNEL=1` and `/dev/iommu` exists.

#![allow(dead_code)] // each test binary uses a different part

pub mod oracle;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use dmalog::uapi::UapiStruct;
use dmalog_vfio::iommufd_uapi::*;
use dmalog_vfio::uapi::{bind_iommufd_request, VFIO_DEVICE_BIND_IOMMUFD};
use dmalog_vfio::{Errno, IoctlCall, IoctlNr, KernelIoctl, VfioDevice, VfioIoctl};

/// Whether to run against the real kernel; prints why not.
pub fn real_kernel(test: &str) -> bool {
    if std::env::var("DMALOG_REAL_KERNEL").as_deref() != Ok("1") {
        eprintln!(
            "{test}: skipped (set DMALOG_REAL_KERNEL=1 on a kernel built by scripts/kernel-vm.sh)"
        );
        return false;
    }
    if !Path::new("/dev/iommu").exists() {
        eprintln!("{test}: skipped (no /dev/iommu: kernel without CONFIG_IOMMUFD)");
        return false;
    }
    true
}

/// Issues a request whose structure holds no user pointers.
pub fn plain_ioctl(fd: &mut KernelIoctl, request: IoctlNr, arg: &mut [u8]) -> Result<i32, Errno> {
    // SAFETY: callers pass only pointer-free structures (DESTROY, IOAS_ALLOC, HWPT_ALLOC
    // without data, MOCK_DOMAIN, BIND, ATTACH), whole, their size field the buffer length.
    unsafe { fd.ioctl(IoctlCall::device(request, arg)) }
}

/// `IOMMU_IOAS_ALLOC`.
pub fn ioas_alloc(iommufd: &mut KernelIoctl) -> u32 {
    let mut arg = IoasAlloc::request().encode();
    plain_ioctl(iommufd, IOMMU_IOAS_ALLOC, &mut arg).expect("IOAS_ALLOC");
    IoasAlloc::decode(&arg).unwrap().out_ioas_id
}

/// Page-aligned memory lent to the kernel (IOAS_MAP pins it for as long as it is mapped;
/// it outlives the iommufd because it is dropped after the rig's fd).
pub struct AlignedBuffer {
    storage: Vec<u8>,
    offset: usize,
    len_bytes: usize,
}

impl AlignedBuffer {
    /// `len_bytes` of zeroes starting on a 4 KiB boundary.
    pub fn new(len_bytes: usize) -> Self {
        let storage = vec![0u8; len_bytes + 4096];
        let offset = (4096 - storage.as_ptr() as usize % 4096) % 4096;
        AlignedBuffer {
            storage,
            offset,
            len_bytes,
        }
    }

    /// The memory.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len_bytes]
    }
}

/// The iommufd self-test mock domain set up like the kernel selftest's
/// `iommufd_dirty_tracking` fixture: a mock device on one IOAS gives a device id; a second
/// IOAS maps `map_len_bytes` at [`MOCK_APERTURE_START`]; HWPT_ALLOC(DIRTY_TRACKING) on it.
pub struct MockDirty {
    /// The iommufd (moved into a tracker by the tests).
    pub iommufd: Option<KernelIoctl>,
    /// The dirty-tracking HWPT.
    pub hwpt_id: u32,
    /// The mock device's automatic HWPT (no dirty ops).
    pub plain_hwpt_id: u32,
    /// The mapped IOVA span.
    pub iova: u64,
    /// Bytes mapped.
    pub map_len_bytes: u64,
    /// The mapped memory (after the fd: dropped last).
    pub memory: AlignedBuffer,
}

impl MockDirty {
    /// Sets up the fixture.
    pub fn new(map_len_bytes: u64) -> Self {
        let mut iommufd = KernelIoctl::open(Path::new("/dev/iommu")).expect("open /dev/iommu");
        let device_ioas = ioas_alloc(&mut iommufd);
        let mut mock = TestCmd::MockDomain {
            id: device_ioas,
            dev_flags: 0,
        }
        .encode();
        plain_ioctl(&mut iommufd, IOMMU_TEST_CMD, &mut mock)
            .expect("IOMMU_TEST_CMD MOCK_DOMAIN (CONFIG_IOMMUFD_TEST)");
        let mock = TestCmd::decode_mock_domain(&mock);
        let ioas = ioas_alloc(&mut iommufd);
        let mut memory = AlignedBuffer::new(map_len_bytes as usize);
        let buffer = memory.bytes_mut();
        let mut map = IoasMap {
            flags: IOAS_MAP_FIXED_IOVA | IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE,
            ioas_id: ioas,
            user_va: buffer.as_mut_ptr() as u64,
            length: map_len_bytes,
            iova: MOCK_APERTURE_START,
            ..IoasMap::request()
        }
        .encode();
        // SAFETY: the only pointer in IOAS_MAP is `user_va`, the start of `buffer`
        // (lent here, `map_len_bytes` long). The kernel pins it until the IOAS goes away;
        // `memory` is dropped after `iommufd` (field order), which frees the IOAS.
        unsafe {
            iommufd.ioctl(IoctlCall::device(IOMMU_IOAS_MAP, &mut map).lending(&mut [buffer]))
        }
        .expect("IOAS_MAP");
        let mut alloc = HwptAlloc {
            flags: HWPT_ALLOC_DIRTY_TRACKING,
            dev_id: mock.idev_id,
            pt_id: ioas,
            ..HwptAlloc::request()
        }
        .encode();
        plain_ioctl(&mut iommufd, IOMMU_HWPT_ALLOC, &mut alloc).expect("HWPT_ALLOC");
        MockDirty {
            iommufd: Some(iommufd),
            hwpt_id: HwptAlloc::decode(&alloc).unwrap().out_hwpt_id,
            plain_hwpt_id: mock.hwpt_id,
            iova: MOCK_APERTURE_START,
            map_len_bytes,
            memory,
        }
    }
}

/// `IOMMU_TEST_OP_DIRTY`: marks the mock IO pages `pages` (indices of 2 KiB pages from
/// `iova`) of `hwpt_id` dirty; returns how many the kernel marked.
pub fn mock_dirty(
    iommufd: &mut KernelIoctl,
    hwpt_id: u32,
    iova: u64,
    npages: u64,
    pages: &[u64],
) -> Result<u64, Errno> {
    let words = npages.div_ceil(64) as usize;
    let mut bitmap = vec![0u64; words];
    for &page in pages {
        bitmap[(page / 64) as usize] |= 1 << (page % 64);
    }
    let mut bytes: Vec<u8> = bitmap.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut cmd = TestCmd::Dirty {
        hwpt_id,
        iova,
        length: npages * MOCK_IO_PAGE_SIZE,
        page_size: MOCK_IO_PAGE_SIZE,
        uptr: bytes.as_mut_ptr() as u64,
    }
    .encode();
    // SAFETY: OP_DIRTY reads `ceil(npages / 8)` bytes at `uptr`, the start of `bytes`
    // (lent here, whole u64 words: at least that long).
    unsafe {
        iommufd.ioctl(IoctlCall::device(IOMMU_TEST_CMD, &mut cmd).lending(&mut [&mut bytes]))
    }?;
    Ok(TestCmd::decode_nr_dirty(&cmd))
}

/// The mtty parent's type directory.
pub const MTTY_TYPES: &str = "/sys/devices/virtual/mtty/mtty/mdev_supported_types";

static NEXT_UUID: AtomicU32 = AtomicU32::new(1);

/// An mtty mdev instance: removed on drop.
pub struct MttyInstance {
    /// Its UUID.
    pub uuid: String,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
}

impl MttyInstance {
    /// Creates an instance of type `mtty-<ports>`.
    pub fn create(ports: u32) -> Self {
        let uuid = format!(
            "d3a10600-{:04x}-4000-8000-{:012x}",
            std::process::id() & 0xffff,
            NEXT_UUID.fetch_add(1, Ordering::Relaxed)
        );
        let create = format!("{MTTY_TYPES}/mtty-{ports}/create");
        std::fs::write(&create, &uuid).unwrap_or_else(|e| panic!("write {create}: {e}"));
        MttyInstance {
            sysfs: PathBuf::from(format!("/sys/bus/mdev/devices/{uuid}")),
            uuid,
        }
    }

    /// Its VFIO cdev `/dev/vfio/devices/vfioN`.
    pub fn cdev(&self) -> PathBuf {
        let dir = self.sysfs.join("vfio-dev");
        let entry = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (CONFIG_VFIO_DEVICE_CDEV?)", dir.display()))
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("vfio"))
            .expect("a vfioN entry");
        PathBuf::from("/dev/vfio/devices").join(entry.file_name())
    }
}

impl Drop for MttyInstance {
    fn drop(&mut self) {
        let _ = std::fs::write(self.sysfs.join("remove"), "1");
    }
}

/// An opened mtty cdev, bound to its own iommufd and attached to an IOAS.
pub struct BoundMtty {
    /// The device.
    pub device: VfioDevice<KernelIoctl>,
    /// The device object id BIND returned.
    pub devid: u32,
    /// The iommufd (dropped after the device).
    pub iommufd: KernelIoctl,
    /// The instance (removed last).
    pub instance: MttyInstance,
}

/// Opens `instance`'s cdev, binds it to a new iommufd and attaches it to a new IOAS.
pub fn bind_mtty(instance: MttyInstance) -> BoundMtty {
    let (device, iommufd, devid) = open_bound(&instance);
    BoundMtty {
        device: VfioDevice::new(device),
        devid,
        iommufd,
        instance,
    }
}

/// The raw fds of a bound, attached mtty cdev: (device, iommufd, devid).
pub fn open_bound(instance: &MttyInstance) -> (KernelIoctl, KernelIoctl, u32) {
    let mut device = KernelIoctl::open(&instance.cdev()).expect("open the mtty cdev");
    let mut iommufd = KernelIoctl::open(Path::new("/dev/iommu")).expect("open /dev/iommu");
    let mut bind = bind_iommufd_request(iommufd.raw_fd());
    plain_ioctl(&mut device, VFIO_DEVICE_BIND_IOMMUFD, &mut bind).expect("BIND_IOMMUFD");
    let devid = get_u32(&bind, BIND_OUT_DEVID);
    let ioas = ioas_alloc(&mut iommufd);
    let mut attach = attach_pt_request(ioas);
    plain_ioctl(&mut device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach)
        .expect("ATTACH_IOMMUFD_PT");
    (device, iommufd, devid)
}
