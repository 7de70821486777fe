//! A model of the AMD/Pensando (pds) dirty tracker (SPEC 5.3): per region a `seq` bitmap
//! the device updates and an `ack` bitmap the host writes back; a page is dirty when its
//! `seq` and `ack` bits differ, and a report acknowledges what it read (`ack = seq`). As in
//! the Linux driver, a report may not span regions (EINVAL) and the page size is the hint
//! unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dmalog::budget::{bitmap_bytes, LogBudget, DEFAULT_MAX_LOG_BYTES};
use dmalog::driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
use dmalog::error::{LogError, LogResult};
use dmalog::iova_bitmap::IovaBitmap;
use dmalog::ranges::{ranges_cover, IovaRange};

/// Regions the default model tracks (the device's `max_regions`).
pub const PDS_DEFAULT_MAX_REGIONS: usize = 8;
/// Bytes charged per region on top of its two bitmaps (the region itself).
pub const PDS_REGION_OVERHEAD_BYTES: u64 = 128;

/// One tracked region: its pages' `seq` (device) and `ack` (host) bits.
struct Region {
    /// First IOVA, aligned to the page size.
    iova: u64,
    /// One past the last IOVA (a whole number of pages after `iova`, never wraps).
    end: u64,
    seq: Box<[AtomicU64]>,
    ack: Box<[AtomicU64]>,
}

/// The device's dirty state for every region (sorted by IOVA, disjoint).
pub struct PdsLog {
    page_shift: u32,
    regions: Vec<Region>,
}

impl PdsLog {
    /// The regions overlapping `[iova, end)`: a binary search, not a scan of every region.
    fn overlapping(&self, iova: u64, end: u64) -> impl Iterator<Item = &Region> {
        let first = self.regions.partition_point(|r| r.end <= iova);
        self.regions[first..]
            .iter()
            .take_while(move |r| r.iova < end)
    }
}

impl std::fmt::Debug for PdsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdsLog")
            .field("regions", &self.regions.len())
            .field("page_size", &(1u64 << self.page_shift))
            .finish()
    }
}

impl DirtyMarker for PdsLog {
    /// The device marks a page by making its `seq` bit differ from its `ack` bit (a
    /// compare-and-swap, so that two writers of one page cannot flip it back).
    fn mark(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = iova.saturating_add(len);
        for region in self.overlapping(iova, end) {
            let (start, stop) = (iova.max(region.iova), end.min(region.end));
            if start >= stop {
                continue;
            }
            let first = (start - region.iova) >> self.page_shift;
            let last = (stop - 1 - region.iova) >> self.page_shift;
            for word in first / 64..=last / 64 {
                let lo = if word == first / 64 { first % 64 } else { 0 };
                let hi = if word == last / 64 { last % 64 } else { 63 };
                let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
                let (seq, ack) = (&region.seq[word as usize], &region.ack[word as usize]);
                let mut current = seq.load(Ordering::SeqCst);
                loop {
                    let clean = !(current ^ ack.load(Ordering::SeqCst)) & mask;
                    if clean == 0 {
                        break;
                    }
                    match seq.compare_exchange(
                        current,
                        current ^ clean,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(_) => break,
                        Err(now) => current = now,
                    }
                }
            }
        }
    }
}

/// The pds driver model.
#[derive(Debug)]
pub struct PdsDriver {
    max_regions: usize,
    live: Arc<LiveLog>,
    log: Option<Arc<PdsLog>>,
    /// The regions' ranges as started (sorted, disjoint), for `add_range`.
    ranges: Vec<IovaRange>,
    budget: LogBudget,
}

impl PdsDriver {
    /// A stopped tracker with up to `max_regions` regions.
    pub fn new(max_regions: usize) -> Self {
        Self::with_live_log(max_regions, LiveLog::new())
    }

    /// As [`PdsDriver::new`], publishing to a live log the caller's DMA paths already hold.
    pub fn with_live_log(max_regions: usize, live: Arc<LiveLog>) -> Self {
        PdsDriver {
            max_regions: max_regions.max(1),
            live,
            log: None,
            ranges: Vec::new(),
            budget: LogBudget::new(DEFAULT_MAX_LOG_BYTES),
        }
    }

