//! The one memory budget for tracker state (SPEC 8), for the models: the same table as the
//! soft tracker's, with the pds `seq` and `ack` bitmaps and the mlx5 receive ring charged.

use dmalog_conformance::drivers::{check_budget, check_huge_start_is_enomem};
use dmalog_models::{Mlx5Caps, Mlx5Driver, PdsDriver};

#[test]
fn pds_budget() {
    check_budget(
        "pds",
        |budget| PdsDriver::new(8).with_max_log_bytes(budget),
        PdsDriver::used_bytes,
        |pages| 2 * (pages / 8),
    );
}

#[test]
fn mlx5_budget() {
    let caps = Mlx5Caps::unlimited();
    check_budget(
        "mlx5",
        |budget| Mlx5Driver::new(caps).with_max_log_bytes(budget),
        Mlx5Driver::used_bytes,
        |pages| pages / 8 + caps.ring_bytes(),
    );
}

#[test]
fn a_huge_start_is_enomem_under_the_default_budget() {
    // 64 TiB at 4 KiB: 2 GiB of bitmap (pds: 4 GiB), above the default 1 GiB.
    check_huge_start_is_enomem(PdsDriver::new(8));
    check_huge_start_is_enomem(Mlx5Driver::new(Mlx5Caps::unlimited()));
}
