//! dmalog's performance workloads, each with its baselines, shared by the criterion benches
//! (`cargo bench -p dmalog-bench`) and the quick run behind `dmalog bench --json`.
//!
//! Every figure is a ratio of ours against a baseline measured in the same process, on the
//! same data, in the same run. The baselines ([`baselines`]; vm-memory's `AtomicBitmap`)
//! report the same pages as dmalog's log, which is what makes the ratios fair:
//!
//! ```
//! use dmalog::{DirtyLog, IovaBitmap};
//! use dmalog_bench::baselines::ByteAtomicLog;
//!
//! let (span, page_size) = (1 << 20, 4096); // bytes
//! let ours = DirtyLog::new(0, span, page_size)?;
//! let libvfio_user_like = ByteAtomicLog::new(span, page_size);
//! for (iova, len_bytes) in [(5 * 4096, 1), (64 * 4096 - 1, 2), (200 * 4096, 3 * 4096)] {
//!     ours.mark(iova, len_bytes);
//!     libvfio_user_like.mark(iova, len_bytes);
//! }
//! let (mut a, mut b) = ([0u8; 32], [0u8; 32]); // one bit per page, 256 pages
//! ours.read_and_clear(0, span, &mut IovaBitmap::new(0, span, page_size, &mut a)?);
//! libvfio_user_like.get_and_clear(&mut b);
//! assert_eq!(a, b);
//! # Ok::<(), dmalog::LogError>(())
//! ```
//!
//! Not a dependency for a VMM: a library only so that the benches and `dmalog bench` share
//! the workloads. No features. MSRV: Rust 1.85, held by clippy's `incompatible_msrv`.

pub mod baselines;
pub mod migrate;
pub mod vm_memory;
pub mod wire;
pub mod workloads;

pub use workloads::{quick_run, Row};
