//! The software tracker (`soft`, SPEC 5.1): a [`DirtyLog`] per started range at the chosen
//! page size (any power of two from 4 KiB to 1 GiB). The reference every other driver is
//! held to by the conformance suite.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::dirty_log::DirtyLog;
use crate::driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
use crate::error::{LogError, LogResult};
use crate::iova_bitmap::IovaBitmap;
use crate::ranges::IovaRange;

/// Smallest page size the soft tracker logs at.
pub const SOFT_MIN_PAGE_SIZE: u64 = 4096;
/// Largest page size the soft tracker logs at.
pub const SOFT_MAX_PAGE_SIZE: u64 = 1 << 30;
/// Ranges that can be added after START in "log all DMA-mapped space" mode.
pub const SOFT_MAX_ADDED_RANGES: usize = 4096;
/// Default cap on the memory of one started log (words plus summary): 4 GiB, which covers
/// 128 TiB of IOVA at 4 KiB pages.
pub const SOFT_DEFAULT_MAX_LOG_BYTES: u64 = 4 << 30;

/// The logs of one START: fixed ranges (sorted) plus ranges added later, all lock-free to
/// mark and to read.
pub struct SoftLog {
    ranges: Vec<DirtyLog>,
    added: Box<[OnceLock<DirtyLog>]>,
    added_len: AtomicUsize,
}

impl std::fmt::Debug for SoftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftLog")
            .field("ranges", &self.ranges)
            .field("added", &self.added_len.load(Ordering::Relaxed))
            .finish()
    }
}

impl SoftLog {
    /// A log over fixed ranges (no later additions).
    pub(crate) fn fixed(ranges: Vec<DirtyLog>) -> SoftLog {
        SoftLog {
            ranges,
            added: Box::new([]),
            added_len: AtomicUsize::new(0),
        }
    }

    /// Clears the dirty pages of `[iova, iova+length)` and calls `page` with each one's
    /// IOVA (range by range, increasing within a range).
    pub fn drain_pages(&self, iova: u64, length: u64, mut page: impl FnMut(u64)) {
        self.for_each_overlapping(iova, length, |log| log.drain_pages(iova, length, &mut page));
    }

    fn added(&self) -> impl Iterator<Item = &DirtyLog> {
        let len = self.added_len.load(Ordering::Acquire);
        self.added[..len].iter().filter_map(OnceLock::get)
    }

    /// Calls `f` on every log overlapping `[iova, iova+len)`.
    #[inline]
    fn for_each_overlapping(&self, iova: u64, len: u64, mut f: impl FnMut(&DirtyLog)) {
        let end = iova.saturating_add(len);
        let first = self
            .ranges
            .partition_point(|log| log.base_iova() + log.length() <= iova);
        for log in &self.ranges[first..] {
            if log.base_iova() >= end {
                break;
            }
            f(log);
        }
        if self.added_len.load(Ordering::Relaxed) != 0 {
            for log in self.added() {
                if log.base_iova() < end && iova < log.base_iova() + log.length() {
                    f(log);
                }
            }
        }
    }

    /// Reports and clears `[iova, iova+length)` from every range it overlaps.
    pub fn read_and_clear(&self, iova: u64, length: u64, bitmap: &mut IovaBitmap<'_>) {
        self.for_each_overlapping(iova, length, |log| log.read_and_clear(iova, length, bitmap));
    }
}

impl DirtyMarker for SoftLog {
    #[inline]
    fn mark(&self, iova: u64, len: u64) {
        self.for_each_overlapping(iova, len, |log| log.mark(iova, len));
    }
}

/// The soft driver.
#[derive(Debug)]
pub struct SoftDriver {
    live: Arc<LiveLog>,
    log: Option<Arc<SoftLog>>,
    page_size: u64,
    used_bytes: u64,
    max_log_bytes: u64,
}

