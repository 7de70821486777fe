//! A hostile peer's mappings, STARTs, writes and REPORTs never panic the models: every
//! error carries an errno (the same ops as the soft tracker's test in the core).

use dmalog::LoggingCore;
use dmalog_conformance::drivers::{peer_op, run_peer};
use dmalog_models::{Mlx5Caps, Mlx5Driver, PdsDriver};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn pds_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = PdsDriver::new(2).with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }

    #[test]
    fn mlx5_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = Mlx5Driver::new(Mlx5Caps::tiny()).with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }
}
