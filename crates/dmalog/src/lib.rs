//! dmalog core: device DMA dirty-page logging for VFIO live migration, without I/O.
//!
//! The bottom of the stack: no socket, no ioctl, no thread. A device (or its emulation)
//! records each DMA write on a [`WriteRecorder`] (lock-free, allocation-free); a VMM drives
//! logging through the consumer trait [`DirtyTracker`] (PROBE, START, REPORT, STOP) and a
//! device's migration v2 through [`MigrationDevice`], whatever is behind them: this crate's
//! drivers in process ([`InProcessTracker`]), a vfio-user device (`dmalog-vfio-user`), a
//! kernel VFIO device or iommufd (`dmalog-vfio`). `dmalog-device` (the DMA space devices
//! write through) and `dmalog-migrate` (the pre-copy engine) build on it.
//!
//! Units: IOVAs, lengths and page sizes are bytes (`u64`); a page size is a power of two. A
//! REPORT bitmap is `u64` words, one bit per page from the report's first IOVA (page `p` is
//! bit `p % 64` of word `p / 64`), sized by [`tracker::report_words`].
//!
//! ```
//! use dmalog::tracker::report_words;
//! use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver};
//!
//! let driver = SoftDriver::new();
//! let mut device = driver.recorder(); // the device side: one per DMA thread
//! let mut tracker = InProcessTracker::new(driver); // the VMM side
//! assert!(tracker.probe()?);
//! let logged = IovaRange::new(1 << 30, 1 << 20)?; // 1 MiB at 1 GiB
//! let page_size = tracker.start(&[logged], 4096)?;
//!
//! device.record_write((1 << 30) + 5 * 4096, 100); // after the data is in memory
//! device.record_write((1 << 30) + 8 * 4096 - 1, 2); // across pages 7 and 8
//!
//! let mut bitmap = vec![0u64; report_words(1 << 20, page_size)? as usize];
//! tracker.report(logged, page_size, &mut bitmap)?; // reads and clears
//! assert_eq!(bitmap[0], 1 << 5 | 1 << 7 | 1 << 8);
//! tracker.stop()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Modules
//! - [`uapi`]: the kernel and vfio-user wire forms of DMA logging (SPEC 2).
//! - [`iova_bitmap`]: report bitmaps written straight into a caller's buffer.
//! - [`dirty_log`]: the lock-free dirty log DMA writers mark.
//! - [`budget`]: the one memory budget every tracker charges its state to.
//! - [`ranges`]: START range validation and the smallest-gap merge.
//! - [`feature`]: the one DEVICE_FEATURE dispatcher (header checked once, one function per
//!   feature, both dialects).
//! - [`logging_core`]: DMA logging validation per SPEC 3, driving a [`driver::LogDriver`].
//! - [`soft`]: the software tracker (SPEC 5.1). The models of hardware trackers (mlx5,
//!   pds), which run threads of their own, are in `dmalog-models`.
//! - [`tracker`]: the consumer trait [`tracker::DirtyTracker`] and its in-process backend.
//!
//! The suite every driver and transport runs is `dmalog-conformance` (a dev-dependency).
//!
//! # Features, MSRV
//! No features. Rust 1.85, held by clippy's `incompatible_msrv`.

#[cfg(target_endian = "big")]
compile_error!("dmalog assumes a little-endian host (bitmaps are shared as u64 words and bytes)");

mod bits;
pub mod budget;
pub mod dirty_log;
pub mod driver;
pub mod error;
pub mod feature;
pub mod iova_bitmap;
mod log_index;
pub mod logging_core;
pub mod migration;
pub mod ranges;
pub mod report_split;
pub mod soft;
mod sync;
pub mod tracker;
pub mod uapi;
pub mod user_memory;

pub use dirty_log::DirtyLog;
pub use driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
pub use error::{LogError, LogResult};
pub use feature::{DeviceFeatures, FeatureError, FeatureRequest, MigrationFeatures};
pub use iova_bitmap::IovaBitmap;
pub use logging_core::{Dialect, LoggingCore};
pub use ranges::IovaRange;
pub use soft::SoftDriver;
pub use tracker::{
    DirtyTracker, InProcessTracker, MigrationDevice, PendingBytes, TrackerError, TrackerResult,
};

#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
