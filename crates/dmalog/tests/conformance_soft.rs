//! The shared conformance suite against the soft driver, in process.

use dmalog::SoftDriver;

dmalog_conformance::conformance_tests!(dmalog_conformance::core_targets(
    || {
        let driver = SoftDriver::new();
        let recorder = driver.recorder();
        (driver, recorder)
    },
    false
));
