//! dma-engine's background workload: a deterministic sequence of DMA writes, paced to
//! WL_RATE, run on its own thread while the device is RUNNING and WL_CTRL says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::dma_space::DmaAccessor;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The workload's k-th write: `(iova, fill word seed)`; None when the parameters cannot run.
pub fn workload_write(base: u64, span: u64, size: u64, seed: u64, k: u64) -> Option<(u64, u64)> {
    if size == 0 || span < size {
        return None;
    }
    let slots = span / size;
    let slot = splitmix(seed ^ k.wrapping_mul(0x2545_f491_4f6c_dd1d)) % slots;
    Some((
        base.checked_add(slot * size)?,
        splitmix(seed.wrapping_add(k)),
    ))
}

/// Fills `out` with the 8-byte little-endian words `first, first+1, ...` (a partial last
/// word is cut), starting at word index `word0`.
pub(super) fn fill_words(out: &mut [u8], first: u64, word0: u64) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = first.wrapping_add(word0 + i as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct WorkloadParams {
    pub(super) base: u64,
    pub(super) span: u64,
    pub(super) size: u64,
    pub(super) rate: u64,
    pub(super) seed: u64,
}

#[derive(Debug, Default)]
pub(super) struct WorkloadControl {
    pub(super) params: WorkloadParams,
    pub(super) enabled: bool,
    pub(super) allowed: bool,
    pub(super) busy: bool,
    pub(super) shutdown: bool,
}

#[derive(Debug, Default)]
pub(super) struct WorkloadShared {
    pub(super) control: Mutex<WorkloadControl>,
    pub(super) changed: Condvar,
    pub(super) writes: AtomicU64,
    pub(super) bytes_written: AtomicU64,
}

impl WorkloadShared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, WorkloadControl> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The workload's pacing: the bytes written since a window opened, at one rate. A new
/// rate opens a new window: kept, a lower rate would owe the time of every byte written at
/// the old one, and the workload would stall for a share of all the time since the window
/// opened (a throttle of 20% after 2 s of running: 0.5 s without a write).
#[derive(Debug, Clone, Copy)]
struct Pacer {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Pacer {
    fn new(now: Instant) -> Self {
        Pacer {
            start: now,
            bytes: 0,
            rate: 0,
        }
    }

    /// Opens a new window at `now`.
    fn restart(&mut self, now: Instant) {
        self.start = now;
        self.bytes = 0;
    }

    /// Counts a write of `bytes` made at `rate` bytes per second; returns when the next
    /// write is due (`now` or later).
    fn wrote(&mut self, now: Instant, rate: u64, bytes: u64) -> Instant {
        if rate != self.rate {
            self.rate = rate;
            self.restart(now);
        }
        self.bytes = self.bytes.saturating_add(bytes);
        // Any rate a peer set: a quotient past what a Duration holds is "forever".
        let due = Duration::try_from_secs_f64(self.bytes as f64 / rate.max(1) as f64)
            .unwrap_or(Duration::MAX);
        self.start
            .checked_add(due)
            .unwrap_or(now + Duration::from_secs(3600))
            .max(now)
    }
}

pub(super) fn run_workload(shared: Arc<WorkloadShared>, mut dma: DmaAccessor) {
    let mut buffer = Vec::new();
    let mut pacer = Pacer::new(Instant::now());
    loop {
        let params = {
            let mut control = shared.lock();
            while !(control.shutdown || control.enabled && control.allowed) {
                control = shared
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
                pacer.restart(Instant::now());
            }
            if control.shutdown {
                return;
            }
            control.busy = true;
            control.params
        };
        let k = shared.writes.load(Ordering::SeqCst);
        let outcome = workload_write(params.base, params.span, params.size, params.seed, k);
        let ok = match outcome {
            Some((iova, first)) => {
                buffer.resize(params.size.min(1 << 24) as usize, 0);
                fill_words(&mut buffer, first, 0);
                dma.write(iova, &buffer).is_ok()
            }
            None => false,
        };
        {
            let mut control = shared.lock();
            control.busy = false;
            if ok {
                shared.writes.fetch_add(1, Ordering::SeqCst);
                shared
                    .bytes_written
                    .fetch_add(buffer.len() as u64, Ordering::SeqCst);
            } else {
                control.enabled = false; // bad parameters or an unmapped IOVA: stop
            }
            shared.changed.notify_all();
        }
        if params.rate > 0 {
            let due = pacer.wrote(Instant::now(), params.rate, buffer.len() as u64);
            // Sleep until the rate allows the next write, in steps short enough to notice a
            // shutdown, a stop or new parameters (any WL_RATE, however small, is honoured).
            loop {
                let now = Instant::now();
                if due <= now {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_millis(100)));
                let control = shared.lock();
                if control.shutdown
                    || !(control.enabled && control.allowed)
                    || control.params.rate != params.rate
                {
                    pacer.restart(Instant::now());
                    break;
                }
            }
        } else {
            pacer.rate = 0; // unlimited: a later rate starts afresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;
    use std::time::{Duration, Instant};

    #[test]
    fn a_lower_rate_paces_from_now_instead_of_owing_the_past() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        // Two seconds at 100 MB/s, 1 MB a write, each on time.
        let mut now = start;
        for _ in 0..200 {
            now += Duration::from_millis(10);
            assert!(pacer.wrote(now, 100_000_000, 1_000_000) <= now + Duration::from_millis(10));
        }
        // Throttled by 20%: the next write is due one write's time at the new rate later,
        // not after the 0.5 s the old window would owe at 80 MB/s.
        now += Duration::from_millis(10);
        let due = pacer.wrote(now, 80_000_000, 1_000_000);
        assert_eq!(due, now + Duration::from_micros(12_500));
        // The same rate again keeps the window.
        let later = now + Duration::from_millis(1);
        assert_eq!(
            pacer.wrote(later, 80_000_000, 1_000_000),
            now + Duration::from_millis(25)
        );
    }

    #[test]
    fn an_absurd_rate_or_size_is_a_long_wait_not_a_panic() {
        let now = Instant::now();
        let mut pacer = Pacer::new(now);
        assert!(pacer.wrote(now, 1, u64::MAX) > now);
        assert!(pacer.wrote(now, u64::MAX, u64::MAX) >= now);
    }
}
