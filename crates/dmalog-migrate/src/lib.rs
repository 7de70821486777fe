//! dmalog's live migration engine: guest memory, the vCPU workload and its dirty log, the
//! pre-copy engine over [`dmalog::DirtyTracker`] and [`dmalog::MigrationDevice`], and the
//! framed migration stream and its TLS.

pub mod destination;
mod dirty;
pub mod engine;
pub mod fuzzing;
pub mod guest;
pub mod peer_text;
pub mod pki;
mod round_sync;
pub mod sender;
pub mod stream;
pub mod tls;
pub mod vcpu;

pub use destination::{
    migrate_destination, migrate_destination_channels, DestinationReport, Incoming,
};
pub use engine::{
    migrate_source, migrate_source_channels, plan_ranges, MigrateError, MigrationReport, Mode,
    RangePlan, RoundStats, SourceConfig, SourceVm,
};
pub use guest::{default_layout, GuestMemory};
pub use vcpu::{VcpuParams, VcpuWorkload};
