//! scratch
use dmalog_bench::workloads::*;
fn main() {
    let mut w = DenseReport::new(8 << 30);
    for _ in 0..3 {
        w.prepare_ours();
        w.ours_at(2 << 20);
    }
}
