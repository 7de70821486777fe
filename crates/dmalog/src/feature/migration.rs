//! The migration features (MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE): served by whatever
//! implements [`MigrationFeatures`], the device's migration state machine.

use super::{kernel_payload, FeatureResult, Payload};
use crate::error::LogError;
use crate::uapi::{
    DeviceState, FeatureHeader, MigDeviceStatePayload, UapiStruct, FEATURE_HEADER_BYTES,
};

/// The migration features of a device (its migration state machine): what MIGRATION,
/// MIG_DEVICE_STATE and MIG_DATA_SIZE are served by. Errors become the errno of the reply.
pub trait MigrationFeatures {
    /// MIGRATION GET: `MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY` bits.
    fn migration_flags(&self) -> u64;
    /// MIG_DEVICE_STATE GET: the current state.
    fn device_state(&self) -> DeviceState;
    /// MIG_DEVICE_STATE SET: moves the device to `target`. Returns the data fd the kernel
    /// dialect hands the user (-1 when the arcs taken create none; vfio-user ignores it).
    fn set_device_state(&mut self, target: DeviceState) -> FeatureResult<i32>;
    /// Whether MIG_DATA_SIZE is served (ENOTTY otherwise).
    fn has_data_size(&self) -> bool {
        false
    }
    /// MIG_DATA_SIZE GET: bytes of migration data still to read.
    fn data_size(&mut self) -> FeatureResult<u64> {
        Err(LogError::NotSupported("no MIG_DATA_SIZE").into())
    }
}

/// MIG_DEVICE_STATE: GET answers the state; SET moves the device there (vfio-user echoes
/// the request; the kernel answers the state reached and the data fd).
pub(super) fn mig_device_state(
    migration: &mut dyn MigrationFeatures,
    header: &FeatureHeader,
    payload: Payload<'_>,
) -> FeatureResult<()> {
    let target =
        |raw: u32| DeviceState::from_u32(raw).ok_or(LogError::Invalid("unknown migration state"));
    if !header.is_set() {
        let state = MigDeviceStatePayload {
            device_state: migration.device_state() as u32,
            data_fd: -1,
        };
        return payload.get_reply(header, &state.encode());
    }
    match payload {
        Payload::VfioUser { request, reply, .. } => {
            let asked = MigDeviceStatePayload::decode(&request[FEATURE_HEADER_BYTES..])
                .map_err(|_| LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes"))?;
            migration.set_device_state(target(asked.device_state)?)?;
            reply.extend_from_slice(request);
        }
        Payload::Kernel { request, .. } => {
            let short = LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes");
            let data = kernel_payload(request, header, 8, short)?;
            let asked = MigDeviceStatePayload::decode(data)
                .map_err(|_| LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes"))?;
            let data_fd = migration.set_device_state(target(asked.device_state)?)?;
            let reached = MigDeviceStatePayload {
                device_state: migration.device_state() as u32,
                data_fd,
            };
            data[..8].copy_from_slice(&reached.encode());
        }
    }
    Ok(())
}
