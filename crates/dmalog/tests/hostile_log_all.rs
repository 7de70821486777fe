//! "Log all DMA-mapped space" (vfio-user START with no ranges) against a peer that maps a
//! lot after START: every mapping's writes are reported, or every REPORT fails with EIO
//! until STOP and a new START (SPEC 8); never a silently clean page.

use dmalog::{IovaRange, LoggingCore, SoftDriver, WriteRecorder};
use dmalog_conformance::drivers::{dirty_pages as report, USER};

const PAGE: u64 = 4096;

fn range(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length).unwrap()
}

fn soft() -> (LoggingCore<SoftDriver>, WriteRecorder) {
    let driver = SoftDriver::new();
    let recorder = driver.recorder();
    (LoggingCore::new(driver), recorder)
}

/// Mapping `k` of the spread-out layout: one page every 64 KiB.
fn spread(k: u64) -> u64 {
    k << 16
}

#[test]
fn soft_covers_5000_mappings_made_after_start() {
    let (mut core, mut dma) = soft();
    assert_eq!(core.start(USER, PAGE, &[]), Ok(PAGE));
    for k in 0..5000 {
        core.dma_mapped(range(spread(k), PAGE));
    }
    dma.record_write(spread(4999) + 100, 8);
    dma.record_write(spread(0), 8);
    dma.record_write(spread(4096), 8);
    assert_eq!(
        report(&mut core, spread(4999), PAGE),
        Ok(vec![0]),
        "a write into the 5000th mapping made after START"
    );
    assert_eq!(report(&mut core, spread(4096), PAGE), Ok(vec![0]));
    assert_eq!(report(&mut core, spread(0), PAGE), Ok(vec![0]));
    assert_eq!(
        report(&mut core, 0, spread(5000)),
        Ok(vec![]),
        "all reported"
    );
}

#[test]
fn soft_covers_mappings_through_map_unmap_churn() {
    let (mut core, mut dma) = soft();
    core.dma_mapped(range(0, 16 * PAGE));
    assert_eq!(core.start(USER, PAGE, &[]), Ok(PAGE));
    // Churn at one IOVA: the range is already covered, no new log each time.
    for _ in 0..5000 {
        core.dma_mapped(range(1 << 30, 4 * PAGE));
        core.dma_unmapped(range(1 << 30, 4 * PAGE));
    }
    let after_same_iova = core.driver().unwrap().used_bytes();
    core.dma_mapped(range(1 << 30, 4 * PAGE));
    assert_eq!(
        core.driver().unwrap().used_bytes(),
        after_same_iova,
        "a re-map of covered IOVA adds no log"
    );
    dma.record_write((1 << 30) + 3 * PAGE, 1);
    assert_eq!(report(&mut core, 1 << 30, 4 * PAGE), Ok(vec![3]));
    // Churn at moving IOVAs: each mapping is unmapped before the next is made.
    for k in 0..5000 {
        core.dma_mapped(range((2 << 30) + spread(k), PAGE));
        core.dma_unmapped(range((2 << 30) + spread(k), PAGE));
    }
    core.dma_mapped(range(3 << 30, 2 * PAGE));
    dma.record_write((3 << 30) + PAGE, 1);
    dma.record_write(5 * PAGE, 1);
    assert_eq!(report(&mut core, 3 << 30, 2 * PAGE), Ok(vec![1]));
    assert_eq!(report(&mut core, 0, 16 * PAGE), Ok(vec![5]));
}

#[test]
fn soft_keeps_marks_across_added_ranges_and_remaps() {
    let (mut core, mut dma) = soft();
    core.dma_mapped(range(0, 8 * PAGE));
    core.start(USER, PAGE, &[]).unwrap();
    dma.record_write(2 * PAGE, 1);
    core.dma_mapped(range(1 << 20, 8 * PAGE));
    dma.record_write((1 << 20) + 7 * PAGE, 1);
    // Unmap and re-map a part of it, and a larger mapping overlapping its log.
    core.dma_unmapped(range(1 << 20, 8 * PAGE));
    core.dma_mapped(range((1 << 20) + 4 * PAGE, 8 * PAGE));
    dma.record_write((1 << 20) + 11 * PAGE, 1);
    assert_eq!(
        report(&mut core, 0, 8 * PAGE),
        Ok(vec![2]),
        "kept after adds"
    );
    assert_eq!(
        report(&mut core, 1 << 20, 16 * PAGE),
        Ok(vec![7, 11]),
        "a write before the re-map is kept, one after it is reported"
    );
}

#[test]
fn soft_added_ranges_beyond_the_budget_latch_eio() {
    // 64 KiB of budget: START of one page fits, 5000 spread mappings do not.
    let driver = SoftDriver::new().with_max_log_bytes(64 << 10);
    let mut dma = driver.recorder();
    let mut core = LoggingCore::new(driver);
    core.start(USER, PAGE, &[]).unwrap();
    for k in 0..5000 {
        core.dma_mapped(range(spread(k), PAGE));
    }
    dma.record_write(spread(4999), 1);
    assert_eq!(report(&mut core, spread(4999), PAGE), Err(libc::EIO));
    core.stop().unwrap();
    for k in 0..5000 {
        core.dma_unmapped(range(spread(k), PAGE));
    }
    core.dma_mapped(range(0, PAGE));
    core.start(USER, PAGE, &[]).unwrap();
    dma.record_write(0, 1);
    assert_eq!(
        report(&mut core, 0, PAGE),
        Ok(vec![0]),
        "a fresh START works"
    );
}

#[test]
fn log_all_start_covers_exactly_the_current_mappings() {
    let (mut core, mut dma) = soft();
    core.dma_mapped(range(0, 4 * PAGE));
    core.dma_mapped(range(1 << 20, 4 * PAGE));
    core.dma_mapped(range(2 << 20, 4 * PAGE));
    core.dma_unmapped(range(1 << 20, 4 * PAGE));
    core.dma_unmapped(range(0, 2 * PAGE)); // not a mapping as made: nothing happens
    core.start(USER, PAGE, &[]).unwrap();
    assert_eq!(core.driver().unwrap().log().unwrap().log_count(), 2);
    for iova in [PAGE, (1 << 20) + PAGE, (2 << 20) + PAGE] {
        dma.record_write(iova, 1);
    }
    assert_eq!(report(&mut core, 0, 4 * PAGE), Ok(vec![1]));
    assert_eq!(report(&mut core, 1 << 20, 4 * PAGE), Ok(vec![]), "unmapped");
    assert_eq!(report(&mut core, 2 << 20, 4 * PAGE), Ok(vec![1]));
    core.stop().unwrap();
    core.dma_unmapped_all();
    core.start(USER, PAGE, &[]).unwrap();
    assert_eq!(core.driver().unwrap().log().unwrap().log_count(), 0);
}
