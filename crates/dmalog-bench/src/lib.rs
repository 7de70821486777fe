//! dmalog's performance workloads, each with its baselines, shared by the criterion benches
//! (`cargo bench -p dmalog-bench`) and the quick run behind `dmalog bench --json`.
//!
//! Every figure is a ratio of ours against a baseline measured in the same process, on the
//! same data, in the same run.

pub mod baselines;
pub mod migrate;
pub mod vm_memory;
pub mod wire;
pub mod workloads;

pub use workloads::{quick_run, Row};
