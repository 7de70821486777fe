//! The shared conformance suite against the soft driver, in process.

use dmalog::conformance::{ConformanceTarget, CoreTarget, Variant};
use dmalog::{LoggingCore, SoftDriver};

fn make(variant: Variant) -> Box<dyn ConformanceTarget> {
    match variant {
        Variant::Logging => {
            let driver = SoftDriver::new();
            let recorder = driver.recorder();
            Box::new(CoreTarget::new(LoggingCore::new(driver), Some(recorder)))
        }
        Variant::NoLogging => Box::new(CoreTarget::new(
            LoggingCore::<SoftDriver>::unsupported(),
            None,
        )),
    }
}

dmalog::conformance_tests!(make);
