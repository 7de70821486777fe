//! The shared conformance suite, unchanged, against the mlx5 model (unlimited preset).

use dmalog::conformance::{ConformanceTarget, CoreTarget, Variant};
use dmalog::{LoggingCore, Mlx5Caps, Mlx5Driver};

fn make(variant: Variant) -> Box<dyn ConformanceTarget> {
    match variant {
        Variant::Logging => {
            let driver = Mlx5Driver::new(Mlx5Caps::unlimited());
            let recorder = driver.recorder();
            Box::new(CoreTarget::new(LoggingCore::new(driver), Some(recorder)).with_fixed_ranges())
        }
        Variant::NoLogging => Box::new(CoreTarget::new(
            LoggingCore::<Mlx5Driver>::unsupported(),
            None,
        )),
    }
}

dmalog::conformance_tests!(make);
