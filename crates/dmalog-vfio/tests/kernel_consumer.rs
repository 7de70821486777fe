//! The kernel consumer against dmalog's kernel-dialect core through the ioctl seam: every
//! SPEC 3 row reachable through the consumer, report semantics against an in-process
//! tracker, EFAULT for pointers outside the lent buffers, the mlx5 model's errnos, and
//! devices without logging.

use dmalog::uapi::{
    feature_request, KernelLoggingReport, LoggingRange, UapiStruct, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_GET,
};
use dmalog::{DirtyTracker, InProcessTracker, IovaRange, LoggingCore, SoftDriver, WriteRecorder};
use dmalog_models::{Mlx5Caps, Mlx5Driver};
use dmalog_vfio::fake::FakeVfioDevice;
use dmalog_vfio::uapi::VFIO_DEVICE_FEATURE;
use dmalog_vfio::{Errno, IoctlCall, VfioDevice, VfioError, VfioIoctl};
use proptest::prelude::*;

const PAGE: u64 = 4096;

fn soft_device() -> (VfioDevice<FakeVfioDevice<SoftDriver>>, WriteRecorder) {
    let driver = SoftDriver::new();
    let recorder = driver.recorder();
    (
        VfioDevice::new(FakeVfioDevice::new(LoggingCore::new(driver), None)),
        recorder,
    )
}

fn r(iova: u64, length: u64) -> LoggingRange {
    LoggingRange { iova, length }
}

fn errno_of(result: Result<impl Sized, VfioError>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(err) => err.errno(),
    }
}

#[test]
fn spec3_rows_through_the_consumer() {
    let (mut dev, mut writes) = soft_device();
    assert!(dev.probe_dma_logging().unwrap());
    let many = |n: u64| (0..n).map(|i| r(i * 2 * PAGE, PAGE)).collect::<Vec<_>>();
    // START rows (kernel column); each failure leaves logging stopped.
    let rows: Vec<(&str, u64, Vec<LoggingRange>, i32)> = vec![
        ("no ranges", PAGE, vec![], libc::EINVAL),
        ("257 ranges", PAGE, many(257), libc::E2BIG),
        ("page size 0", 0, vec![r(0, PAGE)], libc::EINVAL),
        ("page size 3000", 3000, vec![r(0, PAGE)], libc::EINVAL),
        ("iova not aligned", PAGE, vec![r(100, PAGE)], libc::EINVAL),
        (
            "length not aligned",
            PAGE,
            vec![r(0, PAGE + 1)],
            libc::EINVAL,
        ),
        (
            "end wraps",
            PAGE,
            vec![r(u64::MAX - PAGE + 1, PAGE)],
            libc::EOVERFLOW,
        ),
        (
            "overlap",
            PAGE,
            vec![r(0, 2 * PAGE), r(PAGE, PAGE)],
            libc::EINVAL,
        ),
        ("zero length", PAGE, vec![r(0, 0)], libc::EINVAL),
    ];
    for (name, page, ranges, expected) in rows {
        assert_eq!(
            errno_of(dev.start_logging(&ranges, page)),
            expected,
            "START {name}"
        );
        assert_eq!(
            errno_of(dev.report_bytes(0, PAGE, PAGE, &mut [0u8; 1])),
            libc::EINVAL,
            "{name}: still stopped"
        );
    }
    assert_eq!(
        dev.start_logging(&many(256), PAGE).unwrap(),
        PAGE,
        "256 ranges"
    );
    assert_eq!(
        errno_of(dev.start_logging(&many(1), PAGE)),
        libc::EINVAL,
        "START twice"
    );
    dev.stop_logging().unwrap();
    dev.stop_logging().unwrap();
    // REPORT rows.
    assert_eq!(
        errno_of(dev.report_bytes(0, PAGE, PAGE, &mut [0u8; 1])),
        libc::EINVAL,
        "REPORT before START"
    );
    dev.start_logging(&[r(0, 1 << 30)], PAGE).unwrap();
    for (name, iova, length, page, expected) in [
        ("page 2048", 0, PAGE, 2048, libc::EINVAL),
        ("page 12288", 0, PAGE, 12288, libc::EINVAL),
        ("wrap", u64::MAX - PAGE + 1, 2 * PAGE, PAGE, libc::EOVERFLOW),
        ("length 0", 0, 0, PAGE, libc::EINVAL),
    ] {
        assert_eq!(
            errno_of(dev.report_bytes(iova, length, page, &mut [0u8; 8])),
            expected,
            "REPORT {name}"
        );
    }
    // A bitmap the consumer lends too short for the report: EFAULT, nothing written past.
    let mut short = [0u8; 7];
    assert_eq!(
        errno_of(dev.report_bytes(0, 64 * PAGE, PAGE, &mut short)),
        libc::EFAULT
    );
    // And the log survived all of it.
    writes.record_write(3 * PAGE, 1);
    let mut bitmap = [0u64; 1];
    dev.report(IovaRange::new(0, 64 * PAGE).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 1 << 3);
    dev.stop_logging().unwrap();
}

#[test]
fn pointers_outside_the_lent_buffers_are_efault() {
    let (mut dev, _) = soft_device();
    dev.start_logging(&[r(0, 1 << 20)], PAGE).unwrap();
    let fake = dev.ioctl_mut();
    let mut lent = vec![0u8; 8];
    let elsewhere = [0u8; 8];
    for (addr, what) in [
        (elsewhere.as_ptr() as u64, "another buffer"),
        (lent.as_ptr() as u64 + 1, "one byte into it"),
        (0, "NULL"),
    ] {
        let report = KernelLoggingReport {
            iova: 0,
            length: 64 * PAGE,
            page_size: PAGE,
            bitmap: addr,
        };
        let mut request = feature_request(
            40,
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            &report.encode(),
        );
        // SAFETY: the fake resolves the (deliberately wrong) pointer inside `lent` only, so
        // breaking the caller's half of the contract here cannot touch other memory.
        let got = unsafe {
            fake.ioctl(
                IoctlCall::device(VFIO_DEVICE_FEATURE, &mut request).lending(&mut [&mut lent]),
            )
        };
        assert_eq!(got, Err(Errno(libc::EFAULT)), "{what}");
    }
}

