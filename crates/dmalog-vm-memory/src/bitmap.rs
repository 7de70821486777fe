//! [`DmalogBitmap`]: vm-memory's `Bitmap` over a [`DirtyLog`] in guest-physical
//! coordinates.
//!
//! vm-memory hands a region's bitmap region-relative byte offsets (`slice_at` adds the
//! slice's base offset, `MmapRegion::get_slice(off, n)` attaches `bitmap.slice_at(off)`),
//! after the data is written. The bitmap adds its region's GPA and records the write on the
//! region's log with [`DirtyLog::record_write`]: one SeqCst fence (data before bit), then
//! the load-first mark (no RMW when the pages are already dirty). No lock, no allocation.

use std::sync::{Arc, OnceLock};

use dmalog::DirtyLog;
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// The dirty log of one guest memory region, shared (by `Arc`) between the region's
/// bitmap, which marks it, and [`crate::DirtyRegions`], which reports it by GPA.
pub(crate) struct RegionLog {
    /// Guest-physical address of the region's first byte.
    pub(crate) gpa: u64,
    /// Bytes of the region.
    pub(crate) len_bytes: u64,
    /// One bit per log page of `[gpa, gpa + len_bytes)`, in GPA coordinates.
    pub(crate) log: DirtyLog,
}

/// A vm-memory bitmap backed by dmalog's lock-free dirty log.
///
/// Build one per region with [`crate::DirtyRegions::region`] (or
/// [`crate::DirtyRegions::bitmap`]): it then knows its region's GPA and is registered with
/// the shared set a [`crate::VmMemoryDriver`] reports from. A bitmap made by vm-memory
/// itself through [`NewBitmap::with_len`] (e.g. by `GuestMemoryMmap::from_ranges`) knows no
/// GPA: it is *detached* and records nothing until [`crate::DirtyRegions::attach_memory`]
/// attaches it to the GPA of the region that holds it.
///
/// Do not map one `MmapRegion` at two guest addresses (`GuestRegionMmap::with_arc`): the
/// bitmap logs the GPA it was attached at.
pub struct DmalogBitmap {
    len_bytes: usize,
    region: OnceLock<Arc<RegionLog>>,
}

impl DmalogBitmap {
    /// A bitmap already attached to `region`.
    pub(crate) fn attached(region: Arc<RegionLog>) -> Self {
        let bitmap = DmalogBitmap {
            len_bytes: region.len_bytes as usize,
            region: OnceLock::new(),
        };
        let _ = bitmap.region.set(region);
        bitmap
    }

    /// Attaches a detached bitmap; gives the region back if it was attached already.
    pub(crate) fn attach(&self, region: Arc<RegionLog>) -> Result<(), Arc<RegionLog>> {
        self.region.set(region)
    }

    /// Bytes of guest memory this bitmap covers.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// The GPA of the region's first byte, once attached.
    pub fn gpa(&self) -> Option<u64> {
        self.region.get().map(|region| region.gpa)
    }

    /// Whether the bitmap records writes (it is attached to a GPA).
    pub fn is_attached(&self) -> bool {
        self.region.get().is_some()
    }
}

impl std::fmt::Debug for DmalogBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmalogBitmap")
            .field("len_bytes", &self.len_bytes)
            .field("gpa", &self.gpa().map(|gpa| format!("{gpa:#x}")))
            .finish()
    }
}

impl Default for DmalogBitmap {
    /// A detached bitmap of no bytes (vm-memory's `Default` bound; records nothing).
    fn default() -> Self {
        DmalogBitmap::with_len(0)
    }
}

impl<'a> WithBitmapSlice<'a> for DmalogBitmap {
    type S = RefSlice<'a, DmalogBitmap>;
}

impl Bitmap for DmalogBitmap {
    /// Records a write of `len` bytes at region offset `offset`, already in memory.
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        if let Some(region) = self.region.get() {
            // vm-memory's slices add offsets with wrapping arithmetic; a wrapped offset
            // lands outside the log (ignored) or marks a page too many, never corrupts.
            region
                .log
                .record_write(region.gpa.wrapping_add(offset as u64), len as u64);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.region.get().is_some_and(|region| {
            region
                .log
                .is_dirty(region.gpa.wrapping_add(offset as u64), 1)
        })
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, DmalogBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DmalogBitmap {
    /// A detached bitmap of `len` bytes: vm-memory gives no GPA here, so it records nothing
    /// until [`crate::DirtyRegions::attach_memory`] attaches it.
    fn with_len(len: usize) -> Self {
        DmalogBitmap {
            len_bytes: len,
            region: OnceLock::new(),
        }
    }
}
