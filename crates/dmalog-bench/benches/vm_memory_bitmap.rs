//! Criterion benches: `GuestMemoryMmap<AtomicBitmap>` (vm-memory's own bitmap) against
//! `GuestMemoryMmap<DmalogBitmap>`, side by side in the same run: guest writes of 64 B,
//! 4 KiB and 64 KiB at random offsets (the copy and the mark), and the final report of a
//! 64 GiB guest with 1,000 dirty pages. `dmalog bench` runs a quick subset.

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmalog_bench::vm_memory::{GuestFinalReport, GuestWrites};

/// `n` calls of `op` after one untimed `prepare`.
fn timed_run<S>(
    n: u64,
    state: &mut S,
    prepare: impl FnOnce(&mut S),
    mut op: impl FnMut(&mut S),
) -> Duration {
    prepare(state);
    let start = Instant::now();
    for _ in 0..n {
        op(state);
    }
    start.elapsed()
}

fn guest_writes(c: &mut Criterion) {
    for (write_bytes, label) in [(64usize, "64b"), (4096, "4k"), (64 << 10, "64k")] {
        let mut group = c.benchmark_group(format!("guest_write_{label}_random_256m"));
        group.throughput(Throughput::Bytes(write_bytes as u64));
        let mut w = GuestWrites::new(write_bytes, 256 << 20);
        // Each sample starts from clean logs, both sides alike.
        group.bench_function("vm_memory_atomic_bitmap", |b| {
            b.iter_custom(|n| timed_run(n, &mut w, |w| w.reset(), |w| w.vm_memory()))
        });
        group.bench_function("no_bitmap", |b| {
            b.iter_custom(|n| timed_run(n, &mut w, |w| w.reset(), |w| w.plain()))
        });
        group.bench_function("dmalog_bitmap", |b| {
            b.iter_custom(|n| timed_run(n, &mut w, |w| w.reset(), |w| w.ours()))
        });
        group.finish();
    }
}

fn final_report(c: &mut Criterion) {
    let mut group = c.benchmark_group("guest_final_report_64g_1000_dirty");
    group.sample_size(10);
    let mut w = GuestFinalReport::new(64 << 30, 8, 1000);
    let each = |n: u64, w: &mut GuestFinalReport, ours: bool| {
        let mut total = Duration::ZERO;
        for _ in 0..n {
            w.prepare();
            let start = Instant::now();
            if ours {
                w.ours();
            } else {
                w.vm_memory();
            }
            total += start.elapsed();
        }
        total
    };
    group.bench_function("vm_memory_get_and_reset_every_region", |b| {
        b.iter_custom(|n| each(n, &mut w, false))
    });
    group.bench_function("dmalog_report", |b| {
        b.iter_custom(|n| each(n, &mut w, true))
    });
    group.finish();
}

criterion_group!(benches, guest_writes, final_report);
criterion_main!(benches);
