//! A dirty log over a large range, and a soft tracker START over one, do not make the log
//! resident: its words come from `alloc_zeroed`, so untouched pages cost no memory (its own
//! test binary, so that no other test's allocations move the resident size).

use dmalog::{DirtyLog, IovaBitmap, IovaRange, LogDriver, SoftDriver};

const PAGE: u64 = 4096;
const TIB: u64 = 1 << 40;

/// Resident bytes of this process (`/proc/self/statm`, second field, in pages of 4 KiB
/// on the hosts this runs on).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn large_logs_stay_mostly_untouched_until_marked() {
    // 4 TiB at 4 KiB: 2^30 pages, 128 MiB of words and 2 MiB of summary.
    let before = resident_bytes();
    let log = DirtyLog::new(0, 4 * TIB, PAGE).unwrap();
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "a 4 TiB log made {} MiB of its {} MiB resident",
        grown >> 20,
        log.footprint_bytes() >> 20
    );
    // Still a working log where touched.
    log.record_write(3 * TIB + 5 * PAGE, 1);
    let mut bitmap = [0u8; 8];
    let mut report = IovaBitmap::new(3 * TIB, 64 * PAGE, PAGE, &mut bitmap).unwrap();
    log.read_and_clear(3 * TIB, 64 * PAGE, &mut report);
    assert_eq!(bitmap[0], 1 << 5);
    drop(log);

    // The soft tracker's START over 1 TiB (a 32 MiB log) likewise.
    let mut driver = SoftDriver::new();
    let before = resident_bytes();
    let mut page_size = PAGE;
    driver
        .start(&[IovaRange::new(0, TIB).unwrap()], &mut page_size)
        .unwrap();
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "a soft START over 1 TiB made {} MiB resident",
        grown >> 20
    );
}
