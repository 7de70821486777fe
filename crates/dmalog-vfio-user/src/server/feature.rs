//! DEVICE_FEATURE: the core's dispatcher (DMA logging and the migration features), with the
//! tracker's REPORT hook (fault injection) in front.

use dmalog::feature::{DeviceFeatures, FeatureRequest};

use super::migration::ServedMigration;
use super::{Reply, Server};

impl Server {
    /// DEVICE_FEATURE through the core's dispatcher: logging to the logging core,
    /// migration to the device's migration state machine.
    pub(super) fn device_feature(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = FeatureRequest::vfio_user(payload, u64::from(self.negotiated_xfer))
            .map_err(|e| e.errno())?;
        if request.is_report() {
            if let Some(hook) = self.before_report.as_mut() {
                hook();
            }
        }
        let mut reply = std::mem::take(&mut self.spare_reply);
        let mut migration = ServedMigration {
            machine: &mut self.machine,
            device: self.device.as_mut(),
        };
        DeviceFeatures {
            logging: &mut self.core,
            migration: Some(&mut migration),
        }
        .vfio_user(request, &mut reply)
        .map_err(|e| e.errno())?;
        Reply::payload(reply)
    }
}
