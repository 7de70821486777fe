//! Models of hardware DMA dirty trackers, as drivers of dmalog's logging core
//! ([`dmalog::LogDriver`]): what a VMM's migration code meets on real devices (fixed
//! ranges, page-size and address-space limits, a report that goes through queues, faults)
//! without the hardware.
//!
//! ```
//! use dmalog::tracker::report_words;
//! use dmalog::{DirtyTracker, InProcessTracker, IovaRange};
//! use dmalog_models::{Mlx5Caps, Mlx5Driver};
//!
//! let driver = Mlx5Driver::new(Mlx5Caps::tiny());
//! let mut device = driver.recorder(); // the device's DMA writes
//! let mut tracker = InProcessTracker::new(driver);
//! let logged = IovaRange::new(0, 1 << 20)?;
//! let page_size = tracker.start(&[logged], 4096)?;
//! device.record_write(3 * page_size, 8);
//! let mut bitmap = vec![0u64; report_words(1 << 20, page_size)? as usize];
//! tracker.report(logged, page_size, &mut bitmap)?; // through the device thread
//! assert_eq!(bitmap[0], 1 << 3);
//! tracker.stop()?; // joins the device thread
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Modules
//! - [`mlx5`]: the mlx5 hardware page tracker, device half (a thread of its own) and driver
//!   half, with its capabilities and injectable faults (SPEC 5.2).
//! - [`pds`]: the AMD/Pensando tracker's `seq`/`ack` bitmaps (SPEC 5.3).
//!
//! Units as in the core: IOVAs, lengths and page sizes in bytes.
//!
//! # Features, MSRV
//! No features. Rust 1.85, held by clippy's `incompatible_msrv`.

pub mod mlx5;
pub mod pds;

pub use mlx5::{Mlx5Caps, Mlx5Driver, Mlx5Fault};
pub use pds::PdsDriver;
