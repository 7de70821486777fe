//! The driver side of the logging core: the three operations of SPEC section 1 (the
//! kernel's `vfio_log_ops`) and the hot-path handle DMA writers record through.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::{Arc, Mutex};

use crate::error::LogResult;
use crate::iova_bitmap::IovaBitmap;
use crate::ranges::IovaRange;

/// A device-side tracker: what the logging core calls after it has validated a request.
/// Drivers never see an invalid request.
pub trait LogDriver: Send {
    /// Starts tracking `ranges` (sorted, non-overlapping, page-aligned, already merged to
    /// [`LogDriver::max_ranges`]; empty when logging all DMA-mapped space with nothing mapped
    /// yet). `page_size` is the hint on entry and the chosen size on return. On error
    /// nothing stays allocated and logging is stopped.
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()>;

    /// Stops tracking and frees the log. Must succeed in any state.
    fn stop(&mut self);

    /// Reports the dirty pages of `[iova, iova+length)` into `bitmap` (OR) and clears them
    /// from the log. Any IOVA range may be asked for; untracked IOVA reports nothing.
    fn read_and_clear(
        &mut self,
        iova: u64,
        length: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) -> LogResult<()>;

    /// The most ranges the driver tracks; the core merges longer lists down to it.
    fn max_ranges(&self) -> usize {
        usize::MAX
    }

    /// Adds a range while started in "log all DMA-mapped space" mode (a DMA mapping made
    /// after START). Drivers whose ranges are fixed at START return an error for a range they
    /// do not already cover; the core then latches the log into error (every REPORT is EIO
    /// until STOP and a new START). Must be idempotent: the core may ask again for a range
    /// it asked for before.
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let _ = range;
        Err(crate::error::LogError::Unsupported(
            "ranges are fixed at START",
        ))
    }
}

impl<T: LogDriver + ?Sized> LogDriver for Box<T> {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        (**self).start(ranges, page_size)
    }

    fn stop(&mut self) {
        (**self).stop()
    }

    fn read_and_clear(
        &mut self,
        iova: u64,
        length: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) -> LogResult<()> {
        (**self).read_and_clear(iova, length, bitmap)
    }

    fn max_ranges(&self) -> usize {
        (**self).max_ranges()
    }

    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        (**self).add_range(range)
    }
}

/// The part of a live log that DMA writers touch: mark pages dirty, lock-free.
pub trait DirtyMarker: Send + Sync {
    /// Marks every page `[iova, iova+len)` touches; IOVA outside the log is ignored. The
    /// caller has ordered its data writes before this call (see [`WriteRecorder`]).
    fn mark(&self, iova: u64, len: u64);
}

/// The currently published log of a driver, shared between the driver (which publishes on
/// START and retracts on STOP) and any number of [`WriteRecorder`]s.
#[derive(Default)]
pub struct LiveLog {
    generation: StdAtomicU64,
    current: Mutex<Option<Arc<dyn DirtyMarker>>>,
}

impl std::fmt::Debug for LiveLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveLog")
            .field("generation", &self.generation.load(StdOrdering::Relaxed))
            .finish()
    }
}

impl LiveLog {
    /// A live log with nothing published.
    pub fn new() -> Arc<LiveLog> {
        Arc::new(LiveLog::default())
    }

    /// Publishes `marker` (or retracts the current one with `None`). Writers switch at their
    /// next write.
    pub fn publish(&self, marker: Option<Arc<dyn DirtyMarker>>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = marker;
        // SeqCst pairs with the fence in `record_write`: a write either sees the new
        // generation or its data was in memory before this publish returned.
        self.generation.fetch_add(1, StdOrdering::SeqCst);
    }

    /// A recorder for one writer thread.
    pub fn recorder(self: &Arc<Self>) -> WriteRecorder {
        WriteRecorder {
            live: Arc::clone(self),
            generation: u64::MAX,
            cached: None,
        }
    }

    fn snapshot(&self) -> (u64, Option<Arc<dyn DirtyMarker>>) {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (self.generation.load(StdOrdering::SeqCst), current.clone())
    }
}

/// One writer's handle on a [`LiveLog`]: the hot path of every DMA write.
///
/// It caches the published log and checks a generation counter on each write (one load),
/// so a write takes no lock and allocates nothing; only the first write after a START or
/// STOP takes the publish lock to pick up the new log. A stopped log stays alive until each
/// recorder that cached it has seen the new generation or been dropped.
#[derive(Clone)]
pub struct WriteRecorder {
    live: Arc<LiveLog>,
    generation: u64,
    cached: Option<Arc<dyn DirtyMarker>>,
}

impl std::fmt::Debug for WriteRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRecorder")
            .field("generation", &self.generation)
            .field("logging", &self.cached.is_some())
            .finish()
    }
}

impl WriteRecorder {
    /// Records a DMA write of `[iova, iova+len)` whose data is already in memory.
    ///
    /// The SeqCst fence orders the data before both the generation check and the mark, so
    /// a report (or a START) that misses this write's bit cannot also miss its data.
    #[inline]
    pub fn record_write(&mut self, iova: u64, len: u64) {
        std::sync::atomic::fence(StdOrdering::SeqCst);
        if self.live.generation.load(StdOrdering::SeqCst) != self.generation {
            let (generation, cached) = self.live.snapshot();
            self.generation = generation;
            self.cached = cached;
        }
        if let Some(marker) = &self.cached {
            marker.mark(iova, len);
        }
    }

    /// Whether a log was published at the last write (logging is on).
    pub fn is_logging(&self) -> bool {
        self.cached.is_some()
    }
}
