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

/// The dma-engine workload thread: once unmap returns it starts no write on the mapping
/// (it stops: the IOVA is gone) and none of its writes is still landing. (The workload
/// spends most of its time making data, so this catches the race less often than the
/// tests above; it guards the workload's use of the same accessor protocol.)
#[test]
fn the_workload_writes_nothing_after_unmap_returns() {
    use dmalog_device::dma_engine::reg;
    use dmalog_device::{Device, DmaEngine};
    const SPAN: u64 = 8 << 20;
    for _ in 0..4 {
        // Sealed: the direct copy path, the slower one in a debug build, so that a write is
        // in flight for a good part of the workload's time.
        let fd = dmalog_device::sealed_memfd("guest", SPAN).unwrap();
        let driver = SoftDriver::new();
        let space = DmaSpace::new(Arc::clone(driver.live_log()));
        let mapping = SharedMapping::map(&fd, 0, SPAN as usize, true).unwrap();
        space
            .map(DmaRegion {
                iova: 0,
                size: SPAN,
                readable: true,
                writable: true,
                backing: DmaBacking::Mapped(Arc::new(mapping)),
            })
            .unwrap();
        let mut engine = DmaEngine::new(&space);
        let mut set = |offset: u64, value: u64| {
            engine
                .region_write(0, offset, &value.to_le_bytes())
                .unwrap()
        };
        set(reg::WL_SPAN, SPAN);
        set(reg::WL_SIZE, 4 << 20);
        set(reg::WL_SEED, 3);
        set(reg::WL_CTRL, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = [0u8; 8];
        loop {
            engine.region_read(0, reg::WL_WRITES, &mut out).unwrap();
            if u64::from_le_bytes(out) >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "the workload never wrote");
            std::thread::yield_now();
        }
        space.unmap(0, SPAN).unwrap();
        let snapshot = |fd: &OwnedFd| {
            let mut all = vec![0u8; SPAN as usize];
            rustix::io::pread(fd, &mut all, 0).unwrap();
            all
        };
        // The last word of each 4 MiB slot: a write in flight reaches it last.
        let at_unmap = [
            last_word_at(&fd, (4 << 20) - 8),
            last_word_at(&fd, SPAN - 8),
        ];
        let first = snapshot(&fd);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            at_unmap,
            [
                last_word_at(&fd, (4 << 20) - 8),
                last_word_at(&fd, SPAN - 8)
            ],
            "a workload write landed after unmap returned"
        );
        assert!(first == snapshot(&fd), "guest memory changed after unmap");
    }
}

fn last_word_at(fd: &OwnedFd, offset: u64) -> u64 {
    let mut word = [0u8; 8];
    rustix::io::pread(fd, &mut word, offset).unwrap();
    u64::from_le_bytes(word)
}
