//! Stress: writer threads mark random pages through `WriteRecorder`s while a reporting
//! thread reports random sub-ranges (and the whole range) at several page sizes. Every
//! completed write must show up in a report that ended after the write began, no later than
//! the first report that began after the write completed.
//!
//! `DMALOG_STRESS_WRITES` (per writer, default 100000) and `DMALOG_STRESS_WRITERS` (default
//! 3) make it longer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 32;
const PAGES: u64 = 1 << 16; // 256 MiB

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Write {
    page: u64,
    begin: u64,
    end: u64,
}

struct Report {
    first_page: u64,
    end_page: u64,
    begin: u64,
    end: u64,
    pages: Vec<u64>,
}

/// xorshift64*: deterministic per thread.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn every_completed_write_is_reported() {
    let writes_per_writer = env("DMALOG_STRESS_WRITES", 100_000);
    let writers = env("DMALOG_STRESS_WRITERS", 3);
    let driver = SoftDriver::new();
    let recorders: Vec<_> = (0..writers).map(|_| driver.recorder()).collect();
    let mut tracker = InProcessTracker::new(driver);
    tracker
        .start(&[IovaRange::new(BASE, PAGES * PAGE).unwrap()], PAGE)
        .unwrap();
    let clock = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(std::sync::Barrier::new(writers as usize + 1));
    let handles: Vec<_> = recorders
        .into_iter()
        .enumerate()
        .map(|(i, mut recorder)| {
            let (clock, log, ready) = (Arc::clone(&clock), Arc::clone(&log), Arc::clone(&ready));
            std::thread::spawn(move || {
                ready.wait();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let mut done = Vec::with_capacity(writes_per_writer as usize);
                for _ in 0..writes_per_writer {
                    // Hot pages (a small set) and cold pages (spread out), to hit both the
                    // already-dirty path and fresh words.
                    let r = next(&mut rng);
                    let page = if r % 4 == 0 {
                        r % 256
                    } else {
                        (r >> 8) % PAGES
                    };
                    let begin = clock.fetch_add(1, Ordering::SeqCst);
                    recorder.record_write(BASE + page * PAGE + (r >> 40) % PAGE, 1);
                    let end = clock.fetch_add(1, Ordering::SeqCst);
                    done.push(Write { page, begin, end });
                }
                log.lock().unwrap().extend(done);
            })
        })
        .collect();
    let reporter = {
        let (clock, stop, ready) = (Arc::clone(&clock), Arc::clone(&stop), Arc::clone(&ready));
        std::thread::spawn(move || {
            ready.wait();
            let mut reports = Vec::new();
            let mut bitmap = vec![0u64; report_words(PAGES * PAGE, PAGE).unwrap() as usize];
            let mut rng = 7u64;
            let mut last = false;
            loop {
                let finishing = stop.load(Ordering::SeqCst);
                // Mostly the whole range at 4 KiB; sometimes a sub-range at another size
                // (pages then are converted back to 4 KiB pages conservatively).
                let r = next(&mut rng);
                let (from, pages, shift) = if finishing || r % 3 == 0 {
                    (0, PAGES, 12)
                } else {
                    let from = (r >> 8) % PAGES;
                    (
                        from,
                        1 + (r >> 24) % (PAGES - from),
                        12 + (r >> 50) as u32 % 4,
                    )
                };
                let length = pages * PAGE;
                let words = report_words(length, 1 << shift).unwrap() as usize;
                bitmap[..words].fill(0);
                let begin = clock.fetch_add(1, Ordering::SeqCst);
                tracker
                    .report(BASE + from * PAGE, length, 1 << shift, &mut bitmap[..words])
                    .unwrap();
                let end = clock.fetch_add(1, Ordering::SeqCst);
                let per_bit = 1u64 << (shift - 12);
                let mut pages_seen = Vec::new();
                for (w, &word) in bitmap[..words].iter().enumerate() {
                    let mut word = word;
                    while word != 0 {
                        let bit = w as u64 * 64 + word.trailing_zeros() as u64;
                        word &= word - 1;
                        for p in 0..per_bit {
                            let page = from + bit * per_bit + p;
                            if page < from + pages {
                                pages_seen.push(page);
                            }
                        }
                    }
                }
                reports.push(Report {
                    first_page: from,
                    end_page: from + pages,
                    begin,
                    end,
                    pages: pages_seen,
                });
                if last {
                    break;
                }
                last = finishing;
            }
            tracker.stop().unwrap();
            reports
        })
    };
    for handle in handles {
        handle.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let reports = reporter.join().unwrap();
    let writes = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(writes.len() as u64, writers * writes_per_writer);
    // For each page: the reports (in order) that contained it.
    let mut seen: std::collections::HashMap<u64, Vec<usize>> = std::collections::HashMap::new();
    for (i, report) in reports.iter().enumerate() {
        for &page in &report.pages {
            seen.entry(page).or_default().push(i);
        }
    }
    let mut checked_deadline = 0;
    for write in &writes {
        // The first report of a range holding the page that began after the write completed.
        let deadline = (reports.partition_point(|r| r.begin < write.end)..reports.len())
            .find(|&i| (reports[i].first_page..reports[i].end_page).contains(&write.page))
            .expect("the final full report began after every write");
        let hit = seen.get(&write.page).is_some_and(|list| {
            list.iter()
                .any(|&i| i <= deadline && reports[i].end > write.begin)
        });
        assert!(
            hit,
            "write of page {} (clock {}..{}) not reported by report {deadline}",
            write.page, write.begin, write.end
        );
        checked_deadline += 1;
    }
    let last_write_end = writes.iter().map(|w| w.end).max().unwrap_or(0);
    let concurrent = reports.iter().filter(|r| r.begin < last_write_end).count();
    assert!(
        concurrent >= 2,
        "the reporter ran concurrently with the writers ({concurrent} reports)"
    );
    eprintln!(
        "{checked_deadline} writes checked against {} reports ({concurrent} during the writes)",
        reports.len()
    );
}
