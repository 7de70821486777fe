//! DMA_MAP/UNMAP cost against the number of mappings (SPEC 8: O(log n) per message): map n
//! message-only regions one by one, then unmap them all one by one. Throughput is per
//! mapping, so a flat "time per element" across n is the claim.

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dmalog::SoftDriver;
use dmalog_device::{DmaBacking, DmaRegion, DmaSpace};

/// Maps `count` one-page regions (an accessor exists, as on a real device), then unmaps
/// them; returns the time of the maps and of the unmaps.
fn map_then_unmap(count: u64) -> (Duration, Duration) {
    let driver = SoftDriver::new();
    let space = DmaSpace::with_max_maps(Arc::clone(driver.live_log()), count as usize);
    let _dma = space.accessor();
    let start = Instant::now();
    for i in 0..count {
        space
            .map(DmaRegion {
                iova: i * 0x2000,
                size: 0x1000,
                readable: true,
                writable: true,
                backing: DmaBacking::MessageOnly,
            })
            .expect("map");
    }
    let mapped = start.elapsed();
    let start = Instant::now();
    for i in 0..count {
        space.unmap(i * 0x2000, 0x1000).expect("unmap");
    }
    (mapped, start.elapsed())
}

fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("dma_map_scaling");
    group.sample_size(10);
    for count in [1024u64, 8192, 65_536] {
        group.throughput(Throughput::Elements(count));
        group.bench_with_input(BenchmarkId::new("map", count), &count, |b, &count| {
            b.iter_custom(|iters| (0..iters).map(|_| map_then_unmap(count).0).sum())
        });
        group.bench_with_input(BenchmarkId::new("unmap", count), &count, |b, &count| {
            b.iter_custom(|iters| (0..iters).map(|_| map_then_unmap(count).1).sum())
        });
    }
    group.finish();
}

criterion_group!(benches, scaling);
criterion_main!(benches);
