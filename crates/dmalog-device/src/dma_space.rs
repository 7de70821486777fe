//! The device's view of guest memory: DMA mappings by IOVA, with bounds-checked
//! translation, copies into shared memory, and every DMA write recorded on the live tracker.
//!
//! Mappings change rarely (DMA_MAP/UNMAP from the server thread) while DMA happens often on
//! device threads, so the table is an immutable snapshot published with a generation
//! counter. Each DMA thread owns a [`DmaAccessor`] that caches the snapshot and checks the
//! generation with one load per access: no lock and no allocation on the hot path. A
//! mapping's memory stays mapped until the last snapshot holding it is dropped, so a DMA
//! racing with DMA_UNMAP lands in the old mapping instead of faulting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dmalog::{LiveLog, WriteRecorder};

use crate::shared_memory::SharedMapping;

/// How a DMA region is reached.
#[derive(Debug, Clone)]
pub enum DmaBacking {
    /// Mapped from the fd the client sent: direct access.
    Mapped(Arc<SharedMapping>),
    /// No fd: only reachable through DMA_READ/DMA_WRITE messages to the client.
    MessageOnly,
}

/// One DMA mapping.
#[derive(Debug, Clone)]
pub struct DmaRegion {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The client allows device reads.
    pub readable: bool,
    /// The client allows device writes.
    pub writable: bool,
    /// The memory behind it.
    pub backing: DmaBacking,
}

