//! loom model of the mark / read_and_clear protocol (DESIGN invariant 1).
//!
//! Opt-in: `RUSTFLAGS="--cfg loom" cargo test -p dmalog --test loom_dirty_log --release`.
//! `LOOM_MAX_PREEMPTIONS` bounds the search (the CI short run uses 2; unset explores all).
#![cfg(loom)]

use dmalog::{DirtyLog, IovaBitmap};
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

const PAGE: u64 = 4096;
/// 128 pages: two 64-page words under one summary word.
const LEN: u64 = 128 * PAGE;

fn report(log: &DirtyLog, iova: u64, len: u64) -> u128 {
    let mut buf = [0u8; 16];
    let mut bitmap = IovaBitmap::new(0, LEN, PAGE, &mut buf).unwrap();
    log.read_and_clear(iova, len, &mut bitmap);
    u128::from_le_bytes(buf)
}

fn page_bit(page: u64) -> u128 {
    1u128 << page
}

/// Two writers (one turning a word dirty, one re-marking a page already set in the other
/// word, and one touching both words) race a full report; every completed mark is in that
/// report, and nothing is lost across it and a final report.
#[test]
fn concurrent_marks_are_never_lost() {
    loom::model(|| {
        let log = Arc::new(DirtyLog::new(0, LEN, PAGE).unwrap());
        log.mark(70 * PAGE, 1); // word 1 already dirty
        let done = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let writers: Vec<_> = [(3u64, 70u64), (63, 64)]
            .into_iter()
            .enumerate()
            .map(|(i, (first, second))| {
                let (log, done) = (Arc::clone(&log), Arc::clone(&done));
                thread::spawn(move || {
                    log.mark(first * PAGE, 1);
                    log.mark(second * PAGE, 1);
                    done[i].store(true, Ordering::Release);
                })
            })
            .collect();
        let finished_before = [
            done[0].load(Ordering::Acquire),
            done[1].load(Ordering::Acquire),
        ];
        let first = report(&log, 0, LEN);
        for writer in writers {
            writer.join().unwrap();
        }
        let second = report(&log, 0, LEN);
        let expected = [page_bit(3) | page_bit(70), page_bit(63) | page_bit(64)];
        for (i, pages) in expected.iter().enumerate() {
            if finished_before[i] {
                assert_eq!(
                    first & pages,
                    *pages,
                    "writer {i} finished before the report began"
                );
            }
            assert_eq!(
                (first | second) & pages,
                *pages,
                "writer {i}'s pages were lost"
            );
        }
        assert_eq!(
            (first | second) & page_bit(70),
            page_bit(70),
            "the pre-dirtied page"
        );
    });
}

/// A report of part of a word clears only that part; a page of the same word marked
/// concurrently is found by the next report through the summary.
#[test]
fn partial_word_reports_keep_the_rest() {
    loom::model(|| {
        let log = Arc::new(DirtyLog::new(0, LEN, PAGE).unwrap());
        let writer = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                log.mark(0, 1);
                log.mark(PAGE, 1);
            })
        };
        let first = report(&log, 0, PAGE); // page 0 only
        writer.join().unwrap();
        let second = report(&log, 0, LEN);
        assert_eq!(
            first & !page_bit(0),
            0,
            "a report of page 0 reports nothing else"
        );
        assert_eq!((first | second) & 0b11, 0b11);
        assert_eq!(
            second & page_bit(1),
            page_bit(1),
            "page 1 was never in a report of page 0"
        );
    });
}

/// When a report sees a freshly dirtied page, it also sees the data written before the
/// mark (the writer's Release RMWs, the report's AcqRel RMWs on summary and word).
#[test]
fn a_reported_page_has_its_data_visible() {
    loom::model(|| {
        let log = Arc::new(DirtyLog::new(0, LEN, PAGE).unwrap());
        let data = Arc::new(AtomicU64::new(0));
        let writer = {
            let (log, data) = (Arc::clone(&log), Arc::clone(&data));
            thread::spawn(move || {
                data.store(42, Ordering::Relaxed);
                log.mark(5 * PAGE, 8);
            })
        };
        let seen = report(&log, 0, LEN);
        if seen & page_bit(5) != 0 {
            assert_eq!(
                data.load(Ordering::Relaxed),
                42,
                "bit visible before the data"
            );
        }
        writer.join().unwrap();
    });
}
