//! Why a region could not be logged.

use dmalog::LogError;

/// Errors building or attaching logged guest memory.
#[derive(Debug, thiserror::Error)]
pub enum VmMemoryLogError {
    /// The log itself (zero length, out of memory).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log page size is not a power of two from 4 KiB to 1 GiB.
    #[error("log page size {0} is not a power of two from 4 KiB to 1 GiB")]
    PageSize(u64),
    /// A region's GPA or length is not a multiple of the log page size.
    #[error("region at {gpa:#x} of {len_bytes:#x} bytes is not aligned to the {page_size}-byte log page")]
    Unaligned {
        /// GPA of the region.
        gpa: u64,
        /// Bytes of the region.
        len_bytes: u64,
        /// The log page size.
        page_size: u64,
    },
    /// The region runs past the end of the guest address space.
    #[error("region at {gpa:#x} of {len_bytes:#x} bytes overflows the guest address space")]
    Overflow {
        /// GPA of the region.
        gpa: u64,
        /// Bytes of the region.
        len_bytes: u64,
    },
    /// The bitmap is attached to another GPA already.
    #[error("bitmap attached at {attached:#x} cannot be attached again at {requested:#x}")]
    AlreadyAttached {
        /// Where it is attached.
        attached: u64,
        /// Where it was asked to be attached.
        requested: u64,
    },
    /// The mapping failed.
    #[error("mmap: {0}")]
    Mmap(#[from] vm_memory::mmap::MmapRegionError),
    /// The regions overlap or are out of order.
    #[error("guest regions: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
}

impl VmMemoryLogError {
    /// The errno this error stands for.
    pub fn errno(&self) -> i32 {
        match self {
            VmMemoryLogError::Log(err) => err.errno(),
            VmMemoryLogError::Mmap(_) => libc::ENOMEM,
            _ => libc::EINVAL,
        }
    }
}
