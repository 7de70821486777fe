//! The vfio-user REPORT row's work alone, for a profiler: `DMALOG_REPORTS` REPORTs of
//! 64 GiB at 4 KiB, all dirty (or, with `plain` as the argument, as many plain transfers).
use dmalog_bench::wire::SocketReport;

fn main() {
    let reports: usize = std::env::var("DMALOG_REPORTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let plain = std::env::args().nth(1).as_deref() == Some("plain");
    let mut w = SocketReport::new(64 << 30);
    for _ in 0..reports {
        if plain {
            w.plain_transfer();
        } else {
            w.dirty_all();
            w.report();
        }
    }
}
