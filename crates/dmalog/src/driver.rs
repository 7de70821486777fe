//! The driver side of the logging core: the three operations of SPEC section 1 (the
//! kernel's `vfio_log_ops`) and the hot-path handle DMA writers record through.

use std::sync::Arc;

use crate::budget::{LogBudget, DEFAULT_MAX_LOG_BYTES};
use crate::error::LogResult;
use crate::iova_bitmap::IovaBitmap;
use crate::ranges::IovaRange;
use crate::sync::{fence, ArcSwapOption, AtomicU64, Ordering};

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

    /// Reports the dirty pages of `range` into `bitmap` (OR) and clears them from the log.
    /// Any IOVA range may be asked for; untracked IOVA reports nothing.
    fn read_and_clear(&mut self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) -> LogResult<()>;

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

    fn read_and_clear(&mut self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) -> LogResult<()> {
        (**self).read_and_clear(range, bitmap)
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
    /// Marks every page `[iova, iova+len_bytes)` touches; IOVA outside the log is ignored
    /// (and so is `len_bytes == 0`). The caller has ordered its data writes before this
    /// call (see [`WriteRecorder`]).
    fn mark(&self, iova: u64, len_bytes: u64);
}

/// What a driver keeps beside its log: the [`LiveLog`] its DMA writers record through and
/// the [`LogBudget`] its START charges. Every driver publishes, retracts and charges
/// through it the same way.
#[derive(Debug)]
pub struct LogPublisher {
    live: Arc<LiveLog>,
    budget: LogBudget,
}

impl LogPublisher {
    /// A publisher into `live` with the default budget ([`DEFAULT_MAX_LOG_BYTES`]).
    pub fn new(live: Arc<LiveLog>) -> Self {
        LogPublisher {
            live,
            budget: LogBudget::new(DEFAULT_MAX_LOG_BYTES),
        }
    }

    /// Caps the bytes of tracker state a started log may be charged (nothing charged).
    pub fn set_max_log_bytes(&mut self, max_log_bytes: u64) {
        self.budget = LogBudget::new(max_log_bytes);
    }

    /// The budget, to charge a START's or an added range's state against.
    pub fn budget_mut(&mut self) -> &mut LogBudget {
        &mut self.budget
    }

    /// Bytes of tracker state the started log holds (what the budget is charged).
    pub fn used_bytes(&self) -> u64 {
        self.budget.used_bytes()
    }

    /// A recorder for one DMA writer thread.
    pub fn recorder(&self) -> WriteRecorder {
        self.live.recorder()
    }

    /// The live log writers record through.
    pub fn live_log(&self) -> &Arc<LiveLog> {
        &self.live
    }

    /// Publishes `log` to the writers (START, or a range added after it).
    pub fn publish<M: DirtyMarker + 'static>(&self, log: &Arc<M>) {
        self.live
            .publish(Some(Arc::clone(log) as Arc<dyn DirtyMarker>));
    }

    /// Retracts the published log, if `was_started`, and forgets every charge (STOP, or a
    /// START that failed after charging).
    pub fn retract(&mut self, was_started: bool) {
        if was_started {
            self.live.publish(None);
        }
        self.budget.reset();
    }
}

/// What a [`LiveLog`] publishes: the marker of the started log (an `Arc` of an `Arc`,
/// because `arc-swap` swaps thin pointers; writers cache the inner one).
type Published = Arc<dyn DirtyMarker>;

/// The currently published log of a driver, shared between the driver (which publishes on
/// START and retracts on STOP) and any number of [`WriteRecorder`]s.
///
/// The log itself is published through `arc-swap` (`crate::sync::ArcSwapOption`: under
/// `--cfg loom` a shim of loom primitives with the same API, so that the loom models in
/// `tests/loom_live_log.rs` check the publish / record race), and a generation counter
/// tells a writer when to load it again: a write's hot path stays one fence and one load
/// of the counter, with no `arc-swap` guard and no reference count touched.
#[derive(Default)]
pub struct LiveLog {
    generation: AtomicU64,
    current: ArcSwapOption<Published>,
}

impl std::fmt::Debug for LiveLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveLog")
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl LiveLog {
    /// A live log with nothing published.
    pub fn new() -> Arc<LiveLog> {
        Arc::new(LiveLog::default())
    }

    /// Publishes `marker` (or retracts the current one with `None`). Writers switch at their
    /// next write. A write racing this call either marks the new log or had its data in
    /// memory before this call returned (so a copy of guest memory made after a START sees
    /// it).
    pub fn publish(&self, marker: Option<Arc<dyn DirtyMarker>>) {
        // The log first, then the generation that tells writers to load it: a writer that
        // sees the new generation (and then fences, Acquire) loads this log or a newer one.
        self.current.store(marker.map(Arc::new));
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `record_write` (store-buffering: generation here, data
        // there): if that write's load of the generation missed this bump, its fence comes
        // first, so its data is visible to whatever the caller reads after this fence. An
        // RMW alone is not a fence for later plain loads (not on Arm).
        fence(Ordering::SeqCst);
    }

    /// A recorder for one writer thread.
    pub fn recorder(self: &Arc<Self>) -> WriteRecorder {
        WriteRecorder {
            live: Arc::clone(self),
            generation: u64::MAX,
            cached: None,
        }
    }
}

/// One writer's handle on a [`LiveLog`]: the hot path of every DMA write.
///
/// It caches the published log and checks a generation counter on each write (one load),
/// so a write takes no lock and allocates nothing; only the first write after a START or
/// STOP loads the new log (lock-free, from `arc-swap`). A stopped log stays alive until
/// each recorder that cached it has seen the new generation or been dropped.
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
    /// Records a DMA write of `[iova, iova+len_bytes)` whose data is already in memory.
    ///
    /// The SeqCst fence orders the data before both the generation check and the mark, so
    /// a report (or a START) that misses this write's bit cannot also miss its data: it
    /// pairs with the fences that end [`LiveLog::publish`] and every clearing report.
    #[inline]
    pub fn record_write(&mut self, iova: u64, len_bytes: u64) {
        fence(Ordering::SeqCst);
        // Relaxed: the fences order it against a publish's data, and the Acquire fence below
        // against the log it published.
        let generation = self.live.generation.load(Ordering::Relaxed);
        if generation != self.generation {
            self.reload(generation);
        }
        if let Some(marker) = &self.cached {
            marker.mark(iova, len_bytes);
        }
    }

    /// Picks up the log published at `generation` (or a newer one), after a START or STOP:
    /// out of line, so that the write path stays a fence, a load and a compare.
    #[cold]
    #[inline(never)]
    fn reload(&mut self, generation: u64) {
        // Synchronizes with the publish whose bump `record_write` read: its log (or a newer
        // one) is what we load. A newer one with this older generation costs one more reload.
        fence(Ordering::Acquire);
        self.cached = self.live.current.load_full().as_deref().cloned();
        self.generation = generation;
    }

    /// Whether a log was published at the last write (logging is on).
    pub fn is_logging(&self) -> bool {
        self.cached.is_some()
    }
}
