//! The mlx5 model's own behaviour: capability clamps, range reduction, the address-space
//! cap, ring back-pressure, every fault one by one, detach, and DMA writers during reports.

use std::sync::atomic::Ordering;

use dmalog::uapi::LoggingRange;
use dmalog::{Dialect, LoggingCore, WriteRecorder};
use dmalog_conformance::drivers::{dirty_pages as report, USER};
use dmalog_models::mlx5::{Mlx5Faults, Mlx5Stats};
use dmalog_models::{Mlx5Caps, Mlx5Driver, Mlx5Fault};

const PAGE: u64 = 4096;

struct Rig {
    core: LoggingCore<Mlx5Driver>,
    device: WriteRecorder,
    faults: Mlx5Faults,
}

fn rig(caps: Mlx5Caps) -> Rig {
    let driver = Mlx5Driver::new(caps);
    let device = driver.recorder();
    let faults = driver.faults();
    Rig {
        core: LoggingCore::new(driver).with_max_ranges(1024),
        device,
        faults,
    }
}

fn range(iova: u64, length: u64) -> LoggingRange {
    LoggingRange { iova, length }
}

fn live_threads(stats: &Mlx5Stats) -> u64 {
    stats.live_threads.load(Ordering::SeqCst)
}

#[test]
fn presets_and_overrides_parse() {
    assert_eq!(Mlx5Caps::parse("cx7").unwrap(), Mlx5Caps::cx7());
    assert_eq!(Mlx5Caps::parse("").unwrap(), Mlx5Caps::cx7());
    let caps = Mlx5Caps::parse("tiny,max_num_range=8, log_max_msg_size=12").unwrap();
    assert_eq!(
        (
            caps.max_num_range,
            caps.log_max_msg_size,
            caps.log_max_addr_space
        ),
        (8, 12, 32)
    );
    assert!(Mlx5Caps::parse("cx9").is_err());
    assert!(Mlx5Caps::parse("tiny,max_num_range").is_err());
    assert!(Mlx5Caps::parse("tiny,log_max_page_size=300").is_err());
    assert!(
        Mlx5Caps::parse("tiny,log_min_page_size=22").is_err(),
        "min above max"
    );
    assert!(Mlx5Caps::parse("tiny,colour=3").is_err());
    assert_eq!(Mlx5Caps::tiny().ring_bytes(), 2 << 20);
    assert_eq!(
        Mlx5Caps::parse("tiny,log_max_msg_size=20")
            .unwrap()
            .ring_bytes(),
        4 << 20
    );
}

#[test]
fn page_size_is_clamped_both_ways_and_written_back() {
    let mut r = rig(Mlx5Caps::tiny());
    // Below the minimum: raised to 4 KiB.
    assert_eq!(r.core.start(USER, 1024, &[range(0, 1 << 20)]), Ok(PAGE));
    r.core.stop().unwrap();
    // Above the maximum: lowered to 2 MiB; a write marks a whole 2 MiB page.
    assert_eq!(
        r.core.start(USER, 1 << 30, &[range(0, 1 << 30)]),
        Ok(2 << 20)
    );
    r.device.record_write((2 << 20) + 5, 1);
    assert_eq!(
        report(&mut r.core, 0, 8 << 20).unwrap(),
        (512..1024).collect::<Vec<_>>()
    );
    r.core.stop().unwrap();
}

#[test]
fn three_hundred_ranges_are_reduced_to_four_by_smallest_gaps() {
    let mut r = rig(Mlx5Caps::tiny());
    // 300 one-page ranges: gaps of 1 page, except three big gaps (64, 128, 256 pages).
    let mut ranges = Vec::new();
    let mut at = 0u64;
    for i in 0..300u64 {
        ranges.push(range(at * PAGE, PAGE));
        at += 1 + match i {
            74 => 256,
            149 => 128,
            224 => 64,
            _ => 1,
        };
    }
    assert_eq!(r.core.start(USER, PAGE, &ranges), Ok(PAGE));
    // The one-page gaps were merged, so writes there are tracked; the three big gaps
    // remain holes.
    let small_gap = ranges[10].iova + PAGE;
    let big_gap = ranges[74].iova + 10 * PAGE;
    r.device.record_write(small_gap, 1);
    r.device.record_write(big_gap, 1);
    let span = ranges[299].iova + PAGE;
    let bits = report(&mut r.core, 0, span).unwrap();
    assert_eq!(
        bits,
        vec![small_gap / PAGE],
        "gap pages inside merged ranges are tracked, big gaps are not"
    );
    r.core.stop().unwrap();
}

