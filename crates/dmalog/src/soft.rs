//! The software tracker (`soft`, SPEC 5.1): a [`DirtyLog`] per started range at the chosen
//! page size (any power of two from 4 KiB to 1 GiB). The reference every other driver is
//! held to by the conformance suite.
//!
//! In "log all DMA-mapped space" mode every mapping made after START gets a log too, with
//! no fixed cap: [`LogDriver::add_range`] builds a new [`SoftLog`] snapshot that shares
//! every existing [`DirtyLog`] (so marks already recorded are kept), adds logs for the
//! part of the mapping no log covers yet (a re-map of covered IOVA adds nothing), and
//! publishes it through [`LiveLog::publish`]. The only limit is the memory budget
//! ([`crate::budget`]); above it `add_range` fails and the logging core latches the log
//! into error (EIO on REPORT), never a silently clean page.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::budget::{bitmap_bytes, DEFAULT_MAX_LOG_BYTES};
use crate::dirty_log::DirtyLog;
use crate::driver::{DirtyMarker, LiveLog, LogDriver, LogPublisher, WriteRecorder};
use crate::error::{LogError, LogResult};
use crate::iova_bitmap::IovaBitmap;
use crate::log_index::LogIndex;
use crate::ranges::IovaRange;

/// Smallest page size the soft tracker logs at.
pub const SOFT_MIN_PAGE_SIZE: u64 = 4096;
/// Largest page size the soft tracker logs at.
pub const SOFT_MAX_PAGE_SIZE: u64 = 1 << 30;
/// Default cap on the memory of one started log (the shared default budget).
pub const SOFT_DEFAULT_MAX_LOG_BYTES: u64 = DEFAULT_MAX_LOG_BYTES;
/// Bytes charged per log on top of its words: the [`DirtyLog`] and its `Arc`, its entry in
/// the snapshot's index, and its entry in the driver's coverage map.
pub const SOFT_LOG_OVERHEAD_BYTES: u64 = 256;

/// The logs of one START, lock-free to mark and to read: disjoint logs in a
/// B-tree index whose nodes are shared between snapshots (`log_index`), so a range added
/// after START copies O(log n) nodes and a mark is one O(log n) descent.
pub struct SoftLog {
    index: LogIndex,
}

impl std::fmt::Debug for SoftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftLog")
            .field("logs", &self.log_count())
            .field("depth", &self.index.depth())
            .finish()
    }
}

impl SoftLog {
    /// A log over `spans` (sorted, disjoint and page-aligned, as [`page_spans`] makes
    /// them) at `page_size`: what the soft tracker starts with, and what a tracker model
    /// whose ranges are fixed at START (`dmalog-models`) marks and drains. ENOMEM when the
    /// logs cannot be allocated.
    pub fn over_spans(spans: &[IovaRange], page_size: u64) -> LogResult<SoftLog> {
        let logs = dirty_logs(spans, page_size)?;
        Ok(SoftLog {
            index: LogIndex::from_sorted(logs.into_iter().map(Arc::new)),
        })
    }

    /// This log plus `added` (disjoint from each other and from every log here): the
    /// existing logs are shared, not copied.
    fn with_added(&self, added: Vec<Arc<DirtyLog>>) -> SoftLog {
        let mut index = self.index.clone();
        for log in added {
            index = index.with(log);
        }
        SoftLog { index }
    }

    /// Logs in this snapshot.
    pub fn log_count(&self) -> usize {
        self.index.len()
    }

    /// Clears the dirty pages of `range` and calls `page` with each one's IOVA (log by
    /// log, in increasing IOVA).
    pub fn drain_pages(&self, range: IovaRange, mut page: impl FnMut(u64)) {
        let (iova, len_bytes) = (range.iova(), range.len_bytes());
        self.index.for_each_overlapping(iova, len_bytes, |log| {
            log.drain_pages(iova, len_bytes, &mut page)
        });
    }

