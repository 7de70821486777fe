//! The DirtyTracker over logged guest memory: reports by GPA, regions made or attached
//! after START, detached bitmaps, dropped regions, refused layouts, concurrent writers.

use std::sync::Arc;

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, IovaRange};
use dmalog_vm_memory::{DirtyRegions, DmalogBitmap, VmMemoryLogError};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;

/// Dirty GPA pages of `[gpa, gpa + len)` reported at 4 KiB (page numbers from `gpa`).
fn report(tracker: &mut impl DirtyTracker, gpa: u64, len: u64) -> Vec<u64> {
    let mut words = vec![0u64; report_words(len, PAGE).unwrap() as usize];
    tracker
        .report(IovaRange::new(gpa, len).unwrap(), PAGE, &mut words)
        .unwrap();
    let mut pages = Vec::new();
    for (w, word) in words.iter().enumerate() {
        for bit in 0..64 {
            if word >> bit & 1 == 1 {
                pages.push((w * 64 + bit) as u64);
            }
        }
    }
    pages
}

/// Logged guest memory of two 1 MiB regions, at GPA 0 and at 1 GiB.
fn two_regions() -> (Arc<DirtyRegions>, GuestMemoryMmap<DmalogBitmap>) {
    let regions = DirtyRegions::new(PAGE).unwrap();
    let memory = regions
        .guest_memory(&[
            (GuestAddress(0), (1 << 20) as usize, None),
            (GuestAddress(GIB), (1 << 20) as usize, None),
        ])
        .unwrap();
    (regions, memory)
}

#[test]
fn reports_by_gpa_across_regions_and_only_inside_started_ranges() {
    let (regions, memory) = two_regions();
    memory.write_obj(1u8, GuestAddress(7 * PAGE)).unwrap(); // before START: not reported
    let mut tracker = regions.tracker();
    tracker
        .start(
            &[
                IovaRange::new(0, 64 * PAGE).unwrap(),
                IovaRange::new(GIB, 1 << 20).unwrap(),
            ],
            PAGE,
        )
        .unwrap();
    memory.write_obj(1u8, GuestAddress(3 * PAGE)).unwrap();
    memory.write_obj(1u8, GuestAddress(100 * PAGE)).unwrap(); // outside the ranges
    memory
        .write_slice(&[1u8; 8192], GuestAddress(GIB + 5 * PAGE - 1))
        .unwrap();
    assert_eq!(report(&mut tracker, 0, 128 * PAGE), vec![3]);
    assert_eq!(report(&mut tracker, GIB, 64 * PAGE), vec![4, 5, 6]);
    assert!(report(&mut tracker, GIB, 64 * PAGE).is_empty(), "cleared");
    tracker.stop().unwrap();
}

#[test]
fn a_region_made_after_start_is_reported() {
    let regions = DirtyRegions::new(PAGE).unwrap();
    let memory = regions
        .guest_memory(&[(GuestAddress(0), (1 << 20) as usize, None)])
        .unwrap();
    let mut tracker = regions.tracker();
    tracker
        .start(&[IovaRange::new(0, 8 * GIB).unwrap()], PAGE)
        .unwrap();
    // Hot-plugged memory: a region built after START, inserted into the guest memory.
    let hotplug = regions
        .region(GuestAddress(4 * GIB), (2 << 20) as usize, None)
        .unwrap();
    let memory = memory.insert_region(Arc::new(hotplug)).unwrap();
    memory
        .write_obj(5u64, GuestAddress(4 * GIB + 3 * PAGE))
        .unwrap();
    memory.write_obj(5u64, GuestAddress(9 * PAGE)).unwrap();
    assert_eq!(report(&mut tracker, 4 * GIB, 64 * PAGE), vec![3]);
    assert_eq!(report(&mut tracker, 0, 4 * GIB + 64 * PAGE), vec![9]);
}

