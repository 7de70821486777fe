//! The source device as the engine drives it: a dirty source with migration data that
//! auto-converge may slow down ([`SourceDevice::throttle_dma`]), a wrapper for devices that
//! cannot be ([`Unthrottled`]), and the throttle the engine applies to the vCPUs and the
//! device together.

use dmalog::uapi::DeviceState;
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, PendingBytes, TrackerError, TrackerResult};
use tracing::{info, warn};

use crate::engine::MigrateError;
use crate::vcpu::VcpuWorkload;

/// A migratable device that also tracks its DMA, and may be slowed down.
pub trait SourceDevice: DirtyTracker + MigrationDevice {
    /// Slows the device's own DMA by `percent` of its speed for auto-converge (0: its full
    /// speed back). `Ok(false)`: this device cannot be slowed (the default; a real
    /// device's DMA is its guest's business, an emulated workload's is not).
    fn throttle_dma(&mut self, percent: u8) -> Result<bool, TrackerError> {
        let _ = percent;
        Ok(false)
    }
}

/// Any dirty-tracking migratable device as a [`SourceDevice`] that cannot be slowed.
pub struct Unthrottled<'a, D: ?Sized>(pub &'a mut D);

impl<D: DirtyTracker + ?Sized> DirtyTracker for Unthrottled<'_, D> {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        self.0.probe()
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.0.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        self.0.report(range, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.0.stop()
    }
}

impl<D: MigrationDevice + ?Sized> MigrationDevice for Unthrottled<'_, D> {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        self.0.migration_flags()
    }
    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        self.0.device_state()
    }
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        self.0.set_device_state(state)
    }
    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        self.0.read_migration_data(buf)
    }
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        self.0.write_migration_data(data)
    }
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        self.0.pending_migration_bytes()
    }
}

impl<D: DirtyTracker + MigrationDevice + ?Sized> SourceDevice for Unthrottled<'_, D> {}

/// The throttle in force on the vCPUs and the device.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Percent of the guest's time taken away.
    pub(crate) pct: u8,
    /// Whether the device took it.
    pub(crate) device: bool,
}

impl Throttle {
    /// Sets `pct` on the vCPUs and the device when it changes. A device that refuses is
    /// left at its speed (a lost device server fails the migration).
    pub(crate) fn apply(
        &mut self,
        pct: u8,
        vcpus: Option<&VcpuWorkload>,
        device: &mut dyn SourceDevice,
    ) -> Result<(), MigrateError> {
        if pct == self.pct {
            return Ok(());
        }
        if let Some(vcpus) = vcpus {
            vcpus.set_throttle(pct);
        }
        self.device = match device.throttle_dma(pct) {
            Ok(slowed) => slowed && pct > 0,
            Err(err @ TrackerError::Transport(_)) => return Err(err.into()),
            Err(err) => {
                warn!(%err, pct, "the device workload could not be throttled");
                false
            }
        };
        if pct > 0 {
            info!(
                pct,
                device = self.device,
                "auto-converge: throttling the guest"
            );
        }
        self.pct = pct;
        Ok(())
    }
}
