//! The device's view of guest memory: DMA mappings by IOVA, with bounds-checked
//! translation, copies into shared memory, and every DMA write recorded on the live tracker.
//!
//! Mappings change rarely (DMA_MAP/UNMAP from the server thread) while DMA happens often on
//! device threads, so the table is an immutable snapshot ([`DmaTable`], a persistent tree:
//! O(log n) per change, O(1) per snapshot) published through an `ArcSwap` with a generation
//! counter. Each DMA thread owns a [`DmaAccessor`] that caches the snapshot and checks the
//! generation with one load per access: no lock and no allocation on the hot path.
//!
//! DMA_UNMAP must not reply while a write to the mapping may still land (SPEC 8). Each
//! accessor announces "in flight on the snapshot of generation g" in its own slot (one
//! SeqCst store, no shared cache line) and re-checks the generation before touching memory;
//! [`DmaSpace::unmap`] publishes the smaller table, bumps the generation and waits until no
//! slot shows an access on an older snapshot. An access that starts later sees the new
//! generation and takes the new table, so it cannot reach the removed mapping.
//! (`SharedMapping` keeps the memory mapped while any snapshot holds it, so a cached stale
//! snapshot is never a dangling pointer either.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use dmalog::{IovaRange, LiveLog, WriteRecorder};

use crate::dma_table::DmaTable;

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
    /// Bumped after every published change; accessors compare it with their snapshot's.
    generation: AtomicU64,
    table: ArcSwap<DmaTable>,
    /// Serialises changes (one writer builds on the table it read).
    changes: Mutex<()>,
    /// The in-flight slot of every accessor, for unmap to wait on.
    accessors: Mutex<Vec<Weak<AccessSlot>>>,
    live: Arc<LiveLog>,
    max_maps: usize,
}

/// One accessor's announcement: [`IDLE`], or `generation << 1 | 1` while an access based on
/// the snapshot of that generation is in flight.
#[derive(Debug, Default)]
struct AccessSlot(AtomicU64);

const IDLE: u64 = 0;

