//! Unit tests of the dirty log: marks, reports at every page size, clears.

use super::*;

fn report(log: &DirtyLog, iova: u64, len: u64, page: u64) -> Vec<u64> {
    let bytes = crate::iova_bitmap::report_bytes(len, page).unwrap() as usize;
    let mut buf = vec![0u8; bytes];
    let mut bm = IovaBitmap::new(iova, len, page, &mut buf).unwrap();
    log.read_and_clear(iova, len, &mut bm);
    (0..bytes as u64 * 8)
        .filter(|k| buf[(k / 8) as usize] >> (k % 8) & 1 == 1)
        .collect()
}

#[test]
fn mark_and_report_same_page_size() {
    let log = DirtyLog::new(0x100000, 1 << 30, 4096).unwrap();
    log.mark(0x100000, 1);
    log.mark(0x100000 + 70 * 4096 + 5, 4096);
    assert_eq!(report(&log, 0x100000, 1 << 20, 4096), vec![0, 70, 71]);
    assert!(
        report(&log, 0x100000, 1 << 20, 4096).is_empty(),
        "a report clears"
    );
}

#[test]
fn unaligned_start_with_respect_to_words() {
    let log = DirtyLog::new(0, 1 << 24, 4096).unwrap();
    for page in [3u64, 64, 65, 130, 200] {
        log.mark(page * 4096, 4096);
    }
    // Report starting at page 3: bit k = page 3 + k.
    assert_eq!(
        report(&log, 3 * 4096, 1 << 20, 4096),
        vec![0, 61, 62, 127, 197]
    );
}

#[test]
fn partial_word_report_keeps_the_rest_reachable() {
    let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
    log.mark(0, 64 * 4096);
    assert_eq!(report(&log, 4096, 4096, 4096), vec![0]);
    // The other 63 pages are still found through the summary.
    assert_eq!(report(&log, 0, 64 * 4096, 4096).len(), 63);
}

fn rmws() -> (u64, u64) {
    (
        rmw_count::WORD.with(|c| c.get()),
        rmw_count::SUMMARY.with(|c| c.get()),
    )
}

#[test]
fn dense_group_of_full_and_partial_words_keeps_the_callers_bits() {
    // Group 1 (interior, every word flagged): even words all dirty, odd words one page
    // each. The caller's bitmap has bits of its own in both kinds of word and in clean
    // groups; the report only adds bits.
    let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
    let mut expected = Vec::new();
    for k in 0..64u64 {
        let first_page = 4096 + 64 * k;
        if k % 2 == 0 {
            log.mark(first_page * 4096, 64 * 4096);
            expected.extend(first_page..first_page + 64);
        } else {
            log.mark((first_page + k) * 4096, 1);
            expected.push(first_page + k);
        }
    }
    let callers = [5u64, 4096 + 64 + 3, 4096 + 2 * 64 + 7, 12000];
    expected.extend(callers);
    expected.sort_unstable();
    expected.dedup();
    let mut buf = vec![0u8; (64 << 20) / 4096 / 8];
    for page in callers {
        buf[(page / 8) as usize] |= 1 << (page % 8);
    }
    let mut bm = IovaBitmap::new(0, 64 << 20, 4096, &mut buf).unwrap();
    log.read_and_clear(0, 64 << 20, &mut bm);
    let got: Vec<u64> = (0..buf.len() as u64 * 8)
        .filter(|k| buf[(k / 8) as usize] >> (k % 8) & 1 == 1)
        .collect();
    assert_eq!(got, expected);
    assert!(report(&log, 0, 64 << 20, 4096).is_empty(), "cleared");
}

#[test]
fn dense_groups_with_partial_and_full_words() {
    // Four groups of 64 words (16 MiB each at 4 KiB): group 1 has every word flagged
    // but only one page in each, group 2 is all dirty; both are interior to the report.
    let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
    let mut expected: Vec<u64> = (0..64).map(|k| 4096 + 64 * k + k).collect();
    for &page in &expected {
        log.mark(page * 4096, 1);
    }
    log.mark(32 << 20, 16 << 20);
    expected.extend(8192..12288);
    assert_eq!(report(&log, 0, 64 << 20, 4096), expected);
    assert!(report(&log, 0, 64 << 20, 4096).is_empty(), "cleared");
}

#[test]
fn marking_dirty_pages_costs_no_rmw() {
    let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
    let (w0, s0) = rmws();
    log.mark(10 * 4096, 16 * 4096); // 16 fresh pages in one word
    assert_eq!(rmws(), (w0 + 1, s0 + 1), "one word RMW and one summary RMW");
    log.mark(10 * 4096, 16 * 4096);
    log.mark(12 * 4096, 1);
    assert_eq!(rmws(), (w0 + 1, s0 + 1), "already dirty: no RMW at all");
    log.mark(60 * 4096, 200 * 4096); // pages 60..260: words 0..=4
    assert_eq!(rmws().0, w0 + 1 + 5, "at most one RMW per 64-page word");
    let (w1, s1) = rmws();
    log.mark(60 * 4096, 200 * 4096);
    assert_eq!(rmws(), (w1, s1));
}

