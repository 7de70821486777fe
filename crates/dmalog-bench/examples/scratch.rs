//! scratch
use dmalog_bench::workloads::*;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
fn main() {
    for round in 0..3 {
        let offs: Vec<u64> = (0..65536u64).map(|i| (i * 7919 % 262000) * 4096).collect();
        let words: Vec<AtomicU64> = (0..4096).map(|_| AtomicU64::new(u64::MAX)).collect();
        let log = dmalog::DirtyLog::new(0, 1 << 30, 4096).unwrap();
        log.mark(0, 1 << 30);
        let vmm = vm_memory::bitmap::AtomicBitmap::new(1 << 30, std::num::NonZeroUsize::new(4096).unwrap());
        let mut c = 0usize;
        let t1 = best_ns(11, 1 << 16, &mut c, |_| {}, |c| { *c = (*c + 1) & 65535; let p = black_box(offs[*c]) >> 12; let wd = &words[(p / 64) as usize]; if wd.load(Ordering::Relaxed) & (1 << (p % 64)) == 0 { wd.fetch_or(1 << (p%64), Ordering::Release); } });
        let t2 = best_ns(11, 1 << 16, &mut c, |_| {}, |c| { *c = (*c + 1) & 65535; log.mark(black_box(offs[*c]), 4096) });
        let t3 = best_ns(11, 1 << 16, &mut c, |_| {}, |c| { *c = (*c + 1) & 65535; vmm.set_addr_range(black_box(offs[*c]) as usize, 4096) });
        let t4 = best_ns(11, 1 << 16, &mut c, |_| {}, |c| { *c = (*c + 1) & 65535; log.mark(black_box(offs[*c]), 65536) });
        let t5 = best_ns(11, 1 << 16, &mut c, |_| {}, |c| { *c = (*c + 1) & 65535; vmm.set_addr_range(black_box(offs[*c]) as usize, 65536) });
        println!("round {round}: raw-load {t1:.2} ours4k {t2:.2} vmm4k {t3:.2} ours64k {t4:.2} vmm64k {t5:.2}");
    }
}
