//! "Log all DMA-mapped space" against the models, whose ranges are fixed at START: a
//! mapping made after START outside them makes every REPORT fail with EIO until STOP and
//! a new START (SPEC 8); never a silently clean page.

use dmalog::{LiveLog, LoggingCore};
use dmalog_conformance::drivers::check_fixed_ranges_latch_eio;
use dmalog_models::{Mlx5Caps, Mlx5Driver, PdsDriver};

#[test]
fn mlx5_mapping_outside_its_ranges_latches_eio() {
    let caps = Mlx5Caps {
        max_num_range: 1,
        ..Mlx5Caps::tiny()
    };
    let driver = Mlx5Driver::with_live_log(caps, LiveLog::new());
    let dma = driver.recorder();
    check_fixed_ranges_latch_eio(LoggingCore::new(driver), dma);
}

#[test]
fn pds_mapping_outside_its_ranges_latches_eio() {
    let driver = PdsDriver::new(1);
    let dma = driver.recorder();
    check_fixed_ranges_latch_eio(LoggingCore::new(driver), dma);
}