    /// Reports and clears `range` from every log it overlaps.
    pub fn read_and_clear(&self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) {
        let (iova, len_bytes) = (range.iova(), range.len_bytes());
        self.index.for_each_overlapping(iova, len_bytes, |log| {
            log.read_and_clear(iova, len_bytes, bitmap)
        });
    }
}

impl DirtyMarker for SoftLog {
    #[inline]
    fn mark(&self, iova: u64, len_bytes: u64) {
        self.index
            .for_each_overlapping(iova, len_bytes, |log| log.mark(iova, len_bytes));
    }
}

/// The soft driver.
#[derive(Debug)]
pub struct SoftDriver {
    publisher: LogPublisher,
    log: Option<Arc<SoftLog>>,
    page_size: u64,
    /// The IOVA the logs cover, page-aligned, as disjoint non-adjacent intervals
    /// (start -> end): what tells an added range's uncovered parts in O(log n).
    covered: BTreeMap<u64, u64>,
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
            publisher: LogPublisher::new(live),
            log: None,
            page_size: 0,
            covered: BTreeMap::new(),
        }
    }

    /// Caps the memory a started log may use, ranges added after START included (START
    /// fails with ENOMEM above it, `add_range` too).
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.publisher.set_max_log_bytes(max_log_bytes);
        self
    }

    /// Bytes of tracker state the started log holds (what the budget is charged).
    pub fn used_bytes(&self) -> u64 {
        self.publisher.used_bytes()
    }

    /// A recorder for one DMA writer thread.
    pub fn recorder(&self) -> WriteRecorder {
        self.publisher.recorder()
    }

    /// The live log writers record through.
    pub fn live_log(&self) -> &Arc<LiveLog> {
        self.publisher.live_log()
    }

    /// The started log, if any (for in-process writers that mark directly). A range added
    /// after START replaces it with a new snapshot: writers that must see added ranges
    /// record through [`SoftDriver::recorder`] instead.
    pub fn log(&self) -> Option<&Arc<SoftLog>> {
        self.log.as_ref()
    }

    fn charge_logs(&mut self, spans: &[IovaRange], page_size: u64) -> LogResult<()> {
        let cost = spans.iter().fold(0u64, |sum, span| {
            sum.saturating_add(log_cost(span.len_bytes(), page_size))
        });
        self.publisher
            .budget_mut()
            .charge(cost, "soft log above the memory budget")
    }

    /// Marks `span` covered, joining the intervals it touches.
    fn cover(&mut self, span: IovaRange) {
        let (mut start, mut end) = (span.iova(), span.end());
        if let Some((&before, &before_end)) = self.covered.range(..=start).next_back() {
            if before_end >= start {
                start = before;
                end = end.max(before_end);
            }
        }
        while let Some((&next, &next_end)) = self.covered.range(start..).next() {
            if next > end {
                break;
            }
            end = end.max(next_end);
            self.covered.remove(&next);
        }
        self.covered.insert(start, end);
    }

    /// The parts of `span` no log covers yet, in order.
    fn uncovered(&self, span: IovaRange) -> Vec<IovaRange> {
        let (start, end) = (span.iova(), span.end());
        // Non-empty, inside `span`: never an error.
        let gap = |from: u64, to: u64| IovaRange::new(from, to - from).expect("a gap");
        let mut gaps = Vec::new();
        let mut at = start;
        if let Some((_, &before_end)) = self.covered.range(..=start).next_back() {
            at = at.max(before_end);
        }
        for (&next, &next_end) in self.covered.range(start..end) {
            if next > at {
                gaps.push(gap(at, next));
            }
            at = at.max(next_end);
        }
        if at < end {
            gaps.push(gap(at, end));
        }
        gaps
    }

    /// Retracts the published log (if any) and forgets the charges and the coverage.
    fn reset(&mut self) {
        let was_started = self.log.take().is_some();
        self.publisher.retract(was_started);
        self.covered.clear();
    }
}

