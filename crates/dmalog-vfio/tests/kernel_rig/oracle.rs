//! SPEC 3's kernel-dialect errno table as raw DEVICE_FEATURE requests, to send to Linux's
//! vfio core (through mtty, whose DMA logging ops are stubs that accept everything: every
//! error comes from the core) and to dmalog's logging core (through `FakeVfioDevice`).
//!
//! Each row states both answers. `Agree` rows must match; `Differ` rows are the places
//! where the kernel leaves a check to the driver (or pins the bitmap lazily) and dmalog's
//! core, following SPEC 3, decides itself: a driver like mtty's stub answers 0 there. They
//! are listed so that either side changing shows up.

use dmalog::uapi::{
    feature_request, KernelLoggingControl, KernelLoggingReport, LoggingRange, UapiStruct,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE, FEATURE_SET,
};
use dmalog_vfio::uapi::VFIO_DEVICE_FEATURE;
use dmalog_vfio::{Errno, IoctlCall, IoctlTarget, VfioIoctl};
use libc::{E2BIG, EFAULT, EINVAL, ENOTTY, EOVERFLOW};

const PAGE: u64 = 4096;
const START: u32 = FEATURE_DMA_LOGGING_START | FEATURE_SET;
const STOP: u32 = FEATURE_DMA_LOGGING_STOP | FEATURE_SET;
const REPORT: u32 = FEATURE_DMA_LOGGING_REPORT | FEATURE_GET;
/// An address in the kernel half: `access_ok` refuses it before any access, and
/// `BorrowedUserMemory` finds it in no lent buffer, so both sides answer EFAULT if they
/// dereference it, and neither can touch memory through it.
pub const NOT_USER: u64 = 0xffff_ffff_ffff_0000;
/// The range logging runs over for the "started" rows.
pub const LOGGED: LoggingRange = LoggingRange {
    iova: 0x1000_0000,
    length: 0x10_0000,
};

/// A request.
#[derive(Debug, Clone)]
pub enum Req {
    /// Header and payload as given (`argsz` at most 8 + payload length).
    Raw {
        /// The header's argsz.
        argsz: u32,
        /// The header's flags.
        flags: u32,
        /// The payload bytes.
        payload: Vec<u8>,
    },
    /// START with the ranges in a lent buffer.
    Start {
        /// The page size hint.
        page_size: u64,
        /// The ranges.
        ranges: Vec<LoggingRange>,
        /// `reserved` of the control structure.
        reserved: u32,
    },
    /// START with `num_ranges` entries at a raw address.
    StartAt {
        /// Entries.
        num_ranges: u32,
        /// Where they are.
        ranges_addr: u64,
    },
    /// REPORT into a lent buffer of `bitmap_bytes` (at an odd offset when `odd`).
    Report {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        length: u64,
        /// Report page size.
        page_size: u64,
        /// Buffer size.
        bitmap_bytes: usize,
    },
    /// REPORT into a raw address.
    ReportAt {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        length: u64,
        /// Report page size.
        page_size: u64,
        /// Bitmap address.
        bitmap_addr: u64,
    },
}

/// What both sides answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The same errno (0: success).
    Agree(i32),
    /// The kernel with mtty's stub driver answers `kernel`, dmalog's core `dmalog`.
    Differ {
        /// Linux vfio core + mtty.
        kernel: i32,
        /// dmalog's kernel-dialect core.
        dmalog: i32,
        /// Why.
        why: &'static str,
    },
}

impl Expect {
    /// The kernel column.
    pub fn kernel(&self) -> i32 {
        match *self {
            Expect::Agree(e) => e,
            Expect::Differ { kernel, .. } => kernel,
        }
    }

    /// The dmalog column.
    pub fn dmalog(&self) -> i32 {
        match *self {
            Expect::Agree(e) => e,
            Expect::Differ { dmalog, .. } => dmalog,
        }
    }
}

