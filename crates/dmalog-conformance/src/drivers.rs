//! Checks that take a driver rather than a transport, run by every driver's tests: the
//! memory budget (SPEC 8), fixed ranges in "log all" mode, and a hostile peer's mappings.
//! Each drives a [`LoggingCore`] over the driver in the vfio-user dialect at 4 KiB pages.

use dmalog::uapi::LoggingRange;
use dmalog::{Dialect, IovaRange, LogDriver, LoggingCore, WriteRecorder};
use proptest::prelude::*;

use crate::requests::byte_bits;
use crate::PAGE;

/// The dialect the checks speak: vfio-user, no reply limit.
pub const USER: Dialect = Dialect::VfioUser {
    max_data_xfer_size: u64::MAX,
};

/// The dirty pages (numbers from `iova`) of `[iova, iova+length)` at 4 KiB, read and
/// cleared through `core`, or the errno.
pub fn dirty_pages<D: LogDriver>(
    core: &mut LoggingCore<D>,
    iova: u64,
    length: u64,
) -> Result<Vec<u64>, i32> {
    let mut bytes = vec![0u8; (length / PAGE).div_ceil(8) as usize];
    core.report(USER, iova, length, PAGE, &mut bytes)
        .map_err(|e| e.errno())?;
    Ok(byte_bits(&bytes))
}

/// Two ranges of `length` and `length / 2` bytes, far apart.
fn budget_ranges(length: u64) -> [LoggingRange; 2] {
    [
        LoggingRange { iova: 0, length },
        LoggingRange {
            iova: 1 << 50,
            length: length / 2,
        },
    ]
}

/// The memory budget table for one driver (SPEC 8): `make` builds it with a budget in
/// bytes, `used_bytes` reads its charge, `floor_bytes` is what START over `npages` pages
/// must at least charge. A budget of exactly the charge starts, one byte less is ENOMEM
/// with nothing half-started, and a smaller START then succeeds; STOP frees the charge.
pub fn check_budget<D: LogDriver>(
    name: &str,
    make: impl Fn(u64) -> D,
    used_bytes: impl Fn(&D) -> u64,
    floor_bytes: impl Fn(u64) -> u64,
) {
    let length = 4 << 30; // 1 Mi pages (128 KiB of bitmap) plus half of that
    let charge = {
        let mut core = LoggingCore::new(make(u64::MAX));
        core.start(USER, PAGE, &budget_ranges(length)).unwrap();
        let charge = used_bytes(core.driver().unwrap());
        core.stop().unwrap();
        assert_eq!(used_bytes(core.driver().unwrap()), 0, "{name}: STOP frees");
        charge
    };
    let floor = floor_bytes((length + length / 2) / PAGE);
    assert!(
        charge >= floor,
        "{name}: charges {charge}, below its bitmaps ({floor})"
    );
    for (budget, expected) in [(charge, Ok(PAGE)), (charge - 1, Err(libc::ENOMEM))] {
        let mut core = LoggingCore::new(make(budget));
        let got = core
            .start(USER, PAGE, &budget_ranges(length))
            .map_err(|e| e.errno());
        assert_eq!(got, expected, "{name} with a budget of {budget} bytes");
        if got.is_ok() {
            continue;
        }
        // Nothing half-started: logging is stopped, nothing charged.
        assert_eq!(core.started_page_size(), None, "{name}");
        assert_eq!(
            used_bytes(core.driver().unwrap()),
            0,
            "{name}: nothing charged"
        );
        let mut bitmap = [0u8; 8];
        assert_eq!(
            core.report(USER, 0, 64 * PAGE, PAGE, &mut bitmap)
                .map_err(|e| e.errno()),
            Err(libc::EINVAL),
            "{name}: not started"
        );
        // A smaller START then fits.
        assert_eq!(
            core.start(USER, PAGE, &budget_ranges(length / 4))
                .map_err(|e| e.errno()),
            Ok(PAGE),
            "{name}: a smaller START after ENOMEM"
        );
    }
}

/// A 64 TiB START (at 4 KiB, 2 GiB of bitmap) under the default budget is ENOMEM.
pub fn check_huge_start_is_enomem<D: LogDriver>(driver: D) {
    let huge = [LoggingRange {
        iova: 0,
        length: 64 << 40,
    }];
    let mut core = LoggingCore::new(driver);
    assert_eq!(
        core.start(USER, PAGE, &huge).map_err(|e| e.errno()),
        Err(libc::ENOMEM)
    );
}

fn range(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length).unwrap()
}