/// The budget charge of a [`DirtyLog`] over `len_bytes` bytes at `page_size`, before
/// allocating it: its words, its summary and [`SOFT_LOG_OVERHEAD_BYTES`].
pub fn log_cost(len_bytes: u64, page_size: u64) -> u64 {
    // One page more than the len_bytes needs: an unaligned range may touch one extra.
    let pages = len_bytes.div_ceil(page_size).saturating_add(1);
    let words = bitmap_bytes(pages);
    words
        .saturating_add(bitmap_bytes(words / 8))
        .saturating_add(SOFT_LOG_OVERHEAD_BYTES)
}

/// `range` rounded out to whole pages of `page_size` (a power of two), or `Overflow` at
/// the top of the IOVA space.
pub fn page_span(range: IovaRange, page_size: u64) -> LogResult<IovaRange> {
    let mask = page_size - 1;
    let overflow = LogError::Overflow {
        iova: range.iova(),
        len_bytes: range.len_bytes(),
    };
    let end = range.end().checked_add(mask).ok_or(overflow)? & !mask;
    let start = range.iova() & !mask;
    IovaRange::new(start, end - start)
}

/// Sorted, disjoint `ranges` rounded out to whole pages of `page_size`, those that then
/// share a page joined: the spans of disjoint logs (what [`SoftLog::over_spans`] takes).
pub fn page_spans(ranges: &[IovaRange], page_size: u64) -> LogResult<Vec<IovaRange>> {
    let mut spans: Vec<IovaRange> = Vec::new();
    spans
        .try_reserve_exact(ranges.len())
        .map_err(|_| LogError::OutOfMemory("log ranges"))?;
    for range in ranges {
        let span = page_span(*range, page_size)?;
        match spans.last_mut() {
            Some(last) if span.iova() < last.end() => {
                let end = last.end().max(span.end());
                *last = IovaRange::new(last.iova(), end - last.iova())?;
            }
            _ => spans.push(span),
        }
    }
    Ok(spans)
}

/// One [`DirtyLog`] per span at `page_size`; ENOMEM when they cannot be allocated.
fn dirty_logs(spans: &[IovaRange], page_size: u64) -> LogResult<Vec<DirtyLog>> {
    let mut logs = Vec::new();
    logs.try_reserve_exact(spans.len())
        .map_err(|_| LogError::OutOfMemory("soft log ranges"))?;
    for span in spans {
        logs.push(DirtyLog::new(span.iova(), span.len_bytes(), page_size)?);
    }
    Ok(logs)
}

