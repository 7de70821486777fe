//! dmalog core: device DMA dirty-page logging for VFIO live migration, without I/O.
//!
//! - [`uapi`]: the kernel and vfio-user wire forms of DMA logging (SPEC 2).
//! - [`iova_bitmap`]: report bitmaps written straight into a caller's buffer.
//! - [`dirty_log`]: the lock-free dirty log DMA writers mark.
//! - [`budget`]: the one memory budget every tracker charges its state to.
//! - [`ranges`]: START range validation and the smallest-gap merge.
//! - [`logging_core`]: DEVICE_FEATURE validation per SPEC 3, driving a [`driver::LogDriver`].
//! - [`soft`]: the software tracker (SPEC 5.1).
//! - [`mlx5`]: a model of the mlx5 hardware tracker, device and driver halves (SPEC 5.2).
//! - [`pds`]: a model of the pds tracker's seq/ack bitmaps (SPEC 5.3).
//! - [`tracker`]: the consumer trait [`tracker::DirtyTracker`] and its in-process backend.
//! - [`conformance`] (feature `conformance`): the suite every driver runs.

#[cfg(target_endian = "big")]
compile_error!("dmalog assumes a little-endian host (bitmaps are shared as u64 words and bytes)");

mod bits;
pub mod budget;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod dirty_log;
pub mod driver;
pub mod error;
pub mod iova_bitmap;
mod log_index;
pub mod logging_core;
pub mod migration;
pub mod mlx5;
pub mod pds;
pub mod ranges;
pub mod soft;
mod sync;
pub mod tracker;
pub mod uapi;
pub mod user_memory;

pub use dirty_log::DirtyLog;
pub use driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
pub use error::{LogError, LogResult};
pub use iova_bitmap::IovaBitmap;
pub use logging_core::{Dialect, LoggingCore};
pub use mlx5::{Mlx5Caps, Mlx5Driver, Mlx5Fault};
pub use ranges::IovaRange;
pub use soft::SoftDriver;
pub use tracker::{DirtyTracker, InProcessTracker, MigrationDevice, PendingBytes, TrackerError};

#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
