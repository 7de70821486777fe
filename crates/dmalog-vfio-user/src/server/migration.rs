//! Migration v2: the device's state machine behind MIG_DEVICE_STATE (through the feature
//! dispatcher), migration data (MIG_DATA_READ, MIG_DATA_WRITE) and DEVICE_RESET.

use dmalog::feature::{FeatureError, MigrationFeatures};
use dmalog::uapi::DeviceState;
use dmalog_device::{Device, MigrationMachine};
use tracing::debug;

use super::{dev_err, Reply, Server};
use crate::wire::*;

impl Server {
    /// DEVICE_RESET: registers to defaults, the migration state RUNNING from any state
    /// (ERROR included) with migration data dropped, and logging stopped, as a Linux
    /// driver leaves a device after a reset.
    pub(super) fn device_reset(&mut self) -> Result<Reply, i32> {
        let _ = self.core.stop(); // EINVAL when logging was off: nothing to stop
        self.machine.reset(self.device.as_mut()).map_err(dev_err)?;
        Reply::payload(Vec::new())
    }

    pub(super) fn mig_data_read(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = MigData::decode(payload).map_err(|_| libc::EINVAL)?;
        if request.size > self.config.max_data_xfer_size
            || (request.argsz as usize) < MigData::BYTES + request.size as usize
        {
            return Err(libc::EINVAL);
        }
        let mut reply = vec![0u8; MigData::BYTES + request.size as usize];
        let n = self
            .machine
            .read_data(self.device.as_mut(), &mut reply[MigData::BYTES..])
            .map_err(dev_err)?;
        // The reply keeps the requested length (zero-padded), with `size` saying how much is
        // data: libvfio-user's client insists on receiving exactly what it asked room for.
        let head = MigData {
            argsz: reply.len() as u32,
            size: n as u32,
        }
        .encode();
        reply[..MigData::BYTES].copy_from_slice(&head);
        Reply::payload(reply)
    }

    pub(super) fn mig_data_write(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = MigData::decode(payload).map_err(|_| libc::EINVAL)?;
        let data = &payload[MigData::BYTES..];
        if data.len() != request.size as usize || request.size > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        self.machine
            .write_data(self.device.as_mut(), data)
            .map_err(dev_err)?;
        Reply::payload(Vec::new())
    }
}

/// The migration features of a served device: its state machine over the device.
pub(super) struct ServedMigration<'a> {
    pub(super) machine: &'a mut MigrationMachine,
    pub(super) device: &'a mut dyn Device,
}

impl MigrationFeatures for ServedMigration<'_> {
    fn migration_flags(&self) -> u64 {
        self.device.migration_flags()
    }

    fn device_state(&self) -> DeviceState {
        self.machine.state()
    }

    fn set_device_state(&mut self, target: DeviceState) -> Result<i32, FeatureError> {
        self.machine
            .set_state(self.device, target)
            .map_err(|err| FeatureError::migration(err.errno(), err))?;
        debug!(?target, "migration state");
        Ok(-1) // vfio-user has no data fd: migration data goes by MIG_DATA_READ/WRITE
    }
}
