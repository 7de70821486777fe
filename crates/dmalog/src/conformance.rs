//! The conformance suite, written once and run against every driver, in process and over
//! the wire: every errno row of SPEC 3 as a table, report semantics, and a property test
//! against a model (a set of dirty tracker pages).
//!
//! A driver joins by implementing [`ConformanceTarget`] (or using [`CoreTarget`] for an
//! in-process core) and invoking [`conformance_tests!`](crate::conformance_tests) with a
//! factory expression; each case becomes its own `#[test]`.
//!
//! Layout of the IOVA space the suite uses (a target maps `[0, SUITE_SPAN)` if it needs
//! DMA mappings): range A `[16 MiB, 24 MiB)`, a hole, range B `[32 MiB, 36 MiB)`.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::driver::{LogDriver, WriteRecorder};
use crate::logging_core::LoggingCore;
use crate::uapi::{
    feature_request, KernelLoggingControl, KernelLoggingReport, LoggingRange, UapiStruct,
    UserLoggingControl, UserLoggingReport, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_PROBE, FEATURE_SET,
};
use crate::user_memory::SegmentedUserMemory;

/// Bytes of IOVA space the suite touches, from 0.
pub const SUITE_SPAN: u64 = 64 << 20;
/// Range A.
pub const RANGE_A: LoggingRange = LoggingRange {
    iova: 16 << 20,
    length: 8 << 20,
};
/// Range B (after a hole).
pub const RANGE_B: LoggingRange = LoggingRange {
    iova: 32 << 20,
    length: 4 << 20,
};
const PAGE: u64 = 4096;
const EINVAL: i32 = libc::EINVAL;

/// Which device the factory must build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// A device whose DMA writes are tracked.
    Logging,
    /// A device without DMA logging (every logging feature is ENOTTY).
    NoLogging,
}

/// A device under test, reached the way its users reach it.
pub trait ConformanceTarget {
    /// Sends a vfio-user DEVICE_FEATURE payload (argsz, flags, data); returns the reply's
    /// feature payload or the errno.
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32>;

    /// Sends a kernel-dialect feature with pointers into `user`; `None` when the target has
    /// no kernel dialect (a vfio-user server).
    fn feature_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>>;

    /// Has the device write `[iova, iova+len)` by DMA (inside `[0, SUITE_SPAN)`).
    fn dma_write(&mut self, iova: u64, len: u64);

    /// Declares a DMA mapping (for "log all DMA-mapped space").
    fn dma_map(&mut self, iova: u64, len: u64);

    /// The vfio-user `max_data_xfer_size` the target negotiated.
    fn max_data_xfer_size(&self) -> u64;

    /// Whether mappings made after a "log all" START are tracked (soft: yes; hardware
    /// trackers with fixed ranges: no, and one outside those ranges makes every REPORT
    /// EIO until STOP and a new START).
    fn tracks_mappings_added_after_start(&self) -> bool {
        true
    }
}

/// A [`ConformanceTarget`] over a logging core in this process; DMA writes go through a
/// [`WriteRecorder`] exactly as a device's would.
pub struct CoreTarget<D> {
    /// The core under test.
    pub core: LoggingCore<D>,
    recorder: Option<WriteRecorder>,
    max_data_xfer_size: u64,
    added_after_start: bool,
}

impl<D: LogDriver> CoreTarget<D> {
    /// A target over `core`, recording DMA writes through `recorder` (None: no logging).
    pub fn new(core: LoggingCore<D>, recorder: Option<WriteRecorder>) -> Self {
        CoreTarget {
            core,
            recorder,
            max_data_xfer_size: 1 << 20,
            added_after_start: true,
        }
    }

    /// Declares that this driver's ranges are fixed at START: a mapping added after a "log
    /// all" START outside them is not tracked, and REPORT fails with EIO instead.
    pub fn with_fixed_ranges(mut self) -> Self {
        self.added_after_start = false;
        self
    }
}

impl<D: LogDriver> ConformanceTarget for CoreTarget<D> {
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32> {
        let mut reply = Vec::new();
        self.core
            .handle_vfio_user(request, self.max_data_xfer_size, &mut reply)
            .map_err(|e| e.errno())?;
        Ok(reply)
    }

    fn feature_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>> {
        Some(
            self.core
                .handle_kernel(request, user)
                .map_err(|e| e.errno()),
        )
    }

