//! The dispatcher with a migration side, in both dialects.

use super::*;
use crate::soft::SoftDriver;
use crate::uapi::{DeviceState, MigDeviceStatePayload, FEATURE_PROBE, MIGRATION_STOP_COPY};
use crate::user_memory::SegmentedUserMemory;

/// A migration side that records the states it was asked for.
struct Machine {
    state: DeviceState,
    data_size: Option<u64>,
}

impl MigrationFeatures for Machine {
    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY
    }
    fn device_state(&self) -> DeviceState {
        self.state
    }
    fn set_device_state(&mut self, target: DeviceState) -> FeatureResult<i32> {
        if target == DeviceState::Resuming {
            return Err(FeatureError::migration(libc::EBUSY, "busy"));
        }
        self.state = target;
        Ok(7)
    }
    fn has_data_size(&self) -> bool {
        self.data_size.is_some()
    }
    fn data_size(&mut self) -> FeatureResult<u64> {
        Ok(self.data_size.unwrap_or(0))
    }
}

fn feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = FeatureHeader { argsz, flags }.encode().to_vec();
    bytes.extend_from_slice(data);
    bytes
}

fn vfio_user(machine: Option<&mut Machine>, request: &[u8]) -> Result<Vec<u8>, i32> {
    let mut core = LoggingCore::new(SoftDriver::new());
    let mut reply = Vec::new();
    let request = FeatureRequest::vfio_user(request, 1 << 20).map_err(|e| e.errno())?;
    DeviceFeatures {
        logging: &mut core,
        migration: machine.map(|m| m as &mut dyn MigrationFeatures),
    }
    .vfio_user(request, &mut reply)
    .map_err(|e| e.errno())?;
    Ok(reply)
}

fn kernel(machine: Option<&mut Machine>, request: &mut [u8]) -> Result<(), i32> {
    let mut core = LoggingCore::new(SoftDriver::new());
    let request = FeatureRequest::kernel(request).map_err(|e| e.errno())?;
    DeviceFeatures {
        logging: &mut core,
        migration: machine.map(|m| m as &mut dyn MigrationFeatures),
    }
    .kernel(request, &mut SegmentedUserMemory::new())
    .map_err(|e| e.errno())
}

fn machine() -> Machine {
    Machine {
        state: DeviceState::Running,
        data_size: None,
    }
}

#[test]
fn migration_features_without_a_migration_side_are_enotty_probe_included() {
    for index in [
        FEATURE_MIGRATION,
        FEATURE_MIG_DEVICE_STATE,
        FEATURE_MIG_DATA_SIZE,
    ] {
        let probe = feature(16, index | FEATURE_PROBE | FEATURE_GET, &[0; 8]);
        assert_eq!(vfio_user(None, &probe), Err(libc::ENOTTY), "{index}");
        assert_eq!(
            kernel(None, &mut probe.clone()),
            Err(libc::ENOTTY),
            "{index}"
        );
    }
    // MIG_DATA_SIZE needs a side that serves it.
    let get = feature(16, FEATURE_MIG_DATA_SIZE | FEATURE_GET, &[0; 8]);
    assert_eq!(vfio_user(Some(&mut machine()), &get), Err(libc::ENOTTY));
    let mut sized = Machine {
        data_size: Some(4096),
        ..machine()
    };
    let mut request = get.clone();
    assert_eq!(kernel(Some(&mut sized), &mut request), Ok(()));
    assert_eq!(request[8..16], 4096u64.to_le_bytes());
}

#[test]
fn migration_get_answers_in_each_dialect() {
    let get = feature(16, FEATURE_MIGRATION | FEATURE_GET, &[]);
    let reply = vfio_user(Some(&mut machine()), &get).unwrap();
    assert_eq!(
        reply,
        feature(
            16,
            FEATURE_MIGRATION | FEATURE_GET,
            &MIGRATION_STOP_COPY.to_le_bytes()
        )
    );
    // The reply needs room in argsz (vfio-user) or in the payload (kernel).
    let short = feature(15, FEATURE_MIGRATION | FEATURE_GET, &[]);
    assert_eq!(vfio_user(Some(&mut machine()), &short), Err(libc::EINVAL));
    let mut short = feature(15, FEATURE_MIGRATION | FEATURE_GET, &[0; 7]);
    assert_eq!(kernel(Some(&mut machine()), &mut short), Err(libc::EINVAL));
    // SET is not an access MIGRATION has.
    let set = feature(16, FEATURE_MIGRATION | FEATURE_SET, &[0; 8]);
    assert_eq!(vfio_user(Some(&mut machine()), &set), Err(libc::EINVAL));
}

#[test]
fn device_state_set_moves_the_machine_and_answers_per_dialect() {
    let stop = MigDeviceStatePayload {
        device_state: DeviceState::Stop as u32,
        data_fd: -1,
    }
    .encode();
    let set = feature(16, FEATURE_MIG_DEVICE_STATE | FEATURE_SET, &stop);
    let mut m = machine();
    assert_eq!(vfio_user(Some(&mut m), &set), Ok(set.clone()), "an echo");
    assert_eq!(m.state, DeviceState::Stop);
    let mut m = machine();
    let mut request = set.clone();
    kernel(Some(&mut m), &mut request).unwrap();
    let reached = MigDeviceStatePayload::decode(&request[8..]).unwrap();
    assert_eq!(
        (reached.device_state, reached.data_fd),
        (DeviceState::Stop as u32, 7)
    );
    // An unknown state is EINVAL; the side's own refusal keeps its errno.
    let bad = feature(
        16,
        FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
        &[99, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(vfio_user(Some(&mut machine()), &bad), Err(libc::EINVAL));
    let resuming = feature(
        16,
        FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
        &[4, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(vfio_user(Some(&mut machine()), &resuming), Err(libc::EBUSY));
    assert_eq!(
        kernel(Some(&mut machine()), &mut resuming.clone()),
        Err(libc::EBUSY)
    );
}

#[test]
fn the_header_is_checked_before_the_feature_is_looked_up() {
    // A reserved bit on an unknown index: EINVAL (step 2) before ENOTTY (step 4).
    let request = feature(8, 1 << 19 | 0x77, &[]);
    assert_eq!(vfio_user(Some(&mut machine()), &request), Err(libc::EINVAL));
    let request = feature(8, FEATURE_GET | 0x77, &[]);
    assert_eq!(vfio_user(Some(&mut machine()), &request), Err(libc::ENOTTY));
    assert_eq!(
        kernel(Some(&mut machine()), &mut request.clone()),
        Err(libc::ENOTTY)
    );
}
