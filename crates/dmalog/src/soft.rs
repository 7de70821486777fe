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

use crate::budget::{bitmap_bytes, LogBudget, DEFAULT_MAX_LOG_BYTES};
use crate::dirty_log::DirtyLog;
use crate::driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
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
    /// A log over fixed ranges: sorted by IOVA and disjoint (see [`page_spans`]); what a
    /// tracker model whose ranges are fixed at START (`dmalog-models`) marks and drains.
    pub fn fixed(ranges: Vec<DirtyLog>) -> SoftLog {
        SoftLog {
            index: LogIndex::from_sorted(ranges.into_iter().map(Arc::new)),
        }
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

    /// Clears the dirty pages of `[iova, iova+length)` and calls `page` with each one's
    /// IOVA (log by log, in increasing IOVA).
    pub fn drain_pages(&self, iova: u64, length: u64, mut page: impl FnMut(u64)) {
        self.index
            .for_each_overlapping(iova, length, |log| log.drain_pages(iova, length, &mut page));
    }

    /// Reports and clears `[iova, iova+length)` from every range it overlaps.
    pub fn read_and_clear(&self, iova: u64, length: u64, bitmap: &mut IovaBitmap<'_>) {
        self.index
            .for_each_overlapping(iova, length, |log| log.read_and_clear(iova, length, bitmap));
    }
}

impl DirtyMarker for SoftLog {
    #[inline]
    fn mark(&self, iova: u64, len: u64) {
        self.index
            .for_each_overlapping(iova, len, |log| log.mark(iova, len));
    }
}

/// The soft driver.
#[derive(Debug)]
pub struct SoftDriver {
    live: Arc<LiveLog>,
    log: Option<Arc<SoftLog>>,
    page_size: u64,
    budget: LogBudget,
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
            live,
            log: None,
            page_size: 0,
            budget: LogBudget::new(SOFT_DEFAULT_MAX_LOG_BYTES),
            covered: BTreeMap::new(),
        }
    }

    /// Caps the memory a started log may use, ranges added after START included (START
    /// fails with ENOMEM above it, `add_range` too).
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.budget = LogBudget::new(max_log_bytes);
        self
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

    /// The started log, if any (for in-process writers that mark directly). A range added
    /// after START replaces it with a new snapshot: writers that must see added ranges
    /// record through [`SoftDriver::recorder`] instead.
    pub fn log(&self) -> Option<&Arc<SoftLog>> {
        self.log.as_ref()
    }

    fn charge_logs(&mut self, spans: &[(u64, u64)], page_size: u64) -> LogResult<()> {
        let cost = spans.iter().fold(0u64, |sum, &(start, end)| {
            sum.saturating_add(log_cost(end - start, page_size))
        });
        self.budget.charge(cost, "soft log above the memory budget")
    }

    /// Marks `[start, end)` covered, joining the intervals it touches.
    fn cover(&mut self, mut start: u64, mut end: u64) {
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

    /// The parts of `[start, end)` no log covers yet, in order.
    fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut at = start;
        if let Some((_, &before_end)) = self.covered.range(..=start).next_back() {
            at = at.max(before_end);
        }
        for (&next, &next_end) in self.covered.range(start..end) {
            if next > at {
                gaps.push((at, next));
            }
            at = at.max(next_end);
        }
        if at < end {
            gaps.push((at, end));
        }
        gaps
    }

    fn reset(&mut self) {
        self.budget.reset();
        self.covered.clear();
    }
}

/// The budget charge of a [`DirtyLog`] over `length` bytes at `page_size`, before
/// allocating it: its words, its summary and [`SOFT_LOG_OVERHEAD_BYTES`].
pub fn log_cost(length: u64, page_size: u64) -> u64 {
    // One page more than the length needs: an unaligned range may touch one extra.
    let pages = length.div_ceil(page_size).saturating_add(1);
    let words = bitmap_bytes(pages);
    words
        .saturating_add(bitmap_bytes(words / 8))
        .saturating_add(SOFT_LOG_OVERHEAD_BYTES)
}

/// `[iova, iova+length)` rounded out to whole pages of `page_size`, or `Overflow` at the
/// top of the IOVA space.
fn page_span(range: IovaRange, page_size: u64) -> LogResult<(u64, u64)> {
    let mask = page_size - 1;
    let end = range.end().checked_add(mask).ok_or(LogError::Overflow {
        iova: range.iova(),
        length: range.length(),
    })? & !mask;
    Ok((range.iova() & !mask, end))
}

/// Sorted, disjoint `ranges` rounded out to whole pages of `page_size`, those that then
/// share a page joined: the spans of disjoint logs (what [`SoftLog`] requires).
pub fn page_spans(ranges: &[IovaRange], page_size: u64) -> LogResult<Vec<(u64, u64)>> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    spans
        .try_reserve_exact(ranges.len())
        .map_err(|_| LogError::OutOfMemory("log ranges"))?;
    for range in ranges {
        let (start, end) = page_span(*range, page_size)?;
        match spans.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
    Ok(spans)
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
        let mut logs = Vec::new();
        if logs.try_reserve_exact(spans.len()).is_err() {
            self.reset();
            return Err(LogError::OutOfMemory("soft log ranges"));
        }
        for &(start, end) in &spans {
            match DirtyLog::new(start, end - start, chosen) {
                Ok(log) => logs.push(log),
                Err(err) => {
                    self.reset();
                    return Err(err);
                }
            }
            self.cover(start, end);
        }
        let log = Arc::new(SoftLog::fixed(logs));
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
        self.reset();
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

    /// Covers `range` too: logs for its uncovered parts, published as a new snapshot that
    /// keeps every existing log (and its marks). ENOMEM above the budget, nothing added.
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let page_size = self.page_size;
        let Some(current) = self.log.clone() else {
            return Err(LogError::Invalid("logging not started"));
        };
        let (start, end) = page_span(range, page_size)?;
        let gaps = self.uncovered(start, end);
        if gaps.is_empty() {
            return Ok(()); // a re-map of covered IOVA: its log is still there
        }
        let before = self.budget;
        self.charge_logs(&gaps, page_size)?;
        let mut added = Vec::with_capacity(gaps.len());
        for &(gap_start, gap_end) in &gaps {
            match DirtyLog::new(gap_start, gap_end - gap_start, page_size) {
                Ok(log) => added.push(Arc::new(log)),
                Err(err) => {
                    self.budget = before;
                    return Err(err);
                }
            }
        }
        self.cover(start, end);
        let log = Arc::new(current.with_added(added));
        self.live
            .publish(Some(Arc::clone(&log) as Arc<dyn DirtyMarker>));
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
            driver.read_and_clear(0, 270 * P, &mut bitmap).unwrap();
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
        driver.read_and_clear(0, 3 * 4096, &mut bitmap).unwrap();
        assert_eq!(bytes[0], 0b101);
    }
}
