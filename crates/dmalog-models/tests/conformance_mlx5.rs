//! The shared conformance suite, unchanged, against the mlx5 model (unlimited preset).

use dmalog_models::{Mlx5Caps, Mlx5Driver};

dmalog_conformance::conformance_tests!(dmalog_conformance::core_targets(
    || {
        let driver = Mlx5Driver::new(Mlx5Caps::unlimited());
        let recorder = driver.recorder();
        (driver, recorder)
    },
    true
));
