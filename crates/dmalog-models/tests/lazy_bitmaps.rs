//! A START over a large range does not make the whole tracker state resident: the
//! bitmaps come from `alloc_zeroed`, so untouched pages cost no memory (one test in its
//! own binary, so that no other test's allocations move the resident size).

use dmalog::uapi::LoggingRange;
use dmalog::{Dialect, LoggingCore};
use dmalog_models::PdsDriver;

const PAGE: u64 = 4096;

/// Resident bytes of this process (`/proc/self/statm`, second field, in pages of 4 KiB
/// on the hosts this runs on).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn pds_start_over_4_tib_leaves_its_bitmaps_mostly_untouched() {
    // 4 TiB at 4 KiB: 2^30 pages, a 128 MiB seq and a 128 MiB ack bitmap.
    let driver = PdsDriver::new(1);
    let mut dma = driver.recorder();
    let mut core = LoggingCore::new(driver);
    let before = resident_bytes();
    core.start(
        Dialect::VfioUser {
            max_data_xfer_size: u64::MAX,
        },
        PAGE,
        &[LoggingRange {
            iova: 0,
            length: 4 << 40,
        }],
    )
    .unwrap();
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "START made {} MiB resident of 256 MiB of bitmaps",
        grown >> 20
    );
    // The bitmaps still work where touched.
    dma.record_write(3 << 40, 1);
    let mut bitmap = [0u8; 8];
    core.report(
        Dialect::VfioUser {
            max_data_xfer_size: u64::MAX,
        },
        3 << 40,
        64 * PAGE,
        PAGE,
        &mut bitmap,
    )
    .unwrap();
    assert_eq!(bitmap[0], 1);
}
