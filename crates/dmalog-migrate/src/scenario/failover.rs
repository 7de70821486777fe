//! After a failed migration, on both sides.
//!
//! The source: destinations tried in turn, as a VMM's operator would retry a migration.
//! After a failed attempt the VM runs on here (the engine has resumed the vCPUs, returned
//! the device to RUNNING and stopped dirty logging); that state is read back from the
//! device and the vCPUs, logged, and kept with the attempt's outcome for the report, and
//! the next destination is tried, unless the failed destination had already been told to
//! resume the guest (then the guest may run there, and must not run anywhere else).
//!
//! The destination: a device left holding state of a guest it never resumed is reset.

use std::error::Error;

use dmalog::uapi::DeviceState;
use dmalog::IovaRange;
use dmalog::{DirtyTracker, MigrationDevice};
use dmalog_vfio_user::Client;
use tracing::{info, warn};

use super::{causes, chain_text};
use crate::{MigrateError, VcpuWorkload};

/// One attempt to migrate to one destination.
#[derive(Debug, serde::Serialize)]
pub struct Attempt {
    /// The destination's `HOST:PORT`.
    pub destination: String,
    /// Whether the migration completed (the destination resumed the guest).
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VM here right after the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_after_failure: Option<VmState>,
}

/// The source VM's state as read back after a failed attempt.
#[derive(Debug, serde::Serialize)]
pub struct VmState {
    /// The device's migration state as the device reports it ("RUNNING"), or why it
    /// could not be read.
    pub device_state: String,
    /// Whether the vCPUs run.
    pub vcpus_running: bool,
    /// Whether the device still logs DMA (a one-page REPORT succeeds).
    pub device_dirty_logging: bool,
    /// Whether the VMM's own dirty log of vCPU writes is still on.
    pub cpu_dirty_logging: bool,
}

impl VmState {
    /// Reads the state back: the device's state and whether either dirty log still
    /// answers a REPORT (after the engine's STOP it must not: EINVAL, SPEC 3.4). The
    /// REPORT is of the first guest page; on a log that is wrongly still on it clears that
    /// page's bits, which no later migration relies on (each starts its log afresh).
    pub fn read(
        device: &mut (impl MigrationDevice + DirtyTracker),
        cpu: &mut dyn DirtyTracker,
        vcpus: &VcpuWorkload,
        first_gpa: u64,
    ) -> Self {
        let page = crate::engine::PAGE;
        let mut bitmap = [0u64; 1];
        let device_state = match device.device_state() {
            Ok(state) => state_name(state),
            Err(err) => format!("unknown ({err})"),
        };
        // A one-page REPORT succeeds only while logging is on.
        let first_page = IovaRange::new(first_gpa, page).ok();
        let mut logging = |tracker: &mut dyn DirtyTracker| {
            first_page.is_some_and(|range| tracker.report(range, page, &mut bitmap).is_ok())
        };
        VmState {
            device_state,
            vcpus_running: !vcpus.is_paused(),
            device_dirty_logging: logging(device),
            cpu_dirty_logging: logging(cpu),
        }
    }

    /// Whether this is the VM running on, as after a failure it must be.
    fn runs_on(&self) -> bool {
        self.device_state == "RUNNING"
            && self.vcpus_running
            && !self.device_dirty_logging
            && !self.cpu_dirty_logging
    }
}

