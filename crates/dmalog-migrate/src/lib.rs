//! dmalog's live migration engine: guest memory, the vCPU workload and its dirty log, the
//! pre-copy engine over [`dmalog::DirtyTracker`] and [`dmalog::MigrationDevice`], and the
//! framed migration stream and its TLS.

pub mod converge;
pub mod destination;
mod dirty;
pub mod engine;
pub mod fuzzing;
pub mod guest;
pub mod peer_text;
pub mod pki;
pub mod stream;
pub mod tls;
pub mod vcpu;

pub use destination::{migrate_destination, DestinationReport};
pub use engine::{
    migrate_source, plan_ranges, MigrateError, MigrationReport, Mode, RangePlan, RoundStats,
    SourceConfig, SourceVm, StopTimes,
};
pub use guest::{default_layout, GuestMemory};
pub use vcpu::{VcpuParams, VcpuWorkload};
