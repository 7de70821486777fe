//! A hostile client against `dmalog serve` (SPEC 8): numbers that reach a device's time
//! arithmetic, files that shrink under a DMA mapping or a region mmap. Each case must get a
//! clean answer (a reply, an errno, a STATUS) and leave the server serving.

mod common;

use dmalog::IovaRange;
use std::os::fd::{AsFd, OwnedFd};

use common::{engine_op, read_guest, reg, ServerProcess};
use dmalog::uapi::DeviceState;
use dmalog::MigrationDevice;
use rustix::fs::SealFlags;

const FILL: u64 = 1;
const READ: u64 = 3;
const MIB: u64 = 1 << 20;

fn memfd(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create(
        "hostile",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

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

#[test]
fn a_sealed_memfd_cannot_shrink_and_fill_works() {
    let mut server = ServerProcess::start("soft");
    let mut client = server.connect();
    let memory = memfd(MIB);
    rustix::fs::fcntl_add_seals(&memory, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    client
        .dma_map(
            IovaRange::new(0x10_0000, MIB).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    assert!(
        rustix::fs::ftruncate(&memory, 0).is_err(),
        "a sealed file cannot shrink"
    );
    assert_eq!(engine_op(&mut client, FILL, 0x10_0000, 0, MIB, 7), 0);
    assert_eq!(
        read_guest(&memory, MIB - 8, 8),
        (7 + MIB / 8 - 1).to_le_bytes()
    );
    drop(client);
    assert_serving(&mut server, "sealed FILL");
}

#[test]
fn an_unsealed_memfd_shrunk_under_a_mapping_gives_efault_and_the_server_keeps_serving() {
    let mut server = ServerProcess::start("soft");
    let mut client = server.connect();
    let memory = memfd(MIB);
    client
        .dma_map(
            IovaRange::new(0x10_0000, MIB).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    // Touch it once while whole, so the server's mapping has pages to lose.
    assert_eq!(engine_op(&mut client, FILL, 0x10_0000, 0, MIB, 1), 0);
    let before = client.read_u64(0, reg::BYTES_WRITTEN).unwrap();
    rustix::fs::ftruncate(&memory, 256 << 10).unwrap();

    assert_eq!(
        engine_op(&mut client, FILL, 0x10_0000, 0, MIB, 9),
        libc::EFAULT as u64,
        "FILL past the new end of the file"
    );
    assert_eq!(
        client.read_u64(0, reg::BYTES_WRITTEN).unwrap() - before,
        256 << 10,
        "the bytes before the fault were written"
    );
    assert_eq!(
        read_guest(&memory, (256 << 10) - 8, 8),
        (9 + 32767u64).to_le_bytes()
    );
    assert_eq!(
        engine_op(&mut client, READ, 0, 0x10_0000 + (512 << 10), 4096, 0),
        libc::EFAULT as u64,
        "READ past the new end"
    );
    // A region that was never touched before the shrink faults the same way.
    let other = memfd(MIB);
    client
        .dma_map(
            IovaRange::new(0x40_0000, MIB).unwrap(),
            Some(other.as_fd()),
            0,
            true,
        )
        .unwrap();
    rustix::fs::ftruncate(&other, 0).unwrap();
    assert_eq!(
        engine_op(&mut client, FILL, 0x40_0000, 0, 4096, 1),
        libc::EFAULT as u64
    );
    assert_eq!(
        client.read_u64(0, reg::MAGIC).unwrap(),
        0x3130_474F_4C41_4D44
    );
    drop(client);
    assert_serving(&mut server, "FILL into a shrunk file");
}

#[test]
fn lvu_sample_bar1_fd_is_sealed_and_region_read_still_works() {
    let mut server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let mut client = server.connect();
    let bar1 = client.region_info(1).unwrap();
    let fd = bar1.fd.expect("BAR1 comes with an fd");
    let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
    assert!(
        seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL),
        "seals {seals:?}"
    );
    assert!(rustix::fs::ftruncate(&fd, 0).is_err(), "cannot shrink");
    assert!(rustix::fs::ftruncate(&fd, 1 << 30).is_err(), "cannot grow");
    client.region_write(1, 0x3000, &[0x5a; 64]).unwrap();
    let mut back = [0u8; 64];
    client.region_read(1, 0x3000, &mut back).unwrap();
    assert_eq!(back, [0x5a; 64]);
    drop(client);
    assert_serving(&mut server, "BAR1 after a shrink attempt");
}
