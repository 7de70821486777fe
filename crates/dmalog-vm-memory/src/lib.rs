//! dmalog for rust-vmm: a vm-memory [`Bitmap`](vm_memory::bitmap::Bitmap) backed by
//! dmalog's lock-free dirty log, and a [`dmalog::DirtyTracker`] over the same memory.
//!
//! `GuestMemoryMmap<DmalogBitmap>` logs every write vm-memory marks (`write_slice`,
//! `write_obj`, `store`, `read_volatile_from` an fd, `VolatileSlice` writes and copies)
//! with dmalog's hot-path rules: no lock, no allocation, no RMW when the pages are already
//! dirty, and one SeqCst fence per write so the data is in memory before its bit can be
//! seen. [`DirtyRegions::tracker`] REPORTs the dirty pages by GPA with the sparse report
//! (cost in proportion to the dirty words, not to the guest size).
//!
//! ```
//! use dmalog::DirtyTracker;
//! use dmalog::tracker::report_words;
//! use dmalog_vm_memory::DirtyRegions;
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let regions = DirtyRegions::new(4096).unwrap();
//! let memory = regions
//!     .guest_memory(&[(GuestAddress(0), 1 << 20, None)])
//!     .unwrap();
//! let mut tracker = regions.tracker();
//! let logged = dmalog::IovaRange::new(0, 1 << 20).unwrap();
//! tracker.start(&[logged], 4096).unwrap();
//! memory.write_obj(7u32, GuestAddress(5 * 4096)).unwrap();
//! let mut bitmap = vec![0u64; report_words(1 << 20, 4096).unwrap() as usize];
//! tracker.report(logged, 4096, &mut bitmap).unwrap();
//! assert_eq!(bitmap[0], 1 << 5);
//! ```
//!
//! # Where a bitmap learns its GPA
//! vm-memory hands a bitmap region-relative offsets, and `NewBitmap::with_len` gives no
//! GPA. So regions are built by [`DirtyRegions::region`] / [`DirtyRegions::guest_memory`]
//! (an `MmapRegionBuilder` with a bitmap made for that GPA, then `GuestRegionMmap::new`),
//! and a bitmap vm-memory made itself (`GuestMemoryMmap::from_ranges`) is detached until
//! [`DirtyRegions::attach_memory`]. Either way the region registers in the shared set,
//! so a region created after START is reported as soon as it exists.
//!
//! # Where it sits, features, MSRV
//! On the core alone (`dmalog`'s dirty log and consumer trait), beside the transports: a
//! rust-vmm device or VMM that writes guest memory through vm-memory gets dmalog's log
//! without `dmalog-device`. Units: GPAs, lengths and page sizes in bytes. No features of its
//! own (it enables vm-memory's `backend-bitmap` and `backend-mmap`). MSRV: Rust 1.85, held by
//! clippy's `incompatible_msrv`.

mod bitmap;
mod driver;
mod error;
mod regions;

pub use bitmap::DmalogBitmap;
pub use driver::VmMemoryDriver;
pub use error::VmMemoryLogError;
pub use regions::{DirtyRegions, MAX_LOG_PAGE_SIZE, MIN_LOG_PAGE_SIZE};

/// Guest memory whose writes are logged by dmalog.
pub type LoggedGuestMemory = vm_memory::GuestMemoryMmap<DmalogBitmap>;

/// The [`dmalog::DirtyTracker`] over a guest's [`DirtyRegions`].
pub type VmMemoryTracker = dmalog::InProcessTracker<VmMemoryDriver>;
