//! Guest memory on the VMM side: memfd-backed regions at guest physical addresses, shared
//! with device servers through DMA_MAP fds (IOVA = GPA).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use dmalog::IovaRange;
use dmalog_device::{IoPiece, IoPieceMut, SharedMapping};

/// One region of guest memory.
#[derive(Debug)]
pub struct GuestRegion {
    /// Guest physical address (and IOVA).
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    fd: OwnedFd,
    map: SharedMapping,
}

impl GuestRegion {
    /// The memfd behind the region (to DMA_MAP it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The region as an IOVA range.
    pub fn range(&self) -> IovaRange {
        IovaRange::new(self.gpa, self.size).expect("regions are checked at creation")
    }
}

/// The guest's memory map.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

/// The default layout: 768 MiB at GPA 0 and 256 MiB at 4 GiB (a hole between them, so
/// range planning has one to handle).
pub fn default_layout(total_bytes: u64) -> Vec<(u64, u64)> {
    let low = (total_bytes / 4 * 3) & !0xfff;
    vec![(0, low), (4 << 30, total_bytes - low)]
}

impl GuestMemory {
    /// Guest memory with `(gpa, size)` regions (page-aligned, sorted, disjoint).
    pub fn new(layout: &[(u64, u64)]) -> std::io::Result<Self> {
        let mut regions = Vec::with_capacity(layout.len());
        for &(gpa, size) in layout {
            if size == 0
                || gpa % 4096 != 0
                || size % 4096 != 0
                || IovaRange::new(gpa, size).is_err()
            {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            // Sealed against shrinking: the device server (and this process) then copy
            // directly instead of through the kernel's SIGBUS-safe path.
            let fd = dmalog_device::sealed_memfd("dmalog-guest", size)?;
            let map = SharedMapping::map_populated(&fd, 0, size as usize, true)?;
            regions.push(GuestRegion { gpa, size, fd, map });
        }
        Ok(GuestMemory { regions })
    }

    /// The regions.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    fn locate(&self, gpa: u64, len: usize) -> Option<(&GuestRegion, usize)> {
        let region = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)?;
        let offset = (gpa - region.gpa) as usize;
        (offset.checked_add(len)? as u64 <= region.size).then_some((region, offset))
    }

    /// Copies `data` to `gpa` (within one region); false when outside.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        self.locate(gpa, data.len())
            .is_some_and(|(region, offset)| region.map.write(offset, data))
    }

    /// Copies from `gpa` into `out` (within one region); false when outside.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.locate(gpa, out.len())
            .is_some_and(|(region, offset)| region.map.read(offset, out))
    }

    /// `len_bytes` at `gpa` (within one region) as a piece the kernel can send straight
    /// from guest memory ([`dmalog_device::write_pieces`]); `None` when outside.
    pub fn piece(&self, gpa: u64, len_bytes: usize) -> Option<IoPiece<'_>> {
        let (region, offset) = self.locate(gpa, len_bytes)?;
        region.map.piece(offset, len_bytes)
    }

    /// `len_bytes` at `gpa` (within one region) as a piece the kernel can fill straight
    /// from a socket ([`dmalog_device::read_pieces`]); `None` when outside.
    pub fn piece_mut(&self, gpa: u64, len_bytes: usize) -> Option<IoPieceMut<'_>> {
        let (region, offset) = self.locate(gpa, len_bytes)?;
        region.map.piece_mut(offset, len_bytes)
    }

    /// Whether `len_bytes` at `gpa` (within one region) are zero right now (read with
    /// volatile loads: vCPUs and the device may be writing); `None` when outside.
    pub fn is_zero(&self, gpa: u64, len_bytes: usize) -> Option<bool> {
        let (region, offset) = self.locate(gpa, len_bytes)?;
        region.map.is_zero(offset, len_bytes)
    }

    /// Zeroes `npages` pages of `page_size` bytes at `gpa` (within one region), leaving
    /// pages that are zero already untouched; false when outside.
    pub fn zero_pages(&self, gpa: u64, npages: u64, page_size: usize) -> bool {
        static ZEROS: [u8; 4096] = [0; 4096];
        let Some(len) = npages
            .checked_mul(page_size as u64)
            .and_then(|l| usize::try_from(l).ok())
        else {
            return false;
        };
        if page_size == 0 || page_size > ZEROS.len() || self.locate(gpa, len).is_none() {
            return false;
        }
        (0..npages).all(|i| {
            let at = gpa + i * page_size as u64;
            match self.is_zero(at, page_size) {
                Some(true) => true,
                Some(false) => self.write(at, &ZEROS[..page_size]),
                None => false,
            }
        })
    }

    /// crc32c of each region, in order (for verification after a migration).
    pub fn region_hashes(&self) -> Vec<u32> {
        let mut chunk = vec![0u8; 4 << 20];
        self.regions
            .iter()
            .map(|region| {
                let mut crc = 0u32;
                let mut done = 0u64;
                while done < region.size {
                    let n = (region.size - done).min(chunk.len() as u64) as usize;
                    region.map.read(done as usize, &mut chunk[..n]);
                    crc = crc32c::crc32c_append(crc, &chunk[..n]);
                    done += n as u64;
                }
                crc
            })
            .collect()
    }
}