#[test]
fn the_interior_scan_finds_a_page_in_every_group_position() {
    // 21 groups of 4096 pages: 19 interior ones, scanned eight summary words at a time
    // plus a remainder of three. One page in groups at chunk edges, and both edges.
    let log = DirtyLog::new(0, 21 * 4096 * 4096, 4096).unwrap();
    let groups = [0u64, 1, 2, 8, 9, 10, 16, 17, 18, 19, 20];
    let pages: Vec<u64> = groups.iter().map(|g| g * 4096 + 7 * g + 3).collect();
    for &page in &pages {
        log.mark(page * 4096, 1);
    }
    assert_eq!(report(&log, 0, 21 * 4096 * 4096, 4096), pages);
    for &page in &pages {
        log.mark(page * 4096, 1);
    }
    let mut drained = Vec::new();
    log.drain_pages(0, 21 * 4096 * 4096, |iova| drained.push(iova / 4096));
    assert_eq!(drained, pages);
    assert!(report(&log, 0, 21 * 4096 * 4096, 4096).is_empty());
}

#[test]
fn a_fresh_page_in_a_flagged_word_costs_only_the_word_rmw() {
    let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
    for record in [false, true] {
        let mark = |iova: u64, len: u64| {
            if record {
                log.record_write(iova, len);
            } else {
                log.mark(iova, len);
            }
        };
        let base = if record { 1 << 20 } else { 0 };
        mark(base, 1); // word turns dirty: word and summary RMW
        let (w0, s0) = rmws();
        mark(base + 5 * 4096, 1); // same word, a fresh page
        assert_eq!(
            rmws(),
            (w0 + 1, s0),
            "record {record}: summary bit already set"
        );
        mark(base + 64 * 4096, 2 * 4096); // the next word: its own summary bit
        assert_eq!(rmws(), (w0 + 2, s0 + 1), "record {record}");
        mark(base + 5 * 4096, 70 * 4096); // pages 5..75: fresh pages in both words
        assert_eq!(rmws(), (w0 + 4, s0 + 1), "record {record}");
    }
    let mut pages = report(&log, 0, 2 << 20, 4096);
    pages.retain(|&p| p < 256);
    assert_eq!(pages, [0].into_iter().chain(5..75).collect::<Vec<_>>());
}

#[test]
fn an_already_dirty_mark_repairs_a_missing_summary_bit() {
    // Another writer is between W1 and W2: its bit is in the word, the summary not set
    // yet. A mark of that page returns only once a report would find it.
    let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
    log.words[1].fetch_or(1 << 5, Ordering::Relaxed);
    let (_, summary_rmws) = rmws();
    log.mark((64 + 5) * 4096, 1);
    assert_eq!(rmws().1, summary_rmws + 1, "one summary RMW, no word RMW");
    assert_eq!(report(&log, 0, 1 << 20, 4096), vec![64 + 5]);
    // With the summary already set, an already-dirty mark issues no RMW at all.
    log.words[1].fetch_or(1 << 5, Ordering::Relaxed);
    log.summary[0].fetch_or(1 << 1, Ordering::Relaxed);
    let before = rmws();
    log.mark((64 + 5) * 4096, 1);
    assert_eq!(rmws(), before);
    assert_eq!(report(&log, 0, 1 << 20, 4096), vec![64 + 5]);
}

#[test]
fn a_clean_group_costs_a_report_no_rmw() {
    let summary_rmws = || rmw_count::REPORT_SUMMARY.with(|c| c.get());
    let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
    let before = summary_rmws();
    assert!(report(&log, 0, 64 << 20, 4096).is_empty());
    assert_eq!(summary_rmws(), before, "a clean log: summary loads only");
    log.mark(20 << 20, 1);
    let word_rmws = rmw_count::REPORT_WORD.with(|c| c.get());
    assert_eq!(report(&log, 0, 64 << 20, 4096), vec![5120]);
    assert_eq!(
        summary_rmws(),
        before + 1,
        "one R1, for the dirty group only"
    );
    assert_eq!(
        rmw_count::REPORT_WORD.with(|c| c.get()),
        word_rmws + 1,
        "one R2, for the flagged word of the interior group only"
    );
}

