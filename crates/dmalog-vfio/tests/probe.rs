//! `dmalog probe`'s report, on fake devices (no VFIO hardware here).

use dmalog::uapi::{MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{IovaRange, LoggingCore, SoftDriver};
use dmalog_models::{Mlx5Caps, Mlx5Driver};
use dmalog_vfio::fake::{FakeMigration, FakeVfioDevice};
use dmalog_vfio::probe::probe_device;
use dmalog_vfio::VfioDevice;

#[test]
fn a_device_with_logging_and_precopy() {
    let migration = FakeMigration::new(
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        vec![0; 10],
        vec![0; 10],
    );
    let mut dev = VfioDevice::new(FakeVfioDevice::new(
        LoggingCore::new(Mlx5Driver::new(Mlx5Caps::cx7())),
        Some(migration),
    ));
    let range = IovaRange::new(0, 1 << 32).unwrap();
    let report = probe_device("fake0", &mut dev, Some((range, 1 << 31)));
    assert!(report.dma_logging);
    let migration = report.migration.clone().unwrap();
    assert!(migration.stop_copy && migration.pre_copy && !migration.p2p);
    let start = report.try_start.clone().unwrap();
    assert_eq!(
        start.chosen_page_size,
        Some(1 << 30),
        "the hint is clamped to the device's maximum"
    );
    assert!(start.report_ok && start.stop_ok && start.error.is_none());
    assert!(report.errors.is_empty());
    assert_eq!(dev.logging_page_size(), None, "stopped again");
}

#[test]
fn a_device_without_logging_or_migration() {
    let mut dev = VfioDevice::new(FakeVfioDevice::new(
        LoggingCore::<SoftDriver>::unsupported(),
        None,
    ));
    let range = IovaRange::new(0, 1 << 20).unwrap();
    let report = probe_device("fake1", &mut dev, Some((range, 4096)));
    assert!(!report.dma_logging);
    assert!(report.migration.is_none());
    let start = report.try_start.unwrap();
    assert_eq!(start.chosen_page_size, None);
    assert!(start.error.unwrap().contains("no DMA logging"));
}

#[test]
fn a_start_the_device_refuses_is_reported() {
    let mut dev = VfioDevice::new(FakeVfioDevice::new(
        LoggingCore::new(Mlx5Driver::new(Mlx5Caps::tiny())),
        None,
    ));
    let range = IovaRange::new(0, 1 << 40).unwrap();
    let report = probe_device("fake2", &mut dev, Some((range, 4096)));
    let start = report.try_start.unwrap();
    assert!(
        start.error.unwrap().contains("START"),
        "address space above the tiny preset's cap"
    );
    assert!(start.stop_ok);
}
