//! Migration v2 from the VMM side: the client as a [`MigrationDevice`] (MIGRATION and
//! MIG_DEVICE_STATE features, MIG_DATA_READ / MIG_DATA_WRITE).

use dmalog::uapi::{
    feature_request, DeviceState, MigDeviceStatePayload, UapiStruct, FEATURE_GET,
    FEATURE_HEADER_BYTES, FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE, FEATURE_SET,
};
use dmalog::{MigrationDevice, PendingBytes, TrackerError};

use super::{Client, ClientError};
use crate::wire::*;

impl MigrationDevice for Client {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        let reply =
            self.device_feature(&feature_request(16, FEATURE_MIGRATION | FEATURE_GET, &[]))?;
        Ok(dmalog::uapi::read_u64(&reply, FEATURE_HEADER_BYTES)
            .map_err(|_| ClientError::Protocol("short MIGRATION reply"))?)
    }

    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        let reply = self.device_feature(&feature_request(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_GET,
            &[],
        ))?;
        let state = MigDeviceStatePayload::decode(&reply[FEATURE_HEADER_BYTES.min(reply.len())..])
            .map_err(|_| ClientError::Protocol("short state reply"))?;
        Ok(DeviceState::from_u32(state.device_state)
            .ok_or(ClientError::Protocol("unknown state"))?)
    }

    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        let payload = MigDeviceStatePayload {
            device_state: state as u32,
            data_fd: -1,
        }
        .encode();
        self.device_feature(&feature_request(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            &payload,
        ))?;
        Ok(())
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        let size = buf.len().min(self.max_data_xfer_size as usize) as u32;
        let request = MigData {
            argsz: MigData::BYTES as u32 + size,
            size,
        };
        let (reply, _) = self.request(cmd::MIG_DATA_READ, &request.encode(), &[])?;
        let header = MigData::decode(&reply)
            .map_err(|_| ClientError::Protocol("short MIG_DATA_READ reply"))?;
        // `size` bytes of data; a server may pad the reply to the requested length.
        let data = reply
            .get(MigData::BYTES..MigData::BYTES + header.size as usize)
            .filter(|data| data.len() <= buf.len())
            .ok_or(ClientError::Protocol("MIG_DATA_READ size mismatch"))?;
        buf[..data.len()].copy_from_slice(data);
        Ok(data.len())
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        for chunk in data.chunks(self.max_data_xfer_size as usize) {
            let mut payload = MigData {
                argsz: (MigData::BYTES + chunk.len()) as u32,
                size: chunk.len() as u32,
            }
            .encode();
            payload.extend_from_slice(chunk);
            self.request(cmd::MIG_DATA_WRITE, &payload, &[])?;
        }
        Ok(())
    }

    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        Ok(None) // vfio-user has no PRECOPY_INFO or MIG_DATA_SIZE
    }
}