impl Default for SoftDriver {
    fn default() -> Self {
        SoftDriver::new()
    }
}

impl SoftDriver {
    /// A stopped soft tracker with its own [`LiveLog`].
    pub fn new() -> Self {
        SoftDriver::with_live_log(LiveLog::new())
    }

    /// A stopped soft tracker publishing into `live` (shared with the device's writers).
    pub fn with_live_log(live: Arc<LiveLog>) -> Self {
        SoftDriver {
            live,
            log: None,
            page_size: 0,
            used_bytes: 0,
            max_log_bytes: SOFT_DEFAULT_MAX_LOG_BYTES,
        }
    }

    /// Caps the memory a started log may use (START fails with ENOMEM above it).
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.max_log_bytes = max_log_bytes;
        self
    }

    /// A recorder for one DMA writer thread.
    pub fn recorder(&self) -> WriteRecorder {
        self.live.recorder()
    }

    /// The live log writers record through.
    pub fn live_log(&self) -> &Arc<LiveLog> {
        &self.live
    }

    /// The started log, if any (for in-process writers that mark directly).
    pub fn log(&self) -> Option<&Arc<SoftLog>> {
        self.log.as_ref()
    }

    fn new_range_log(&mut self, range: IovaRange, page_size: u64) -> LogResult<DirtyLog> {
        let pages = range.length().div_ceil(page_size).saturating_add(1);
        let estimate = pages
            .div_ceil(64)
            .saturating_mul(8)
            .saturating_add(pages.div_ceil(4096) * 8);
        if self.used_bytes.saturating_add(estimate) > self.max_log_bytes {
            return Err(LogError::OutOfMemory("soft log above its memory cap"));
        }
        let log = DirtyLog::new(range.iova(), range.length(), page_size)?;
        self.used_bytes += log.footprint_bytes();
        Ok(log)
    }
}

impl LogDriver for SoftDriver {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        if self.log.is_some() {
            return Err(LogError::Invalid("logging already started"));
        }
        let chosen = (*page_size)
            .clamp(SOFT_MIN_PAGE_SIZE, SOFT_MAX_PAGE_SIZE)
            .next_power_of_two();
        self.used_bytes = 0;
        let mut logs = Vec::with_capacity(ranges.len());
        for range in ranges {
            match self.new_range_log(*range, chosen) {
                Ok(log) => logs.push(log),
                Err(err) => {
                    self.used_bytes = 0;
                    return Err(err);
                }
            }
        }
        let log = Arc::new(SoftLog {
            ranges: logs,
            added: (0..SOFT_MAX_ADDED_RANGES)
                .map(|_| OnceLock::new())
                .collect(),
            added_len: AtomicUsize::new(0),
        });
        self.live
            .publish(Some(Arc::clone(&log) as Arc<dyn DirtyMarker>));
        self.log = Some(log);
        self.page_size = chosen;
        *page_size = chosen;
        Ok(())
    }

    fn stop(&mut self) {
        if self.log.take().is_some() {
            self.live.publish(None);
        }
        self.used_bytes = 0;
    }

    fn read_and_clear(
        &mut self,
        iova: u64,
        length: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) -> LogResult<()> {
        let log = self
            .log
            .as_ref()
            .ok_or(LogError::Invalid("logging not started"))?;
        log.read_and_clear(iova, length, bitmap);
        Ok(())
    }

    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let page_size = self.page_size;
        let Some(log) = self.log.clone() else {
            return Err(LogError::Invalid("logging not started"));
        };
        let index = log.added_len.load(Ordering::Relaxed);
        if index >= log.added.len() {
            return Err(LogError::Unsupported("too many ranges added after START"));
        }
        let new_log = self.new_range_log(range, page_size)?;
        // Only the driver (behind &mut self) appends, so the slot is free.
        let _ = log.added[index].set(new_log);
        log.added_len.store(index + 1, Ordering::Release);
        Ok(())
    }
}
