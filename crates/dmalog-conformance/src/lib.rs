//! The conformance suite, written once and run against every driver, in process and over
//! the wire: every errno row of SPEC 3 as a table, report semantics, and a property test
//! against a model (a set of dirty tracker pages); plus the checks that take a driver
//! rather than a transport ([`drivers`]: the memory budget, fixed ranges in "log all"
//! mode, a hostile peer's mappings).
//!
//! A driver joins by implementing [`ConformanceTarget`] (or using [`CoreTarget`] for an
//! in-process core, [`core_targets`] for a factory of them) and invoking
//! [`conformance_tests!`] with a factory expression in an integration test (`tests/`); each
//! case becomes its own `#[test]`, `conformance::<case>`.
//!
//! Layout of the IOVA space the suite uses (a target maps `[0, SUITE_SPAN)` if it needs
//! DMA mappings): range A `[16 MiB, 24 MiB)`, a hole, range B `[32 MiB, 36 MiB)`. Units:
//! IOVAs, lengths and page sizes in bytes; bit lists are page numbers from a report's
//! first IOVA.
//!
//! # Modules
//! - [`requests`]: DEVICE_FEATURE requests in both dialects, sent to a target.
//! - [`header`], [`start`], [`report`]: the errno tables of SPEC 3.1 to 3.4.
//! - [`semantics`]: what a REPORT sets and clears.
//! - [`model`]: random writes and reports against a model.
//! - [`drivers`]: the driver-level checks.
//!
//! # MSRV
//! Rust 1.88 (proptest 1.12). Not published: a dev-dependency of the crates that run it.

use dmalog::uapi::LoggingRange;

pub mod drivers;
pub mod header;
pub mod model;
pub mod report;
pub mod requests;
pub mod semantics;
pub mod start;
mod target;

pub use header::header_errnos;
pub use model::matches_model;
pub use report::report_errnos;
pub use semantics::{
    log_all_mapped, report_any_range, report_ors_and_clears, report_page_size_conversion,
};
pub use start::{start_errnos, stop_always_succeeds};
pub use target::{core_targets, ConformanceTarget, CoreTarget, DmaWriter, Variant};

/// Bytes of IOVA space the suite touches, from 0.
pub const SUITE_SPAN: u64 = 64 << 20;
/// Range A.
pub const RANGE_A: LoggingRange = LoggingRange {
    iova: 16 << 20,
    length: 8 << 20,
};
/// Range B (after a hole).
pub const RANGE_B: LoggingRange = LoggingRange {
    iova: 32 << 20,
    length: 4 << 20,
};
/// The page size the suite starts and reports at unless a case says otherwise.
const PAGE: u64 = 4096;
const EINVAL: i32 = libc::EINVAL;

/// What every case takes: a factory of targets, called once per device the case needs.
pub type MakeTarget<'a> = &'a mut dyn FnMut(Variant) -> Box<dyn ConformanceTarget>;

/// Generates one `#[test]` per conformance case, in a module `conformance`, for a factory
/// expression of type `impl FnMut(Variant) -> Box<dyn ConformanceTarget>` (evaluated anew
/// for each test, in the invoking module).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            header_errnos, start_errnos, stop_always_succeeds, report_errnos,
            report_ors_and_clears, report_any_range, report_page_size_conversion,
            log_all_mapped, matches_model);
    };
    (@cases $make:expr; $($case:ident),*) => {
        fn conformance_factory(
        ) -> impl FnMut($crate::Variant) -> Box<dyn $crate::ConformanceTarget> {
            $make
        }
        mod conformance {
            $(
                #[test]
                fn $case() {
                    $crate::$case(&mut super::conformance_factory())
                }
            )*
        }
    };
}