impl DmaRegion {
    /// One past the last IOVA (the caller made sure it does not wrap).
    pub fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// A DMA_MAP or DMA_UNMAP that cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The new mapping overlaps an existing one (EEXIST).
    #[error("mapping [{iova:#x}, +{size:#x}) overlaps an existing one")]
    Overlap {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// Zero size or an end past 2^64 (EINVAL).
    #[error("invalid mapping [{iova:#x}, +{size:#x})")]
    Invalid {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// No mapping matches exactly (EINVAL).
    #[error("no mapping is exactly [{iova:#x}, +{size:#x})")]
    NoSuchMapping {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// The table is full (the negotiated `max_dma_maps`) (ENOSPC).
    #[error("too many DMA mappings (limit {0})")]
    TooMany(usize),
}

impl MapError {
    /// The errno for a wire reply.
    pub fn errno(&self) -> i32 {
        match self {
            MapError::Overlap { .. } => libc::EEXIST,
            MapError::Invalid { .. } | MapError::NoSuchMapping { .. } => libc::EINVAL,
            MapError::TooMany(_) => libc::ENOSPC,
        }
    }
}

/// A DMA access that hit an IOVA not mapped (or not writable/readable, or message-only):
/// the bytes before `at` were transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault at IOVA {at:#x} after {done} bytes")]
pub struct DmaFault {
    /// The first IOVA that could not be accessed.
    pub at: u64,
    /// Bytes transferred before it.
    pub done: u64,
}

struct DmaShared {
    generation: AtomicU64,
    table: Mutex<Arc<Vec<DmaRegion>>>,
    live: Arc<LiveLog>,
    max_maps: usize,
}

/// The DMA mappings of one device, shared by the server and the device's threads.
#[derive(Clone)]
pub struct DmaSpace {
    shared: Arc<DmaShared>,
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace")
            .field("regions", &self.regions().len())
            .finish()
    }
}

impl DmaSpace {
    /// An empty space whose writes are recorded on `live` (the tracker's live log).
    pub fn new(live: Arc<LiveLog>) -> Self {
        Self::with_max_maps(live, 65535)
    }

    /// As [`DmaSpace::new`] with a limit on mappings.
    pub fn with_max_maps(live: Arc<LiveLog>, max_maps: usize) -> Self {
        DmaSpace {
            shared: Arc::new(DmaShared {
                generation: AtomicU64::new(0),
                table: Mutex::new(Arc::new(Vec::new())),
                live,
                max_maps,
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Arc<Vec<DmaRegion>>> {
        self.shared.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A recorder on this space's tracker, for a DMA path that writes guest memory outside
    /// [`DmaSpace::accessor`] (an embedding library's own engine) and records it itself.
    pub fn recorder(&self) -> dmalog::WriteRecorder {
        self.shared.live.recorder()
    }

    /// The current mappings, sorted by IOVA.
    pub fn regions(&self) -> Arc<Vec<DmaRegion>> {
        Arc::clone(&self.table())
    }

    fn publish(&self, table: &mut Arc<Vec<DmaRegion>>, regions: Vec<DmaRegion>) {
        *table = Arc::new(regions);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Adds a mapping; EEXIST when it overlaps one.
    pub fn map(&self, region: DmaRegion) -> Result<(), MapError> {
        let (iova, size) = (region.iova, region.size);
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(MapError::Invalid { iova, size });
        }
        let mut table = self.table();
        if table.len() >= self.shared.max_maps {
            return Err(MapError::TooMany(self.shared.max_maps));
        }
        let at = table.partition_point(|r| r.end() <= iova);
        if table.get(at).is_some_and(|r| r.iova < iova + size) {
            return Err(MapError::Overlap { iova, size });
        }
        let mut regions = table.as_ref().clone();
        regions.insert(at, region);
        self.publish(&mut table, regions);
        Ok(())
    }

    /// Removes the mapping that is exactly `[iova, iova+size)`.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<DmaRegion, MapError> {
        let mut table = self.table();
        let at = table
            .iter()
            .position(|r| r.iova == iova && r.size == size)
            .ok_or(MapError::NoSuchMapping { iova, size })?;
        let mut regions = table.as_ref().clone();
        let removed = regions.remove(at);
        self.publish(&mut table, regions);
        Ok(removed)
    }

    /// Removes every mapping.
    pub fn unmap_all(&self) {
        let mut table = self.table();
        self.publish(&mut table, Vec::new());
    }

    /// A handle for one DMA thread.
    pub fn accessor(&self) -> DmaAccessor {
        DmaAccessor {
            shared: Arc::clone(&self.shared),
            generation: u64::MAX,
            table: Arc::new(Vec::new()),
            recorder: self.shared.live.recorder(),
        }
    }
}

/// One thread's DMA handle (see the module documentation).
pub struct DmaAccessor {
    shared: Arc<DmaShared>,
    generation: u64,
    table: Arc<Vec<DmaRegion>>,
    recorder: WriteRecorder,
}

impl std::fmt::Debug for DmaAccessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaAccessor")
            .field("generation", &self.generation)
            .finish()
    }
}

impl DmaAccessor {
    fn refresh(&mut self) {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if generation != self.generation {
            let table = self.shared.table.lock().unwrap_or_else(|p| p.into_inner());
            self.table = Arc::clone(&table);
            self.generation = self.shared.generation.load(Ordering::SeqCst);
        }
    }

    /// The mapped region holding `iova`, and how many bytes of it from there.
    fn lookup(table: &[DmaRegion], iova: u64) -> Option<(&DmaRegion, u64)> {
        let at = table.partition_point(|r| r.end() <= iova);
        let region = table.get(at).filter(|r| r.iova <= iova)?;
        Some((region, region.end() - iova))
    }

    /// Walks `len` bytes from `iova` across adjacent mappings, handing each piece to
    /// `access(mapping, offset in the mapping, its IOVA, bytes done before it, its length)`.
    /// Stops with a fault at the first IOVA that is not mapped, message-only or lacks the
    /// permission (`write`: writable, else readable), or where `access` fails.
    fn walk(
        table: &[DmaRegion],
        iova: u64,
        len: usize,
        write: bool,
        mut access: impl FnMut(&SharedMapping, usize, u64, usize, usize) -> bool,
    ) -> Result<(), DmaFault> {
        let mut done = 0usize;
        while done < len {
            let at = iova.checked_add(done as u64).ok_or(DmaFault {
                at: u64::MAX,
                done: done as u64,
            })?;
            let fault = DmaFault {
                at,
                done: done as u64,
            };
            let (region, available) = Self::lookup(table, at).ok_or(fault)?;
            let DmaBacking::Mapped(mapping) = &region.backing else {
                return Err(fault);
            };
            if !(if write {
                region.writable
            } else {
                region.readable
            }) {
                return Err(fault);
            }
            let piece = (len - done).min(available.min(usize::MAX as u64) as usize);
            if !access(mapping, (at - region.iova) as usize, at, done, piece) {
                return Err(fault);
            }
            done += piece;
        }
        Ok(())
    }

    /// Writes `data` at `iova` (possibly across adjacent mappings), recording each piece on
    /// the tracker after its bytes are in memory. Stops at the first IOVA that is not
    /// mapped, not writable or message-only.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.refresh();
        let recorder = &mut self.recorder;
        Self::walk(
            &self.table,
            iova,
            data.len(),
            true,
            |mapping, offset, at, done, piece| {
                let written = mapping.write(offset, &data[done..done + piece]);
                if written {
                    recorder.record_write(at, piece as u64);
                }
                written
            },
        )
    }

    /// Reads `out.len()` bytes at `iova`. Reads never dirty a page.
    pub fn read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        self.refresh();
        Self::walk(
            &self.table,
            iova,
            out.len(),
            false,
            |mapping, offset, _, done, piece| mapping.read(offset, &mut out[done..done + piece]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(iova: u64, size: u64, fd: &std::os::fd::OwnedFd, offset: u64) -> DmaRegion {
        let mapping = SharedMapping::map(fd, offset, size as usize, true).unwrap();
        DmaRegion {
            iova,
            size,
            readable: true,
            writable: true,
            backing: DmaBacking::Mapped(Arc::new(mapping)),
        }
    }

    #[test]
    fn map_translate_and_log() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        let driver = dmalog::SoftDriver::new();
        let space = DmaSpace::new(Arc::clone(driver.live_log()));
        let mut core = dmalog::InProcessTracker::new(driver);
        space.map(mapped(0x10000, 0x8000, &fd, 0)).unwrap();
        space.map(mapped(0x18000, 0x8000, &fd, 0x8000)).unwrap(); // adjacent
        assert_eq!(
            space
                .map(mapped(0x17000, 0x2000, &fd, 0))
                .unwrap_err()
                .errno(),
            libc::EEXIST
        );
        let range = dmalog::IovaRange::new(0, 1 << 20).unwrap();
        dmalog::DirtyTracker::start(&mut core, &[range], 4096).unwrap();
        let mut dma = space.accessor();
        // A write across the two adjacent mappings.
        dma.write(0x17ff0, &[0xab; 0x20]).unwrap();
        let mut back = [0u8; 0x20];
        dma.read(0x17ff0, &mut back).unwrap();
        assert_eq!(back, [0xab; 0x20]);
        // Faults: unmapped IOVA after some bytes; the bytes before were written and logged.
        let err = dma.write(0x1fff0, &[1; 0x20]).unwrap_err();
        assert_eq!(
            err,
            DmaFault {
                at: 0x20000,
                done: 0x10
            }
        );
        let mut bitmap = [0u64; 4];
        dmalog::DirtyTracker::report(&mut core, 0, 256 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(
            bitmap[0],
            (1 << 0x17) | (1 << 0x18) | (1 << 0x1f),
            "pages 0x17, 0x18, 0x1f"
        );
        // Reads never dirty.
        dma.read(0x10000, &mut back).unwrap();
        bitmap = [0; 4];
        dmalog::DirtyTracker::report(&mut core, 0, 256 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(bitmap, [0; 4]);
        // Unmap must match exactly; the accessor sees the change.
        assert_eq!(
            space.unmap(0x10000, 0x1000).unwrap_err().errno(),
            libc::EINVAL
        );
        space.unmap(0x10000, 0x8000).unwrap();
        assert_eq!(dma.write(0x10000, &[1]).unwrap_err().at, 0x10000);
        assert_eq!(dma.write(u64::MAX, &[1, 2]).unwrap_err().done, 0);
    }
}
