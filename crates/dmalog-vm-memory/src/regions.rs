//! [`DirtyRegions`]: the shared set of region logs of one guest, where each region
//! registers itself when its bitmap is made or attached, so that a region created after
//! START is reported too.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use dmalog::{DirtyLog, InProcessTracker};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::bitmap::{DmalogBitmap, RegionLog};
use crate::driver::VmMemoryDriver;
use crate::error::VmMemoryLogError;

/// Smallest log page size: the kernel dialect's smallest report page.
pub const MIN_LOG_PAGE_SIZE: u64 = 4096;
/// Largest log (and tracker) page size.
pub const MAX_LOG_PAGE_SIZE: u64 = 1 << 30;

/// The dirty logs of one guest's memory regions, shared by the regions' bitmaps (which
/// register here) and the [`VmMemoryDriver`] that reports them by GPA.
///
/// Every log is at one page size, [`DirtyRegions::page_size`]. The set holds each region's
/// log weakly: a region dropped from the guest memory (and from every snapshot of it) stops
/// being reported and its log is freed.
pub struct DirtyRegions {
    page_size: u64,
    regions: Mutex<Vec<Weak<RegionLog>>>,
}

impl std::fmt::Debug for DirtyRegions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRegions")
            .field("page_size", &self.page_size)
            .field("regions", &self.region_count())
            .finish()
    }
}

impl DirtyRegions {
    /// An empty set logging at `page_size` bytes per bit (a power of two from 4 KiB to
    /// 1 GiB; regions must be aligned to it).
    pub fn new(page_size: u64) -> Result<Arc<DirtyRegions>, VmMemoryLogError> {
        if !page_size.is_power_of_two()
            || !(MIN_LOG_PAGE_SIZE..=MAX_LOG_PAGE_SIZE).contains(&page_size)
        {
            return Err(VmMemoryLogError::PageSize(page_size));
        }
        Ok(Arc::new(DirtyRegions {
            page_size,
            regions: Mutex::new(Vec::new()),
        }))
    }

    /// Bytes per log bit.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Regions whose logs are still alive.
    pub fn region_count(&self) -> usize {
        self.lock()
            .iter()
            .filter(|region| region.strong_count() > 0)
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<RegionLog>>> {
        // A panic elsewhere while holding the lock leaves the list valid (pushes and
        // retains only), so a poisoned lock is still usable.
        self.regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new log for `[gpa, gpa + len_bytes)`, registered.
    fn register(&self, gpa: u64, len_bytes: u64) -> Result<Arc<RegionLog>, VmMemoryLogError> {
        let mask = self.page_size - 1;
        if gpa & mask != 0 || len_bytes & mask != 0 {
            return Err(VmMemoryLogError::Unaligned {
                gpa,
                len_bytes,
                page_size: self.page_size,
            });
        }
        if gpa.checked_add(len_bytes).is_none() {
            return Err(VmMemoryLogError::Overflow { gpa, len_bytes });
        }
        let region = Arc::new(RegionLog {
            gpa,
            len_bytes,
            log: DirtyLog::new(gpa, len_bytes, self.page_size)?,
        });
        let mut regions = self.lock();
        regions.retain(|region| region.strong_count() > 0);
        regions.push(Arc::downgrade(&region));
        Ok(region)
    }

    /// A bitmap for a region of `len_bytes` at `gpa`, registered: writes through it are
    /// reported from now on. Pass it to `MmapRegionBuilder::new_with_bitmap`.
    pub fn bitmap(
        &self,
        gpa: GuestAddress,
        len_bytes: usize,
    ) -> Result<DmalogBitmap, VmMemoryLogError> {
        Ok(DmalogBitmap::attached(
            self.register(gpa.0, len_bytes as u64)?,
        ))
    }

    /// A guest region of `len_bytes` at `gpa` with a registered bitmap: read-write,
    /// `MAP_SHARED` over `file` when given (a memfd shared with a device process), else
    /// private anonymous memory; `MAP_NORESERVE` either way.
    pub fn region(
        &self,
        gpa: GuestAddress,
        len_bytes: usize,
        file: Option<FileOffset>,
    ) -> Result<GuestRegionMmap<DmalogBitmap>, VmMemoryLogError> {
        let bitmap = self.bitmap(gpa, len_bytes)?;
        // The builder defaults to PROT_NONE and anonymous private memory: set both.
        let mut builder = MmapRegionBuilder::new_with_bitmap(len_bytes, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        builder = match file {
            Some(file) => builder
                .with_file_offset(file)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
            None => builder
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE),
        };
        let mapping = builder.build()?;
        GuestRegionMmap::new(mapping, gpa).ok_or(VmMemoryLogError::Overflow {
            gpa: gpa.0,
            len_bytes: len_bytes as u64,
        })
    }

    /// Guest memory of the given regions (sorted by GPA, disjoint), each logged.
    pub fn guest_memory(
        &self,
        ranges: &[(GuestAddress, usize, Option<FileOffset>)],
    ) -> Result<GuestMemoryMmap<DmalogBitmap>, VmMemoryLogError> {
        let regions = ranges
            .iter()
            .map(|(gpa, len_bytes, file)| self.region(*gpa, *len_bytes, file.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GuestMemoryMmap::from_regions(regions)?)
    }

    /// Attaches `bitmap` (made by [`vm_memory::bitmap::NewBitmap::with_len`]) to the
    /// region at `gpa`: it records writes from now on. Attaching again at the same GPA is a
    /// no-op; at another GPA it is an error.
    pub fn attach(&self, bitmap: &DmalogBitmap, gpa: GuestAddress) -> Result<(), VmMemoryLogError> {
        if let Some(attached) = bitmap.gpa() {
            return if attached == gpa.0 {
                Ok(())
            } else {
                Err(VmMemoryLogError::AlreadyAttached {
                    attached,
                    requested: gpa.0,
                })
            };
        }
        let region = self.register(gpa.0, bitmap.len_bytes() as u64)?;
        // Lost race with another attach: the unused log is dropped (its Weak dies).
        bitmap.attach(region).or_else(|_| self.attach(bitmap, gpa))
    }

    /// Attaches every detached bitmap of `memory` to its region's GPA (memory built by
    /// `GuestMemoryMmap::from_ranges`, or a region inserted later). Writes made before
    /// this call are not recorded.
    pub fn attach_memory(
        &self,
        memory: &GuestMemoryMmap<DmalogBitmap>,
    ) -> Result<(), VmMemoryLogError> {
        for region in memory.iter() {
            self.attach(MmapRegion::bitmap(region), region.start_addr())?;
        }
        Ok(())
    }

    /// A [`dmalog::DirtyTracker`] over these regions, with the logging core's checks
    /// (kernel dialect).
    pub fn tracker(self: &Arc<Self>) -> InProcessTracker<VmMemoryDriver> {
        InProcessTracker::new(VmMemoryDriver::new(Arc::clone(self)))
    }

    /// Calls `f` with every live region log, in registration order. Holds the set's lock
    /// (registration waits; marking never does).
    pub(crate) fn for_each_region(&self, mut f: impl FnMut(&RegionLog)) {
        let mut regions = self.lock();
        regions.retain(|region| region.strong_count() > 0);
        for region in regions.iter() {
            if let Some(region) = region.upgrade() {
                f(&region);
            }
        }
    }
}
