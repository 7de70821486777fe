//! The "vCPU" workload: threads writing guest memory at a set rate over a working set
//! through vm-memory (`write_slice`), so that every write is marked by the memory's
//! [`DmalogBitmap`](dmalog_vm_memory::DmalogBitmap) (data before bit) and REPORTed by
//! [`DirtyRegions::tracker`](dmalog_vm_memory::DirtyRegions::tracker); a synchronous pause
//! (no write after `pause` returns), and a throttle for auto-converge.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::guest::LoggedGuestMemory;

/// What the workload does.
#[derive(Debug, Clone, Copy)]
pub struct VcpuParams {
    /// Threads.
    pub threads: usize,
    /// First GPA of the working set.
    pub base: u64,
    /// Bytes of the working set.
    pub span: u64,
    /// Bytes per second, all threads together (each write is one 4 KiB page).
    pub rate: u64,
    /// Seed of the page sequence.
    pub seed: u64,
}

struct Shared {
    paused: AtomicBool,
    stop: AtomicBool,
    active: AtomicUsize,
    writes: AtomicU64,
    throttle_pct: AtomicU8,
}

/// Running vCPU threads.
pub struct VcpuWorkload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

const WRITE_BYTES: u64 = 4096;

/// Run time between throttle sleeps (QEMU's CPU throttle works in 10 ms slices too).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The longest single sleep, so that a stop or a lifted throttle is seen soon.
const SLEEP_STEP: Duration = Duration::from_millis(5);

