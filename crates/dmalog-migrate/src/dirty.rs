//! Dirty pages for one round: per-region bitmaps, each dirty source's REPORTs into them
//! (a failed REPORT counts everything dirty and restarts tracking), and the merge into the
//! migration bitmap with the per-source counts.

use std::time::Instant;

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, IovaRange};
use tracing::warn;

use crate::engine::{MigrateError, RoundStats, SourceDevice, PAGE};
use crate::guest::{GuestPages, LoggedGuestMemory};

/// Per-region bitmaps, reused every round.
pub(crate) struct Bitmaps {
    pub(crate) words: Vec<Vec<u64>>,
}

impl Bitmaps {
    pub(crate) fn new(memory: &LoggedGuestMemory) -> Result<Self, MigrateError> {
        let words = memory
            .regions()
            .iter()
            .map(|r| report_words(r.size, PAGE).map(|n| vec![0u64; n as usize]))
            .collect::<Result<_, _>>()
            .map_err(|_| MigrateError::Memory("region too large"))?;
        Ok(Bitmaps { words })
    }

    pub(crate) fn clear(&mut self) {
        for words in &mut self.words {
            words.fill(0);
        }
    }

    pub(crate) fn fill(&mut self, memory: &LoggedGuestMemory) {
        for (words, region) in self.words.iter_mut().zip(memory.regions()) {
            words.fill(u64::MAX);
            let pages = region.size / PAGE;
            if pages % 64 != 0 {
                if let Some(last) = words.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
        }
    }
}

/// Reports one source over every region into `bitmaps`. On an error the log is corrupt:
/// every region is treated as dirty (restarting tracking drops the log of the regions
/// already reported too, and writes made since their report would be lost) and tracking
/// restarts (STOP, START). Returns the errors seen.
fn report_source(
    source: &mut dyn DirtyTracker,
    memory: &LoggedGuestMemory,
    ranges: &[IovaRange],
    bitmaps: &mut Bitmaps,
) -> u32 {
    for (index, region) in memory.regions().iter().enumerate() {
        if let Err(err) = source.report(region.range(), PAGE, &mut bitmaps.words[index]) {
            warn!(%err, gpa = region.gpa, "REPORT failed: all guest memory is sent again, tracking restarts");
            bitmaps.fill(memory);
            let _ = source.stop();
            if let Err(err) = source.start(ranges, PAGE) {
                warn!(%err, "restarting dirty tracking failed");
            }
            return 1;
        }
    }
    0
}

/// Which sources track.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tracking {
    pub(crate) device: bool,
    pub(crate) cpu: bool,
}

/// A round's dirty pages: each source's bitmaps and their union (what the round sends),
/// reused every round, over the START `ranges` (a failed REPORT restarts tracking on them).
pub(crate) struct DirtyPages<'r> {
    ranges: &'r [IovaRange],
    tracking: Tracking,
    device: Bitmaps,
    cpu: Bitmaps,
    /// The union of the sources' dirty pages.
    pub(crate) merged: Bitmaps,
}

impl<'r> DirtyPages<'r> {
    /// Empty bitmaps for every region of `memory`.
    pub(crate) fn new(
        memory: &LoggedGuestMemory,
        ranges: &'r [IovaRange],
        tracking: Tracking,
    ) -> Result<Self, MigrateError> {
        Ok(DirtyPages {
            ranges,
            tracking,
            device: Bitmaps::new(memory)?,
            cpu: Bitmaps::new(memory)?,
            merged: Bitmaps::new(memory)?,
        })
    }

    /// One round's REPORTs: each tracking source into its bitmaps (an untracked source
    /// counts everything dirty), merged into [`DirtyPages::merged`], counted into `stats`.
    /// With `accumulate`, the REPORTs add to what the bitmaps hold (REPORT ORs) and the
    /// counts are of the union: the final round sends what the deciding round found and
    /// what was dirtied since.
    pub(crate) fn collect(
        &mut self,
        device: &mut dyn SourceDevice,
        cpu: &mut dyn DirtyTracker,
        memory: &LoggedGuestMemory,
        stats: &mut RoundStats,
        accumulate: bool,
    ) {
        let report_start = Instant::now();
        for (tracked, source, bitmaps) in [
            (
                self.tracking.device,
                device as &mut dyn DirtyTracker,
                &mut self.device,
            ),
            (self.tracking.cpu, cpu, &mut self.cpu),
        ] {
            if tracked {
                if !accumulate {
                    bitmaps.clear();
                }
                stats.report_errors += report_source(source, memory, self.ranges, bitmaps);
            } else {
                bitmaps.fill(memory);
            }
        }
        stats.report_ms = report_start.elapsed().as_secs_f64() * 1e3;
        (stats.pages_device, stats.pages_cpu, stats.pages_both) = (0, 0, 0);
        count_dirty(&self.device, &self.cpu, &mut self.merged, stats);
    }
}

fn count_dirty(device: &Bitmaps, cpu: &Bitmaps, merged: &mut Bitmaps, stats: &mut RoundStats) {
    for ((d_words, c_words), m_words) in device.words.iter().zip(&cpu.words).zip(&mut merged.words)
    {
        for ((d, c), m) in d_words.iter().zip(c_words).zip(m_words.iter_mut()) {
            *m = d | c;
            stats.pages_device += u64::from((d & !c).count_ones());
            stats.pages_cpu += u64::from((c & !d).count_ones());
            stats.pages_both += u64::from((d & c).count_ones());
        }
    }
}
