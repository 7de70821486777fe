//! A hostile client against `dmalog serve` (SPEC 8): numbers that reach a device's time
//! arithmetic, files that shrink under a DMA mapping or a region mmap. Each case must get a
//! clean answer (a reply, an errno, a STATUS) and leave the server serving.

mod common;

use common::ServerProcess;
use dmalog::uapi::DeviceState;
use dmalog::MigrationDevice;

/// The server process is alive and answers a request.
fn assert_serving(server: &mut ServerProcess, what: &str) {
    assert!(server.is_running(), "the server died: {what}");
    let mut client = server.connect();
    client.device_info().expect("the server answers");
}

#[test]
fn extreme_time_t_in_lvu_sample_bar0_is_answered_and_the_server_keeps_serving() {
    let mut server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    for value in [i64::MAX, i64::MIN, i64::MAX - 1, -1, i64::MIN / 2, 1 << 62] {
        let mut client = server.connect();
        let written = client.write_u64(0, 0, value as u64);
        // Either the write is taken (a deadline too far to arm means no timer) or refused.
        if let Err(err) = &written {
            assert_eq!(err.errno(), libc::EINVAL, "time_t {value}: {err:?}");
        }
        // The server answers the next message on the same connection: BAR0 reads back.
        client
            .read_u64(0, 0)
            .unwrap_or_else(|e| panic!("time_t {value}: {e:?}"));
        drop(client);
        assert_serving(&mut server, &format!("time_t {value}"));
    }
}

#[test]
fn extreme_time_t_in_lvu_sample_migration_state_is_refused_or_harmless() {
    let mut server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    for value in [i64::MAX, i64::MIN] {
        let mut client = server.connect();
        client.set_device_state(DeviceState::Resuming).unwrap();
        let mut stream = vec![0u8; 0x4000];
        stream.extend_from_slice(&value.to_le_bytes());
        client.write_migration_data(&stream).unwrap();
        // RESUMING -> STOP decodes the state; STOP -> RUNNING arms the timer from it.
        let to_stop = client.set_device_state(DeviceState::Stop);
        if to_stop.is_ok() {
            let _ = client.set_device_state(DeviceState::Running);
        }
        client
            .read_u64(0, 0)
            .unwrap_or_else(|e| panic!("time_t {value}: {e:?}"));
        client.reset().unwrap();
        drop(client);
        assert_serving(&mut server, &format!("migrated time_t {value}"));
    }
}