/// Whether a row runs with logging stopped (STOP after it) or started over [`LOGGED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Logging stopped before the row; STOP after it.
    Stopped,
    /// Logging started over [`LOGGED`] before the row (and stays started).
    Started,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What it tests.
    pub name: &'static str,
    /// When it runs.
    pub phase: Phase,
    /// The request.
    pub req: Req,
    /// The answers.
    pub expect: Expect,
}

fn r(iova: u64, length: u64) -> LoggingRange {
    LoggingRange { iova, length }
}

fn raw(argsz: u32, flags: u32, payload_len: usize) -> Req {
    Req::Raw {
        argsz,
        flags,
        payload: vec![0u8; payload_len],
    }
}

fn start(page_size: u64, ranges: Vec<LoggingRange>) -> Req {
    Req::Start {
        page_size,
        ranges,
        reserved: 0,
    }
}

fn report(iova: u64, length: u64, page_size: u64) -> Req {
    let bytes = (length / page_size.max(1)).div_ceil(8).max(1) as usize;
    Req::Report {
        iova,
        length,
        page_size,
        bitmap_bytes: bytes.min(1 << 20),
    }
}

/// The table, in the order it is sent.
pub fn rows() -> Vec<Row> {
    use Expect::*;
    use Phase::*;
    let many = |n: u64| (0..n).map(|i| r(i * 2 * PAGE, PAGE)).collect::<Vec<_>>();
    let wrap = r(u64::MAX - PAGE + 1, PAGE);
    let row = |name, phase, req, expect| Row {
        name,
        phase,
        req,
        expect,
    };
    vec![
        // SPEC 3.1: the feature header.
        row("argsz 7", Stopped, raw(7, STOP, 0), Agree(EINVAL)),
        row("reserved flag bit 19", Stopped, raw(8, STOP | 1 << 19, 0), Agree(EINVAL)),
        row("reserved flag bit 31", Stopped, raw(8, STOP | 1 << 31, 0), Agree(EINVAL)),
        row("GET|SET without PROBE", Stopped, raw(8, STOP | FEATURE_GET, 0), Agree(EINVAL)),
        row("unknown feature 0x99", Stopped, raw(8, 0x99 | FEATURE_GET, 0), Agree(ENOTTY)),
        row("feature index 0", Stopped, raw(8, FEATURE_GET, 0), Agree(ENOTTY)),
        row("START with GET", Stopped, raw(32, FEATURE_DMA_LOGGING_START | FEATURE_GET, 24), Agree(EINVAL)),
        row("REPORT with SET", Stopped, raw(40, FEATURE_DMA_LOGGING_REPORT | FEATURE_SET, 32), Agree(EINVAL)),
        row("STOP with GET", Stopped, raw(8, FEATURE_DMA_LOGGING_STOP | FEATURE_GET, 0), Agree(EINVAL)),
        row("PROBE START|SET", Stopped, raw(8, START | FEATURE_PROBE, 0), Agree(0)),
        row("PROBE START alone", Stopped, raw(8, FEATURE_DMA_LOGGING_START | FEATURE_PROBE, 0), Agree(0)),
        row("PROBE START|GET", Stopped, raw(8, FEATURE_DMA_LOGGING_START | FEATURE_GET | FEATURE_PROBE, 0), Agree(EINVAL)),
        row("PROBE START|GET|SET", Stopped, raw(8, START | FEATURE_GET | FEATURE_PROBE, 0), Agree(EINVAL)),
        row("PROBE REPORT|GET", Stopped, raw(8, REPORT | FEATURE_PROBE, 0), Agree(0)),
        row("PROBE REPORT|SET", Stopped, raw(8, FEATURE_DMA_LOGGING_REPORT | FEATURE_SET | FEATURE_PROBE, 0), Agree(EINVAL)),
        row("PROBE STOP|SET", Stopped, raw(8, STOP | FEATURE_PROBE, 0), Agree(0)),
        row("REPORT neither GET nor SET", Stopped, raw(8, FEATURE_DMA_LOGGING_REPORT, 0), Agree(EINVAL)),
        row("STOP neither GET nor SET", Stopped, raw(8, FEATURE_DMA_LOGGING_STOP, 0), Agree(EINVAL)),
        row("START argsz 8+23", Stopped, raw(31, START, 23), Agree(EINVAL)),
        row("REPORT argsz 8+31", Stopped, raw(39, REPORT, 31), Agree(EINVAL)),
        row("STOP argsz 8", Stopped, raw(8, STOP, 0), Agree(0)),
        row("STOP with a 16-byte payload", Stopped, raw(24, STOP, 16), Agree(0)),
        // The migration features' headers (mtty has migration v2).
        row("MIGRATION GET argsz 8+7", Stopped, raw(15, FEATURE_MIGRATION | FEATURE_GET, 7), Agree(EINVAL)),
        row("MIGRATION GET", Stopped, raw(16, FEATURE_MIGRATION | FEATURE_GET, 8), Agree(0)),
        row("MIGRATION SET", Stopped, raw(16, FEATURE_MIGRATION | FEATURE_SET, 8), Agree(EINVAL)),
        row("PROBE MIGRATION|GET", Stopped, raw(8, FEATURE_MIGRATION | FEATURE_GET | FEATURE_PROBE, 0), Agree(0)),
        row("MIG_DEVICE_STATE GET argsz 8+7", Stopped, raw(15, FEATURE_MIG_DEVICE_STATE | FEATURE_GET, 7), Agree(EINVAL)),
        row("MIG_DEVICE_STATE GET", Stopped, raw(16, FEATURE_MIG_DEVICE_STATE | FEATURE_GET, 8), Agree(0)),
        row("PROBE MIG_DEVICE_STATE GET|SET", Stopped, raw(8, FEATURE_MIG_DEVICE_STATE | FEATURE_GET | FEATURE_SET | FEATURE_PROBE, 0), Agree(0)),
        row("MIG_DATA_SIZE GET", Stopped, raw(16, FEATURE_MIG_DATA_SIZE | FEATURE_GET, 8), Agree(0)),
        row("MIG_DATA_SIZE SET", Stopped, raw(16, FEATURE_MIG_DATA_SIZE | FEATURE_SET, 8), Agree(EINVAL)),
        // SPEC 3.2: START.
        row("START num_ranges 0", Stopped, start(PAGE, vec![]), Agree(EINVAL)),
        row("START 257 ranges", Stopped, start(PAGE, many(257)), Agree(E2BIG)),
        row("START 256 ranges", Stopped, start(PAGE, many(256)), Agree(0)),
        row("START adjacent ranges", Stopped, start(PAGE, vec![r(0, PAGE), r(PAGE, PAGE)]), Agree(0)),
        row("START page size 0", Stopped, start(0, vec![LOGGED]), Agree(EINVAL)),
        row("START page size 3000, ranges aligned to its bits", Stopped, start(3000, vec![LOGGED]),
            Differ { kernel: 0, dmalog: EINVAL, why: "the vfio core leaves the page size to the driver (IS_ALIGNED with a mask only); mtty's stub accepts it" }),
        row("START iova not page aligned", Stopped, start(PAGE, vec![r(LOGGED.iova + 512, PAGE)]), Agree(EINVAL)),
        row("START length not page aligned", Stopped, start(PAGE, vec![r(LOGGED.iova, PAGE + 1)]), Agree(EINVAL)),
        row("START end at 2^64", Stopped, start(PAGE, vec![wrap]), Agree(EOVERFLOW)),
        row("START overlap", Stopped, start(PAGE, vec![LOGGED, r(LOGGED.iova + PAGE, PAGE)]), Agree(EINVAL)),
        row("START duplicate", Stopped, start(PAGE, vec![LOGGED, LOGGED]), Agree(EINVAL)),
        row("START zero-length range", Stopped, start(PAGE, vec![r(LOGGED.iova, 0)]),
            Differ { kernel: 0, dmalog: EINVAL, why: "the vfio core inserts [iova, iova-1] into its interval tree and calls the driver" }),
        row("START bad range after good ones", Stopped, start(PAGE, vec![LOGGED, r(0, PAGE), r(PAGE * 2, 7)]), Agree(EINVAL)),
        row("START order: wrap before misaligned", Stopped, start(PAGE, vec![wrap, r(100, PAGE)]), Agree(EOVERFLOW)),
        row("START order: misaligned before wrap", Stopped, start(PAGE, vec![r(100, PAGE), wrap]), Agree(EINVAL)),
        row("START order: overlap before wrap", Stopped, start(PAGE, vec![LOGGED, LOGGED, wrap]), Agree(EINVAL)),
        row("START order: wrap before overlap", Stopped, start(PAGE, vec![LOGGED, wrap, LOGGED]), Agree(EOVERFLOW)),
        row("START reserved field set", Stopped, Req::Start { page_size: PAGE, ranges: vec![LOGGED], reserved: 1 }, Agree(0)),
        row("START ranges pointer not user memory", Stopped, Req::StartAt { num_ranges: 1, ranges_addr: NOT_USER }, Agree(EFAULT)),
        row("START 257 ranges at a bad pointer", Stopped, Req::StartAt { num_ranges: 257, ranges_addr: NOT_USER }, Agree(E2BIG)),
        row("REPORT before START", Stopped, report(LOGGED.iova, PAGE, PAGE),
            Differ { kernel: 0, dmalog: EINVAL, why: "the vfio core does not know whether logging runs: the driver does (mtty's stub says 0)" }),
        row("START twice", Started, start(PAGE, vec![LOGGED]),
            Differ { kernel: 0, dmalog: EINVAL, why: "the vfio core keeps no logging state: the driver refuses a second START (mtty's stub does not)" }),
        // SPEC 3.4: REPORT (logging started).
        row("REPORT whole range", Started, report(LOGGED.iova, LOGGED.length, PAGE), Agree(0)),
        row("REPORT page size 2048", Started, report(LOGGED.iova, PAGE, 2048), Agree(EINVAL)),
        row("REPORT page size 0", Started, report(LOGGED.iova, PAGE, 0), Agree(EINVAL)),
        row("REPORT page size 12288", Started, report(LOGGED.iova, 3 * 12288, 12288), Agree(EINVAL)),
        row("REPORT page size 2^63", Started, report(0, 1 << 63, 1 << 63), Agree(0)),
        row("REPORT wraps", Started, report(u64::MAX - PAGE + 1, 2 * PAGE, PAGE), Agree(EOVERFLOW)),
        row("REPORT end at 2^64", Started, report(u64::MAX - PAGE + 1, PAGE, PAGE), Agree(EOVERFLOW)),
        row("REPORT outside the logged range", Started, report(0, PAGE, PAGE), Agree(0)),
        row("REPORT iova not page aligned", Started, report(LOGGED.iova + 100, PAGE, PAGE), Agree(0)),
        row("REPORT length 0", Started, report(LOGGED.iova, 0, PAGE),
            Differ { kernel: 0, dmalog: EINVAL, why: "the vfio core passes length 0 to the driver" }),
        row("REPORT bitmap pointer not user memory", Started,
            Req::ReportAt { iova: LOGGED.iova, length: 64 * PAGE, page_size: PAGE, bitmap_addr: NOT_USER },
            Differ { kernel: 0, dmalog: EFAULT, why: "the kernel pins the bitmap only when a bit is set; mtty sets none" }),
        row("REPORT bitmap 7 bytes for 64 pages", Started,
            Req::Report { iova: LOGGED.iova, length: 64 * PAGE, page_size: PAGE, bitmap_bytes: 7 },
            Differ { kernel: 0, dmalog: EFAULT, why: "the kernel pins lazily (page granular) and mtty sets no bit" }),
        row("STOP while started", Started, raw(8, STOP, 0), Agree(0)),
        row("STOP twice", Stopped, raw(8, STOP, 0), Agree(0)),
    ]
}