/// The uAPI name of a device state ("STOP_COPY").
pub fn state_name(state: DeviceState) -> String {
    let mut name = String::new();
    for (i, c) in format!("{state:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Every destination failed: the attempts, in order.
#[derive(Debug)]
pub struct AllFailed(pub Vec<Attempt>);

impl std::error::Error for AllFailed {}

impl std::fmt::Display for AllFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

fn describe(attempts: &[Attempt]) -> String {
    let each: Vec<String> = attempts
        .iter()
        .map(|a| {
            format!(
                "{}: {}",
                a.destination,
                a.error.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    match each.as_slice() {
        [one] => format!("migration to {one}"),
        _ => format!(
            "every destination failed ({} attempts); {}",
            each.len(),
            each.join("; ")
        ),
    }
}

/// Tries `destinations` in turn with `migrate` until one succeeds. After each failure,
/// `read_state` says what the VM is doing now (logged and kept with the attempt). Both get
/// `vm`, the parts of the VM they use. No destination is tried after one whose failure
/// carries [`MigrateError::Unconfirmed`] (it had been told to resume the guest).
pub fn try_in_turn<V, T, E: Error + 'static>(
    destinations: &[String],
    vm: &mut V,
    mut migrate: impl FnMut(&mut V, &str) -> Result<T, E>,
    mut read_state: impl FnMut(&mut V) -> VmState,
) -> Result<(T, Vec<Attempt>), AllFailed> {
    let mut attempts = Vec::new();
    for (i, destination) in destinations.iter().enumerate() {
        match migrate(vm, destination) {
            Ok(done) => {
                attempts.push(Attempt {
                    destination: destination.clone(),
                    ok: true,
                    error: None,
                    vm_after_failure: None,
                });
                return Ok((done, attempts));
            }
            Err(err) => {
                let error = chain_text(&err);
                let state = read_state(vm);
                let next = destinations.get(i + 1);
                if state.runs_on() {
                    warn!(
                        %destination, %error,
                        "migration failed; the VM runs on here (vCPUs running, device RUNNING, dirty logging off)"
                    );
                } else {
                    warn!(%destination, %error, ?state, "migration failed, and the VM is not back to running");
                }

                let handed_over = causes(&err).any(|cause| {
                    matches!(
                        cause.downcast_ref::<MigrateError>(),
                        Some(MigrateError::Unconfirmed(_))
                    )
                });
                attempts.push(Attempt {
                    destination: destination.clone(),
                    ok: false,
                    error: Some(error),
                    vm_after_failure: Some(state),
                });
                if handed_over {
                    // The guest may run at that destination: not at another one too.
                    break;
                }
                if let Some(next) = next {
                    info!(%next, "trying the next destination");
                }
            }
        }
    }
    Err(AllFailed(attempts))
}

/// After a failed incoming migration: a device left holding a guest's state it never
/// resumed (a partial load in RESUMING, a whole one in STOP waiting for the source's Go, or
/// ERROR) is reset (DEVICE_RESET: registers to defaults, RUNNING, no migration data), so
/// that nothing of a guest that runs elsewhere stays here. A RUNNING device (nothing
/// loaded, or resumed before the failure) is left alone.
pub fn discard_unresumed_load(device: &mut Client) {
    match device.device_state() {
        Ok(DeviceState::Running) => {}
        Ok(state) => match device.reset() {
            Ok(()) => warn!(
                was = state_name(state),
                "the device's unresumed migration state was discarded (DEVICE_RESET)"
            ),
            Err(err) => warn!(%err, "could not reset the device after the failed migration"),
        },
        Err(err) => warn!(%err, "could not read the device's state after the failed migration"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ScenarioError;

    fn running() -> VmState {
        VmState {
            device_state: "RUNNING".into(),
            vcpus_running: true,
            device_dirty_logging: false,
            cpu_dirty_logging: false,
        }
    }

    #[test]
    fn destinations_are_tried_in_turn_until_one_takes_the_vm() {
        let destinations = ["a", "b", "c"].map(String::from);
        let mut tried = Vec::new();
        let (done, attempts) = try_in_turn(
            &destinations,
            &mut tried,
            |tried, to| {
                tried.push(to.to_string());
                if to == "b" {
                    Ok(7)
                } else {
                    Err(ScenarioError::Failed(format!("{to} is down")))
                }
            },
            |_| running(),
        )
        .unwrap();
        assert_eq!(
            (done, tried.as_slice()),
            (7, &["a".to_string(), "b".into()][..])
        );
        assert_eq!(attempts.len(), 2);
        assert!(!attempts[0].ok && attempts[1].ok);
        assert_eq!(attempts[0].error.as_deref(), Some("a is down"));
        assert!(attempts[0].vm_after_failure.as_ref().unwrap().runs_on());
    }

    #[test]
    fn no_other_destination_after_one_was_told_to_resume() {
        let destinations = ["a", "b"].map(String::from);
        let mut tried = 0;
        let failed = try_in_turn(
            &destinations,
            &mut tried,
            |tried, _| -> Result<(), ScenarioError> {
                *tried += 1;
                let unconfirmed =
                    MigrateError::Unconfirmed(Box::new(MigrateError::Peer("x".into())));
                Err(ScenarioError::Migration(unconfirmed))
            },
            |_| running(),
        )
        .unwrap_err();
        assert_eq!(tried, 1);
        assert_eq!(failed.0.len(), 1);
        assert!(failed.to_string().contains("stays paused"), "{failed}");
    }

    #[test]
    fn state_names_are_the_uapi_s() {
        assert_eq!(state_name(DeviceState::Running), "RUNNING");
        assert_eq!(state_name(DeviceState::StopCopy), "STOP_COPY");
        assert_eq!(state_name(DeviceState::PreCopyP2p), "PRE_COPY_P2P");
    }
}
