//! dmalog's live migration engine: guest memory, the vCPU workload and its dirty log, the
//! pre-copy engine over [`dmalog::DirtyTracker`] and [`dmalog::MigrationDevice`], and the
//! framed migration stream.

pub mod engine;
pub mod guest;
pub mod stream;
pub mod vcpu;

pub use engine::{
    migrate_destination, migrate_source, plan_ranges, DestinationReport, MigrateError,
    MigrationReport, Mode, RangePlan, RoundStats, SourceConfig, SourceVm,
};
pub use guest::{default_layout, GuestMemory};
pub use vcpu::{VcpuParams, VcpuWorkload};