/// Sends `req` to `dev`; returns 0 or the errno.
pub fn send<I: VfioIoctl>(dev: &mut I, req: &Req) -> i32 {
    let mut ranges_buf: Vec<u8> = Vec::new();
    let mut bitmap_buf: Vec<u8> = Vec::new();
    let mut arg = match req {
        Req::Raw {
            argsz,
            flags,
            payload,
        } => feature_request(*argsz, *flags, payload),
        Req::Start {
            page_size,
            ranges,
            reserved,
        } => {
            for range in ranges {
                ranges_buf.extend_from_slice(&range.encode());
            }
            let control = KernelLoggingControl {
                page_size: *page_size,
                num_ranges: ranges.len() as u32,
                __reserved: *reserved,
                ranges: ranges_buf.as_ptr() as u64,
            };
            feature_request(32, START, &control.encode())
        }
        Req::StartAt {
            num_ranges,
            ranges_addr,
        } => {
            let control = KernelLoggingControl {
                page_size: PAGE,
                num_ranges: *num_ranges,
                __reserved: 0,
                ranges: *ranges_addr,
            };
            feature_request(32, START, &control.encode())
        }
        Req::Report {
            iova,
            length,
            page_size,
            bitmap_bytes,
        } => {
            // One byte in: a bitmap that is not 8-byte aligned.
            bitmap_buf = vec![0u8; bitmap_bytes + 1];
            let report = KernelLoggingReport {
                iova: *iova,
                length: *length,
                page_size: *page_size,
                bitmap: bitmap_buf.as_ptr() as u64 + 1,
            };
            feature_request(40, REPORT, &report.encode())
        }
        Req::ReportAt {
            iova,
            length,
            page_size,
            bitmap_addr,
        } => {
            let report = KernelLoggingReport {
                iova: *iova,
                length: *length,
                page_size: *page_size,
                bitmap: *bitmap_addr,
            };
            feature_request(40, REPORT, &report.encode())
        }
    };
    // SAFETY: `arg` is the whole feature (argsz never above its length). Its pointers are
    // the starts of `ranges_buf` (every range START reads) and `bitmap_buf` + 1 (which
    // holds `bitmap_bytes`, all a REPORT may write, except in the rows that lend less on
    // purpose: the kernel pins the bitmap page-wise and mtty never sets a bit, so nothing is
    // written there), both lent here, or `NOT_USER`, which no side dereferences (EFAULT).
    let result = unsafe {
        dev.ioctl(IoctlCall {
            target: IoctlTarget::Device,
            nr: VFIO_DEVICE_FEATURE,
            arg: &mut arg,
            lent: &mut [&mut ranges_buf, &mut bitmap_buf],
        })
    };
    match result {
        Ok(_) => 0,
        Err(Errno(errno)) => errno,
    }
}

