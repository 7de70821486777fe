//! Guest memory on the VMM side is vm-memory's: a [`LoggedGuestMemory`]
//! (`GuestMemoryMmap<DmalogBitmap>`) of memfd-backed regions at guest physical addresses,
//! shared with device servers through DMA_MAP fds (IOVA = GPA; each region's fd and file
//! offset are its vm-memory `FileOffset`), its CPU writes logged by the
//! [`DmalogBitmap`](dmalog_vm_memory::DmalogBitmap)
//! and REPORTed by [`DirtyRegions::tracker`].
//!
//! [`memfd_guest`] builds one the way the demo's VMM does; a VMM with its own
//! `GuestMemoryMmap<DmalogBitmap>` hands that in instead (`examples/vmm_memory.rs`).
//! [`GuestPages`] is what the engine reads of it: pieces for `writev`/`readv`, zero checks,
//! region hashes, and each region's `(gpa, size, fd, offset)` for DMA_MAP.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use dmalog::IovaRange;
use dmalog_device::{CopyPath, IoPiece, IoPieceMut};
use dmalog_vm_memory::DirtyRegions;
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::error::MigrateError;

pub use dmalog_vm_memory::LoggedGuestMemory;

/// One region of guest memory as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct GuestRegion<'a> {
    /// Guest physical address (and IOVA).
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    file: Option<&'a FileOffset>,
}

impl<'a> GuestRegion<'a> {
    /// The file behind the region (to DMA_MAP it), `None` for anonymous memory.
    pub fn fd(&self) -> Option<BorrowedFd<'a>> {
        self.file.map(|file| file.file().as_fd())
    }

    /// Where the region starts in its file (0 without one).
    pub fn file_offset(&self) -> u64 {
        self.file.map_or(0, FileOffset::start)
    }

    /// The region as an IOVA range.
    ///
    /// # Panics
    /// On an empty region, which vm-memory's own constructors never make (and
    /// [`check_guest_memory`] refuses); vm-memory regions never wrap.
    pub fn range(&self) -> IovaRange {
        IovaRange::new(self.gpa, self.size).expect("a non-empty vm-memory region")
    }
}

/// The default layout: 768 MiB at GPA 0 and 256 MiB at 4 GiB (a hole between them, so
/// range planning has one to handle).
pub fn default_layout(total_bytes: u64) -> Vec<(u64, u64)> {
    let low = (total_bytes / 4 * 3) & !0xfff;
    vec![(0, low), (4 << 30, total_bytes - low)]
}

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

/// Guest memory with `(gpa, size)` regions (page-aligned, sorted, disjoint), each a sealed
/// memfd mapped shared with every page faulted in, its bitmap registered in `regions` (so
/// `regions.tracker()` REPORTs what the vCPUs write through it).
pub fn memfd_guest(
    regions: &DirtyRegions,
    layout: &[(u64, u64)],
) -> std::io::Result<LoggedGuestMemory> {
    let mut made = Vec::with_capacity(layout.len());
    for &(gpa, size) in layout {
        if size == 0 || gpa % 4096 != 0 || size % 4096 != 0 || IovaRange::new(gpa, size).is_err() {
            return Err(einval());
        }
        let len_bytes = usize::try_from(size).map_err(|_| einval())?;
        // Sealed against shrinking: the device server (and this process) then copy
        // directly instead of through the kernel's SIGBUS-safe path.
        let fd = dmalog_device::sealed_memfd("dmalog-guest", size)?;
        let bitmap = regions
            .bitmap(GuestAddress(gpa), len_bytes)
            .map_err(|err| std::io::Error::from_raw_os_error(err.errno()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len_bytes, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_POPULATE)
            .with_file_offset(FileOffset::new(File::from(fd), 0))
            .build()
            .map_err(|err| std::io::Error::other(format!("mapping guest memory: {err}")))?;
        made.push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(einval)?);
    }
    GuestMemoryMmap::from_regions(made).map_err(|_| einval())
}

/// As [`memfd_guest`], its bitmaps in a set of their own that nothing REPORTs (a
/// destination's guest, or one whose CPU writes are not tracked).
pub fn memfd_guest_untracked(layout: &[(u64, u64)]) -> std::io::Result<LoggedGuestMemory> {
    let regions = DirtyRegions::new(4096).expect("4 KiB is a valid log page size");
    memfd_guest(&regions, layout)
}

/// Refuses guest memory the engine cannot migrate as it is: a region whose GPA or size is
/// not a multiple of the 4 KiB page (or that is empty), or one over a file that can shrink
/// (not a memfd sealed with `F_SEAL_SHRINK`), which the device server it is shared with
/// could truncate under the engine's direct copies (SIGBUS). Anonymous regions pass.
pub fn check_guest_memory<B: Bitmap>(memory: &GuestMemoryMmap<B>) -> Result<(), MigrateError> {
    for region in memory.iter() {
        let (gpa, size) = (region.start_addr().0, region.len());
        if size == 0 || gpa % 4096 != 0 || size % 4096 != 0 {
            return Err(MigrateError::Memory(
                "a guest memory region is empty or not aligned to 4 KiB pages",
            ));
        }
        if let Some(file) = region.file_offset() {
            if CopyPath::for_file(file.file(), file.start(), region.size()) != CopyPath::Direct {
                return Err(MigrateError::Memory(
                    "a guest memory file can shrink: use memfds sealed with F_SEAL_SHRINK",
                ));
            }
        }
    }
    Ok(())
}