/// Spins, then yields, then sleeps briefly: the wait of an unmapper for accesses in flight
/// (each is one bounded copy, so the wait ends).
fn backoff(round: &mut u32) {
    *round = round.saturating_add(1);
    match *round {
        0..=64 => std::hint::spin_loop(),
        65..=256 => std::thread::yield_now(),
        _ => std::thread::sleep(std::time::Duration::from_micros(50)),
    }
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
                table: ArcSwap::from_pointee(DmaTable::new()),
                changes: Mutex::new(()),
                accessors: Mutex::new(Vec::new()),
                live,
                max_maps,
            }),
        }
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.shared
            .changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A recorder on this space's tracker, for a DMA path that writes guest memory outside
    /// [`DmaSpace::accessor`] (an embedding library's own engine) and records it itself.
    pub fn recorder(&self) -> dmalog::WriteRecorder {
        self.shared.live.recorder()
    }

    /// The current mappings (an O(1) snapshot; iterate it in IOVA order).
    pub fn regions(&self) -> Arc<DmaTable> {
        self.shared.table.load_full()
    }

    /// Publishes `table`; returns its generation. Accesses that start after this see it.
    fn publish(&self, table: DmaTable) -> u64 {
        self.shared.table.store(Arc::new(table));
        self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The accessors' slots, locked, with those of dropped accessors removed.
    fn live_accessors(&self) -> std::sync::MutexGuard<'_, Vec<Weak<AccessSlot>>> {
        let mut accessors = self
            .shared
            .accessors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        accessors.retain(|slot| slot.strong_count() > 0);
        accessors
    }

    /// Waits until no access based on a snapshot older than `generation` is in flight.
    ///
    /// Why this is enough: an accessor announces `(its snapshot's generation, active)` with
    /// a SeqCst store and then re-reads the generation (SeqCst) before touching memory;
    /// we bumped the generation (SeqCst) before reading the announcements. So either it
    /// sees the new generation and drops its old snapshot before any access, or we see its
    /// announcement and wait for it to end.
    fn wait_for_accesses_before(&self, generation: u64) {
        let slots: Vec<Arc<AccessSlot>> = self
            .live_accessors()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let start = std::time::Instant::now();
        let mut warned = false;
        for slot in slots {
            let mut round = 0;
            loop {
                let state = slot.0.load(Ordering::SeqCst);
                if state & 1 == 0 || state >> 1 >= generation {
                    break;
                }
                backoff(&mut round);
                if !warned && round > 256 && start.elapsed() > std::time::Duration::from_secs(1) {
                    // An access that does not end (memory whose page faults block): say so.
                    tracing::warn!("DMA unmap has waited 1 s for a device access in flight");
                    warned = true;
                }
            }
        }
    }

    /// Adds a mapping; EEXIST when it overlaps one. O(log n).
    pub fn map(&self, region: DmaRegion) -> Result<(), MapError> {
        let (iova, size) = (region.iova, region.size);
        let range = IovaRange::new(iova, size).map_err(|_| MapError::Invalid { iova, size })?;
        let _changes = self.lock_changes();
        let table = self.shared.table.load_full();
        if table.len() >= self.shared.max_maps {
            return Err(MapError::TooMany(self.shared.max_maps));
        }
        if table.overlaps(range) {
            return Err(MapError::Overlap { iova, size });
        }
        self.publish(table.inserted(region));
        Ok(())
    }

    /// Removes the mapping that is exactly `[iova, iova+size)`, O(log n), and returns once
    /// no access to it is in flight: no DMA write lands in it after this returns.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<DmaRegion, MapError> {
        let _changes = self.lock_changes();
        let table = self.shared.table.load_full();
        let missing = MapError::NoSuchMapping { iova, size };
        if table.get(iova).is_none_or(|r| r.size != size) {
            return Err(missing);
        }
        let (rest, removed) = table.removed(iova).ok_or(missing)?;
        let generation = self.publish(rest);
        self.wait_for_accesses_before(generation);
        Ok(removed)
    }

    /// Removes every mapping, returning once no access to any of them is in flight.
    pub fn unmap_all(&self) {
        let _changes = self.lock_changes();
        let empty = self.shared.table.load().cleared();
        let generation = self.publish(empty);
        self.wait_for_accesses_before(generation);
    }

    /// A handle for one DMA thread.
    pub fn accessor(&self) -> DmaAccessor {
        let slot = Arc::new(AccessSlot::default());
        self.live_accessors().push(Arc::downgrade(&slot));
        // The generation first: the table loaded after it is at least that new.
        let generation = self.shared.generation.load(Ordering::SeqCst);
        DmaAccessor {
            shared: Arc::clone(&self.shared),
            slot,
            generation,
            table: self.shared.table.load_full(),
            recorder: self.shared.live.recorder(),
        }
    }
}

/// One thread's DMA handle (see the module documentation).
pub struct DmaAccessor {
    shared: Arc<DmaShared>,
    slot: Arc<AccessSlot>,
    generation: u64,
    table: Arc<DmaTable>,
    recorder: WriteRecorder,
}

impl std::fmt::Debug for DmaAccessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaAccessor")
            .field("generation", &self.generation)
            .finish()
    }
}

/// Marks the accessor idle when the access ends (also on unwinding, so an unmapper never
/// waits on an access that is gone).
struct InFlight<'a>(&'a AccessSlot);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0 .0.store(IDLE, Ordering::Release);
    }
}

