//! One workload of the mark and guest-memory rows alone, for a profiler (callgrind counts
//! instructions per op independently of load):
//! `vm_memory_ops <workload> [ops]`, the timed part inside `measured`, e.g.
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured*'
//! target/release/examples/vm_memory_ops record_write_4k 100000`.
//! Workloads: record_write_4k, record_write_64k, set_addr_range_4k, set_addr_range_64k,
//! write_{ours,atomic,plain}_{64b,4k,64k}, report_{ours,atomic}.
use dmalog::IovaRange;
use std::hint::black_box;

use dmalog_bench::vm_memory::{GuestFinalReport, GuestWrites};
use dmalog_bench::workloads::MarkRandom;

/// Runs `op` `ops` times; returns the nanoseconds it took.
#[inline(never)]
fn measured<S>(ops: u64, state: &mut S, mut op: impl FnMut(&mut S)) -> u128 {
    let start = std::time::Instant::now();
    for _ in 0..ops {
        op(black_box(&mut *state));
    }
    start.elapsed().as_nanos()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "record_write_4k".to_string());
    let ops: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let kib = |s: &str| match s {
        "64b" => 64usize,
        "4k" => 4096,
        _ => 64 << 10,
    };
    if let Some(size) = workload.strip_prefix("ab_mark_") {
        ab_mark(if size == "4k" { 4096 } else { 64 << 10 }, ops);
        return;
    }
    if let Some(size) = workload.strip_prefix("ab_write_") {
        ab_write(kib(size), ops);
        return;
    }
    if let Some(side) = workload.strip_prefix("logreport_") {
        log_report(side == "ours", ops);
        return;
    }
    let ns = match workload.as_str() {
        "record_write_4k" | "record_write_64k" | "set_addr_range_4k" | "set_addr_range_64k" => {
            let size = if workload.ends_with("_4k") {
                4096
            } else {
                64 << 10
            };
            let mut w = MarkRandom::new(size);
            // Warm up: every page the offsets touch is dirty, as in the timed batches.
            for _ in 0..1 << 16 {
                w.ours_record_write();
            }
            if workload.starts_with("record_write") {
                measured(ops, &mut w, |w| w.ours_record_write())
            } else {
                measured(ops, &mut w, |w| w.vm_memory())
            }
        }
        "report_ours" | "report_atomic" => {
            let mut w = GuestFinalReport::new(64 << 30, 8, 1000);
            (0..ops)
                .map(|_| {
                    w.prepare();
                    if workload == "report_ours" {
                        measured(1, &mut w, |w| w.ours())
                    } else {
                        measured(1, &mut w, |w| w.vm_memory())
                    }
                })
                .sum()
        }
        other => {
            let mut parts = other.split('_').skip(1);
            let (side, size) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let mut w = GuestWrites::new(kib(size), 256 << 20);
            for _ in 0..1 << 16 {
                w.ours();
                w.vm_memory();
            }
            match side {
                "ours" => measured(ops, &mut w, |w| w.ours()),
                "atomic" => measured(ops, &mut w, |w| w.vm_memory()),
                _ => measured(ops, &mut w, |w| w.plain()),
            }
        }
    };
    eprintln!("{workload}: {:.1} ns per op", ns as f64 / ops as f64);
}

/// Prints the median of each `samples` (nanoseconds per batch of `ops`) per op, by name.
fn print_medians(names: [&str; 3], mut samples: [Vec<u128>; 3], ops: u64) {
    for (name, s) in names.iter().zip(&mut samples) {
        s.sort_unstable();
        eprintln!(
            "{name}: {:.2} ns per op (median)",
            s[s.len() / 2] as f64 / ops as f64
        );
    }
}

/// Medians of interleaved batches: the old record_write (fence, then mark), the new one,
/// and vm-memory's set_addr_range, on already-dirty pages.
fn ab_mark(size: u64, ops: u64) {
    let mut w = MarkRandom::new(size);
    for _ in 0..1 << 16 {
        w.ours_record_write();
    }
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..41 {
        samples[0].push(measured(ops, &mut w, |w| {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            w.ours()
        }));
        samples[1].push(measured(ops, &mut w, |w| w.ours_record_write()));
        samples[2].push(measured(ops, &mut w, |w| w.vm_memory()));
    }
    print_medians(
        ["fence+mark", "record_write", "set_addr_range"],
        samples,
        ops,
    );
}

/// Medians of interleaved batches of guest writes, each batch from clean logs (as the
/// quick rows): DmalogBitmap, AtomicBitmap, no bitmap.
fn ab_write(size: usize, ops: u64) {
    let mut w = GuestWrites::new(size, 256 << 20);
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..41 {
        w.reset();
        samples[0].push(measured(ops, &mut w, |w| w.ours()));
        w.reset();
        samples[1].push(measured(ops, &mut w, |w| w.vm_memory()));
        w.reset();
        samples[2].push(measured(ops, &mut w, |w| w.plain()));
    }
    print_medians(["DmalogBitmap", "AtomicBitmap", "no bitmap"], samples, ops);
}

/// The final report of a 64 GiB guest (8 regions, 1,000 dirty pages) on the bitmaps alone,
/// no guest memory mapped (valgrind cannot map 64 GiB): `ops` reports, each after marking.
fn log_report(ours: bool, ops: u64) {
    use dmalog::tracker::report_words;
    use dmalog::DirtyTracker;
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    const REGION: u64 = 8 << 30;
    let set = dmalog_vm_memory::DirtyRegions::new(4096).unwrap();
    let bitmaps: Vec<_> = (0..8)
        .map(|k| {
            set.bitmap(vm_memory::GuestAddress(k * REGION), REGION as usize)
                .unwrap()
        })
        .collect();
    let atomic: Vec<_> = (0..8)
        .map(|_| AtomicBitmap::new(REGION as usize, std::num::NonZeroUsize::new(4096).unwrap()))
        .collect();
    let mut tracker = set.tracker();
    tracker
        .start(&[dmalog::IovaRange::new(0, 8 * REGION).unwrap()], 4096)
        .unwrap();
    let mut words = vec![0u64; report_words(8 * REGION, 4096).unwrap() as usize];
    let mut rng = 4242u64;
    let dirty: usize = std::env::var("DIRTY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let pages: Vec<u64> = (0..dirty)
        .map(|_| dmalog_bench::workloads::next_random(&mut rng) % (8 * REGION / 4096))
        .collect();
    let mut ns = 0;
    for _ in 0..ops {
        for &page in &pages {
            let (region, offset) = (
                (page * 4096 / REGION) as usize,
                (page * 4096 % REGION) as usize,
            );
            words[(page / 64) as usize] = 0;
            bitmaps[region].mark_dirty(offset, 1);
            atomic[region].mark_dirty(offset, 1);
        }
        ns += if ours {
            measured(1, &mut words, |words| {
                tracker
                    .report(IovaRange::new(0, 8 * REGION).unwrap(), 4096, words)
                    .unwrap()
            })
        } else {
            measured(1, &mut (), |_| {
                for bitmap in &atomic {
                    black_box(bitmap.get_and_reset());
                }
            })
        };
    }
    eprintln!(
        "log report ({}): {:.1} ns per report",
        if ours { "ours" } else { "AtomicBitmap" },
        ns as f64 / ops as f64
    );
}
