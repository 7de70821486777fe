//! Places where the fakes behaved unlike Linux 6.12 (found by tests/real_kernel.rs in the
//! VM of scripts/kernel-vm.sh), pinned here so that the default run keeps them fixed.

use dmalog::uapi::{DeviceState, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{DirtyTracker, IovaRange, LoggingCore, SoftDriver};
use dmalog_vfio::fake::{FakeIommu, FakeMigration, FakeVfioDevice};
use dmalog_vfio::{IommufdDirtyTracker, VfioDevice};

#[test]
fn precopy_info_answers_in_pre_copy_p2p_too() {
    // mtty (and vfio's uAPI) accept VFIO_MIG_GET_PRECOPY_INFO in PRE_COPY and PRE_COPY_P2P.
    let migration = FakeMigration::new(
        MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY,
        vec![1; 24],
        vec![2; 36],
    );
    let mut dev = VfioDevice::new(FakeVfioDevice::new(
        LoggingCore::new(SoftDriver::new()),
        Some(migration),
    ));
    dev.set_device_state(DeviceState::PreCopy).unwrap();
    assert_eq!(dev.precopy_info().unwrap().initial_bytes, 24);
    dev.set_device_state(DeviceState::PreCopyP2p).unwrap();
    assert_eq!(
        dev.precopy_info()
            .map(|i| i.initial_bytes)
            .map_err(|e| e.errno()),
        Ok(24),
        "PRECOPY_INFO in PRE_COPY_P2P"
    );
    dev.set_device_state(DeviceState::StopCopy).unwrap();
    assert_eq!(
        dev.precopy_info().map_err(|e| e.errno()).unwrap_err(),
        libc::EINVAL
    );
}

#[test]
fn dirty_bitmap_with_tracking_off_reports_nothing() {
    // 6.12: with tracking off, GET_DIRTY_BITMAP succeeds and sets no bit, also for pages
    // dirtied before tracking was turned off.
    const BASE: u64 = 1 << 24;
    let mut t = IommufdDirtyTracker::new(
        FakeIommu::new(7, IovaRange::new(BASE, 1 << 20).unwrap(), true),
        7,
    );
    let range = IovaRange::new(BASE, 1 << 20).unwrap();
    t.start(&[range], 4096).unwrap();
    t.ioctl().dma_write(BASE + 4096, 1);
    t.stop().unwrap();
    let mut bitmap = [0u8; 32];
    t.report_bytes(BASE, 1 << 20, 4096, &mut bitmap, true)
        .unwrap();
    assert_eq!(bitmap, [0u8; 32], "no bits with tracking off");
    // Enabling again starts clean.
    t.start(&[range], 4096).unwrap();
    t.report_bytes(BASE, 1 << 20, 4096, &mut bitmap, true)
        .unwrap();
    assert_eq!(bitmap, [0u8; 32]);
}
