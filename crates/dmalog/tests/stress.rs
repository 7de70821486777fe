//! Stress, exact at the log's page size: writer threads record random writes (hot pages,
//! cold pages, writes spanning pages and writes partly or wholly outside the tracked range)
//! through `WriteRecorder`s while a reporter thread reports random sub-ranges (word-
//! unaligned) and the whole range, all at the log's page size. Checked against a model of
//! the writes and reports on a shared clock:
//! - complete (SPEC 3.4): every written page is in a report that ended after the write
//!   began, no later than the first report of that page that began after the write ended;
//!   a final report after the writers joined accounts for every write;
//! - exact: a reported page was written, by a write that began before the report ended and
//!   ended after the previous report of that page began (else that report cleared it).
//!
//! `DMALOG_STRESS_WRITES` (per writer, default 100000) and `DMALOG_STRESS_WRITERS` (default
//! 3) make it longer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 32;
const PAGES: u64 = 1 << 16; // 256 MiB
/// Each writer waits at this many evenly spaced points for one more report to have run, so
/// reports interleave with the writes on any scheduler (the reporter never blocks).
const CHECKPOINTS: u64 = 8;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One completed write: the tracked pages `[first_page, end_page)` it touched (empty when
/// wholly outside the range) and the clock before and after `record_write`.
struct Write {
    first_page: u64,
    end_page: u64,
    begin: u64,
    end: u64,
}

/// One report of pages `[first_page, end_page)`.
struct Report {
    first_page: u64,
    end_page: u64,
    begin: u64,
    end: u64,
    pages: Vec<u64>,
}

impl Report {
    fn covers(&self, page: u64) -> bool {
        (self.first_page..self.end_page).contains(&page)
    }
}

/// xorshift64*: deterministic per thread.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A random write: (IOVA, length in bytes).
fn random_write(rng: &mut u64) -> (u64, u64) {
    let r = next(rng);
    let offset = (r >> 40) % PAGE;
    match r % 16 {
        // Hot pages: the already-dirty path.
        0..=3 => (BASE + (r >> 8) % 256 * PAGE + offset, 1 + (r >> 20) % 64),
        // Spanning up to four pages, word boundaries included.
        4..=5 => (
            BASE + (r >> 8) % PAGES * PAGE + offset,
            1 + (r >> 20) % (3 * PAGE),
        ),
        // Straddling either end of the range, or just outside it.
        6 => (BASE - PAGE + offset, 1 + (r >> 20) % (2 * PAGE)),
        7 => (
            BASE + (PAGES - 1) * PAGE + offset,
            1 + (r >> 20) % (2 * PAGE),
        ),
        // Cold pages spread out: fresh words.
        _ => (BASE + (r >> 8) % PAGES * PAGE + offset, 1 + (r >> 20) % 256),
    }
}

/// The tracked pages `[first, end)` that `[iova, iova+len)` touches.
fn touched_pages(iova: u64, len: u64) -> (u64, u64) {
    let start = iova.max(BASE);
    let end = (iova + len).min(BASE + PAGES * PAGE);
    if start >= end {
        return (0, 0);
    }
    ((start - BASE) / PAGE, (end - 1 - BASE) / PAGE + 1)
}

/// Runs the writers and the reporter; returns every write and every report, in order.
fn run(writers: u64, writes_per_writer: u64) -> (Vec<Write>, Vec<Report>) {
    let driver = SoftDriver::new();
    let recorders: Vec<_> = (0..writers).map(|_| driver.recorder()).collect();
    let mut tracker = InProcessTracker::new(driver);
    let page_size = tracker
        .start(&[IovaRange::new(BASE, PAGES * PAGE).unwrap()], PAGE)
        .unwrap();
    assert_eq!(page_size, PAGE, "reports are at the log's page size");
    let clock = Arc::new(AtomicU64::new(0));
    let reports_done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(writers as usize + 1));
    let handles: Vec<_> = recorders
        .into_iter()
        .enumerate()
        .map(|(i, mut recorder)| {
            let (clock, reports_done, ready) = (
                Arc::clone(&clock),
                Arc::clone(&reports_done),
                Arc::clone(&ready),
            );
            std::thread::spawn(move || {
                ready.wait();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let mut done = Vec::with_capacity(writes_per_writer as usize);
                for n in 0..writes_per_writer {
                    let checkpoint = n * CHECKPOINTS / writes_per_writer;
                    while reports_done.load(Ordering::SeqCst) < checkpoint {
                        std::thread::yield_now();
                    }
                    let (iova, len) = random_write(&mut rng);
                    let begin = clock.fetch_add(1, Ordering::SeqCst);
                    recorder.record_write(iova, len);
                    let end = clock.fetch_add(1, Ordering::SeqCst);
                    let (first_page, end_page) = touched_pages(iova, len);
                    done.push(Write {
                        first_page,
                        end_page,
                        begin,
                        end,
                    });
                }
                done
            })
        })
        .collect();
    let reporter = {
        let (clock, reports_done, stop, ready) = (
            Arc::clone(&clock),
            Arc::clone(&reports_done),
            Arc::clone(&stop),
            Arc::clone(&ready),
        );
        std::thread::spawn(move || {
            ready.wait();
            let mut reports = Vec::new();
            let mut bitmap = vec![0u64; report_words(PAGES * PAGE, PAGE).unwrap() as usize];
            let mut rng = 7u64;
            let mut last = false;
            loop {
                let finishing = stop.load(Ordering::SeqCst);
                let r = next(&mut rng);
                let (from, pages) = if finishing || r % 3 == 0 {
                    (0, PAGES)
                } else {
                    let from = (r >> 8) % PAGES;
                    (from, 1 + (r >> 24) % (PAGES - from).min(4096))
                };
                let words = report_words(pages * PAGE, PAGE).unwrap() as usize;
                bitmap[..words].fill(0);
                let begin = clock.fetch_add(1, Ordering::SeqCst);
                tracker
                    .report(
                        IovaRange::new(BASE + from * PAGE, pages * PAGE).unwrap(),
                        PAGE,
                        &mut bitmap[..words],
                    )
                    .unwrap();
                let end = clock.fetch_add(1, Ordering::SeqCst);
                let mut seen = Vec::new();
                for (w, &word) in bitmap[..words].iter().enumerate() {
                    let mut word = word;
                    while word != 0 {
                        let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                        word &= word - 1;
                        assert!(
                            bit < pages,
                            "report bit {bit} past the report's {pages} pages"
                        );
                        seen.push(from + bit);
                    }
                }
                reports.push(Report {
                    first_page: from,
                    end_page: from + pages,
                    begin,
                    end,
                    pages: seen,
                });
                reports_done.fetch_add(1, Ordering::SeqCst);
                if last {
                    break;
                }
                last = finishing;
            }
            tracker.stop().unwrap();
            reports
        })
    };
    let mut writes = Vec::new();
    for handle in handles {
        writes.extend(handle.join().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    (writes, reporter.join().unwrap())
}

/// Per page: the writes touching it as (begin, end) sorted by begin, with the running
/// maximum of `end` (so "some write began before t and ended after u" is one search).
struct PageWrites {
    begins: Vec<u64>,
    max_end: Vec<u64>,
}

impl PageWrites {
    /// Whether a write of this page began before `before` and ended after `after`.
    fn any(&self, before: u64, after: Option<u64>) -> bool {
        let n = self.begins.partition_point(|&b| b < before);
        n > 0 && after.is_none_or(|after| self.max_end[n - 1] > after)
    }
}

fn check(writes: &[Write], reports: &[Report]) {
    let mut by_page: Vec<Vec<(u64, u64)>> = (0..PAGES).map(|_| Vec::new()).collect();
    for write in writes {
        for page in write.first_page..write.end_page {
            by_page[page as usize].push((write.begin, write.end));
        }
    }
    let by_page: Vec<PageWrites> = by_page
        .into_iter()
        .map(|mut list| {
            list.sort_unstable();
            let mut max_end = 0;
            PageWrites {
                begins: list.iter().map(|w| w.0).collect(),
                max_end: list
                    .iter()
                    .map(|w| {
                        max_end = max_end.max(w.1);
                        max_end
                    })
                    .collect(),
            }
        })
        .collect();
    // Exact: every reported page is justified by a write not yet cleared by an earlier
    // report. Also builds, per page, the reports holding it.
    let mut seen: Vec<Vec<usize>> = (0..PAGES).map(|_| Vec::new()).collect();
    for (j, report) in reports.iter().enumerate() {
        for &page in &report.pages {
            assert!(report.covers(page), "report {j} set page {page} outside it");
            let previous = reports[..j].iter().rev().find(|k| k.covers(page));
            assert!(
                by_page[page as usize].any(report.end, previous.map(|k| k.begin)),
                "report {j} (clock {}..{}) set page {page}, written by no write since the \
                 previous report of it (clock {:?})",
                report.begin,
                report.end,
                previous.map(|k| k.begin)
            );
            seen[page as usize].push(j);
        }
    }
    // Complete: every write of a page is in a report no later than its deadline.
    for write in writes {
        for page in write.first_page..write.end_page {
            // The first report of the page that began after the write completed.
            let deadline = (reports.partition_point(|r| r.begin < write.end)..reports.len())
                .find(|&i| reports[i].covers(page))
                .expect("the final full report began after every write");
            let hit = seen[page as usize]
                .iter()
                .any(|&i| i <= deadline && reports[i].end > write.begin);
            assert!(
                hit,
                "write of page {page} (clock {}..{}) not reported by report {deadline}",
                write.begin, write.end
            );
        }
    }
}

#[test]
fn every_write_is_reported_exactly() {
    let writes_per_writer = env("DMALOG_STRESS_WRITES", 100_000);
    let writers = env("DMALOG_STRESS_WRITERS", 3);
    let (writes, reports) = run(writers, writes_per_writer);
    assert_eq!(writes.len() as u64, writers * writes_per_writer);
    let last_write_end = writes.iter().map(|w| w.end).max().unwrap_or(0);
    let concurrent = reports.iter().filter(|r| r.begin < last_write_end).count();
    assert!(
        concurrent as u64 >= CHECKPOINTS - 1,
        "the reporter ran concurrently with the writers ({concurrent} reports)"
    );
    let reported: usize = reports.iter().map(|r| r.pages.len()).sum();
    assert!(reported > 0, "something was reported");
    check(&writes, &reports);
    eprintln!(
        "{} writes checked against {} reports ({concurrent} during the writes, {reported} \
         pages reported)",
        writes.len(),
        reports.len()
    );
}

/// The checker itself: a report of a page nobody wrote, or one repeated with no write in
/// between, or a missing page, is caught.
#[test]
fn the_checker_catches_lost_and_spurious_pages() {
    let write = |page, begin, end| Write {
        first_page: page,
        end_page: page + 1,
        begin,
        end,
    };
    let report = |begin, end, pages: Vec<u64>| Report {
        first_page: 0,
        end_page: PAGES,
        begin,
        end,
        pages,
    };
    let writes = [write(5, 0, 1)];
    check(&writes, &[report(2, 3, vec![5]), report(4, 5, vec![])]);
    let caught = |reports: Vec<Report>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&writes, &reports))).is_err()
    };
    assert!(caught(vec![report(2, 3, vec![])]), "a lost page");
    assert!(
        caught(vec![report(2, 3, vec![5, 6])]),
        "a page never written"
    );
    assert!(
        caught(vec![report(2, 3, vec![5]), report(4, 5, vec![5])]),
        "a page reported twice for one write"
    );
}
