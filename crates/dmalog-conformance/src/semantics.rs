//! What a REPORT sets and clears: ORs into the caller's buffer, any range, page-size conversion, "log all DMA-mapped space".

use crate::requests::{byte_bits, kernel_report, user_dirty, user_start, user_stop};
use crate::{MakeTarget, Variant, PAGE, RANGE_A, RANGE_B};

/// REPORT ORs into the caller's buffer and clears the log; a second report adds nothing.
pub fn report_ors_and_clears(make: MakeTarget<'_>) {
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
        assert_eq!(user_dirty(t, RANGE_A.iova, length, page).unwrap(), vec![2]);
    }
    t.dma_write(RANGE_A.iova + 5 * page, 1);
    assert_eq!(user_dirty(t, RANGE_A.iova, length, page).unwrap(), vec![5]);
    assert!(
        user_dirty(t, RANGE_A.iova, length, page)
            .unwrap()
            .is_empty(),
        "a report clears"
    );
    user_stop(t).unwrap();
    // A new START begins clean.
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    assert!(
        user_dirty(t, RANGE_A.iova, RANGE_A.length, page)
            .unwrap()
            .is_empty(),
        "START begins clean"
    );
    user_stop(t).unwrap();
}

/// Sub-ranges across range edges and holes, unaligned starts, untracked IOVA is zero.
pub fn report_any_range(make: MakeTarget<'_>) {
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
    let bits = user_dirty(t, from, length, PAGE).unwrap();
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
    let bits = user_dirty(t, from, 256 * PAGE, PAGE).unwrap();
    assert_eq!(bits, vec![63 - 37, 64 - 37, 65 - 37, 127 - 37, 200 - 37]);
    // Pages 1 (before the report) is still dirty; a report starting mid-page counts it.
    let bits = user_dirty(t, RANGE_A.iova + PAGE + 100, PAGE, PAGE).unwrap();
    assert_eq!(
        bits,
        vec![0],
        "a report page overlapping a dirty tracker page is dirty"
    );
    // Wholly untracked IOVA reports zero.
    t.dma_write(hole, 64 * PAGE);
    assert!(user_dirty(t, hole - 8 * PAGE, 128 * PAGE, PAGE)
        .unwrap()
        .is_empty());
    assert!(user_dirty(t, 0, RANGE_A.iova, PAGE).unwrap().is_empty());
    user_stop(t).unwrap();
}

/// Report page size differs from the tracker's: smaller replicates, larger ORs; identical
/// to reporting at the tracker's size and converting by hand.
pub fn report_page_size_conversion(make: MakeTarget<'_>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    // Tracker at 4 KiB, reports at 2 MiB and at 1 KiB.
    let page = user_start(t, PAGE, &[RANGE_A]).unwrap();
    t.dma_write(RANGE_A.iova + (2 << 20) + 5 * page, 1);
    t.dma_write(RANGE_A.iova + (6 << 20), 3 * page);
    assert_eq!(
        user_dirty(t, RANGE_A.iova, RANGE_A.length, 2 << 20).unwrap(),
        vec![1, 3]
    );
    t.dma_write(RANGE_A.iova + 7 * page, 1);
    let bits = user_dirty(t, RANGE_A.iova, 16 * page, 1024).unwrap();
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
    let bits = user_dirty(t, RANGE_A.iova, 8 << 20, PAGE).unwrap();
    assert_eq!(bits, (512..1024).collect::<Vec<_>>());
    // Report of a sub-range starting mid tracker page: every report page it overlaps.
    t.dma_write(RANGE_A.iova + (4 << 20), 1);
    let bits = user_dirty(t, RANGE_A.iova + (5 << 20), 2 << 20, PAGE).unwrap();
    assert_eq!(
        bits,
        (0..256).collect::<Vec<_>>(),
        "the second half of the dirty 2 MiB page"
    );
    user_stop(t).unwrap();
}

/// "Log all DMA-mapped space" (vfio-user START with no ranges).
pub fn log_all_mapped(make: MakeTarget<'_>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    t.dma_map(RANGE_A.iova, RANGE_A.length);
    let page = user_start(t, PAGE, &[]).unwrap();
    t.dma_write(RANGE_A.iova + 9 * page, 1);
    assert_eq!(
        user_dirty(t, RANGE_A.iova, 64 * page, page).unwrap(),
        vec![9]
    );
    t.dma_map(RANGE_B.iova, RANGE_B.length);
    t.dma_write(RANGE_B.iova + 2 * page, 1);
    let bits = user_dirty(t, RANGE_B.iova, 64 * page, page);
    if t.tracks_mappings_added_after_start() {
        assert_eq!(bits, Ok(vec![2]), "a mapping added after START is tracked");
    } else {
        // Fixed ranges cannot cover it: never a silently clean page, but EIO on every
        // REPORT until STOP and a new START (SPEC 8).
        assert_eq!(bits, Err(libc::EIO), "a mapping outside fixed ranges");
        assert_eq!(
            user_dirty(t, RANGE_A.iova, 64 * page, page),
            Err(libc::EIO),
            "every REPORT fails once a mapping is untracked"
        );
        user_stop(t).unwrap();
        let page = user_start(t, PAGE, &[]).unwrap();
        t.dma_write(RANGE_B.iova + 3 * page, 1);
        assert_eq!(
            user_dirty(t, RANGE_B.iova, 64 * page, page),
            Ok(vec![3]),
            "a new START covers the mapping"
        );
    }
    user_stop(t).unwrap();
}
