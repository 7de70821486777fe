//! REPORT rows (SPEC 3.4), both dialects: each refusal leaves the log intact.

use crate::requests::{
    kernel_report, user_dirty, user_report, user_report_request, user_start, user_stop,
};
use crate::{ConformanceTarget, MakeTarget, Variant, EINVAL, PAGE, RANGE_A};

/// SPEC 3.4: REPORT rows, both dialects; failures leave the log intact.
pub fn report_errnos(make: MakeTarget<'_>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    assert_eq!(
        user_report(t, RANGE_A.iova, PAGE, PAGE),
        Err(EINVAL),
        "REPORT before START"
    );
    if let Some(got) = kernel_report(t, RANGE_A.iova, PAGE, PAGE, &[0]) {
        assert_eq!(got, Err(EINVAL), "kernel REPORT before START");
    }
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    t.dma_write(RANGE_A.iova, 1);
    let raw =
        |t: &mut dyn ConformanceTarget, argsz: u32, iova: u64, length: u64, page_size: u64| {
            t.feature_vfio_user(&user_report_request(argsz, iova, length, page_size))
                .map(|_| ())
        };
    assert_eq!(
        raw(t, 64, RANGE_A.iova, PAGE, 3000),
        Err(EINVAL),
        "page size not a power of two"
    );
    assert_eq!(
        raw(t, 64, RANGE_A.iova, PAGE, 0),
        Err(EINVAL),
        "page size 0"
    );
    assert_eq!(
        raw(t, 64, u64::MAX - PAGE + 1, 2 * PAGE, PAGE),
        Err(libc::EOVERFLOW),
        "wrap"
    );
    assert_eq!(raw(t, 64, RANGE_A.iova, 0, PAGE), Err(EINVAL), "length 0");
    // 64 pages need one word: argsz 8+24+8 is enough, one byte less is not.
    assert_eq!(
        raw(t, 8 + 24 + 7, RANGE_A.iova, 64 * PAGE, PAGE),
        Err(EINVAL),
        "argsz short of the bitmap"
    );
    let max = t.max_data_xfer_size();
    let too_long = (max.saturating_mul(8) + 64) * PAGE;
    assert_eq!(
        raw(t, u32::MAX, 0, too_long, PAGE),
        Err(libc::E2BIG),
        "reply above max_data_xfer_size"
    );
    // vfio-user accepts report pages below 4 KiB; the kernel does not.
    assert!(
        user_report(t, RANGE_A.iova, PAGE, 2048).is_ok(),
        "vfio-user page size 2048"
    );
    if let Some(got) = kernel_report(t, RANGE_A.iova, PAGE, 2048, &[0]) {
        assert_eq!(got, Err(EINVAL), "kernel page size 2048");
        assert_eq!(
            kernel_report(t, RANGE_A.iova, PAGE, 12288, &[0]).unwrap(),
            Err(EINVAL),
            "kernel 12288"
        );
        assert_eq!(
            kernel_report(t, u64::MAX - PAGE + 1, 2 * PAGE, PAGE, &[0]).unwrap(),
            Err(libc::EOVERFLOW)
        );
        assert_eq!(
            kernel_report(t, RANGE_A.iova, 0, PAGE, &[0]).unwrap(),
            Err(EINVAL),
            "kernel length 0"
        );
        // A bitmap shorter than ceil(bits/8): EFAULT, no write past it.
        assert_eq!(
            kernel_report(t, RANGE_A.iova, 64 * PAGE, PAGE, &[0u8; 7]).unwrap(),
            Err(libc::EFAULT)
        );
        // A huge length with a small buffer is an error, not an out-of-bounds write.
        assert_eq!(
            kernel_report(t, 0, u64::MAX / 2, PAGE, &[0u8; 8]).unwrap(),
            Err(libc::EFAULT)
        );
    }
    // None of the failures cleared the log. (The 2048 report above did report and clear
    // page 0, so write it again.)
    t.dma_write(RANGE_A.iova + 3 * page, 1);
    let bits = user_dirty(t, RANGE_A.iova, RANGE_A.length, page).unwrap();
    assert_eq!(bits, vec![3], "the log survives refused reports");
    user_stop(t).unwrap();
}
