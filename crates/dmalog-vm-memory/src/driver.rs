//! [`VmMemoryDriver`]: the logging core's driver over a guest's [`DirtyRegions`], so the
//! same memory vm-memory writes is REPORTed by GPA with dmalog's sparse report.
//!
//! The region logs are always on (like vm-memory's `AtomicBitmap`) at the set's page size
//! `L`. START picks a tracker page size `T >= L`, clears every log and remembers the ranges;
//! a REPORT reads and clears only inside them. At `T == L` the region logs report straight
//! into the caller's bitmap (a walk of the summary plus the dirty words); at `T > L` a
//! tracker page is dirty when any of its log pages is, so the report clears whole tracker
//! pages and sets every report page of each dirty one.

use std::sync::Arc;

use dmalog::soft::page_span;
use dmalog::{IovaBitmap, IovaRange, LogDriver, LogError, LogResult};
use tracing::debug;

use crate::regions::{DirtyRegions, MAX_LOG_PAGE_SIZE};

/// The logging core's driver over a guest's region logs.
#[derive(Debug)]
pub struct VmMemoryDriver {
    regions: Arc<DirtyRegions>,
    started: Option<Started>,
}

#[derive(Debug)]
struct Started {
    /// The tracker page size `T`.
    page_size: u64,
    /// Tracked GPA, aligned out to `T`: sorted, disjoint `[start, end)` spans.
    spans: Vec<(u64, u64)>,
}

impl VmMemoryDriver {
    /// A stopped driver over `regions`.
    pub fn new(regions: Arc<DirtyRegions>) -> Self {
        VmMemoryDriver {
            regions,
            started: None,
        }
    }

    /// The regions reported.
    pub fn regions(&self) -> &Arc<DirtyRegions> {
        &self.regions
    }

    /// Clears `[start, end)` in every region log (pages dirtied before tracking began).
    fn clear(&self, start: u64, end: u64) {
        self.regions.for_each_region(|region| {
            region.log.drain_pages(start, end - start, |_| {});
        });
    }
}

/// `range` aligned out to `page_size` as `[start, end)`, or `Overflow` at the top of the
/// address space.
fn aligned_span(range: IovaRange, page_size: u64) -> LogResult<(u64, u64)> {
    let span = page_span(range, page_size)?;
    Ok((span.iova(), span.end()))
}

/// Sorts `spans` and joins the overlapping or adjacent ones.
fn merge_spans(spans: &mut Vec<(u64, u64)>) {
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for &(start, end) in spans.iter() {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    *spans = merged;
}

impl LogDriver for VmMemoryDriver {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        if self.started.is_some() {
            return Err(LogError::Invalid("logging already started"));
        }
        let chosen = (*page_size)
            .clamp(self.regions.page_size(), MAX_LOG_PAGE_SIZE)
            .next_power_of_two();
        let mut spans = ranges
            .iter()
            .map(|range| aligned_span(*range, chosen))
            .collect::<LogResult<Vec<_>>>()?;
        merge_spans(&mut spans);
        // START begins clean: nothing written before it is reported.
        self.clear(0, u64::MAX);
        debug!(
            spans = spans.len(),
            page_size = chosen,
            "vm-memory dirty log started"
        );
        self.started = Some(Started {
            page_size: chosen,
            spans,
        });
        *page_size = chosen;
        Ok(())
    }

    fn stop(&mut self) {
        self.started = None;
    }

    fn read_and_clear(&mut self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) -> LogResult<()> {
        let started = self
            .started
            .as_ref()
            .ok_or(LogError::Invalid("logging not started"))?;
        let (iova, end) = (range.iova(), range.end());
        let (tracker_page, log_page) = (started.page_size, self.regions.page_size());
        let tracker_mask = tracker_page - 1;
        for &(span_start, span_end) in &started.spans {
            let (start, stop) = (iova.max(span_start), end.min(span_end));
            if start >= stop {
                continue;
            }
            if tracker_page == log_page {
                self.regions.for_each_region(|region| {
                    region.log.read_and_clear(start, stop - start, bitmap);
                });
                continue;
            }
            // Whole tracker pages (the span is aligned to them, so they stay inside it).
            let (start, stop) = (start & !tracker_mask, (stop - 1) | tracker_mask);
            self.regions.for_each_region(|region| {
                let mut last_page = None;
                region.log.drain_pages(start, stop - start + 1, |gpa| {
                    let page = gpa & !tracker_mask;
                    // Log pages arrive in increasing order: one set per tracker page.
                    if last_page != Some(page) {
                        bitmap.set(page, tracker_page);
                        last_page = Some(page);
                    }
                });
            });
        }
        Ok(())
    }

    /// Tracks `range` too ("log all DMA-mapped space"): a region log covers it already or
    /// will when its region is made; its pages start clean.
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let Some(started) = self.started.as_mut() else {
            return Err(LogError::Invalid("logging not started"));
        };
        let (start, end) = aligned_span(range, started.page_size)?;
        // Only the untracked parts start clean: tracked GPA (a re-map) keeps its pages.
        let mut gaps = Vec::new();
        let mut at = start;
        for &(span_start, span_end) in &started.spans {
            if span_end <= at || span_start >= end {
                continue;
            }
            if span_start > at {
                gaps.push((at, span_start));
            }
            at = at.max(span_end);
        }
        if at < end {
            gaps.push((at, end));
        }
        started.spans.push((start, end));
        merge_spans(&mut started.spans);
        for (gap_start, gap_end) in gaps {
            self.clear(gap_start, gap_end);
        }
        Ok(())
    }
}
