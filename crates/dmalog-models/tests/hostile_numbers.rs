//! Peer-controlled numbers that once reached unchecked arithmetic in the models: each is
//! now an error with the right errno, never a panic or a silently lost page (SPEC 8).

use dmalog::{IovaRange, LoggingCore};
use dmalog_conformance::drivers::USER;
use dmalog_models::PdsDriver;

const PAGE: u64 = 4096;

/// The last bytes of the IOVA space: a mapping whose end cannot be rounded up to a page.
fn top_of_iova_space() -> IovaRange {
    IovaRange::new(u64::MAX - 100, 100).unwrap()
}

#[test]
fn pds_log_all_with_a_mapping_at_the_top_of_the_iova_space() {
    // The region end once wrapped past 2^64: an overflow panic on the first write (or, in
    // release builds, a region that never matched: lost marks).
    let driver = PdsDriver::new(8);
    let mut dma = driver.recorder();
    let mut core = LoggingCore::new(driver);
    core.dma_mapped(top_of_iova_space());
    assert_eq!(
        core.start(USER, PAGE, &[]).map_err(|e| e.errno()),
        Err(libc::EOVERFLOW)
    );
    dma.record_write(u64::MAX - 50, 8);
    assert_eq!(core.started_page_size(), None, "nothing half-started");
}