#[test]
fn bitmaps_vm_memory_makes_are_detached_until_attached() {
    let regions = DirtyRegions::new(PAGE).unwrap();
    // vm-memory builds these bitmaps itself (NewBitmap::with_len): no GPA yet.
    let memory =
        GuestMemoryMmap::<DmalogBitmap>::from_ranges(&[(GuestAddress(GIB), 1 << 20)]).unwrap();
    let mut tracker = regions.tracker();
    tracker
        .start(&[IovaRange::new(0, 8 * GIB).unwrap()], PAGE)
        .unwrap();
    memory.write_obj(1u8, GuestAddress(GIB + PAGE)).unwrap();
    assert!(
        report(&mut tracker, GIB, 64 * PAGE).is_empty(),
        "detached: records nothing"
    );
    regions.attach_memory(&memory).unwrap();
    regions.attach_memory(&memory).unwrap(); // again: a no-op
    assert_eq!(regions.region_count(), 1);
    memory.write_obj(1u8, GuestAddress(GIB + 2 * PAGE)).unwrap();
    assert_eq!(report(&mut tracker, GIB, 64 * PAGE), vec![2]);

    // A region vm-memory makes after START, inserted and attached.
    let late =
        GuestRegionMmap::<DmalogBitmap>::from_range(GuestAddress(2 * GIB), 1 << 20, None).unwrap();
    let memory = memory.insert_region(Arc::new(late)).unwrap();
    regions.attach_memory(&memory).unwrap();
    memory
        .write_obj(1u8, GuestAddress(2 * GIB + 6 * PAGE))
        .unwrap();
    assert_eq!(report(&mut tracker, 2 * GIB, 64 * PAGE), vec![6]);

    // Attached at one GPA, never at another.
    let region = memory.find_region(GuestAddress(GIB)).unwrap();
    let err = regions
        .attach(MmapRegion::bitmap(region), GuestAddress(3 * GIB))
        .unwrap_err();
    assert!(matches!(
        err,
        VmMemoryLogError::AlreadyAttached {
            attached: GIB,
            requested
        } if requested == 3 * GIB
    ));
}

#[test]
fn a_dropped_region_stops_being_reported() {
    let (regions, memory) = two_regions();
    let mut tracker = regions.tracker();
    tracker
        .start(&[IovaRange::new(0, 2 * GIB).unwrap()], PAGE)
        .unwrap();
    memory.write_obj(1u8, GuestAddress(GIB)).unwrap();
    let (smaller, removed) = memory.remove_region(GuestAddress(GIB), 1 << 20).unwrap();
    drop(memory);
    let memory = smaller;
    assert_eq!(regions.region_count(), 2, "still held by the removed Arc");
    drop(removed);
    assert_eq!(regions.region_count(), 1, "the log went with its region");
    assert!(report(&mut tracker, GIB, 64 * PAGE).is_empty());
    memory.write_obj(1u8, GuestAddress(PAGE)).unwrap();
    assert_eq!(report(&mut tracker, 0, 64 * PAGE), vec![1]);
}

#[test]
fn bad_layouts_are_refused() {
    for page_size in [0, 1000, 2048, 2 << 30] {
        let err = DirtyRegions::new(page_size).unwrap_err();
        assert!(matches!(err, VmMemoryLogError::PageSize(p) if p == page_size));
        assert_eq!(err.errno(), libc::EINVAL);
    }
    let regions = DirtyRegions::new(64 << 10).unwrap();
    for (gpa, len) in [(PAGE, 1 << 20), (0, (1 << 20) + PAGE as usize)] {
        let err = regions.region(GuestAddress(gpa), len, None).unwrap_err();
        assert!(
            matches!(err, VmMemoryLogError::Unaligned { page_size, .. } if page_size == 64 << 10),
            "{err}"
        );
    }
    let err = regions
        .region(GuestAddress(u64::MAX - (64 << 10) + 1), 128 << 10, None)
        .unwrap_err();
    assert!(matches!(err, VmMemoryLogError::Overflow { .. }), "{err}");
    let err = regions.region(GuestAddress(0), 0, None).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "zero-length region: {err}");
    assert_eq!(regions.region_count(), 0, "nothing registered");
}

#[test]
fn a_larger_tracker_page_reports_whole_tracker_pages() {
    let regions = DirtyRegions::new(PAGE).unwrap();
    let memory = regions
        .guest_memory(&[(GuestAddress(0), (8 << 20) as usize, None)])
        .unwrap();
    let mut tracker = regions.tracker();
    let page = tracker
        .start(&[IovaRange::new(0, 8 << 20).unwrap()], 2 << 20)
        .unwrap();
    assert_eq!(page, 2 << 20);
    memory
        .write_obj(1u8, GuestAddress((2 << 20) + 12345))
        .unwrap();
    assert_eq!(
        report(&mut tracker, 0, 8 << 20),
        (512..1024).collect::<Vec<_>>()
    );
    // A report of part of a tracker page clears the whole tracker page.
    memory.write_obj(1u8, GuestAddress(4 << 20)).unwrap();
    assert_eq!(
        report(&mut tracker, (5 << 20) + PAGE, PAGE),
        vec![0],
        "a report page inside a dirty tracker page"
    );
    assert!(
        report(&mut tracker, 4 << 20, 2 << 20).is_empty(),
        "the whole tracker page cleared"
    );
}

