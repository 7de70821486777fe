//! Kernel consumers for dmalog: a VMM with a real VFIO device (mlx5, pds, hisi VFs) or an
//! IOMMU with dirty tracking uses the same [`dmalog::DirtyTracker`] and
//! [`dmalog::MigrationDevice`] traits as with a vfio-user device.
//!
//! - [`device::VfioDevice`]: DMA logging (PROBE, START with ranges by pointer, REPORT into
//!   the caller's buffer, STOP) and migration v2 (MIGRATION flags, MIG_DEVICE_STATE with the
//!   data fd, PRE_COPY info, MIG_DATA_SIZE) on a VFIO device fd.
//! - [`iommufd::IommufdDirtyTracker`]: iommufd HWPT dirty tracking.
//! - [`seam`]: the one place that calls `ioctl`, behind a trait; [`fake`] serves the same
//!   requests from dmalog's kernel-dialect core for tests.
//! - [`probe`]: what `dmalog probe` reports about a device.

pub mod device;
pub mod fake;
pub mod iommufd;
pub mod iommufd_uapi;
pub mod probe;
pub mod seam;
pub mod uapi;

pub use device::{VfioDevice, VfioError};
pub use iommufd::IommufdDirtyTracker;
pub use seam::{Errno, IoctlTarget, KernelIoctl, VfioIoctl};
