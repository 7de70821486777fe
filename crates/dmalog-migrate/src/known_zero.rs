//! The destination's record of the pages it knows are zero: a zero run costs the source 16
//! bytes on the wire for up to [`crate::stream::MAX_ZERO_PAGES_PER_FRAME`] pages of work
//! here (measured: about 1 s of CPU per 320 bytes sent, when every page is looked at), so
//! each page is zeroed (or found zero) once and then skipped until a data run writes it
//! again. The zeroing work of a whole migration is then bounded by guest memory plus the
//! data pages received, whatever the source sends.
//!
//! Nothing else writes the destination's guest memory before its device runs (the vCPUs
//! do not run and a device in RESUMING does no DMA), so a page known zero stays zero.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::PAGE;
use crate::guest::{GuestPages, LoggedGuestMemory};

/// One bit per page of guest memory (set: zero, and not written since).
#[derive(Debug)]
pub(crate) struct KnownZero {
    /// `(gpa, pages, bits)` of each region.
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl KnownZero {
    /// Nothing known yet (the memory may hold anything).
    pub(crate) fn new(memory: &LoggedGuestMemory) -> Self {
        let regions = memory
            .regions()
            .iter()
            .map(|r| {
                let pages = r.size / PAGE;
                let words = pages.div_ceil(64) as usize;
                (
                    r.gpa,
                    pages,
                    (0..words).map(|_| AtomicU64::new(0)).collect(),
                )
            })
            .collect();
        KnownZero { regions }
    }

    /// The bits of the run of `npages` at `gpa`, and its first page's index; `None` when
    /// the run is not inside one region.
    fn locate(&self, gpa: u64, npages: u64) -> Option<(&[AtomicU64], u64)> {
        let (base, pages, bits) = self
            .regions
            .iter()
            .find(|(base, pages, _)| gpa >= *base && (gpa - base) / PAGE < *pages)?;
        let first = (gpa - base) / PAGE;
        (first.checked_add(npages)? <= *pages).then_some((bits.as_slice(), first))
    }

    /// A data run of `npages` at `gpa` is about to be written: its pages are no longer
    /// known zero.
    pub(crate) fn forget(&self, gpa: u64, npages: u64) {
        if let Some((bits, first)) = self.locate(gpa, npages) {
            for page in first..first + npages {
                bits[(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::AcqRel);
            }
        }
    }

    /// Zeroes the `npages` pages at `gpa` not known zero, and records them; false when
    /// the run is outside guest memory.
    pub(crate) fn zero(&self, memory: &LoggedGuestMemory, gpa: u64, npages: u64) -> bool {
        let Some((bits, first)) = self.locate(gpa, npages) else {
            return false;
        };
        (first..first + npages).all(|page| {
            let (word, bit) = (&bits[(page / 64) as usize], 1u64 << (page % 64));
            if word.load(Ordering::Acquire) & bit != 0 {
                return true;
            }
            let at = gpa + (page - first) * PAGE;
            let zeroed = memory.zero_pages(at, 1, PAGE as usize);
            if zeroed {
                word.fetch_or(bit, Ordering::AcqRel);
            }
            zeroed
        })
    }
}