/// Writers on two threads dirty distinct pages while a reporter reports: every page is
/// reported exactly once in the union, and its data is there when it is.
#[test]
fn concurrent_writers_lose_no_page() {
    const PAGES: u64 = 4096;
    let regions = DirtyRegions::new(PAGE).unwrap();
    let memory = Arc::new(
        regions
            .guest_memory(&[(GuestAddress(0), (PAGES * PAGE) as usize, None)])
            .unwrap(),
    );
    let mut tracker = regions.tracker();
    tracker
        .start(&[IovaRange::new(0, PAGES * PAGE).unwrap()], PAGE)
        .unwrap();
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || {
                for page in (t..PAGES).step_by(2) {
                    memory
                        .write_obj(page + 1, GuestAddress(page * PAGE))
                        .unwrap();
                }
            })
        })
        .collect();
    let mut seen = vec![0u32; PAGES as usize];
    let mut reports = 0;
    let mut consume = |tracker: &mut dmalog_vm_memory::VmMemoryTracker| {
        for page in report(tracker, 0, PAGES * PAGE) {
            seen[page as usize] += 1;
            let value: u64 = memory.read_obj(GuestAddress(page * PAGE)).unwrap();
            assert_eq!(value, page + 1, "page {page} reported before its data");
        }
    };
    while writers.iter().any(|w| !w.is_finished()) && reports < 100_000 {
        consume(&mut tracker);
        reports += 1;
    }
    for writer in writers {
        writer.join().unwrap();
    }
    consume(&mut tracker);
    assert!(
        seen.iter().all(|&n| n == 1),
        "each page reported exactly once"
    );
}

/// Writes the last byte of `range` in `memory`; the 4 KiB report of `range` (4 words).
fn write_last_byte_and_report(
    memory: &GuestMemoryMmap<DmalogBitmap>,
    tracker: &mut impl DirtyTracker,
    range: IovaRange,
) -> [u64; 4] {
    let last = range.iova() + (range.len_bytes() - 1);
    memory.write_obj(1u8, GuestAddress(last)).unwrap();
    let mut words = [0u64; 4];
    tracker.report(range, PAGE, &mut words).unwrap();
    words
}

/// Requests at the top of the address space: refused or reported, never a panic or an
/// overflow.
#[test]
fn requests_at_the_top_of_the_address_space() {
    // A 1 MiB region ending 64 KiB below 2^64.
    let top = u64::MAX - (1 << 20) + 1 - (64 << 10);
    let regions = DirtyRegions::new(PAGE).unwrap();
    let memory = regions
        .guest_memory(&[(GuestAddress(top), 1 << 20, None)])
        .unwrap();
    let range = IovaRange::new(top, 1 << 20).unwrap();
    let mut tracker = regions.tracker();
    tracker.start(&[range], PAGE).unwrap();
    let words = write_last_byte_and_report(&memory, &mut tracker, range);
    assert_eq!(words[3], 1 << 63, "the last page");
    // A report past 2^64 cannot even be asked for: the range is refused.
    let err = IovaRange::new(u64::MAX - PAGE + 1, 2 * PAGE).unwrap_err();
    assert_eq!(err.errno(), libc::EOVERFLOW);
    tracker.stop().unwrap();
    // A 64 KiB tracker page at the top: whole tracker pages, no overflow.
    let page = tracker.start(&[range], 64 << 10).unwrap();
    assert_eq!(page, 64 << 10);
    let words = write_last_byte_and_report(&memory, &mut tracker, range);
    assert_eq!(words[3], 0xffff << 48, "the last 64 KiB");

    // Log pages of 64 KiB, a 4 KiB hint for the last 4 KiB page below 2^64: aligned out to
    // the 64 KiB the driver chooses, the range would pass 2^64. Refused, and still stopped.
    let coarse = DirtyRegions::new(64 << 10).unwrap();
    let mut tracker = coarse.tracker();
    let last = IovaRange::new(u64::MAX - 2 * PAGE + 1, PAGE).unwrap();
    let err = tracker.start(&[last], PAGE).unwrap_err();
    assert_eq!(err.errno(), libc::EOVERFLOW, "{err}");
    tracker
        .start(&[IovaRange::new(0, 1 << 20).unwrap()], PAGE)
        .unwrap();
}