/// Runs the table on `dev`, putting it in each row's phase first; returns one answer per
/// row.
pub fn run<I: VfioIoctl>(dev: &mut I) -> Vec<i32> {
    let stop = raw(8, STOP, 0);
    let begin = start(PAGE, vec![LOGGED]);
    let mut started = false;
    let mut answers = Vec::new();
    for row in rows() {
        match (row.phase, started) {
            (Phase::Started, false) => {
                assert_eq!(send(dev, &begin), 0, "START before {}", row.name);
                started = true;
            }
            (Phase::Stopped, true) => {
                assert_eq!(send(dev, &stop), 0, "STOP before {}", row.name);
                started = false;
            }
            _ => {}
        }
        answers.push(send(dev, &row.req));
        if row.phase == Phase::Stopped {
            assert_eq!(send(dev, &stop), 0, "STOP after {}", row.name);
        }
        if row.name == "STOP while started" {
            started = false;
        }
    }
    answers
}

/// Compares `answers` with one column of the table; the message lists every mismatch.
pub fn check_column(side: &str, answers: &[i32], column: impl Fn(&Expect) -> i32) {
    let rows = rows();
    let mut mismatches = Vec::new();
    for (row, got) in rows.iter().zip(answers) {
        let want = column(&row.expect);
        if *got != want {
            mismatches.push(format!(
                "  {}: {side} answered {got}, the table says {want}",
                row.name
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{side} disagrees with the table:\n{}",
        mismatches.join("\n")
    );
}