/// Announces an access by the accessor owning `slot` and makes sure the snapshot it uses
/// (`table`, of `generation`) is the published one. While the mappings do not change this is
/// one SeqCst store and one load: no lock, no allocation. (A free function over the
/// accessor's fields, so the guard borrows only the slot.)
fn begin<'a>(
    slot: &'a AccessSlot,
    shared: &DmaShared,
    generation: &mut u64,
    table: &mut Arc<DmaTable>,
) -> InFlight<'a> {
    loop {
        slot.0.store(*generation << 1 | 1, Ordering::SeqCst);
        let current = shared.generation.load(Ordering::SeqCst);
        if current == *generation {
            return InFlight(slot);
        }
        // Stale: stand down before taking the new snapshot (the generation first: the
        // table loaded after it is at least that new).
        slot.0.store(IDLE, Ordering::Release);
        *generation = current;
        *table = shared.table.load_full();
    }
}

impl DmaAccessor {
    /// The mapped region holding `iova`, and how many bytes of it from there.
    fn lookup(table: &DmaTable, iova: u64) -> Option<(&DmaRegion, u64)> {
        let region = table.containing(iova)?;
        Some((region, region.end() - iova))
    }

    /// Walks `len` bytes from `iova` across adjacent mappings, handing each piece to
    /// `access(mapping, offset in the mapping, its IOVA, bytes done before it, its length)`.
    /// Stops with a fault at the first IOVA that is not mapped, message-only or lacks the
    /// permission (`write`: writable, else readable), or where `access` stops (it returns
    /// the bytes of the piece it did copy).
    fn walk(
        table: &DmaTable,
        iova: u64,
        len: usize,
        write: bool,
        mut access: impl FnMut(&SharedMapping, usize, u64, usize, usize) -> Result<(), usize>,
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
            if let Err(copied) = access(mapping, (at - region.iova) as usize, at, done, piece) {
                let done = done + copied.min(piece);
                return Err(DmaFault {
                    at: iova.wrapping_add(done as u64),
                    done: done as u64,
                });
            }
            done += piece;
        }
        Ok(())
    }

    /// Writes `data` at `iova` (possibly across adjacent mappings), recording each piece on
    /// the tracker after its bytes are in memory. Stops at the first IOVA that is not
    /// mapped, not writable or message-only.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        let _in_flight = begin(
            &self.slot,
            &self.shared,
            &mut self.generation,
            &mut self.table,
        );
        let recorder = &mut self.recorder;
        Self::walk(
            &self.table,
            iova,
            data.len(),
            true,
            |mapping, offset, at, done, piece| {
                // A fault part-way (a shrunk file) still wrote, and logs, what came before.
                let result = mapping.try_write(offset, &data[done..done + piece]);
                let written = result.map_or_else(|f| f.copied_bytes, |()| piece);
                if written > 0 {
                    recorder.record_write(at, written as u64);
                }
                result.map_err(|f| f.copied_bytes)
            },
        )
    }

    /// Reads `out.len()` bytes at `iova`. Reads never dirty a page.
    pub fn read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        let _in_flight = begin(
            &self.slot,
            &self.shared,
            &mut self.generation,
            &mut self.table,
        );
        Self::walk(
            &self.table,
            iova,
            out.len(),
            false,
            |mapping, offset, _, done, piece| {
                mapping
                    .try_read(offset, &mut out[done..done + piece])
                    .map_err(|f| f.copied_bytes)
            },
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
        dmalog::DirtyTracker::report(
            &mut core,
            dmalog::IovaRange::new(0, 256 * 4096).unwrap(),
            4096,
            &mut bitmap,
        )
        .unwrap();
        assert_eq!(
            bitmap[0],
            (1 << 0x17) | (1 << 0x18) | (1 << 0x1f),
            "pages 0x17, 0x18, 0x1f"
        );
        // Reads never dirty.
        dma.read(0x10000, &mut back).unwrap();
        bitmap = [0; 4];
        dmalog::DirtyTracker::report(
            &mut core,
            dmalog::IovaRange::new(0, 256 * 4096).unwrap(),
            4096,
            &mut bitmap,
        )
        .unwrap();
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
