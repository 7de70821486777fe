//! Criterion benches: dmalog's dirty log against vm-memory's `AtomicBitmap`, a
//! libvfio-user-like byte-atomic log, a per-bit loop and memcpy/memset, side by side.
//! `dmalog bench --json` runs a quick subset of the same workloads.

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dmalog_bench::workloads::{DenseReport, MarkRandom, SparseReport};

fn mark(c: &mut Criterion) {
    for write_bytes in [4096u64, 64 << 10] {
        let mut group = c.benchmark_group(format!("mark_{}k_random_1g", write_bytes / 1024));
        let mut w = MarkRandom::new(write_bytes);
        group.bench_function("dmalog_mark", |b| b.iter(|| w.ours()));
        group.bench_function("dmalog_record_write", |b| b.iter(|| w.ours_record_write()));
        group.bench_function("vm_memory_set_addr_range", |b| b.iter(|| w.vm_memory()));
        group.bench_function("byte_atomic", |b| b.iter(|| w.byte_atomic()));
        group.bench_function("per_bit_loop", |b| b.iter(|| w.naive()));
        group.finish();
    }
}

/// Times `op` only, with an untimed `prepare` before each call.
fn timed<S>(
    iters: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        prepare(state);
        let start = Instant::now();
        op(state);
        total += start.elapsed();
    }
    total
}

fn sparse(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparse_report_1t_4k_1000_dirty");
    group.sample_size(10);
    let mut w = SparseReport::new(1000);
    group.bench_function("dmalog", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare(), |w| w.ours()))
    });
    group.bench_function("vm_memory_get_and_reset", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare(), |w| w.vm_memory()))
    });
    group.finish();
}

fn dense(c: &mut Criterion) {
    let mut group = c.benchmark_group("dense_report_64g_4k_all_dirty");
    group.sample_size(10);
    let mut w = DenseReport::new(64 << 30);
    group.bench_function("dmalog", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_ours(), |w| w.ours_at(4096)))
    });
    group.bench_function(BenchmarkId::new("dmalog_report_at", "2M"), |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_ours(), |w| w.ours_at(2 << 20)))
    });
    group.bench_function("dmalog_2m_log_at_4k", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_ours(), |w| w.ours_2m_at_4k()))
    });
    group.bench_function("vm_memory_get_and_reset", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_vm_memory(), |w| w.vm_memory()))
    });
    group.bench_function("byte_atomic", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_baselines(), |w| w.byte_atomic()))
    });
    group.bench_function("per_bit_loop", |b| {
        b.iter_custom(|n| timed(n, &mut w, |w| w.prepare_baselines(), |w| w.naive()))
    });
    group.bench_function("memcpy", |b| b.iter(|| w.memcpy()));
    group.bench_function("memset", |b| b.iter(|| w.memset()));
    group.finish();
}

criterion_group!(benches, mark, sparse, dense);
criterion_main!(benches);