/// A driver whose ranges are fixed at START (one range at most), in "log all" mode:
/// `[0, 1 MiB)` and `[2 MiB, 3 MiB)` mapped and merged into `[0, 3 MiB)` at START; a
/// mapping inside is covered, one outside latches every REPORT into EIO until STOP and a
/// new START (SPEC 8), never a silently clean page.
pub fn check_fixed_ranges_latch_eio<D: LogDriver>(
    mut core: LoggingCore<D>,
    mut dma: WriteRecorder,
) {
    core.dma_mapped(range(0, 1 << 20));
    core.dma_mapped(range(2 << 20, 1 << 20));
    assert_eq!(core.start(USER, PAGE, &[]), Ok(PAGE));
    // Inside the hardware range: covered, no error.
    core.dma_mapped(range(1 << 20, 1 << 20));
    dma.record_write((1 << 20) + 5 * PAGE, 1);
    assert_eq!(dirty_pages(&mut core, 1 << 20, 1 << 20), Ok(vec![5]));
    // Outside: the log is latched into error, every REPORT is EIO.
    assert!(!core.is_untracked_mapping_latched());
    core.dma_mapped(range(8 << 20, 1 << 20));
    assert!(core.is_untracked_mapping_latched());
    dma.record_write(8 << 20, 1);
    assert_eq!(dirty_pages(&mut core, 8 << 20, 1 << 20), Err(libc::EIO));
    assert_eq!(
        dirty_pages(&mut core, 0, 1 << 20),
        Err(libc::EIO),
        "every REPORT"
    );
    assert_eq!(
        dirty_pages(&mut core, 0, 1 << 20),
        Err(libc::EIO),
        "until STOP"
    );
    // STOP and a new START (which now covers the new mapping) clear it.
    core.stop().unwrap();
    assert_eq!(core.start(USER, PAGE, &[]), Ok(PAGE));
    assert!(!core.is_untracked_mapping_latched());
    dma.record_write((8 << 20) + PAGE, 1);
    assert_eq!(dirty_pages(&mut core, 8 << 20, 1 << 20), Ok(vec![1]));
}

/// One step of a peer driving DMA mappings and logging against a tracker.
#[derive(Debug, Clone)]
pub enum PeerOp {
    /// DMA_MAP of `(iova, len_bytes)`.
    Map(u64, u64),
    /// DMA_UNMAP of `(iova, len_bytes)`.
    Unmap(u64, u64),
    /// START logging all DMA-mapped space at this page size.
    StartAll(u64),
    /// START over these `(iova, len_bytes)` ranges (rounded down to the page size).
    StartRanges(u64, Vec<(u64, u64)>),
    /// A device write of `(iova, len_bytes)`.
    Write(u64, u64),
    /// REPORT of `(iova, len_bytes, page_size)`.
    Report(u64, u64, u64),
    /// STOP.
    Stop,
}

/// An address biased towards the edges of the IOVA space, where arithmetic wraps.
fn edge_address() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..(1 << 24),
        (0u64..(1 << 16)).prop_map(|back| u64::MAX - back),
        any::<u64>(),
    ]
}

/// One hostile peer step: any lengths, page sizes from 1 byte to 512 GiB.
pub fn peer_op() -> impl Strategy<Value = PeerOp> {
    let len = prop_oneof![1u64..(1 << 20), any::<u64>()];
    let page = (0u32..40).prop_map(|shift| 1u64 << shift);
    prop_oneof![
        3 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Map(a, l)),
        1 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Unmap(a, l)),
        1 => page.clone().prop_map(PeerOp::StartAll),
        1 => (page.clone(), prop::collection::vec((edge_address(), len.clone()), 0..4))
            .prop_map(|(p, r)| PeerOp::StartRanges(p, r)),
        2 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Write(a, l)),
        2 => (edge_address(), len, page).prop_map(|(a, l, p)| PeerOp::Report(a, l, p)),
        1 => Just(PeerOp::Stop),
    ]
}

/// Runs `ops` against `core` (the device writing through `dma`): every error carries an
/// errno, nothing panics.
pub fn run_peer<D: LogDriver>(
    mut core: LoggingCore<D>,
    mut dma: WriteRecorder,
    ops: Vec<PeerOp>,
) -> Result<(), TestCaseError> {
    let user = Dialect::VfioUser {
        max_data_xfer_size: 1 << 16,
    };
    let mut bitmap = vec![0u8; 1 << 16];
    for op in ops {
        let result = match op {
            PeerOp::Map(iova, len) => {
                if let Ok(range) = IovaRange::new(iova, len) {
                    core.dma_mapped(range);
                }
                Ok(())
            }
            PeerOp::Unmap(iova, len) => {
                if let Ok(range) = IovaRange::new(iova, len) {
                    core.dma_unmapped(range);
                }
                Ok(())
            }
            PeerOp::StartAll(page) => core.start(user, page, &[]).map(|_| ()),
            PeerOp::StartRanges(page, ranges) => {
                let ranges: Vec<LoggingRange> = ranges
                    .into_iter()
                    .map(|(iova, length)| LoggingRange {
                        iova: iova & !(page - 1),
                        length: length & !(page - 1),
                    })
                    .collect();
                core.start(user, page, &ranges).map(|_| ())
            }
            PeerOp::Write(iova, len) => {
                dma.record_write(iova, len);
                Ok(())
            }
            PeerOp::Report(iova, len, page) => {
                let need = len.checked_div(page).unwrap_or(0).div_ceil(8) + 1;
                let bytes = need.min(bitmap.len() as u64) as usize;
                core.report(user, iova, len, page, &mut bitmap[..bytes])
            }
            PeerOp::Stop => core.stop(),
        };
        if let Err(err) = result {
            prop_assert!(err.errno() > 0);
        }
    }
    Ok(())
}
