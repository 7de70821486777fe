//! iommufd HWPT dirty tracking through the seam against a model of the kernel's checks.

use dmalog::uapi::UapiStruct;
use dmalog::{DirtyTracker, IovaRange};
use dmalog_vfio::fake::FakeIommu;
use dmalog_vfio::uapi::{GetDirtyBitmap, IOMMU_HWPT_GET_DIRTY_BITMAP};
use dmalog_vfio::{Errno, IoctlCall, IommufdDirtyTracker, VfioIoctl};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 30;

fn tracker() -> IommufdDirtyTracker<FakeIommu> {
    IommufdDirtyTracker::new(
        FakeIommu::new(7, IovaRange::new(BASE, 64 << 20).unwrap(), true),
        7,
    )
}

#[test]
fn enable_clears_stale_bits_and_reports_clear_unless_no_clear() {
    let mut t = tracker();
    assert!(t.probe().unwrap());
    t.start(&[IovaRange::new(BASE, 64 << 20).unwrap()], PAGE)
        .unwrap();
    t.ioctl().dma_write(BASE + 5 * PAGE, 1);
    t.stop().unwrap();
    t.ioctl().dma_write(BASE + 9 * PAGE, 1); // not tracked: disabled
    t.start(&[IovaRange::new(BASE, 64 << 20).unwrap()], PAGE)
        .unwrap();
    let mut bitmap = [0u64; 1];
    t.report(IovaRange::new(BASE, 64 * PAGE).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 0, "enabling took a clean snapshot");
    t.ioctl().dma_write(BASE + 3 * PAGE, 2 * PAGE);
    t.report_no_clear(IovaRange::new(BASE, 64 * PAGE).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 0b11 << 3);
    let mut again = [0u64; 1];
    t.report(IovaRange::new(BASE, 64 * PAGE).unwrap(), PAGE, &mut again)
        .unwrap();
    assert_eq!(again[0], 0b11 << 3, "NO_CLEAR left the bits");
    let mut cleared = [0u64; 1];
    t.report(IovaRange::new(BASE, 64 * PAGE).unwrap(), PAGE, &mut cleared)
        .unwrap();
    assert_eq!(cleared[0], 0);
    // 2 MiB report pages.
    t.ioctl().dma_write(BASE + (4 << 20), 1);
    t.report(
        IovaRange::new(BASE, 64 << 20).unwrap(),
        2 << 20,
        &mut cleared,
    )
    .unwrap();
    assert_eq!(cleared[0], 1 << 2);
    t.stop().unwrap();
}

#[test]
fn kernel_checks_in_order() {
    let mut t = tracker();
    t.start(&[IovaRange::new(BASE, 64 << 20).unwrap()], PAGE)
        .unwrap();
    let mut bitmap = [0u64; 4];
    // A range past 2^64 is refused by `IovaRange` already, with the kernel's errno.
    let mut errno = |t: &mut IommufdDirtyTracker<FakeIommu>, iova: u64, len: u64, page: u64| {
        match IovaRange::new(iova, len) {
            Ok(range) => t.report(range, page, &mut bitmap).map(|_| 0),
            Err(err) => Err(err.into()),
        }
        .unwrap_or_else(|e: dmalog::TrackerError| e.errno())
    };
    assert_eq!(
        errno(&mut t, u64::MAX - PAGE + 1, 2 * PAGE, PAGE),
        libc::EOVERFLOW
    );
    assert_eq!(
        errno(&mut t, BASE + 512, PAGE, PAGE),
        libc::EINVAL,
        "iova not IOMMU-page aligned"
    );
    assert_eq!(
        errno(&mut t, BASE + PAGE, 2 << 20, 2 << 20),
        libc::EINVAL,
        "not aligned to the bitmap page"
    );
    // Raw requests: unknown flags and reserved fields are EOPNOTSUPP, page size 0 EINVAL.
    for (flags, reserved, page_size, expected) in [
        (2u32, 0u32, PAGE, libc::EOPNOTSUPP),
        (0, 1, PAGE, libc::EOPNOTSUPP),
        (0, 0, 0, libc::EINVAL),
    ] {
        let mut buf = [0u8; 8];
        let request = GetDirtyBitmap {
            size: 48,
            hwpt_id: 7,
            flags,
            reserved,
            iova: BASE,
            length: 64 * PAGE,
            page_size,
            data: buf.as_mut_ptr() as u64,
        };
        let mut arg = request.encode();
        // SAFETY: `data` points at `buf`, lent in full; the fake resolves it there only.
        let got = unsafe {
            t.ioctl_mut().ioctl(
                IoctlCall::device(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut arg).lending(&mut [&mut buf]),
            )
        };
        assert_eq!(
            got,
            Err(Errno(expected)),
            "flags {flags} reserved {reserved} page {page_size}"
        );
    }
}

#[test]
fn bitmaps_at_any_alignment_get_exactly_their_bytes() {
    // The selftest's placements: aligned, +2048-like, odd; bit counts 4..65536.
    for nbits in [4u64, 8, 32, 64, 160, 16384] {
        for offset in [0usize, 1, 0xf1] {
            let mut t = tracker();
            t.start(&[IovaRange::new(BASE, 64 << 20).unwrap()], PAGE)
                .unwrap();
            // Every other page dirty.
            for k in (0..nbits).step_by(2) {
                t.ioctl().dma_write(BASE + k * PAGE, 1);
            }
            let bytes = nbits.div_ceil(8) as usize;
            let mut buf = vec![0xeeu8; offset + bytes + 16];
            buf[offset..offset + bytes].fill(0);
            t.report_bytes(
                BASE,
                nbits * PAGE,
                PAGE,
                &mut buf[offset..offset + bytes],
                true,
            )
            .unwrap();
            assert!(buf[..offset].iter().all(|&b| b == 0xee));
            assert!(
                buf[offset + bytes..].iter().all(|&b| b == 0xee),
                "nbits {nbits} offset {offset}"
            );
            let set: u32 = buf[offset..offset + bytes]
                .iter()
                .map(|b| b.count_ones())
                .sum();
            assert_eq!(u64::from(set), nbits.div_ceil(2));
        }
    }
}

#[test]
fn an_iommu_without_dirty_tracking_says_so() {
    let mut t = IommufdDirtyTracker::new(
        FakeIommu::new(7, IovaRange::new(BASE, 1 << 20).unwrap(), false),
        7,
    );
    assert!(!t.probe().unwrap());
    let err = t
        .start(&[IovaRange::new(BASE, 1 << 20).unwrap()], PAGE)
        .unwrap_err();
    assert_eq!(
        err.errno(),
        libc::ENOTTY,
        "EOPNOTSUPP from the kernel means: no dirty tracking here"
    );
    let mut wrong_hwpt = IommufdDirtyTracker::new(
        FakeIommu::new(7, IovaRange::new(BASE, 1 << 20).unwrap(), true),
        8,
    );
    assert_eq!(
        wrong_hwpt
            .start(&[IovaRange::new(BASE, 1 << 20).unwrap()], PAGE)
            .unwrap_err()
            .errno(),
        libc::ENOENT,
        "the kernel's errno for a missing HWPT survives (Linux 6.12 says ENOENT)"
    );
}
