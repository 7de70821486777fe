//! A failed or abandoned migration must not strand the device (SPEC 8): DEVICE_RESET
//! returns it to RUNNING with logging stopped, entering RESUMING starts a fresh load, and a
//! client disconnect resets the migration state. Across processes, against `dmalog serve`.

mod common;

use common::{engine_op, guest_memory, map_and_start_logging, reg, ServerProcess};
use dmalog::uapi::{
    feature_request, DeviceState, UapiStruct, UserLoggingReport, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_GET, FEATURE_HEADER_BYTES, USER_REPORT_BYTES,
};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice};
use dmalog_vfio_user::Client;

const PAGE: u64 = 4096;
const GUEST: u64 = 1 << 20;
const FILL: u64 = 1;

/// The dma-engine's whole STOP_COPY state, read from a device whose PATTERN is `pattern`.
fn saved_state(client: &mut Client, pattern: u64) -> Vec<u8> {
    client.write_u64(0, reg::PATTERN, pattern).unwrap();
    client.set_device_state(DeviceState::StopCopy).unwrap();
    let mut state = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = client.read_migration_data(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        state.extend_from_slice(&buf[..n]);
    }
    client.set_device_state(DeviceState::Running).unwrap();
    assert!(state.len() > 16, "a state record");
    state
}

/// A raw REPORT of the first page: the server's errno (0: a bitmap came back).
fn report_errno(client: &mut Client) -> i32 {
    let request = feature_request(
        (FEATURE_HEADER_BYTES + USER_REPORT_BYTES + 8) as u32,
        FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
        &UserLoggingReport {
            iova: 0,
            length: PAGE,
            page_size: PAGE,
        }
        .encode(),
    );
    match client.device_feature(&request) {
        Ok(_) => 0,
        Err(err) => err.errno(),
    }
}

#[test]
fn partial_resuming_then_disconnect_does_not_poison_the_next_load() {
    let server = ServerProcess::start("soft");
    let mut first = server.connect();
    let state = saved_state(&mut first, 0x5eed);
    first.write_u64(0, reg::PATTERN, 1).unwrap();
    // An interrupted load: RESUMING, part of the state, then the client goes away.
    first.set_device_state(DeviceState::Resuming).unwrap();
    first.write_migration_data(&state[..13]).unwrap();
    drop(first);

    let mut second = server.connect();
    assert_eq!(
        second.device_state().unwrap(),
        DeviceState::Running,
        "a disconnect leaves the device RUNNING"
    );
    second.set_device_state(DeviceState::Resuming).unwrap();
    second.write_migration_data(&state).unwrap();
    second
        .set_device_state(DeviceState::Stop)
        .expect("RESUMING -> STOP with a valid state, after an abandoned load");
    second.set_device_state(DeviceState::Running).unwrap();
    assert_eq!(second.read_u64(0, reg::PATTERN).unwrap(), 0x5eed, "loaded");
}

#[test]
fn device_reset_during_resuming_drops_the_partial_load() {
    let server = ServerProcess::start("soft");
    let mut client = server.connect();
    let state = saved_state(&mut client, 0xfeed);
    client.set_device_state(DeviceState::Resuming).unwrap();
    client.write_migration_data(&state[..13]).unwrap();
    // Abandon the load with a reset, then load again from the start.
    client.reset().unwrap();
    assert_eq!(client.device_state().unwrap(), DeviceState::Running);
    client.set_device_state(DeviceState::Resuming).unwrap();
    client.write_migration_data(&state).unwrap();
    client.set_device_state(DeviceState::Stop).unwrap();
    client.set_device_state(DeviceState::Running).unwrap();
    assert_eq!(client.read_u64(0, reg::PATTERN).unwrap(), 0xfeed);
}

#[test]
fn failed_resuming_then_device_reset_is_running_with_logging_stopped() {
    let server = ServerProcess::start("soft");
    let mut client = server.connect();
    let memory = guest_memory(GUEST);
    map_and_start_logging(&mut client, &memory, GUEST, PAGE);
    assert_eq!(report_errno(&mut client), 0, "logging is on");

    client.set_device_state(DeviceState::Resuming).unwrap();
    client.write_migration_data(&[0xab; 13]).unwrap();
    let err = client
        .set_device_state(DeviceState::Stop)
        .expect_err("invalid state data fails RESUMING -> STOP");
    assert_eq!(err.errno(), libc::EINVAL, "{err}");

    client.reset().unwrap();
    assert_eq!(
        client.device_state().unwrap(),
        DeviceState::Running,
        "DEVICE_RESET returns the device to RUNNING"
    );
    assert_eq!(
        report_errno(&mut client),
        libc::EINVAL,
        "DEVICE_RESET stops logging"
    );
    assert_eq!(
        engine_op(&mut client, FILL, 0, 0, PAGE, 7),
        0,
        "the device does DMA again"
    );
    // And a later migration works: logging starts afresh, STOP_COPY gives a state.
    client
        .start(&[IovaRange::new(0, GUEST).unwrap()], PAGE)
        .unwrap();
    let state = saved_state(&mut client, 3);
    assert!(!state.is_empty());
}

#[test]
fn an_abandoned_stop_copy_is_undone_by_a_disconnect() {
    let server = ServerProcess::start("soft");
    let mut first = server.connect();
    let whole = saved_state(&mut first, 0xab);
    // STOP_COPY again, read a little, and go away without finishing.
    first.set_device_state(DeviceState::StopCopy).unwrap();
    let mut some = [0u8; 8];
    assert_eq!(first.read_migration_data(&mut some).unwrap(), 8);
    drop(first);

    let mut second = server.connect();
    assert_eq!(second.device_state().unwrap(), DeviceState::Running);
    // A new save starts from the beginning and is the same state.
    assert_eq!(saved_state(&mut second, 0xab), whole);
    assert_eq!(
        engine_op(&mut second, FILL, 0, 0, PAGE, 0),
        libc::EFAULT as u64,
        "RUNNING: the op runs (and faults, nothing is mapped) instead of EBUSY"
    );
}
