//! A bitmap too short for the report it is lent to never reaches the ioctl seam: the real
//! kernel would write past the end of the slice. The seam here counts the requests that
//! carry a bitmap, so a consumer that forgot the length check fails these tests even
//! though the fakes would refuse the pointer themselves.

use dmalog::{DirtyTracker, IovaRange, LoggingCore, SoftDriver};
use dmalog_vfio::fake::{FakeIommu, FakeVfioDevice};
use dmalog_vfio::{Errno, IoctlCall, IommufdDirtyTracker, VfioDevice, VfioIoctl};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 30;

/// Passes requests to `inner` and counts those that carry a buffer.
struct CountingSeam<I> {
    inner: I,
    requests_with_buffers: usize,
}

// SAFETY: a pass-through: it touches nothing and returns what `inner` (itself a
// `VfioIoctl`) returns.
unsafe impl<I: VfioIoctl> VfioIoctl for CountingSeam<I> {
    unsafe fn ioctl(&mut self, call: IoctlCall<'_, '_>) -> Result<i32, Errno> {
        if !call.lent.is_empty() {
            self.requests_with_buffers += 1;
        }
        // SAFETY: forwarded unchanged: the caller's guarantees hold for `inner` as well.
        unsafe { self.inner.ioctl(call) }
    }
}

#[test]
fn vfio_device_refuses_a_short_bitmap_before_the_ioctl() {
    let seam = CountingSeam {
        inner: FakeVfioDevice::new(LoggingCore::new(SoftDriver::new()), None),
        requests_with_buffers: 0,
    };
    let mut dev = VfioDevice::new(seam);
    dev.start(&[IovaRange::new(0, 1 << 20).unwrap()], PAGE)
        .unwrap();
    let issued = dev.ioctl().requests_with_buffers;
    // 64 pages need 8 bytes; 7 would let the kernel write one byte past the slice.
    let err = dev
        .report_bytes(0, 64 * PAGE, PAGE, &mut [0u8; 7])
        .unwrap_err();
    assert_eq!(err.errno(), libc::EFAULT);
    assert_eq!(dev.ioctl().requests_with_buffers, issued, "nothing issued");
    // The exact size goes through.
    dev.report_bytes(0, 64 * PAGE, PAGE, &mut [0u8; 8]).unwrap();
    assert_eq!(dev.ioctl().requests_with_buffers, issued + 1);
    // 65 pages need 9 bytes (ceil), not 8.
    let err = dev
        .report_bytes(0, 65 * PAGE, PAGE, &mut [0u8; 8])
        .unwrap_err();
    assert_eq!(err.errno(), libc::EFAULT);
    // A page size the size cannot be computed for is EINVAL, also before the ioctl.
    let err = dev
        .report_bytes(0, 64 * PAGE, 0, &mut [0u8; 8])
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert_eq!(dev.ioctl().requests_with_buffers, issued + 1);
}

#[test]
fn iommufd_tracker_refuses_a_short_bitmap_before_the_ioctl() {
    let seam = CountingSeam {
        inner: FakeIommu::new(7, IovaRange::new(BASE, 64 << 20).unwrap(), true),
        requests_with_buffers: 0,
    };
    let mut t = IommufdDirtyTracker::new(seam, 7);
    t.start(&[IovaRange::new(BASE, 64 << 20).unwrap()], PAGE)
        .unwrap();
    let issued = t.ioctl().requests_with_buffers;
    for clear in [true, false] {
        let err = t
            .report_bytes(BASE, 64 * PAGE, PAGE, &mut [0u8; 7], clear)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EFAULT, "clear {clear}");
    }
    assert_eq!(t.ioctl().requests_with_buffers, issued, "nothing issued");
    t.report_bytes(BASE, 64 * PAGE, PAGE, &mut [0u8; 8], true)
        .unwrap();
    assert_eq!(t.ioctl().requests_with_buffers, issued + 1);
}