/// What the engine reads and writes of guest memory, by GPA (named apart from vm-memory's
/// `Bytes::read`/`write`, which take a `GuestAddress` and may cross regions). Reads are volatile (vCPUs and
/// the device write concurrently); [`GuestPages::write_at`] goes through vm-memory, so the
/// region's bitmap marks it.
pub trait GuestPages {
    /// The regions, in GPA order.
    fn regions(&self) -> Vec<GuestRegion<'_>>;

    /// Total bytes.
    fn total_bytes(&self) -> u64;

    /// Copies `data` to `gpa` (within one region) through vm-memory (`write_slice`, marked
    /// dirty); false when outside.
    fn write_at(&self, gpa: u64, data: &[u8]) -> bool;

    /// Copies from `gpa` into `out` (within one region) with volatile loads; false when
    /// outside.
    fn read_at(&self, gpa: u64, out: &mut [u8]) -> bool;

    /// `len_bytes` at `gpa` (within one region) as a piece the kernel can send straight
    /// from guest memory ([`dmalog_device::write_pieces`]); `None` when outside.
    fn piece(&self, gpa: u64, len_bytes: usize) -> Option<IoPiece<'_>>;

    /// `len_bytes` at `gpa` (within one region) as a piece the kernel can fill straight
    /// from a socket ([`dmalog_device::read_pieces`], not marked dirty); `None` when
    /// outside.
    fn piece_mut(&self, gpa: u64, len_bytes: usize) -> Option<IoPieceMut<'_>>;

    /// Whether `len_bytes` at `gpa` (within one region) are zero right now (read with
    /// volatile loads: vCPUs and the device may be writing); `None` when outside.
    fn is_zero(&self, gpa: u64, len_bytes: usize) -> Option<bool>;

    /// Zeroes `npages` pages of `page_size` bytes at `gpa` (within one region), leaving
    /// pages that are zero already untouched; false when outside.
    fn zero_pages(&self, gpa: u64, npages: u64, page_size: usize) -> bool;

    /// crc32c of each region, in order (for verification after a migration).
    fn region_hashes(&self) -> Vec<u32>;
}

/// The region holding `[gpa, gpa + len)` and the offset of `gpa` in it.
fn locate<B: Bitmap>(
    memory: &GuestMemoryMmap<B>,
    gpa: u64,
    len: usize,
) -> Option<(&GuestRegionMmap<B>, usize)> {
    let region = memory.find_region(GuestAddress(gpa))?;
    let offset = usize::try_from(gpa - region.start_addr().0).ok()?;
    (offset.checked_add(len)? <= region.size()).then_some((region, offset))
}

impl<B: Bitmap> GuestPages for GuestMemoryMmap<B> {
    fn regions(&self) -> Vec<GuestRegion<'_>> {
        self.iter()
            .map(|region| GuestRegion {
                gpa: region.start_addr().0,
                size: region.len(),
                file: region.file_offset(),
            })
            .collect()
    }

    fn total_bytes(&self) -> u64 {
        self.iter().map(|region| region.len()).sum()
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> bool {
        locate(self, gpa, data.len()).is_some_and(|(region, offset)| {
            region
                .write_slice(data, MemoryRegionAddress(offset as u64))
                .is_ok()
        })
    }

    fn read_at(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.piece(gpa, out.len())
            .is_some_and(|piece| piece.copy_to(out).is_ok())
    }

    fn piece(&self, gpa: u64, len_bytes: usize) -> Option<IoPiece<'_>> {
        let (region, offset) = locate(self, gpa, len_bytes)?;
        IoPiece::of_region(region, offset, len_bytes)
    }

    fn piece_mut(&self, gpa: u64, len_bytes: usize) -> Option<IoPieceMut<'_>> {
        let (region, offset) = locate(self, gpa, len_bytes)?;
        IoPieceMut::of_region(region, offset, len_bytes)
    }

    fn is_zero(&self, gpa: u64, len_bytes: usize) -> Option<bool> {
        self.piece(gpa, len_bytes)?.is_zero().ok()
    }

    fn zero_pages(&self, gpa: u64, npages: u64, page_size: usize) -> bool {
        static ZEROS: [u8; 4096] = [0; 4096];
        let Some(len) = npages
            .checked_mul(page_size as u64)
            .and_then(|l| usize::try_from(l).ok())
        else {
            return false;
        };
        if page_size == 0 || page_size > ZEROS.len() || locate(self, gpa, len).is_none() {
            return false;
        }
        (0..npages).all(|i| {
            let at = gpa + i * page_size as u64;
            match self.is_zero(at, page_size) {
                Some(true) => true,
                Some(false) => self.write_at(at, &ZEROS[..page_size]),
                None => false,
            }
        })
    }

    fn region_hashes(&self) -> Vec<u32> {
        let mut chunk = vec![0u8; 4 << 20];
        self.iter()
            .map(|region| {
                let mut crc = 0u32;
                let mut done = 0usize;
                while done < region.size() {
                    let n = (region.size() - done).min(chunk.len());
                    if let Some(piece) = IoPiece::of_region(region, done, n) {
                        // A fault leaves zeros: the hash then differs, as it should.
                        if piece.copy_to(&mut chunk[..n]).is_err() {
                            chunk[..n].fill(0);
                        }
                    }
                    crc = crc32c::crc32c_append(crc, &chunk[..n]);
                    done += n;
                }
                crc
            })
            .collect()
    }
}
