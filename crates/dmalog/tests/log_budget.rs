//! The one memory budget for tracker state (SPEC 8): every tracker charges what START
//! allocates; a budget of exactly that starts, one byte less is ENOMEM with nothing
//! half-started, and a smaller START then succeeds. (The models run the same table in
//! dmalog-models.)

use dmalog::{LoggingCore, SoftDriver};
use dmalog_conformance::drivers::{check_budget, check_huge_start_is_enomem, USER};

const PAGE: u64 = 4096;

#[test]
fn soft_budget() {
    check_budget(
        "soft",
        |budget| SoftDriver::new().with_max_log_bytes(budget),
        SoftDriver::used_bytes,
        |pages| pages / 8,
    );
}

#[test]
fn a_huge_start_is_enomem_under_the_default_budget() {
    check_huge_start_is_enomem(SoftDriver::new());
}

#[test]
fn soft_charges_ranges_added_after_start() {
    let mut core = LoggingCore::new(SoftDriver::new());
    core.start(USER, PAGE, &[]).unwrap();
    assert_eq!(core.driver().unwrap().used_bytes(), 0);
    core.dma_mapped(dmalog::IovaRange::new(0, 1 << 30).unwrap());
    assert!(
        core.driver().unwrap().used_bytes() >= (1 << 30) / PAGE / 8,
        "an added range is charged"
    );
    core.stop().unwrap();
    assert_eq!(core.driver().unwrap().used_bytes(), 0);
}