impl VcpuWorkload {
    /// Starts `params.threads` threads writing `memory` (each write marked by its bitmap).
    pub fn start(memory: Arc<LoggedGuestMemory>, params: VcpuParams) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            throttle_pct: AtomicU8::new(0),
        });
        let pages = (params.span / WRITE_BYTES).max(1);
        let per_thread_rate = params.rate / params.threads.max(1) as u64;
        let threads = (0..params.threads.max(1))
            .map(|t| {
                let (shared, memory) = (Arc::clone(&shared), Arc::clone(&memory));
                std::thread::Builder::new()
                    .name(format!("vcpu{t}"))
                    .spawn(move || {
                        let mut x =
                            params.seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let mut page = vec![0u8; WRITE_BYTES as usize];
                        let started = Instant::now();
                        let mut written = 0u64;
                        // Time spent in throttle sleeps: not run time, so the rate pacing
                        // below does not make it up afterwards with a burst.
                        let mut throttled = Duration::ZERO;
                        let mut slice_start = Instant::now();
                        while !shared.stop.load(Ordering::SeqCst) {
                            // Announce the write before checking for a pause (see `pause`).
                            shared.active.fetch_add(1, Ordering::SeqCst);
                            if shared.paused.load(Ordering::SeqCst) {
                                shared.active.fetch_sub(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(1));
                                continue;
                            }
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let gpa = params.base + (x % pages) * WRITE_BYTES;
                            page[..8].copy_from_slice(&x.to_le_bytes());
                            // vm-memory copies, then the bitmap marks the page (data before
                            // bit); a GPA outside guest memory writes nothing.
                            let _ = memory.write_slice(&page, GuestAddress(gpa));
                            shared.active.fetch_sub(1, Ordering::SeqCst);
                            shared.writes.fetch_add(1, Ordering::Relaxed);
                            written += WRITE_BYTES;
                            let ran = slice_start.elapsed();
                            if ran >= THROTTLE_SLICE {
                                throttled += throttle_sleep(&shared, ran);
                                slice_start = Instant::now();
                            }
                            if per_thread_rate > 0 {
                                let due = Duration::from_secs_f64(
                                    written as f64 / per_thread_rate as f64,
                                );
                                let elapsed = started.elapsed().saturating_sub(throttled);
                                if due > elapsed {
                                    std::thread::sleep(due - elapsed);
                                }
                            }
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(VcpuWorkload { shared, threads })
    }

    /// Stops every vCPU: no write happens after this returns.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        while self.shared.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }

    /// Takes `percent` of the vCPUs' time away (auto-converge): after each 10 ms slice
    /// of running, each thread sleeps `percent / (100 - percent)` of it, so that it runs
    /// `100 - percent`% of the time at most (99 at most; 0 lifts the throttle).
    pub fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle_pct
            .store(percent.min(99), Ordering::SeqCst);
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::SeqCst)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }
}

/// The throttle's sleep after `ran` of running: `ran * p / (100 - p)`, in short steps
/// that end early on a stop, a pause or a lower throttle. Returns the time slept.
fn throttle_sleep(shared: &Shared, ran: Duration) -> Duration {
    let percent = shared.throttle_pct.load(Ordering::SeqCst);
    if percent == 0 {
        return Duration::ZERO;
    }
    let percent = u32::from(percent.min(99));
    let owed = ran * percent / (100 - percent);
    let start = Instant::now();
    loop {
        let slept = start.elapsed();
        if slept >= owed
            || shared.stop.load(Ordering::SeqCst)
            || shared.paused.load(Ordering::SeqCst)
            || u32::from(shared.throttle_pct.load(Ordering::SeqCst)) < percent
        {
            return slept;
        }
        std::thread::sleep((owed - slept).min(SLEEP_STEP));
    }
}

impl Drop for VcpuWorkload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_vcpu_still_pauses_and_stops_at_once() {
        let memory = Arc::new(crate::memfd_guest_untracked(&[(0, 1 << 20)]).unwrap());
        let vcpus = VcpuWorkload::start(
            Arc::clone(&memory),
            VcpuParams {
                threads: 2,
                base: 0,
                span: 1 << 20,
                rate: 0,
                seed: 1,
            },
        )
        .unwrap();
        vcpus.set_throttle(250);
        assert_eq!(vcpus.throttle(), 99, "at most 99%");
        // At 99% each 10 ms slice is followed by ~1 s of sleep, which ends early on a
        // pause or a stop (the test takes well under that).
        std::thread::sleep(Duration::from_millis(50));
        vcpus.pause();
        let writes = vcpus.writes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vcpus.writes(), writes, "no write after pause returned");
        vcpus.resume();
        vcpus.set_throttle(0);
        assert_eq!(vcpus.throttle(), 0);
        drop(vcpus);
    }

    /// The vCPUs' writes are logged by the memory's bitmaps: a REPORT of the tracker over
    /// them finds dirty pages inside the working set only, and none once `pause` returned
    /// and what came before was reported (no write, and no mark, after the pause).
    #[test]
    fn vcpu_writes_come_out_of_the_bitmaps_report_and_end_at_pause() {
        use dmalog::DirtyTracker;

        const GUEST_BYTES: u64 = 4 << 20;
        let regions = dmalog_vm_memory::DirtyRegions::new(4096).unwrap();
        let memory = Arc::new(crate::memfd_guest(&regions, &[(0, GUEST_BYTES)]).unwrap());
        let mut cpu = regions.tracker();
        let guest = dmalog::IovaRange::new(0, GUEST_BYTES).unwrap();
        cpu.start(&[guest], 4096).unwrap();
        let (base, span) = (1 << 20, 1 << 20);
        let vcpus = VcpuWorkload::start(
            Arc::clone(&memory),
            VcpuParams {
                threads: 2,
                base,
                span,
                rate: 0,
                seed: 9,
            },
        )
        .unwrap();
        // Waited for, not timed: some writes happen.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vcpus.writes() < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        vcpus.pause();
        let mut bitmap = [0u64; (GUEST_BYTES / 4096 / 64) as usize];
        cpu.report(guest, 4096, &mut bitmap).unwrap();
        let dirty: Vec<u64> = (0..GUEST_BYTES / 4096)
            .filter(|&page| bitmap[(page / 64) as usize] >> (page % 64) & 1 == 1)
            .collect();
        assert!(
            !dirty.is_empty(),
            "{} writes, no page reported",
            vcpus.writes()
        );
        assert!(
            dirty
                .iter()
                .all(|&page| (base..base + span).contains(&(page * 4096))),
            "only the working set: {dirty:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        bitmap.fill(0);
        cpu.report(guest, 4096, &mut bitmap).unwrap();
        assert_eq!(
            bitmap, [0u64; 16],
            "nothing marked after the pause returned"
        );
        vcpus.resume();
        drop(vcpus);
    }
}