#[test]
fn address_space_above_the_cap_is_eopnotsupp_and_leaves_nothing_running() {
    let mut r = rig(Mlx5Caps::tiny());
    let stats = r.faults.clone();
    assert_eq!(
        r.core
            .start(USER, PAGE, &[range(0, 1 << 33)])
            .unwrap_err()
            .errno(),
        libc::EOPNOTSUPP
    );
    // Two ranges of 2^31 + 4 KiB: the sum rounds up to 2^33.
    let two = [range(0, (1 << 31) + PAGE), range(1 << 40, (1 << 31) + PAGE)];
    assert_eq!(
        r.core.start(USER, PAGE, &two).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
    assert_eq!(live_threads(stats.stats()), 0);
    // Exactly 2^32 fits, and logging works.
    assert_eq!(r.core.start(USER, PAGE, &[range(0, 1 << 32)]), Ok(PAGE));
    r.device.record_write(7 * PAGE, 1);
    assert_eq!(report(&mut r.core, 0, 64 * PAGE).unwrap(), vec![7]);
    // A second START (kernel dialect) is EINVAL.
    assert_eq!(
        r.core
            .start(Dialect::Kernel, PAGE, &[range(0, 1 << 32)])
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    r.core.stop().unwrap();
    // Below the minimum address space: cx7 with a custom minimum.
    let mut r = rig(Mlx5Caps::parse("cx7,log_min_addr_space=30").unwrap());
    assert_eq!(
        r.core
            .start(USER, PAGE, &[range(0, 1 << 20)])
            .unwrap_err()
            .errno(),
        libc::EOPNOTSUPP
    );
}

#[test]
fn a_report_much_larger_than_the_ring_reuses_buffers_and_loses_nothing() {
    let mut r = rig(Mlx5Caps::tiny());
    let faults = r.faults.clone();
    // 2^32 bytes at 4 KiB: 1 Mi pages, 8 MiB of entries through a 2 MiB ring of 512-byte
    // messages.
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    r.device.record_write(0, 1 << 32);
    let bits = report(&mut r.core, 0, 1 << 32).unwrap();
    assert_eq!(bits.len(), 1 << 20);
    let stats = faults.stats();
    assert_eq!(stats.entries.load(Ordering::SeqCst), 1 << 20);
    assert_eq!(
        stats.messages.load(Ordering::SeqCst),
        (1 << 20) / 64 + 1,
        "full messages plus the TRACKING one"
    );
    // Four times more messages than receive buffers: every buffer was handed back and
    // reused (whether the device half had to wait for one depends on scheduling).
    let caps = Mlx5Caps::tiny();
    let ring_buffers = caps.ring_bytes() / caps.max_msg_size() as u64;
    assert!(stats.messages.load(Ordering::SeqCst) > 4 * ring_buffers);
    assert!(
        report(&mut r.core, 0, 1 << 32).unwrap().is_empty(),
        "the device half cleared what it reported"
    );
    r.core.stop().unwrap();
    assert_eq!(live_threads(stats), 0);
}

/// Every fault: REPORT is EIO, and stays EIO, until STOP and a new START; STOP frees the
/// device thread; logging then works again.
#[test]
fn each_fault_latches_eio_until_stop_and_start() {
    for fault in [
        Mlx5Fault::CompletionQueueError,
        Mlx5Fault::Catastrophic,
        Mlx5Fault::ObjectChangedError,
        Mlx5Fault::CompletionError,
        Mlx5Fault::MalformedMessage,
        Mlx5Fault::OversizedMessage,
        Mlx5Fault::BadOpcode,
    ] {
        let mut r = rig(Mlx5Caps::tiny());
        let faults = r.faults.clone();
        r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
        // Enough dirty pages for several messages, so message faults hit mid-report.
        r.device.record_write(0, 1 << 30);
        faults.inject(fault);
        assert_eq!(report(&mut r.core, 0, 1 << 32), Err(libc::EIO), "{fault:?}");
        r.device.record_write(5 * PAGE, 1);
        assert_eq!(
            report(&mut r.core, 0, 1 << 20),
            Err(libc::EIO),
            "{fault:?}: latched"
        );
        assert_eq!(
            report(&mut r.core, 0, 1 << 20),
            Err(libc::EIO),
            "{fault:?}: still latched"
        );
        r.core.stop().unwrap();
        assert_eq!(
            live_threads(faults.stats()),
            0,
            "{fault:?}: the device thread ended with STOP"
        );
        r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
        r.device.record_write(9 * PAGE, 1);
        assert_eq!(
            report(&mut r.core, 0, 1 << 20).unwrap(),
            vec![9],
            "{fault:?}: works after STOP+START"
        );
        r.core.stop().unwrap();
    }
}

#[test]
fn a_benign_object_change_is_queried_and_the_report_completes() {
    let mut r = rig(Mlx5Caps::tiny());
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    r.device.record_write(3 * PAGE, 200 * PAGE);
    r.faults.inject(Mlx5Fault::ObjectChangedBenign);
    assert_eq!(
        report(&mut r.core, 0, 1 << 20).unwrap(),
        (3..203).collect::<Vec<_>>()
    );
    r.core.stop().unwrap();
}

#[test]
fn detach_is_enotconn_and_stop_still_succeeds() {
    let mut r = rig(Mlx5Caps::tiny());
    let faults = r.faults.clone();
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    faults.detach();
    assert_eq!(report(&mut r.core, 0, 1 << 20), Err(libc::ENOTCONN));
    r.core.stop().unwrap();
    assert_eq!(live_threads(faults.stats()), 0);
    assert_eq!(
        r.core
            .start(USER, PAGE, &[range(0, 1 << 32)])
            .unwrap_err()
            .errno(),
        libc::ENOTCONN
    );
    faults.reattach();
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    r.device.record_write(PAGE, 1);
    assert_eq!(report(&mut r.core, 0, 1 << 20).unwrap(), vec![1]);
}

#[test]
fn stop_mid_report_joins_a_device_thread_blocked_on_a_full_ring() {
    let mut r = rig(Mlx5Caps::tiny());
    let faults = r.faults.clone();
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    r.device.record_write(0, 1 << 32); // 4x the ring
    faults.inject(Mlx5Fault::MalformedMessage); // the host stops consuming at once
    assert_eq!(report(&mut r.core, 0, 1 << 32), Err(libc::EIO));
    r.core.stop().unwrap();
    assert_eq!(live_threads(faults.stats()), 0);
    // Dropping a started driver also ends its thread.
    let mut r = rig(Mlx5Caps::tiny());
    let faults = r.faults.clone();
    r.core.start(USER, PAGE, &[range(0, 1 << 32)]).unwrap();
    drop(r);
    assert_eq!(live_threads(faults.stats()), 0);
}

#[test]
fn dma_writers_during_reports_lose_nothing() {
    let mut r = rig(Mlx5Caps::parse("cx7,log_max_msg_size=9").unwrap());
    let base = 1u64 << 32;
    let pages = 1u64 << 16;
    r.core
        .start(USER, PAGE, &[range(base, pages * PAGE)])
        .unwrap();
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let mut device = r.core.driver().unwrap().recorder();
            std::thread::spawn(move || {
                let mut written = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for _ in 0..50_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % pages;
                    device.record_write(base + page * PAGE, 8);
                    written.push(page);
                }
                written
            })
        })
        .collect();
    let mut seen = vec![false; pages as usize];
    let mut reports = 0;
    while !writers.iter().all(|w| w.is_finished()) || reports < 3 {
        for page in report(&mut r.core, base, pages * PAGE).unwrap() {
            seen[page as usize] = true;
        }
        reports += 1;
    }
    let written: Vec<u64> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    for page in report(&mut r.core, base, pages * PAGE).unwrap() {
        seen[page as usize] = true;
    }
    let missing = written.iter().filter(|&&page| !seen[page as usize]).count();
    assert_eq!(
        missing, 0,
        "{missing} written pages never reported ({reports} reports)"
    );
    r.core.stop().unwrap();
}