    fn dma_write(&mut self, iova: u64, len: u64) {
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.record_write(iova, len);
        }
    }

    fn dma_map(&mut self, iova: u64, len: u64) {
        if let Ok(range) = crate::ranges::IovaRange::new(iova, len) {
            self.core.dma_mapped(range);
        }
    }

    fn max_data_xfer_size(&self) -> u64 {
        self.max_data_xfer_size
    }

    fn tracks_mappings_added_after_start(&self) -> bool {
        self.added_after_start
    }
}

// ---------------------------------------------------------------------------------------
// Request helpers (both dialects)

const START_SET: u32 = FEATURE_DMA_LOGGING_START | FEATURE_SET;
const STOP_SET: u32 = FEATURE_DMA_LOGGING_STOP | FEATURE_SET;
const REPORT_GET: u32 = FEATURE_DMA_LOGGING_REPORT | FEATURE_GET;
const RANGES_ADDR: u64 = 0x7000_0000;
const BITMAP_ADDR: u64 = 0x9000_0000;

fn user_start_request(flags: u32, page_size: u64, ranges: &[LoggingRange]) -> Vec<u8> {
    let payload = UserLoggingControl::encode(page_size, ranges);
    feature_request(8 + payload.len() as u32, flags, &payload)
}

/// vfio-user START; returns the chosen page size.
pub fn user_start(
    t: &mut dyn ConformanceTarget,
    page_size: u64,
    ranges: &[LoggingRange],
) -> Result<u64, i32> {
    let request = user_start_request(START_SET, page_size, ranges);
    let reply = t.feature_vfio_user(&request)?;
    assert_eq!(reply.len(), request.len(), "START reply echoes the request");
    assert_eq!(
        reply[16..],
        request[16..],
        "START reply echoes the request after the page size"
    );
    Ok(u64::from_le_bytes(reply[8..16].try_into().unwrap()))
}

/// vfio-user STOP.
pub fn user_stop(t: &mut dyn ConformanceTarget) -> Result<(), i32> {
    t.feature_vfio_user(&feature_request(8, STOP_SET, &[]))
        .map(|_| ())
}

/// vfio-user REPORT into fresh words.
pub fn user_report(
    t: &mut dyn ConformanceTarget,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<Vec<u64>, i32> {
    let words = crate::tracker::report_words(length, page_size).map_err(|e| e.errno())?;
    let argsz = 8 + 24 + words * 8;
    let request = feature_request(
        argsz as u32,
        REPORT_GET,
        &UserLoggingReport {
            iova,
            length,
            page_size,
        }
        .encode(),
    );
    let reply = t.feature_vfio_user(&request)?;
    assert_eq!(reply.len() as u64, argsz, "REPORT reply is argsz bytes");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()) as u64,
        argsz
    );
    assert_eq!(
        reply[8..32],
        request[8..32],
        "REPORT reply repeats the request"
    );
    Ok(reply[32..]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect())
}

/// Kernel START; returns the chosen page size (None: no kernel dialect).
pub fn kernel_start(
    t: &mut dyn ConformanceTarget,
    page_size: u64,
    ranges: &[LoggingRange],
) -> Option<Result<u64, i32>> {
    let mut user = SegmentedUserMemory::new();
    user.insert(
        RANGES_ADDR,
        ranges.iter().flat_map(|r| r.encode()).collect(),
    );
    let control = KernelLoggingControl {
        page_size,
        num_ranges: ranges.len() as u32,
        __reserved: 0,
        ranges: RANGES_ADDR,
    };
    let mut request = feature_request(8 + 24, START_SET, &control.encode());
    let result = t.feature_kernel(&mut request, &mut user)?;
    Some(result.map(|()| u64::from_le_bytes(request[8..16].try_into().unwrap())))
}

/// Kernel REPORT into a bitmap preloaded with `preset` bytes; returns the bytes.
pub fn kernel_report(
    t: &mut dyn ConformanceTarget,
    iova: u64,
    length: u64,
    page_size: u64,
    preset: &[u8],
) -> Option<Result<Vec<u8>, i32>> {
    let mut user = SegmentedUserMemory::new();
    user.insert(BITMAP_ADDR, preset.to_vec());
    let report = KernelLoggingReport {
        iova,
        length,
        page_size,
        bitmap: BITMAP_ADDR,
    };
    let mut request = feature_request(8 + 32, REPORT_GET, &report.encode());
    let result = t.feature_kernel(&mut request, &mut user)?;
    Some(result.map(|()| user.segment(BITMAP_ADDR).unwrap_or_default().to_vec()))
}

