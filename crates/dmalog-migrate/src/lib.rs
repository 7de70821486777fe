//! dmalog's live migration engine: guest memory, the vCPU workload and its dirty log, the
//! pre-copy engine over [`dmalog::DirtyTracker`] and [`dmalog::MigrationDevice`], and the
//! framed migration stream and its TLS.
//!
//! The top of the library stack: it knows only the consumer traits, the migration-data
//! interface and guest memory, never a device's registers, so the same engine migrates a
//! vfio-user device (`dmalog-vfio-user`'s `Client`), a kernel VFIO device (`dmalog-vfio`) or
//! an in-process one. [`migrate_source`] runs the source (START on every dirty source, round
//! 0, pre-copy rounds until the rest fits the downtime budget, the stop, the final round,
//! the device state, verification) and [`migrate_destination`] the other end, over any
//! byte stream ([`stream`]; [`tls`] for TCP between hosts). Units: GPAs, IOVAs and sizes in
//! bytes, pages of 4 KiB, durations as [`std::time::Duration`], rates in bytes per second.
//!
//! Planning what to START, the engine's first step:
//!
//! ```
//! use dmalog_migrate::{default_layout, plan_ranges, GuestMemory, RangePlan};
//!
//! // 3 MiB at GPA 0 and 1 MiB at 4 GiB: a hole between them.
//! let memory = GuestMemory::new(&default_layout(4 << 20))?;
//! let exact = plan_ranges(&memory, RangePlan::Exact, 8);
//! assert_eq!(exact.len(), 2);
//! // A device that takes one range gets one spanning the hole (smallest gaps merged first).
//! let one = plan_ranges(&memory, RangePlan::Exact, 1);
//! assert_eq!((one[0].iova(), one[0].end()), (0, (4 << 30) + (1 << 20)));
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! No features. MSRV: Rust 1.88 (rcgen 0.14.10 through `time` 0.3.55), held by clippy's
//! `incompatible_msrv`.

pub mod converge;
pub mod destination;
mod dirty;
pub mod engine;
mod error;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod guest;
mod known_zero;
pub mod peer_text;
pub mod pki;
mod report;
mod round_sync;
pub mod scenario;
pub mod sender;
mod source_device;
pub mod stream;
pub mod tls;
pub mod vcpu;

pub use destination::{
    migrate_destination, migrate_destination_channels, DestinationReport, Incoming,
};
pub use engine::{
    migrate_source, migrate_source_channels, plan_ranges, MigrateError, MigrationReport, Mode,
    RangePlan, RoundStats, SourceConfig, SourceVm, StopTimes,
};
pub use guest::{default_layout, GuestMemory};
pub use vcpu::{VcpuParams, VcpuWorkload};
