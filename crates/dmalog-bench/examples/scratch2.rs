//! scratch
use dmalog::DirtyLog;
#[inline(never)]
#[no_mangle]
pub fn mark_probe(log: &DirtyLog, iova: u64, len: u64) { log.mark(iova, len) }
fn main() {
    let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
    mark_probe(&log, std::hint::black_box(4096), 4096);
}