#[test]
fn edge_groups_take_only_the_reported_pages_of_their_edge_words() {
    // Three groups of 64 words (12288 pages). The report [1, 12287) starts inside word 0
    // (the first word of group 0) and ends inside word 191 (the last of group 2): those
    // groups are edges, not interior, and must leave pages 0 and 12287.
    let log = DirtyLog::new(0, 12288 * 4096, 4096).unwrap();
    for page in [0, 1, 4099, 12286, 12287] {
        log.mark(page * 4096, 1);
    }
    assert_eq!(report(&log, 4096, 12286 * 4096, 4096), vec![0, 4098, 12285]);
    assert_eq!(report(&log, 0, 12288 * 4096, 4096), vec![0, 12287]);
    // The same at word-aligned edges inside the edge groups (the Words conversion).
    for page in [0, 64, 4099, 12223, 12287] {
        log.mark(page * 4096, 1);
    }
    assert_eq!(
        report(&log, 64 * 4096, 12160 * 4096, 4096),
        vec![0, 4035, 12159]
    );
    assert_eq!(report(&log, 0, 12288 * 4096, 4096), vec![0, 12287]);
}

#[test]
fn a_partial_report_that_empties_a_word_leaves_no_summary_bit() {
    let summary_rmws = || rmw_count::REPORT_SUMMARY.with(|c| c.get());
    let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
    log.mark(5 * 4096, 1);
    log.mark(7 * 4096, 1);
    // Page 7 remains: R3 keeps the word flagged.
    assert_eq!(report(&log, 5 * 4096, 4096, 4096), vec![0]);
    assert_eq!(report(&log, 0, 1 << 20, 4096), vec![7]);
    // Nothing remains: no summary bit, so the next report costs no RMW.
    log.mark(5 * 4096, 1);
    assert_eq!(report(&log, 5 * 4096, 4096, 4096), vec![0]);
    let before = summary_rmws();
    assert!(report(&log, 0, 1 << 20, 4096).is_empty());
    assert_eq!(summary_rmws(), before, "no summary bit left behind");
}

#[test]
fn drain_pages_walks_interior_groups() {
    // Three groups of 64 words: pages in the edge groups and in the interior one.
    let log = DirtyLog::new(0x10_0000, 12288 * 4096, 4096).unwrap();
    let pages = [3u64, 4096, 6000, 8191, 12287];
    for page in pages {
        log.mark(0x10_0000 + page * 4096, 1);
    }
    let mut drained = Vec::new();
    log.drain_pages(0x10_0000, 12288 * 4096, |iova| drained.push(iova));
    let expected: Vec<u64> = pages.iter().map(|p| 0x10_0000 + p * 4096).collect();
    assert_eq!(drained, expected);
    log.drain_pages(0x10_0000, 12288 * 4096, |iova| {
        panic!("{iova:#x} drained twice")
    });
}

#[test]
fn the_dense_path_keeps_the_callers_bits() {
    // REPORT only sets bits (SPEC 3.4): a caller's bit survives the dense path's copy.
    let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
    log.mark(16 << 20, 16 << 20); // group 1: dense, interior
    let len = 64u64 << 20;
    let mut buf = vec![0u8; crate::iova_bitmap::report_bytes(len, 4096).unwrap() as usize];
    buf[512] = 0xff; // pages 4096..4104, dirty in the log too
    buf[600] = 0x01; // page 4800, dirty in the log too
    buf[0] = 0x80; // page 7, clean in the log
    let mut bm = IovaBitmap::new(0, len, 4096, &mut buf).unwrap();
    log.read_and_clear(0, len, &mut bm);
    assert_eq!(buf[0], 0x80);
    assert!(buf[512..1024].iter().all(|&b| b == 0xff));
    assert!(buf[1..512].iter().chain(&buf[1024..]).all(|&b| b == 0));
}

#[test]
fn the_sole_reporter_clears_all_ones_words_without_rmw() {
    let report_rmws = || rmw_count::REPORT_WORD.with(|c| c.get());
    let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
    for round in 0..2 {
        // Groups 1 and 2 dense: interior to the report (the dense path); group 0 has two
        // all-ones words at the report's first (partial) group.
        log.mark(16 << 20, 32 << 20);
        log.mark(0, 128 * 4096);
        let before = report_rmws();
        let pages = report(&log, 0, 64 << 20, 4096);
        assert_eq!(pages.len(), 128 + 8192, "round {round}");
        assert_eq!(report_rmws(), before, "round {round}: plain stores only");
    }
    // A partly dirty word needs the RMW (a writer may be setting its other bits).
    log.mark(5 << 20, 1);
    let before = report_rmws();
    assert_eq!(report(&log, 0, 64 << 20, 4096).len(), 1);
    assert_eq!(report_rmws(), before + 1);
}

#[test]
fn conversions_both_ways() {
    let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
    log.mark(5 << 20, 1); // page in the third 2 MiB block
    log.mark((100 << 20) + 4096, 1); // in an interior group: the coarse group path
    assert_eq!(report(&log, 0, 1 << 30, 2 << 20), vec![2, 50]);
    assert!(report(&log, 0, 1 << 30, 2 << 20).is_empty(), "cleared");
    let coarse = DirtyLog::new(0, 1 << 30, 2 << 20).unwrap();
    coarse.mark(5 << 20, 1);
    let bits = report(&coarse, 0, 8 << 20, 4096);
    assert_eq!(bits, (1024..1536).collect::<Vec<_>>());
}