    /// Caps the memory of the `seq` and `ack` bitmaps one START allocates (the device's
    /// and the host's; in this model both are ours). START fails with ENOMEM above it.
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.budget = LogBudget::new(max_log_bytes);
        self
    }

    /// Bytes of tracker state the started tracker holds (what the budget is charged).
    pub fn used_bytes(&self) -> u64 {
        self.budget.used_bytes()
    }

    /// A recorder for one DMA writer thread.
    pub fn recorder(&self) -> WriteRecorder {
        self.live.recorder()
    }
}

/// A zeroed bitmap of `words` words from `alloc_zeroed`: the pages of a large one stay
/// untouched (not resident) until the device marks them or a report reads them.
fn zeroed(words: u64) -> LogResult<Box<[AtomicU64]>> {
    let words = usize::try_from(words).map_err(|_| LogError::OutOfMemory("pds bitmap"))?;
    bytemuck::allocation::try_zeroed_slice_box(words)
        .map_err(|()| LogError::OutOfMemory("pds bitmap"))
}

impl LogDriver for PdsDriver {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        if self.log.is_some() {
            return Err(LogError::Invalid("dirty tracking already enabled"));
        }
        if !page_size.is_power_of_two() {
            return Err(LogError::Invalid("page size is not a power of two"));
        }
        let page_shift = page_size.trailing_zeros();
        let mask = *page_size - 1;
        // Regions cover whole pages: the mappings of "log all" need not be aligned.
        let mut spans = Vec::with_capacity(ranges.len());
        let mut cost = 0u64;
        for range in ranges {
            let overflow = LogError::Overflow {
                iova: range.iova(),
                length: range.length(),
            };
            let start = range.iova() & !mask;
            let end = range.end().checked_add(mask).ok_or(overflow)? & !mask;
            let pages = (end - start) >> page_shift;
            cost = cost
                .saturating_add(bitmap_bytes(pages).saturating_mul(2))
                .saturating_add(PDS_REGION_OVERHEAD_BYTES);
            spans.push((start, end, pages));
        }
        self.budget.reset();
        self.budget
            .charge(cost, "pds bitmaps above the memory budget")?;
        let mut regions = Vec::with_capacity(spans.len());
        for (start, end, pages) in spans {
            let bitmaps = zeroed(pages.div_ceil(64)).and_then(|seq| {
                let ack = zeroed(pages.div_ceil(64))?;
                Ok((seq, ack))
            });
            let (seq, ack) = match bitmaps {
                Ok(bitmaps) => bitmaps,
                Err(err) => {
                    self.budget.reset();
                    return Err(err);
                }
            };
            regions.push(Region {
                iova: start,
                end,
                seq,
                ack,
            });
        }
        self.ranges = ranges.to_vec();
        let log = Arc::new(PdsLog {
            page_shift,
            regions,
        });
        self.live
            .publish(Some(Arc::clone(&log) as Arc<dyn DirtyMarker>));
        self.log = Some(log);
        Ok(()) // the page size is returned unchanged, as the pds driver does
    }

    fn stop(&mut self) {
        if self.log.take().is_some() {
            self.live.publish(None);
        }
        self.ranges.clear();
        self.budget.reset();
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
            .ok_or(LogError::Invalid("dirty tracking not enabled"))?;
        let region = log
            .overlapping(iova, iova.saturating_add(1))
            .next()
            .filter(|r| iova >= r.iova)
            .ok_or(LogError::Invalid("no region holds the IOVA"))?;
        if length == 0 || iova.checked_add(length).is_none_or(|end| end > region.end) {
            return Err(LogError::Invalid("a report may not span regions"));
        }
        let first = (iova - region.iova) >> log.page_shift;
        let last = (iova + length - 1 - region.iova) >> log.page_shift;
        for word in first / 64..=last / 64 {
            let lo = if word == first / 64 { first % 64 } else { 0 };
            let hi = if word == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            // READ_SEQ, then WRITE_ACK of what was read: a page the device marks in between
            // differs again from its ack and is reported next time.
            let seq = region.seq[word as usize].load(Ordering::SeqCst);
            let ack = &region.ack[word as usize];
            let old_ack = ack.load(Ordering::SeqCst);
            let mut dirty = (seq ^ old_ack) & mask;
            ack.store((old_ack & !mask) | (seq & mask), Ordering::SeqCst);
            while dirty != 0 {
                let page = word * 64 + u64::from(dirty.trailing_zeros());
                dirty &= dirty - 1;
                bitmap.set(
                    region.iova + (page << log.page_shift),
                    1u64 << log.page_shift,
                );
            }
        }
        Ok(())
    }

    fn max_ranges(&self) -> usize {
        self.max_regions
    }

    /// The regions are fixed at START: a mapping wholly inside them is already covered
    /// (Ok); any other is not (`Unsupported`, and the logging core latches the log into
    /// error).
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        if self.log.is_none() {
            return Err(LogError::Invalid("dirty tracking not enabled"));
        }
        if ranges_cover(&self.ranges, range) {
            Ok(())
        } else {
            Err(LogError::Unsupported(
                "mapping outside the regions fixed at START",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmalog::uapi::LoggingRange;
    use dmalog::LoggingCore;
    use dmalog_conformance::drivers::{dirty_pages as report, USER};

    const PAGE: u64 = 4096;

    #[test]
    fn seq_xor_ack_regions_and_merging() {
        let driver = PdsDriver::new(2);
        let mut dma = driver.recorder();
        let mut core = LoggingCore::new(driver);
        let r = |iova, length| LoggingRange { iova, length };
        // Three ranges merged to the device's two regions (the smallest gap closes).
        assert_eq!(
            core.start(
                USER,
                PAGE,
                &[r(0, 1 << 20), r(2 << 20, 1 << 20), r(1 << 30, 1 << 20)]
            ),
            Ok(PAGE)
        );
        dma.record_write(5 * PAGE, 1);
        dma.record_write(5 * PAGE, 1); // twice: still one dirty page, not flipped back
        dma.record_write((1 << 20) + PAGE, 1); // in the merged gap
        assert_eq!(report(&mut core, 0, 3 << 20).unwrap(), vec![5, 257]);
        assert!(
            report(&mut core, 0, 3 << 20).unwrap().is_empty(),
            "ack = seq"
        );
        dma.record_write(6 * PAGE, 1);
        assert_eq!(
            report(&mut core, 0, 3 << 20).unwrap(),
            vec![6],
            "a page dirty again after its ack"
        );
        // A report across regions is EINVAL, as in the AMD driver; untracked IOVA too.
        assert_eq!(report(&mut core, 0, 2 << 30), Err(libc::EINVAL));
        assert_eq!(report(&mut core, 512 << 20, PAGE), Err(libc::EINVAL));
        assert_eq!(
            report(&mut core, 1 << 30, 1 << 20).unwrap(),
            Vec::<u64>::new()
        );
        core.stop().unwrap();
    }

    #[test]
    fn concurrent_marks_are_reported() {
        let driver = PdsDriver::new(1);
        let recorders: Vec<_> = (0..2).map(|_| driver.recorder()).collect();
        let mut core = LoggingCore::new(driver);
        core.start(
            USER,
            PAGE,
            &[LoggingRange {
                iova: 0,
                length: 1 << 24,
            }],
        )
        .unwrap();
        let writers: Vec<_> = recorders
            .into_iter()
            .enumerate()
            .map(|(t, mut dma)| {
                std::thread::spawn(move || {
                    let mut pages = Vec::new();
                    let mut x = t as u64 + 11;
                    for _ in 0..20_000 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let page = (x >> 33) % 4096;
                        dma.record_write(page * PAGE, 8);
                        pages.push(page);
                    }
                    pages
                })
            })
            .collect();
        let mut seen = vec![false; 4096];
        while !writers.iter().all(|w| w.is_finished()) {
            for page in report(&mut core, 0, 1 << 24).unwrap() {
                seen[page as usize] = true;
            }
        }
        for page in report(&mut core, 0, 1 << 24).unwrap() {
            seen[page as usize] = true;
        }
        let written: Vec<u64> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        assert!(
            written.iter().all(|&p| seen[p as usize]),
            "every written page was reported"
        );
    }
}