fn set_bits(words: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            out.push(i as u64 * 64 + w.trailing_zeros() as u64);
            w &= w - 1;
        }
    }
    out
}

fn byte_bits(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() as u64 * 8)
        .filter(|k| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Errno tables

/// SPEC 3.1: the feature header rows, in both dialects.
pub fn header_errnos(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    let start_payload = UserLoggingControl::encode(PAGE, &[RANGE_A]);
    // (name, request, expected errno or 0)
    let user_rows: Vec<(&str, Vec<u8>, i32)> = vec![
        ("shorter than the header", vec![0u8; 7], EINVAL),
        ("argsz below 8", feature_request(4, STOP_SET, &[]), EINVAL),
        (
            "argsz below the echo",
            feature_request(8, START_SET, &start_payload),
            EINVAL,
        ),
        (
            "reserved flag bit 19",
            feature_request(8, STOP_SET | 1 << 19, &[]),
            EINVAL,
        ),
        (
            "reserved flag bit 31",
            feature_request(8, STOP_SET | 1 << 31, &[]),
            EINVAL,
        ),
        (
            "GET|SET without PROBE",
            feature_request(8, STOP_SET | FEATURE_GET, &[]),
            EINVAL,
        ),
        (
            "unknown feature",
            feature_request(8, 0x1234 | FEATURE_GET, &[]),
            libc::ENOTTY,
        ),
        (
            "START with GET",
            feature_request(
                8 + 16,
                FEATURE_DMA_LOGGING_START | FEATURE_GET,
                &start_payload[..16],
            ),
            EINVAL,
        ),
        (
            "REPORT with SET",
            feature_request(8 + 24, FEATURE_DMA_LOGGING_REPORT | FEATURE_SET, &[0u8; 24]),
            EINVAL,
        ),
        (
            "PROBE START",
            feature_request(8, FEATURE_DMA_LOGGING_START | FEATURE_PROBE, &[]),
            0,
        ),
        (
            "PROBE START|SET",
            feature_request(8, START_SET | FEATURE_PROBE, &[]),
            0,
        ),
        (
            "PROBE START|GET",
            feature_request(
                8,
                FEATURE_DMA_LOGGING_START | FEATURE_GET | FEATURE_PROBE,
                &[],
            ),
            EINVAL,
        ),
        (
            "PROBE REPORT|GET",
            feature_request(8, REPORT_GET | FEATURE_PROBE, &[]),
            0,
        ),
        (
            "PROBE REPORT|SET",
            feature_request(
                8,
                FEATURE_DMA_LOGGING_REPORT | FEATURE_SET | FEATURE_PROBE,
                &[],
            ),
            EINVAL,
        ),
        (
            "PROBE STOP|SET",
            feature_request(8, STOP_SET | FEATURE_PROBE, &[]),
            0,
        ),
        (
            "PROBE GET|SET on START",
            feature_request(8, START_SET | FEATURE_GET | FEATURE_PROBE, &[]),
            EINVAL,
        ),
        (
            "neither GET nor SET",
            feature_request(8, FEATURE_DMA_LOGGING_STOP, &[]),
            EINVAL,
        ),
        (
            "START payload 15 bytes",
            feature_request(8 + 15, START_SET, &start_payload[..15]),
            EINVAL,
        ),
        (
            "START payload short of its ranges",
            feature_request(8 + 31, START_SET, &start_payload[..31]),
            EINVAL,
        ),
        (
            "REPORT payload 23 bytes",
            feature_request(8 + 32 + 8, REPORT_GET, &[0u8; 23]),
            EINVAL,
        ),
        ("STOP with no payload", feature_request(8, STOP_SET, &[]), 0),
    ];
    for (name, request, expected) in &user_rows {
        let got = t.feature_vfio_user(request);
        match (expected, &got) {
            (0, Ok(reply)) => {
                assert_eq!(reply, request, "vfio-user {name}: reply echoes the request")
            }
            (0, Err(errno)) => panic!("vfio-user {name}: expected success, got errno {errno}"),
            (e, Err(errno)) => assert_eq!(errno, e, "vfio-user {name}"),
            (e, Ok(_)) => panic!("vfio-user {name}: expected errno {e}, got success"),
        }
    }
    // Kernel dialect rows (argsz is the ioctl's, payload minimums 24/32/0).
    let kernel_rows: Vec<(&str, Vec<u8>, i32)> = vec![
        ("argsz below 8", feature_request(7, STOP_SET, &[]), EINVAL),
        (
            "reserved flag",
            feature_request(8, STOP_SET | 1 << 20, &[]),
            EINVAL,
        ),
        (
            "GET|SET",
            feature_request(8, STOP_SET | FEATURE_GET, &[]),
            EINVAL,
        ),
        (
            "unknown feature",
            feature_request(8, 0x99 | FEATURE_GET, &[]),
            libc::ENOTTY,
        ),
        (
            "START argsz 8+23",
            feature_request(8 + 23, START_SET, &[0u8; 23]),
            EINVAL,
        ),
        (
            "REPORT argsz 8+31",
            feature_request(8 + 31, REPORT_GET, &[0u8; 31]),
            EINVAL,
        ),
        ("STOP argsz 8", feature_request(8, STOP_SET, &[]), 0),
        (
            "PROBE START|SET",
            feature_request(8, START_SET | FEATURE_PROBE, &[]),
            0,
        ),
        (
            "PROBE REPORT|SET",
            feature_request(
                8,
                FEATURE_DMA_LOGGING_REPORT | FEATURE_SET | FEATURE_PROBE,
                &[],
            ),
            EINVAL,
        ),
        (
            "neither GET nor SET",
            feature_request(8, FEATURE_DMA_LOGGING_REPORT, &[]),
            EINVAL,
        ),
    ];
    let mut user = SegmentedUserMemory::new();
    for (name, request, expected) in &kernel_rows {
        let mut request = request.clone();
        let Some(got) = t.feature_kernel(&mut request, &mut user) else {
            break;
        };
        assert_eq!(got.err().unwrap_or(0), *expected, "kernel {name}");
    }
    // A device without logging: ENOTTY for all three, PROBE included.
    let mut none = make(Variant::NoLogging);
    for flags in [
        START_SET,
        STOP_SET,
        REPORT_GET,
        START_SET | FEATURE_PROBE,
        REPORT_GET | FEATURE_PROBE,
    ] {
        let request = feature_request(64, flags, &[0u8; 40]);
        assert_eq!(
            none.feature_vfio_user(&request),
            Err(libc::ENOTTY),
            "no logging, flags {flags:#x}"
        );
        let mut request = request.clone();
        if let Some(got) = none.feature_kernel(&mut request, &mut SegmentedUserMemory::new()) {
            assert_eq!(
                got,
                Err(libc::ENOTTY),
                "kernel, no logging, flags {flags:#x}"
            );
        }
    }
}

/// Checks that logging is stopped and still works: a valid START succeeds, a write is
/// reported, STOP succeeds.
fn assert_still_usable(t: &mut dyn ConformanceTarget, what: &str) {
    let page = user_start(t, PAGE, &[RANGE_A])
        .unwrap_or_else(|e| panic!("{what}: START after it failed with {e}"));
    t.dma_write(RANGE_A.iova + page, 1);
    let bits = set_bits(&user_report(t, RANGE_A.iova, RANGE_A.length, page).unwrap());
    assert_eq!(bits, vec![1], "{what}: logging works after");
    user_stop(t).unwrap();
}

/// SPEC 3.2: START rows, both dialects; each failure leaves logging stopped.
pub fn start_errnos(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
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
        set_bits(&user_report(t, RANGE_A.iova, RANGE_A.length, page).unwrap()),
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
pub fn stop_always_succeeds(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
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

/// SPEC 3.4: REPORT rows, both dialects; failures leave the log intact.
pub fn report_errnos(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
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
            let request = feature_request(
                argsz,
                REPORT_GET,
                &UserLoggingReport {
                    iova,
                    length,
                    page_size,
                }
                .encode(),
            );
            t.feature_vfio_user(&request).map(|_| ())
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
    let bits = set_bits(&user_report(t, RANGE_A.iova, RANGE_A.length, page).unwrap());
    assert_eq!(bits, vec![3], "the log survives refused reports");
    user_stop(t).unwrap();
}

// ---------------------------------------------------------------------------------------
// Report semantics

/// REPORT ORs into the caller's buffer and clears the log; a second report adds nothing.
pub fn report_ors_and_clears(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    let page = user_start(t, PAGE, &[RANGE_A, RANGE_B]).unwrap();
    t.dma_write(RANGE_A.iova + 2 * page, 10);
    let length = 16 * page;
    let bits = (length / page) as usize;
    if let Some(got) = kernel_report(t, RANGE_A.iova, length, page, &[0b1000_0001, 0x80]) {
        let bytes = got.unwrap();
        assert_eq!(bytes.len(), bits.div_ceil(8));
        assert_eq!(
            byte_bits(&bytes),
            vec![0, 2, 7, 15],
            "the caller's bits are kept"
        );
        let again = kernel_report(t, RANGE_A.iova, length, page, &[0, 0])
            .unwrap()
            .unwrap();
        assert_eq!(byte_bits(&again), Vec::<u64>::new(), "a report clears");
    } else {
        // No kernel dialect (a vfio-user server): replies carry a fresh bitmap.
        assert_eq!(
            set_bits(&user_report(t, RANGE_A.iova, length, page).unwrap()),
            vec![2]
        );
    }
    t.dma_write(RANGE_A.iova + 5 * page, 1);
    assert_eq!(
        set_bits(&user_report(t, RANGE_A.iova, length, page).unwrap()),
        vec![5]
    );
    assert!(
        set_bits(&user_report(t, RANGE_A.iova, length, page).unwrap()).is_empty(),
        "a report clears"
    );
    user_stop(t).unwrap();
    // A new START begins clean.
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    assert!(
        set_bits(&user_report(t, RANGE_A.iova, RANGE_A.length, page).unwrap()).is_empty(),
        "START begins clean"
    );
    user_stop(t).unwrap();
}

/// Sub-ranges across range edges and holes, unaligned starts, untracked IOVA is zero.
pub fn report_any_range(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    let page = user_start(t, PAGE, &[RANGE_A, RANGE_B]).unwrap();
    assert_eq!(
        page, PAGE,
        "a 4 KiB hint is honoured by the suite's drivers"
    );
    let last_a = RANGE_A.iova + RANGE_A.length - PAGE;
    let hole = RANGE_A.iova + RANGE_A.length + 4 * PAGE;
    t.dma_write(last_a, PAGE);
    t.dma_write(hole, PAGE); // untracked
    t.dma_write(RANGE_B.iova, PAGE);
    t.dma_write(RANGE_B.iova + 70 * PAGE + 100, 1);
    // One report over the end of A, the hole and the start of B.
    let from = last_a - 3 * PAGE;
    let length = RANGE_B.iova + 128 * PAGE - from;
    let bits = set_bits(&user_report(t, from, length, PAGE).unwrap());
    let expect = |iova: u64| (iova - from) / PAGE;
    assert_eq!(
        bits,
        vec![
            expect(last_a),
            expect(RANGE_B.iova),
            expect(RANGE_B.iova + 70 * PAGE)
        ]
    );
    // Unaligned start with respect to the log's 64-page words and to the page itself.
    for page_index in [1u64, 63, 64, 65, 127, 200] {
        t.dma_write(RANGE_A.iova + page_index * PAGE, 1);
    }
    let from = RANGE_A.iova + 37 * PAGE;
    let bits = set_bits(&user_report(t, from, 256 * PAGE, PAGE).unwrap());
    assert_eq!(bits, vec![63 - 37, 64 - 37, 65 - 37, 127 - 37, 200 - 37]);
    // Pages 1 (before the report) is still dirty; a report starting mid-page counts it.
    let bits = set_bits(&user_report(t, RANGE_A.iova + PAGE + 100, PAGE, PAGE).unwrap());
    assert_eq!(
        bits,
        vec![0],
        "a report page overlapping a dirty tracker page is dirty"
    );
    // Wholly untracked IOVA reports zero.
    t.dma_write(hole, 64 * PAGE);
    assert!(set_bits(&user_report(t, hole - 8 * PAGE, 128 * PAGE, PAGE).unwrap()).is_empty());
    assert!(set_bits(&user_report(t, 0, RANGE_A.iova, PAGE).unwrap()).is_empty());
    user_stop(t).unwrap();
}

/// Report page size differs from the tracker's: smaller replicates, larger ORs; identical
/// to reporting at the tracker's size and converting by hand.
pub fn report_page_size_conversion(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    // Tracker at 4 KiB, reports at 2 MiB and at 1 KiB.
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    t.dma_write(RANGE_A.iova + (2 << 20) + 5 * page, 1);
    t.dma_write(RANGE_A.iova + (6 << 20), 3 * page);
    assert_eq!(
        set_bits(&user_report(t, RANGE_A.iova, RANGE_A.length, 2 << 20).unwrap()),
        vec![1, 3]
    );
    t.dma_write(RANGE_A.iova + 7 * page, 1);
    let bits = set_bits(&user_report(t, RANGE_A.iova, 16 * page, 1024).unwrap());
    assert_eq!(
        bits,
        vec![28, 29, 30, 31],
        "a 4 KiB page is four 1 KiB report pages"
    );
    user_stop(t).unwrap();
    // Tracker at 2 MiB, report at 4 KiB: 512 bits per dirty tracker page.
    let page = user_start(t, 2 << 20, &[RANGE_A]).unwrap();
    assert_eq!(
        page,
        2 << 20,
        "a 2 MiB hint is honoured by the suite's drivers"
    );
    t.dma_write(RANGE_A.iova + (2 << 20) + 12345, 1);
    let bits = set_bits(&user_report(t, RANGE_A.iova, 8 << 20, PAGE).unwrap());
    assert_eq!(bits, (512..1024).collect::<Vec<_>>());
    // Report of a sub-range starting mid tracker page: every report page it overlaps.
    t.dma_write(RANGE_A.iova + (4 << 20), 1);
    let bits = set_bits(&user_report(t, RANGE_A.iova + (5 << 20), 2 << 20, PAGE).unwrap());
    assert_eq!(
        bits,
        (0..256).collect::<Vec<_>>(),
        "the second half of the dirty 2 MiB page"
    );
    user_stop(t).unwrap();
}

/// "Log all DMA-mapped space" (vfio-user START with no ranges).
pub fn log_all_mapped(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    t.dma_map(RANGE_A.iova, RANGE_A.length);
    let page = user_start(t, PAGE, &[]).unwrap();
    t.dma_write(RANGE_A.iova + 9 * page, 1);
    assert_eq!(
        set_bits(&user_report(t, RANGE_A.iova, 64 * page, page).unwrap()),
        vec![9]
    );
    t.dma_map(RANGE_B.iova, RANGE_B.length);
    t.dma_write(RANGE_B.iova + 2 * page, 1);
    let bits = user_report(t, RANGE_B.iova, 64 * page, page).map(|r| set_bits(&r));
    if t.tracks_mappings_added_after_start() {
        assert_eq!(bits, Ok(vec![2]), "a mapping added after START is tracked");
    } else {
        // Fixed ranges cannot cover it: never a silently clean page, but EIO on every
        // REPORT until STOP and a new START (SPEC 8).
        assert_eq!(bits, Err(libc::EIO), "a mapping outside fixed ranges");
        assert_eq!(
            user_report(t, RANGE_A.iova, 64 * page, page).map(|r| set_bits(&r)),
            Err(libc::EIO),
            "every REPORT fails once a mapping is untracked"
        );
        user_stop(t).unwrap();
        let page = user_start(t, PAGE, &[]).unwrap();
        t.dma_write(RANGE_B.iova + 3 * page, 1);
        assert_eq!(
            user_report(t, RANGE_B.iova, 64 * page, page).map(|r| set_bits(&r)),
            Ok(vec![3]),
            "a new START covers the mapping"
        );
    }
    user_stop(t).unwrap();
}

// ---------------------------------------------------------------------------------------
// Property test against a model

#[derive(Debug, Clone)]
enum Op {
    Write {
        iova: u64,
        len: u64,
    },
    Report {
        iova: u64,
        len: u64,
        page_shift: u32,
        kernel: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Addresses at byte, 1 KiB, 4 KiB, 64 KiB and 2 MiB granularity, so that every
    // conversion path (aligned grids and misaligned ones) is exercised.
    let aligned = |max: u64| {
        (
            0u64..max,
            prop::sample::select(vec![0u32, 10, 12, 12, 16, 21]),
        )
            .prop_map(move |(n, shift)| (n >> shift) << shift)
    };
    prop_oneof![
        3 => (aligned(48 << 20), prop_oneof![1u64..8192, 1u64..(3 << 20)]).prop_map(|(iova, len)| Op::Write { iova, len }),
        1 => (aligned(48 << 20), aligned(20 << 20), 10u32..23, any::<bool>())
            .prop_map(|(iova, len, page_shift, kernel)| Op::Report { iova, len: len.max(1), page_shift, kernel }),
    ]
}

/// The model: the set of dirty tracker pages, within the tracked ranges.
struct Model {
    page: u64,
    tracked: Vec<LoggingRange>,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn write(&mut self, iova: u64, len: u64) {
        for range in &self.tracked {
            let start = iova.max(range.iova);
            let end = (iova + len).min(range.iova + range.length);
            if start < end {
                for p in start / self.page..=(end - 1) / self.page {
                    self.dirty.insert(p);
                }
            }
        }
    }

    fn report(&mut self, iova: u64, len: u64, report_page: u64) -> BTreeSet<u64> {
        let mut bits = BTreeSet::new();
        let first = iova / self.page;
        let last = (iova + len - 1) / self.page;
        let hit: Vec<u64> = self.dirty.range(first..=last).copied().collect();
        for p in hit {
            self.dirty.remove(&p);
            let start = (p * self.page).max(iova);
            let end = ((p + 1) * self.page).min(iova + len);
            for k in (start - iova) / report_page..=(end - 1 - iova) / report_page {
                bits.insert(k);
            }
        }
        bits
    }
}

/// Random writes and reports (random ranges, page sizes 1 KiB to 4 MiB, both dialects)
/// against the model, for tracker page sizes of 4 KiB and 64 KiB. Set
/// `DMALOG_PROPTEST_CASES` for a longer run.
pub fn matches_model(make: &mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>) {
    let cases = std::env::var("DMALOG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop::sample::select(vec![PAGE, 64 << 10]),
        prop::collection::vec(op_strategy(), 1..40),
    );
    let make = std::cell::RefCell::new(make);
    let result = runner.run(&strategy, |(tracker_page, ops)| {
        let mut t = (make.borrow_mut())(Variant::Logging);
        let t = t.as_mut();
        let tracked = vec![RANGE_A, RANGE_B];
        let page = user_start(t, tracker_page, &tracked)
            .map_err(|e| TestCaseError::fail(format!("START {e}")))?;
        prop_assert_eq!(page, tracker_page);
        let mut model = Model {
            page,
            tracked,
            dirty: BTreeSet::new(),
        };
        for op in ops {
            match op {
                Op::Write { iova, len } => {
                    t.dma_write(iova, len);
                    model.write(iova, len);
                }
                Op::Report {
                    iova,
                    len,
                    page_shift,
                    kernel,
                } => {
                    let report_page = 1u64 << page_shift;
                    let expect = model.report(iova, len, report_page);
                    let bytes =
                        crate::iova_bitmap::report_bytes(len, report_page).unwrap() as usize;
                    let via_kernel = if kernel && report_page >= PAGE {
                        kernel_report(t, iova, len, report_page, &vec![0u8; bytes])
                    } else {
                        None
                    };
                    let got: BTreeSet<u64> = match via_kernel {
                        Some(result) => byte_bits(&result.unwrap()).into_iter().collect(),
                        None => set_bits(&user_report(t, iova, len, report_page).unwrap())
                            .into_iter()
                            .collect(),
                    };
                    prop_assert_eq!(
                        got,
                        expect,
                        "report iova {:#x} len {:#x} page {}",
                        iova,
                        len,
                        report_page
                    );
                }
            }
        }
        user_stop(t).unwrap();
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

/// Generates one `#[test]` per conformance case for a factory expression of type
/// `impl FnMut(Variant) -> Box<dyn ConformanceTarget>`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        #[test]
        fn conformance_header_errnos() {
            $crate::conformance::header_errnos(&mut $make)
        }
        #[test]
        fn conformance_start_errnos() {
            $crate::conformance::start_errnos(&mut $make)
        }
        #[test]
        fn conformance_stop_always_succeeds() {
            $crate::conformance::stop_always_succeeds(&mut $make)
        }
        #[test]
        fn conformance_report_errnos() {
            $crate::conformance::report_errnos(&mut $make)
        }
        #[test]
        fn conformance_report_ors_and_clears() {
            $crate::conformance::report_ors_and_clears(&mut $make)
        }
        #[test]
        fn conformance_report_any_range() {
            $crate::conformance::report_any_range(&mut $make)
        }
        #[test]
        fn conformance_report_page_size_conversion() {
            $crate::conformance::report_page_size_conversion(&mut $make)
        }
        #[test]
        fn conformance_log_all_mapped() {
            $crate::conformance::log_all_mapped(&mut $make)
        }
        #[test]
        fn conformance_matches_model() {
            $crate::conformance::matches_model(&mut $make)
        }
    };
}