impl LogDriver for SoftDriver {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        if self.log.is_some() {
            return Err(LogError::Invalid("logging already started"));
        }
        let chosen = (*page_size)
            .clamp(SOFT_MIN_PAGE_SIZE, SOFT_MAX_PAGE_SIZE)
            .next_power_of_two();
        self.reset();
        let spans = page_spans(ranges, chosen)?;
        self.charge_logs(&spans, chosen)?;
        let log = match SoftLog::over_spans(&spans, chosen) {
            Ok(log) => Arc::new(log),
            Err(err) => {
                self.reset();
                return Err(err);
            }
        };
        for span in &spans {
            self.cover(*span);
        }
        self.publisher.publish(&log);
        self.log = Some(log);
        self.page_size = chosen;
        *page_size = chosen;
        Ok(())
    }

    fn stop(&mut self) {
        self.reset();
    }

    fn read_and_clear(&mut self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) -> LogResult<()> {
        let log = self
            .log
            .as_ref()
            .ok_or(LogError::Invalid("logging not started"))?;
        log.read_and_clear(range, bitmap);
        Ok(())
    }

    /// Covers `range` too: logs for its uncovered parts, published as a new snapshot that
    /// keeps every existing log (and its marks). ENOMEM above the budget, nothing added.
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let page_size = self.page_size;
        let Some(current) = self.log.clone() else {
            return Err(LogError::Invalid("logging not started"));
        };
        let span = page_span(range, page_size)?;
        let gaps = self.uncovered(span);
        if gaps.is_empty() {
            return Ok(()); // a re-map of covered IOVA: its log is still there
        }
        let before = *self.publisher.budget_mut();
        self.charge_logs(&gaps, page_size)?;
        let added = match dirty_logs(&gaps, page_size) {
            Ok(logs) => logs.into_iter().map(Arc::new).collect(),
            Err(err) => {
                *self.publisher.budget_mut() = before;
                return Err(err);
            }
        };
        self.cover(span);
        let log = Arc::new(current.with_added(added));
        self.publisher.publish(&log);
        self.log = Some(log);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_ranges_keep_the_index_shallow_and_fill_only_gaps() {
        let mut driver = SoftDriver::new();
        let mut page = 4096;
        driver.start(&[], &mut page).unwrap();
        for k in 0..1000u64 {
            driver
                .add_range(IovaRange::new(k << 20, 4096).unwrap())
                .unwrap();
        }
        let log = driver.log().unwrap();
        assert_eq!(log.log_count(), 1000);
        assert!(log.index.depth() <= 4, "depth {}", log.index.depth());
        // One log covering the gaps between three earlier ones adds only the gaps.
        driver
            .add_range(IovaRange::new(0, 3 << 20).unwrap())
            .unwrap();
        assert_eq!(driver.log().unwrap().log_count(), 1003);
        assert_eq!(driver.covered.range(..(3 << 20)).count(), 1, "joined");
    }

    proptest::proptest! {
        /// Ranges added in any order and overlap, writes anywhere: a report shows exactly
        /// the written pages that some added range covers.
        #[test]
        fn added_ranges_report_like_a_model(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..256, 1u64..12), 1..120)
        ) {
            const P: u64 = 4096;
            let mut driver = SoftDriver::new();
            let mut dma = driver.recorder();
            let mut page = P;
            driver.start(&[], &mut page).unwrap();
            let mut covered = [false; 270];
            let mut written = [false; 270];
            for (is_map, first, pages) in ops {
                if is_map {
                    driver.add_range(IovaRange::new(first * P, pages * P).unwrap()).unwrap();
                    covered[first as usize..(first + pages) as usize].fill(true);
                } else {
                    dma.record_write(first * P + 7, pages * P - 7);
                    for k in first..first + pages {
                        written[k as usize] |= covered[k as usize];
                    }
                }
            }
            let mut bytes = [0u8; 34];
            let mut bitmap = IovaBitmap::new(0, 270 * P, P, &mut bytes).unwrap();
            driver.read_and_clear(IovaRange::new(0, 270 * P).unwrap(), &mut bitmap).unwrap();
            for k in 0..270 {
                proptest::prop_assert_eq!(bytes[k / 8] >> (k % 8) & 1 == 1, written[k], "page {}", k);
            }
        }
    }

    #[test]
    fn ranges_sharing_a_chosen_page_get_one_log() {
        let mut driver = SoftDriver::new();
        let mut dma = driver.recorder();
        let r = |iova, length| IovaRange::new(iova, length).unwrap();
        let mut page = 512;
        driver
            .start(&[r(0, 512), r(1024, 512), r(8192, 4096)], &mut page)
            .unwrap();
        assert_eq!(page, 4096);
        assert_eq!(driver.log().unwrap().log_count(), 2);
        dma.record_write(1100, 1);
        dma.record_write(8192 + 5, 1);
        let mut bytes = [0u8; 1];
        let mut bitmap = IovaBitmap::new(0, 3 * 4096, 4096, &mut bytes).unwrap();
        driver
            .read_and_clear(IovaRange::new(0, 3 * 4096).unwrap(), &mut bitmap)
            .unwrap();
        assert_eq!(bytes[0], 0b101);
    }
}