#[test]
fn a_device_without_logging_is_enotty() {
    let mut dev = VfioDevice::new(FakeVfioDevice::new(
        LoggingCore::<SoftDriver>::unsupported(),
        None,
    ));
    assert!(!dev.probe_dma_logging().unwrap());
    let err = dev.start_logging(&[r(0, PAGE)], PAGE).unwrap_err();
    assert!(matches!(err, VfioError::NoDmaLogging));
    assert_eq!(err.errno(), libc::ENOTTY);
    let tracker_err =
        DirtyTracker::start(&mut dev, &[IovaRange::new(0, PAGE).unwrap()], PAGE).unwrap_err();
    assert_eq!(tracker_err.errno(), libc::ENOTTY);
    assert!(matches!(dev.migration_flags(), Err(VfioError::NoMigration)));
}

#[test]
fn the_mlx5_model_behind_the_kernel_consumer() {
    let driver = Mlx5Driver::new(Mlx5Caps::tiny());
    let faults = driver.faults();
    let mut writes = driver.recorder();
    let mut dev = VfioDevice::new(FakeVfioDevice::new(LoggingCore::new(driver), None));
    assert_eq!(
        errno_of(dev.start_logging(&[r(0, 1 << 33)], PAGE)),
        libc::EOPNOTSUPP,
        "address-space cap"
    );
    assert_eq!(
        dev.start_logging(&[r(0, 1 << 30)], 1 << 30).unwrap(),
        2 << 20,
        "page size clamped and read back"
    );
    writes.record_write(5 << 20, 1);
    let mut bitmap = [0u64; 8];
    dev.report(IovaRange::new(0, 1 << 30).unwrap(), 2 << 20, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 1 << 2);
    faults.inject(dmalog_models::Mlx5Fault::Catastrophic);
    assert_eq!(
        dev.report(IovaRange::new(0, 1 << 30).unwrap(), 2 << 20, &mut bitmap)
            .unwrap_err()
            .errno(),
        libc::EIO
    );
    assert_eq!(
        dev.report(IovaRange::new(0, 1 << 30).unwrap(), 2 << 20, &mut bitmap)
            .unwrap_err()
            .errno(),
        libc::EIO,
        "latched"
    );
    dev.stop_logging().unwrap();
    faults.detach();
    assert_eq!(
        errno_of(dev.start_logging(&[r(0, 1 << 30)], PAGE)),
        libc::ENOTCONN
    );
}

#[test]
fn reports_split_into_chunks_equal_one_report() {
    let (dev, mut writes) = soft_device();
    let mut dev = dev.with_report_chunk(100 * PAGE); // rounded down to 64 pages
    let (mut whole, mut whole_writes) = soft_device();
    let range = IovaRange::new(0, 1 << 24).unwrap();
    dev.start(&[range], PAGE).unwrap();
    whole.start(&[range], PAGE).unwrap();
    for page in [0u64, 63, 64, 65, 1000, 4095] {
        writes.record_write(page * PAGE, 1);
        whole_writes.record_write(page * PAGE, 1);
    }
    let mut a = vec![0u64; 64];
    let mut b = vec![0u64; 64];
    dev.report(IovaRange::new(0, 4096 * PAGE).unwrap(), PAGE, &mut a)
        .unwrap();
    whole
        .report(IovaRange::new(0, 4096 * PAGE).unwrap(), PAGE, &mut b)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.iter().map(|w| w.count_ones()).sum::<u32>(), 6);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The kernel consumer and an in-process tracker see the same writes and must produce
    /// the same bitmaps, for any report ranges and page sizes (OR into the caller's words).
    #[test]
    fn consumer_matches_in_process_tracker(
        writes in prop::collection::vec((0u64..(64 << 20), 1u64..(1 << 20)), 1..20),
        reports in prop::collection::vec((0u64..1024, 1u64..1024, 12u32..22, any::<u64>()), 1..8),
        chunk_pages in prop_oneof![Just(None), (1u64..300).prop_map(Some)],
    ) {
        let (dev, mut dev_writes) = soft_device();
        let mut dev = match chunk_pages { Some(pages) => dev.with_report_chunk(pages * PAGE), None => dev };
        let driver = SoftDriver::new();
        let mut model_writes = driver.recorder();
        let mut model = InProcessTracker::new(driver);
        let ranges = [IovaRange::new(0, 32 << 20).unwrap(), IovaRange::new(40 << 20, 8 << 20).unwrap()];
        prop_assert_eq!(dev.start(&ranges, PAGE).unwrap(), model.start(&ranges, PAGE).unwrap());
        for (iova, len) in writes {
            dev_writes.record_write(iova, len);
            model_writes.record_write(iova, len);
        }
        for (first_page, pages, shift, preset) in reports {
            let page = 1u64 << shift;
            let (iova, length) = (first_page * PAGE / page * page, pages * page);
            let words = dmalog::tracker::report_words(length, page).unwrap() as usize;
            let mut got = vec![preset; words];
            let mut want = vec![preset; words];
            dev.report(IovaRange::new(iova, length).unwrap(), page, &mut got).unwrap();
            model.report(IovaRange::new(iova, length).unwrap(), page, &mut want).unwrap();
            prop_assert_eq!(got, want);
        }
    }
}
