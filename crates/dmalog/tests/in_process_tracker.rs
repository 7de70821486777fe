//! The consumer trait over an in-process soft tracker: what a VMM sees.

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver, TrackerError};

const PAGE: u64 = 4096;

#[test]
fn a_vmm_round_trip_through_the_trait() {
    let driver = SoftDriver::new();
    let mut device = driver.recorder();
    let mut tracker = InProcessTracker::new(driver);
    assert!(tracker.probe().unwrap());
    let ranges = [
        IovaRange::new(0, 1 << 30).unwrap(),
        IovaRange::new(4 << 30, 1 << 28).unwrap(),
    ];
    assert_eq!(tracker.start(&ranges, PAGE).unwrap(), PAGE);
    assert!(
        !device.is_logging(),
        "a recorder picks up the log at its next write"
    );
    device.record_write(5 * PAGE, 1);
    device.record_write((4 << 30) + 3 * PAGE, 2 * PAGE);
    assert!(device.is_logging());

    // The caller's buffer is reused and ORed into: bit 0 stays set.
    let mut bitmap = vec![0u64; report_words(1 << 30, PAGE).unwrap() as usize];
    bitmap[0] = 1;
    tracker
        .report(IovaRange::new(0, 1 << 30).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 1 | 1 << 5);
    assert!(bitmap[1..].iter().all(|&w| w == 0));

    let mut high = [0u64; 1];
    tracker
        .report(IovaRange::new(4 << 30, 64 * PAGE).unwrap(), PAGE, &mut high)
        .unwrap();
    assert_eq!(high[0], 0b11 << 3);

    // A buffer too short for the report is refused, not overrun.
    let mut short = [0u64; 1];
    let err = tracker
        .report(IovaRange::new(0, 65 * PAGE).unwrap(), PAGE, &mut short)
        .unwrap_err();
    assert!(matches!(
        err,
        TrackerError::BufferTooSmall {
            need_words: 2,
            have_words: 1
        }
    ));
    assert_eq!(err.errno(), libc::EINVAL);

    tracker.stop().unwrap();
    device.record_write(5 * PAGE, 1);
    assert!(
        !device.is_logging(),
        "after STOP writes are no longer logged"
    );
    let err = tracker
        .report(IovaRange::new(0, PAGE).unwrap(), PAGE, &mut short)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "REPORT after STOP");
    tracker.stop().unwrap();
}

#[test]
fn kernel_rules_apply_in_process() {
    let mut tracker = InProcessTracker::new(SoftDriver::new());
    assert_eq!(
        tracker.start(&[], PAGE).unwrap_err().errno(),
        libc::EINVAL,
        "no ranges"
    );
    let range = IovaRange::new(0, 1 << 20).unwrap();
    tracker.start(&[range], PAGE).unwrap();
    let mut bitmap = [0u64; 1];
    assert_eq!(
        tracker
            .report(IovaRange::new(0, PAGE).unwrap(), 2048, &mut bitmap)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        tracker.start(&[range], PAGE).unwrap_err().errno(),
        libc::EINVAL,
        "START twice"
    );
}

#[test]
fn soft_log_memory_cap_is_enomem_and_leaves_logging_stopped() {
    let mut tracker = InProcessTracker::new(SoftDriver::new().with_max_log_bytes(1 << 20));
    // 1 TiB at 4 KiB needs 32 MiB of log.
    let huge = IovaRange::new(0, 1 << 40).unwrap();
    assert_eq!(
        tracker.start(&[huge], PAGE).unwrap_err().errno(),
        libc::ENOMEM
    );
    // Still stopped: a smaller START works.
    tracker
        .start(&[IovaRange::new(0, 1 << 30).unwrap()], PAGE)
        .unwrap();
}

#[test]
fn page_size_hints_are_clamped_and_written_back() {
    let mut tracker = InProcessTracker::new(SoftDriver::new());
    let range = IovaRange::new(0, 1 << 31).unwrap();
    assert_eq!(
        tracker.start(&[range], 1 << 31).unwrap(),
        1 << 30,
        "above 1 GiB: 1 GiB"
    );
    tracker.stop().unwrap();
    // The kernel dialect requires ranges aligned to the hint; a 1 KiB hint is raised to 4 KiB.
    assert_eq!(tracker.start(&[range], 1024).unwrap(), PAGE);
}
