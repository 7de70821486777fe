//! START (SPEC 3.2) and STOP (SPEC 3.3): each refused START leaves logging stopped and usable.

use dmalog::uapi::{feature_request, KernelLoggingControl, LoggingRange, UapiStruct};
use dmalog::user_memory::SegmentedUserMemory;

use crate::requests::{kernel_start, user_dirty, user_report, user_start, user_stop, START_SET};
use crate::{ConformanceTarget, MakeTarget, Variant, EINVAL, PAGE, RANGE_A, RANGE_B};

/// Checks that logging is stopped and still works: a valid START succeeds, a write is
/// reported, STOP succeeds.
fn assert_still_usable(t: &mut dyn ConformanceTarget, what: &str) {
    let page = user_start(t, PAGE, &[RANGE_A])
        .unwrap_or_else(|e| panic!("{what}: START after it failed with {e}"));
    t.dma_write(RANGE_A.iova + page, 1);
    let bits = user_dirty(t, RANGE_A.iova, RANGE_A.length, page).unwrap();
    assert_eq!(bits, vec![1], "{what}: logging works after");
    user_stop(t).unwrap();
}

/// SPEC 3.2: START rows, both dialects; each failure leaves logging stopped.
pub fn start_errnos(make: MakeTarget<'_>) {
    let r = |iova: u64, length: u64| LoggingRange { iova, length };
    let many = |n: u64| (0..n).map(|i| r(i * 2 * PAGE, PAGE)).collect::<Vec<_>>();
    let rows: Vec<(&str, u64, Vec<LoggingRange>, i32, i32)> = vec![
        // (name, page size, ranges, kernel errno, vfio-user errno)
        ("257 ranges", PAGE, many(257), libc::E2BIG, libc::E2BIG),
        ("page size 0", 0, vec![RANGE_A], EINVAL, EINVAL),
        ("page size 3000", 3000, vec![RANGE_A], EINVAL, EINVAL),
        (
            "iova not page aligned",
            PAGE,
            vec![r(RANGE_A.iova + 512, PAGE)],
            EINVAL,
            EINVAL,
        ),
        (
            "length not page aligned",
            PAGE,
            vec![r(RANGE_A.iova, PAGE + 1)],
            EINVAL,
            EINVAL,
        ),
        (
            "end wraps",
            PAGE,
            vec![r(u64::MAX - PAGE + 1, PAGE)],
            libc::EOVERFLOW,
            libc::EOVERFLOW,
        ),
        (
            "overlap",
            PAGE,
            vec![RANGE_A, r(RANGE_A.iova + PAGE, PAGE)],
            EINVAL,
            EINVAL,
        ),
        ("duplicate", PAGE, vec![RANGE_B, RANGE_B], EINVAL, EINVAL),
        (
            "zero length",
            PAGE,
            vec![r(RANGE_A.iova, 0)],
            EINVAL,
            EINVAL,
        ),
        (
            "bad range after good ones",
            PAGE,
            vec![RANGE_A, RANGE_B, r(PAGE, 7)],
            EINVAL,
            EINVAL,
        ),
    ];
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    for (name, page, ranges, kernel_errno, user_errno) in &rows {
        assert_eq!(
            user_start(t, *page, ranges),
            Err(*user_errno),
            "vfio-user START {name}"
        );
        assert_still_usable(t, name);
        if let Some(got) = kernel_start(t, *page, ranges) {
            assert_eq!(got, Err(*kernel_errno), "kernel START {name}");
            assert_still_usable(t, name);
        }
    }
    // 256 ranges and adjacent ranges are fine.
    assert!(user_start(t, PAGE, &many(256)).is_ok(), "256 ranges");
    user_stop(t).unwrap();
    assert!(
        user_start(t, PAGE, &[r(0, PAGE), r(PAGE, PAGE)]).is_ok(),
        "adjacent ranges"
    );
    user_stop(t).unwrap();
    // num_ranges 0: kernel EINVAL; vfio-user logs all DMA-mapped space.
    if let Some(got) = kernel_start(t, PAGE, &[]) {
        assert_eq!(got, Err(EINVAL), "kernel START with no ranges");
    }
    assert!(
        user_start(t, PAGE, &[]).is_ok(),
        "vfio-user START with no ranges"
    );
    user_stop(t).unwrap();
    // Already started: kernel EINVAL; vfio-user identical OK, different EINVAL.
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    assert_eq!(
        user_start(t, PAGE, &[RANGE_A]),
        Ok(page),
        "identical START is idempotent"
    );
    assert_eq!(
        user_start(t, PAGE, &[RANGE_B]),
        Err(EINVAL),
        "different START while started"
    );
    assert_eq!(
        user_start(t, 2 * PAGE, &[RANGE_A]),
        Err(EINVAL),
        "other page size while started"
    );
    if let Some(got) = kernel_start(t, PAGE, &[RANGE_A]) {
        assert_eq!(got, Err(EINVAL), "kernel START twice");
    }
    // The started log is undisturbed by the refused STARTs.
    t.dma_write(RANGE_A.iova, 1);
    assert_eq!(
        user_dirty(t, RANGE_A.iova, RANGE_A.length, page).unwrap(),
        vec![0]
    );
    user_stop(t).unwrap();
    // Kernel: a ranges pointer to nowhere is EFAULT.
    let mut request = feature_request(
        32,
        START_SET,
        &KernelLoggingControl {
            page_size: PAGE,
            num_ranges: 1,
            __reserved: 0,
            ranges: 0xdead_0000,
        }
        .encode(),
    );
    if let Some(got) = t.feature_kernel(&mut request, &mut SegmentedUserMemory::new()) {
        assert_eq!(
            got,
            Err(libc::EFAULT),
            "kernel START with a bad ranges pointer"
        );
        assert_still_usable(t, "EFAULT");
    }
}

/// SPEC 3.3: STOP always succeeds.
pub fn stop_always_succeeds(make: MakeTarget<'_>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    assert_eq!(user_stop(t), Ok(()), "STOP before START");
    assert_eq!(user_stop(t), Ok(()), "STOP twice");
    user_start(t, PAGE, &[RANGE_A]).unwrap();
    assert_eq!(user_stop(t), Ok(()));
    assert_eq!(user_stop(t), Ok(()));
    assert_eq!(
        user_report(t, RANGE_A.iova, PAGE, PAGE),
        Err(EINVAL),
        "REPORT after STOP"
    );
}
