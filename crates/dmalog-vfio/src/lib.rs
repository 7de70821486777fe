//! Kernel consumers for dmalog: a VMM with a real VFIO device (mlx5, pds, hisi VFs) or an
//! IOMMU with dirty tracking uses the same [`dmalog::DirtyTracker`] and
//! [`dmalog::MigrationDevice`] traits as with a vfio-user device.
//!
//! - [`device::VfioDevice`]: DMA logging (PROBE, START with ranges by pointer, REPORT into
//!   the caller's buffer, STOP) and migration v2 (MIGRATION flags, MIG_DEVICE_STATE with the
//!   data fd, PRE_COPY info, MIG_DATA_SIZE) on a VFIO device fd.
//! - [`iommufd::IommufdDirtyTracker`]: iommufd HWPT dirty tracking.
//! - [`seam`]: the one place that calls `ioctl`, behind a trait; `fake` (feature `testing`)
//!   serves the same requests from dmalog's kernel-dialect core for tests.
//! - [`probe`]: what `dmalog probe` reports about a device.
//!
//! It sits beside `dmalog-vfio-user` as the other transport under the consumer traits, on
//! the core alone. Units: IOVAs, lengths and page sizes in bytes; REPORT bitmaps are `u64`
//! words, one bit per page.
//!
//! On a real device (needs a VFIO cdev bound to a variant driver with DMA logging, and its
//! iommufd set up by the VMM, so it is not run here):
//!
//! ```no_run
//! use dmalog::{DirtyTracker, IovaRange};
//! use dmalog_vfio::{KernelIoctl, VfioDevice};
//!
//! let fd = KernelIoctl::open(std::path::Path::new("/dev/vfio/devices/vfio0"))?;
//! let mut device = VfioDevice::new(fd);
//! if device.probe()? {
//!     device.start(&[IovaRange::new(0, 1 << 30)?], 4096)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The same consumer against `fake::FakeVfioDevice` (feature `testing`), which answers the
//! ioctls with the kernel's rules from dmalog's soft tracker:
//!
//! ```
//! use dmalog::tracker::report_words;
//! use dmalog::{DirtyTracker, IovaRange, LoggingCore, SoftDriver};
//! use dmalog_vfio::fake::FakeVfioDevice;
//! use dmalog_vfio::VfioDevice;
//!
//! let driver = SoftDriver::new();
//! let mut dma = driver.recorder(); // what the device's DMA engine would mark
//! let mut device = VfioDevice::new(FakeVfioDevice::new(LoggingCore::new(driver), None));
//! assert!(device.probe()?);
//! let logged = IovaRange::new(0, 1 << 20)?;
//! let page_size = device.start(&[logged], 4096)?;
//! dma.record_write(9 * 4096, 4096);
//! let mut bitmap = vec![0u64; report_words(1 << 20, page_size)? as usize];
//! device.report(logged, page_size, &mut bitmap)?;
//! assert_eq!(bitmap[0], 1 << 9);
//! device.stop()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Features: `testing` adds the test doubles (`fake`, `seam::BorrowedUserMemory`). MSRV: Rust 1.85, held by clippy's `incompatible_msrv`.

pub mod device;
#[cfg(feature = "testing")]
pub mod fake;
pub mod iommufd;
pub mod iommufd_uapi;
pub mod probe;
pub mod seam;
pub mod uapi;

pub use device::{VfioDevice, VfioError};
pub use iommufd::IommufdDirtyTracker;
pub use seam::{Errno, IoctlCall, IoctlNr, IoctlTarget, KernelIoctl, VfioIoctl};
