//! iommufd HWPT dirty tracking as a [`DirtyTracker`]: the system IOMMU records DMA writes
//! of every device attached to a hardware page table (`IOMMU_HWPT_SET_DIRTY_TRACKING`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP`), for devices without their own tracker.
//!
//! The IOMMU tracks the whole IO address space of the HWPT: START ranges are not sent to
//! the kernel (they only bound what the caller reports). Enabling clears stale dirty bits.

use dmalog::error::LogError;
use dmalog::report_split::report_parts;
use dmalog::tracker::checked_report_words;
use dmalog::uapi::UapiStruct;
use dmalog::{DirtyTracker, IovaRange, TrackerError, TrackerResult};

use crate::seam::{Errno, IoctlCall, VfioIoctl};
use crate::uapi::{
    GetDirtyBitmap, SetDirtyTracking, GET_DIRTY_BITMAP_BYTES, IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, IOMMU_HWPT_SET_DIRTY_TRACKING,
};

/// Smallest report page size accepted (the IOMMU's base page).
pub const IOMMU_MIN_PAGE_SIZE: u64 = 4096;

/// Dirty tracking of one iommufd HWPT, through an ioctl seam on the iommufd.
#[derive(Debug)]
pub struct IommufdDirtyTracker<I: VfioIoctl> {
    ioctl: I,
    hwpt_id: u32,
    enabled: bool,
}

fn kernel_error(errno: Errno) -> TrackerError {
    match errno.0 {
        libc::EOPNOTSUPP => LogError::NotSupported("this HWPT has no dirty tracking").into(),
        other => {
            let typed = LogError::from_errno(other);
            if typed.errno() == other {
                typed.into()
            } else {
                // An errno dmalog has no variant for (ENOENT: no such HWPT) is kept as it
                // is rather than turned into EINVAL.
                TrackerError::Transport(std::io::Error::from_raw_os_error(other))
            }
        }
    }
}

impl<I: VfioIoctl> IommufdDirtyTracker<I> {
    /// Dirty tracking of HWPT `hwpt_id` (allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
    pub fn new(ioctl: I, hwpt_id: u32) -> Self {
        IommufdDirtyTracker {
            ioctl,
            hwpt_id,
            enabled: false,
        }
    }

    /// The seam.
    pub fn ioctl(&self) -> &I {
        &self.ioctl
    }

    /// The seam, mutably.
    pub fn ioctl_mut(&mut self) -> &mut I {
        &mut self.ioctl
    }

    fn set_tracking(&mut self, enable: bool) -> Result<(), Errno> {
        let mut arg = SetDirtyTracking::new(enable, self.hwpt_id).encode();
        // SAFETY: SET_DIRTY_TRACKING is a plain structure (`arg`, its size field the
        // buffer's length) with no embedded pointers.
        unsafe {
            self.ioctl
                .ioctl(IoctlCall::device(IOMMU_HWPT_SET_DIRTY_TRACKING, &mut arg))
        }
        .map(|_| ())
    }

    /// GET_DIRTY_BITMAP of `[iova, iova + len_bytes)` into `bitmap` bytes (`ceil(bits/8)` of
    /// them are written), with the values exactly as given (the kernel checks them); with
    /// `clear == false` the IOMMU keeps the dirty bits (read before an unmap). A `bitmap`
    /// shorter than that is refused (EFAULT) before anything is issued.
    pub fn report_bytes(
        &mut self,
        iova: u64,
        len_bytes: u64,
        page_size: u64,
        bitmap: &mut [u8],
        clear: bool,
    ) -> Result<(), TrackerError> {
        crate::device::check_bitmap_len(len_bytes, page_size, bitmap.len())
            .map_err(kernel_error)?;
        let request = GetDirtyBitmap {
            size: GET_DIRTY_BITMAP_BYTES as u32,
            hwpt_id: self.hwpt_id,
            flags: if clear {
                0
            } else {
                IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
            },
            reserved: 0,
            iova,
            length: len_bytes,
            page_size,
            data: bitmap.as_mut_ptr() as u64,
        };
        let mut arg = request.encode();
        // SAFETY: the only pointer in `arg` is `data`, the start of `bitmap`, lent in
        // `lent` and checked above to hold every byte the kernel writes.
        unsafe {
            self.ioctl.ioctl(
                IoctlCall::device(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut arg).lending(&mut [bitmap]),
            )
        }
        .map_err(kernel_error)?;
        Ok(())
    }

    /// Like [`DirtyTracker::report`] but leaves the bits in the IOMMU.
    pub fn report_no_clear(
        &mut self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> TrackerResult {
        self.report_words(range, page_size, bitmap, false)
    }

    /// One GET_DIRTY_BITMAP into the report's bytes of `bitmap` (the IOMMU has no lock
    /// held across a report, so it is not split).
    fn report_words(
        &mut self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> TrackerResult {
        checked_report_words(range.length(), page_size, bitmap.len())?;
        for part in report_parts(range, page_size, None)? {
            let (iova, len_bytes) = (part.range.iova(), part.range.length());
            self.report_bytes(iova, len_bytes, page_size, part.bytes_of(bitmap), clear)?;
        }
        Ok(())
    }
}

impl<I: VfioIoctl> DirtyTracker for IommufdDirtyTracker<I> {
    /// Whether the HWPT supports dirty tracking: disabling it (harmless when off) is refused
    /// with EOPNOTSUPP by an IOMMU without dirty support. Call before `start`.
    fn probe(&mut self) -> Result<bool, TrackerError> {
        if self.enabled {
            return Ok(true);
        }
        match self.set_tracking(false) {
            Ok(()) => Ok(true),
            Err(Errno(libc::EOPNOTSUPP)) => Ok(false),
            Err(errno) => Err(kernel_error(errno)),
        }
    }

    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        if self.enabled {
            return Err(LogError::Invalid("dirty tracking already enabled").into());
        }
        if ranges.is_empty() {
            return Err(LogError::Invalid("no ranges").into());
        }
        if !page_size.is_power_of_two() {
            return Err(LogError::Invalid("page size is not a power of two").into());
        }
        self.set_tracking(true).map_err(kernel_error)?;
        self.enabled = true;
        Ok(page_size.max(IOMMU_MIN_PAGE_SIZE))
    }

    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        if !self.enabled {
            return Err(LogError::Invalid("dirty tracking not enabled").into());
        }
        self.report_words(range, page_size, bitmap, true)
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        if !self.enabled {
            return Ok(());
        }
        self.enabled = false;
        self.set_tracking(false).map_err(kernel_error)
    }
}
