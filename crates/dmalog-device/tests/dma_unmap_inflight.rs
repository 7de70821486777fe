//! DMA_UNMAP with device DMA in flight (SPEC 8): once `DmaSpace::unmap` (or `unmap_all`)
//! returns, no write lands in the removed mapping any more.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmalog::SoftDriver;
use dmalog_device::{DmaBacking, DmaRegion, DmaSpace, SharedMapping};

/// Bytes of each write: large, so that a write is in flight at almost any instant.
const WRITE_BYTES: usize = 4 << 20;

fn last_word(fd: &OwnedFd) -> u64 {
    let mut word = [0u8; 8];
    rustix::io::pread(fd, &mut word, WRITE_BYTES as u64 - 8).unwrap();
    u64::from_le_bytes(word)
}

fn one_round(unmap_all: bool) {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, WRITE_BYTES as u64).unwrap();
    let driver = SoftDriver::new();
    let space = DmaSpace::new(Arc::clone(driver.live_log()));
    let mapping = SharedMapping::map(&fd, 0, WRITE_BYTES, true).unwrap();
    space
        .map(DmaRegion {
            iova: 0x10_0000,
            size: WRITE_BYTES as u64,
            readable: true,
            writable: true,
            backing: DmaBacking::Mapped(Arc::new(mapping)),
        })
        .unwrap();
    let writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut dma = space.accessor();
    let writer = {
        let (writes, stop) = (Arc::clone(&writes), Arc::clone(&stop));
        std::thread::spawn(move || {
            // Two buffers, so the thread spends its time writing, not filling.
            let buffers = [vec![0x11u8; WRITE_BYTES], vec![0x22u8; WRITE_BYTES]];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if dma.write(0x10_0000, &buffers[k % 2]).is_err() {
                    break;
                }
                k += 1;
                writes.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while writes.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the writer never wrote");
        std::thread::yield_now();
    }
    if unmap_all {
        space.unmap_all();
    } else {
        space.unmap(0x10_0000, WRITE_BYTES as u64).unwrap();
    }
    // From here on the memory must not change: a write still in flight would reach the
    // last word after this read.
    let at_unmap = last_word(&fd);
    std::thread::sleep(Duration::from_millis(3));
    let later = last_word(&fd);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(
        at_unmap,
        later,
        "a write landed after unmap{} returned",
        if unmap_all { "_all" } else { "" }
    );
    assert_eq!(last_word(&fd), later, "and none after that");
}

#[test]
fn no_write_lands_after_unmap_returns() {
    for _ in 0..20 {
        one_round(false);
    }
}

#[test]
fn no_write_lands_after_unmap_all_returns() {
    for _ in 0..20 {
        one_round(true);
    }
}
