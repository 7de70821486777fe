//! loom model of the mark / read_and_clear protocol (DESIGN invariant 1).
//!
//! Opt-in: `RUSTFLAGS="--cfg loom" cargo test -p dmalog --test loom_dirty_log --release`.
//! `LOOM_MAX_PREEMPTIONS` bounds the search (the CI short run uses 2; unset explores all;
//! one model needs at least 3 and raises a lower bound).
//!
//! Each step of the protocol the no-lost-page argument in `src/dirty_log.rs` relies on has a
//! model here that fails without it: the summary repair on the already-dirty path, its
//! Acquire load, the RMW on a flagged clean word, and the report's closing fence.
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

/// A log of [`LEN`] bytes, shared with the model's threads.
fn new_log() -> Arc<DirtyLog> {
    Arc::new(DirtyLog::new(0, LEN, PAGE).unwrap())
}

/// Two writer threads: writer `i` marks the pages `pages[i]` in order, then flags that it
/// is done (Release).
struct Writers {
    threads: Vec<thread::JoinHandle<()>>,
    done: Arc<[AtomicBool; 2]>,
}

impl Writers {
    fn spawn(log: &Arc<DirtyLog>, pages: [&'static [u64]; 2]) -> Self {
        let done = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let threads = pages
            .into_iter()
            .enumerate()
            .map(|(i, pages)| {
                let (log, done) = (Arc::clone(log), Arc::clone(&done));
                thread::spawn(move || {
                    for page in pages {
                        log.mark(page * PAGE, 1);
                    }
                    done[i].store(true, Ordering::Release);
                })
            })
            .collect();
        Writers { threads, done }
    }

    /// Which writers have flagged that they are done (Acquire), writer 0 first.
    fn finished(&self) -> [bool; 2] {
        [
            self.done[0].load(Ordering::Acquire),
            self.done[1].load(Ordering::Acquire),
        ]
    }

    fn join(self) {
        for writer in self.threads {
            writer.join().unwrap();
        }
    }
}

/// Two writers (one turning a word dirty, one re-marking a page already set in the other
/// word, and one touching both words) race a full report; every completed mark is in that
/// report, and nothing is lost across it and a final report.
#[test]
fn concurrent_marks_are_never_lost() {
    loom::model(|| {
        let log = new_log();
        log.mark(70 * PAGE, 1); // word 1 already dirty
        let writers = Writers::spawn(&log, [&[3, 70], &[63, 64]]);
        let finished_before = writers.finished();
        let first = report(&log, 0, LEN);
        writers.join();
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

/// Two writers dirty the same page while a reporter reports: one writer turns the word
/// dirty (W1, then W2 on the summary), the other finds the bit already set (W0). The second
/// writer must not return before the summary points at the word, or a report that begins
/// after it returned, but before the first writer reaches W2, skips the word: a completed
/// write missing from the report that followed it (SPEC 3.4).
#[test]
fn two_writers_on_one_page_one_reporter() {
    loom::model(|| {
        let log = new_log();
        let writers = Writers::spawn(&log, [&[5], &[5]]);
        let finished_before = writers.finished();
        let first = report(&log, 0, LEN);
        writers.join();
        let last = report(&log, 0, LEN);
        if finished_before.contains(&true) {
            assert_eq!(
                first,
                page_bit(5),
                "a write completed before the report began"
            );
        }
        assert_eq!(
            first | last,
            page_bit(5),
            "the page is reported, and only it"
        );
        assert_eq!(report(&log, 0, LEN), 0, "the last report cleared the log");
    });
}

/// The same race after a report has already cleared the summary bit of a word that was
/// dirty before (page 6): a writer that finds page 5 already set must not trust a stale
/// summary bit from before that report. Any write completed before the second report began
/// is in the first or the second report.
#[test]
fn already_dirty_page_after_a_report_cleared_the_summary() {
    loom::model(|| {
        let log = new_log();
        log.mark(6 * PAGE, 1);
        let writers = Writers::spawn(&log, [&[5], &[5]]);
        let first = report(&log, 0, LEN);
        let finished_before = writers.finished();
        let second = report(&log, 0, LEN);
        writers.join();
        let last = report(&log, 0, LEN);
        assert_eq!(first & page_bit(6), page_bit(6), "marked before any report");
        if finished_before.contains(&true) {
            assert_eq!(
                (first | second) & page_bit(5),
                page_bit(5),
                "a write completed before the second report began"
            );
        }
        assert_eq!(
            (first | second | last) & page_bit(5),
            page_bit(5),
            "page 5 was lost"
        );
        assert_eq!((first | second | last) & !(page_bit(5) | page_bit(6)), 0);
    });
}

/// A report of part of a word clears only that part; a page of the same word marked
/// concurrently is found by the next report through the summary.
#[test]
fn partial_word_reports_keep_the_rest() {
    loom::model(|| {
        let log = new_log();
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
        let log = new_log();
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

/// A report can find a word flagged in the summary but clean (the summary update of a write
/// landed after the previous report took the word). It must still clear it with an RMW: a
/// writer that later finds its page already set relies on synchronising with that RMW to
/// see the summary cleared, and not a stale summary bit from before this report.
#[test]
fn a_flagged_clean_word_is_still_cleared_by_an_rmw() {
    // The losing order needs three preemptions (one in phase 1, two in phase 2).
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = builder.preemption_bound.map(|bound| bound.max(3));
    builder.check(|| {
        let log = new_log();
        // Phase 1: one writer races a report of a word already dirty (page 4); when its W1
        // lands before the report takes the word and its W2 after the report cleared the
        // summary, page 5's summary bit stays set with the word clean.
        log.mark(4 * PAGE, 1);
        let early = {
            let log = Arc::clone(&log);
            thread::spawn(move || log.mark(5 * PAGE, 1))
        };
        let r1 = report(&log, 0, LEN);
        early.join().unwrap();
        // Phase 2: two writers on the same page race two reports.
        let writers = Writers::spawn(&log, [&[5], &[5]]);
        let r2 = report(&log, 0, LEN);
        // A scheduling point (not a preemption): lets the writers run between the reports
        // within the preemption bound.
        thread::yield_now();
        let finished_before = writers.finished();
        let r3 = report(&log, 0, LEN);
        writers.join();
        let r4 = report(&log, 0, LEN);
        assert_eq!(
            r1 & page_bit(4),
            page_bit(4),
            "marked before the first report"
        );
        assert_eq!((r1 | r2) & page_bit(5), page_bit(5), "the early write");
        if finished_before.contains(&true) {
            assert_eq!(
                (r2 | r3) & page_bit(5),
                page_bit(5),
                "a write completed before the third report began"
            );
        }
        assert_eq!((r2 | r3 | r4) & page_bit(5), page_bit(5), "page 5 was lost");
        assert_eq!(
            (r1 | r2 | r3 | r4) & !(page_bit(4) | page_bit(5)),
            0,
            "only pages 4 and 5 were written"
        );
    });
}

/// 384 pages: three summary groups of two words each under `cfg(loom)` (see `GROUP_WORDS`
/// in `src/dirty_log.rs`), so a whole-range report has one interior group (words 2 and 3,
/// pages 128..256), taken by the dense path.
const WIDE_LEN: u64 = 384 * PAGE;

fn report_wide(log: &DirtyLog) -> [u64; 6] {
    let mut buf = [0u8; 48];
    let mut bitmap = IovaBitmap::new(0, WIDE_LEN, PAGE, &mut buf).unwrap();
    log.read_and_clear(0, WIDE_LEN, &mut bitmap);
    std::array::from_fn(|w| u64::from_le_bytes(buf[8 * w..8 * w + 8].try_into().unwrap()))
}

/// The dense path clears an all-ones word with a plain store. A writer can still RMW that
/// word between the report's load and store (its own load of the word was stale), so its
/// page is reported now though nothing orders its data before the report: the report's
/// closing SeqCst fence, paired with the one in `record_write`, must make the data visible
/// (or the page must be reported again). Also crosses group boundaries with one mark.
#[test]
fn a_dense_group_report_keeps_a_late_writers_data() {
    loom::model(|| {
        let log = Arc::new(DirtyLog::new(0, WIDE_LEN, PAGE).unwrap());
        // Group 1 dirty except page 130; the mark also spans the boundary into group 2.
        log.mark(128 * PAGE, 2 * PAGE);
        log.mark(131 * PAGE, 129 * PAGE);
        let data = Arc::new(AtomicU64::new(0));
        let completer = {
            let log = Arc::clone(&log);
            thread::spawn(move || log.mark(130 * PAGE, 1))
        };
        let late = {
            let (log, data) = (Arc::clone(&log), Arc::clone(&data));
            thread::spawn(move || {
                data.store(42, Ordering::Relaxed);
                log.record_write(130 * PAGE, 1);
            })
        };
        let first = report_wide(&log);
        let data_after_first = data.load(Ordering::Relaxed);
        completer.join().unwrap();
        late.join().unwrap();
        let last = report_wide(&log);
        let expected = [0, 0, u64::MAX, u64::MAX, 0b1111, 0];
        for w in 0..6 {
            assert_eq!(first[w] | last[w], expected[w], "word {w}");
        }
        assert_eq!(first[3], u64::MAX, "marked before the report");
        assert_eq!(
            first[4], 0b1111,
            "marked before the report, past the boundary"
        );
        let page_130 = 1u64 << (130 - 128);
        assert!(
            data_after_first == 42 || last[2] & page_130 != 0,
            "page 130 reported once, before its data was visible"
        );
    });
}
