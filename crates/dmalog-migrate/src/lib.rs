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
//! Guest memory is vm-memory's: a [`LoggedGuestMemory`] (`GuestMemoryMmap<DmalogBitmap>`)
//! of memfd-backed regions, whose fds and file offsets the device servers DMA_MAP, and
//! whose vCPU writes (through vm-memory: `write_slice`, `write_obj`, `VolatileSlice`) the
//! [`DmalogBitmap`](dmalog_vm_memory::DmalogBitmap) logs and
//! [`DirtyRegions::tracker`] REPORTs as the engine's vCPU dirty source. [`memfd_guest`]
//! builds one; a VMM that has its own hands it in: `examples/vmm_memory.rs` builds a
//! memfd-backed `GuestMemoryMmap<DmalogBitmap>` as a VMM would, writes it as a rust-vmm
//! device does, and migrates it over loopback TCP to a destination that verifies every
//! byte. [`GuestPages`] is what the engine reads of it.
//!
//! Planning what to START, the engine's first step:
//!
//! ```
//! use dmalog_migrate::vm_memory::{Bytes, GuestAddress};
//! use dmalog_migrate::{default_layout, memfd_guest, plan_ranges, DirtyRegions, RangePlan};
//!
//! // 3 MiB at GPA 0 and 1 MiB at 4 GiB: a hole between them.
//! let regions = DirtyRegions::new(4096)?;
//! let memory = memfd_guest(&regions, &default_layout(4 << 20))?;
//! let exact = plan_ranges(&memory, RangePlan::Exact, 8);
//! assert_eq!(exact.len(), 2);
//! // A device that takes one range gets one spanning the hole (smallest gaps merged first).
//! let one = plan_ranges(&memory, RangePlan::Exact, 1);
//! assert_eq!((one[0].iova(), one[0].end()), (0, (4 << 30) + (1 << 20)));
//!
//! // A vCPU's write through vm-memory is what `regions.tracker()` REPORTs.
//! use dmalog::DirtyTracker;
//! let mut cpu = regions.tracker();
//! cpu.start(&exact, 4096)?;
//! memory.write_obj(1u64, GuestAddress((4 << 30) + 2 * 4096))?;
//! let mut bitmap = [0u64; 4];
//! cpu.report(exact[1], 4096, &mut bitmap)?;
//! assert_eq!(bitmap[0], 1 << 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Features: `testing` adds the fuzzing entry points (`fuzzing`). MSRV: Rust 1.88 (rcgen
//! 0.14.10 through `time` 0.3.55), held by clippy's `incompatible_msrv`.

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
/// The vm-memory bitmap and tracker crate the engine's guest memory is built on.
pub use dmalog_vm_memory;
pub use dmalog_vm_memory::{DirtyRegions, VmMemoryTracker};
pub use engine::{
    migrate_source, migrate_source_channels, plan_ranges, MigrateError, MigrationReport, Mode,
    RangePlan, RoundStats, SourceConfig, SourceVm, StopTimes,
};
pub use guest::{
    check_guest_memory, default_layout, memfd_guest, memfd_guest_untracked, GuestPages,
    LoggedGuestMemory,
};
pub use vcpu::{VcpuParams, VcpuWorkload};
/// The vm-memory the engine's guest memory is (the same version, for a VMM's own memory).
pub use vm_memory;
