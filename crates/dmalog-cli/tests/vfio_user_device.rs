//! dma-engine driven across processes: ops and REPORTs, IRQs, the workload, disconnects,
//! and migration between two server processes.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;

use common::{engine_op, guest_memory, map_and_start_logging, read_guest, reg, ServerProcess};
use dmalog::uapi::DeviceState;
use dmalog::{DirtyTracker, IovaRange, MigrationDevice};

const PAGE: u64 = 4096;
const GUEST: u64 = 16 << 20;

fn dirty_pages(client: &mut dmalog_vfio_user::Client, length: u64) -> Vec<u64> {
    let mut bitmap = vec![0u64; dmalog::tracker::report_words(length, PAGE).unwrap() as usize];
    client
        .report(IovaRange::new(0, length).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    (0..length / PAGE)
        .filter(|p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect()
}

#[test]
fn ops_reports_irqs_and_faults() {
    let server = ServerProcess::start("soft");
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    let mut client = server.connect();
    let info = client.device_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let bar0 = client.region_info(0).unwrap();
    assert_eq!(bar0.info.size, 4096);
    assert!(bar0.fd.is_none());
    let mut config = [0u8; 4];
    client.region_read(7, 0, &mut config).unwrap();
    assert_eq!(config, [0x36, 0x1b, 0xd1, 0x10]);
    assert_eq!(
        client.read_u64(0, reg::MAGIC).unwrap(),
        0x3130_474F_4C41_4D44
    );
    assert_eq!(
        client.region_read(0, 4, &mut [0u8; 8]).unwrap_err().errno(),
        libc::EINVAL,
        "unaligned register"
    );
    assert_eq!(client.irq_info(2).unwrap().count, 0, "no MSI-X");

    let memory = guest_memory(GUEST);
    client
        .dma_map(
            IovaRange::new(0, GUEST).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    assert_eq!(
        client
            .dma_map(
                IovaRange::new(GUEST - PAGE, 2 * PAGE).unwrap(),
                Some(memory.as_fd()),
                0,
                true
            )
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert!(client.probe().unwrap());
    assert_eq!(
        client
            .start(&[IovaRange::new(0, GUEST).unwrap()], PAGE)
            .unwrap(),
        PAGE
    );

    // INTx through an eventfd after each op.
    let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    client.set_irq_eventfds(0, 0, &[eventfd.as_fd()]).unwrap();
    client.write_u64(0, 0x058, 1).unwrap();

    assert_eq!(engine_op(&mut client, 1, 0x3000, 0, 3 * PAGE, 7), 0, "FILL");
    assert_eq!(dirty_pages(&mut client, GUEST), vec![3, 4, 5]);
    let bytes = read_guest(&memory, 0x3000, 16);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 8);
    let mut count = [0u8; 8];
    rustix::io::read(&eventfd, &mut count).unwrap();
    assert_eq!(u64::from_ne_bytes(count), 1, "one interrupt");

    assert_eq!(
        engine_op(&mut client, 2, 0x10_0000, 0x3000, 100, 0),
        0,
        "COPY"
    );
    assert_eq!(
        read_guest(&memory, 0x10_0000, 100),
        read_guest(&memory, 0x3000, 100)
    );
    assert_eq!(engine_op(&mut client, 3, 0, 0x10_0000, 100, 0), 0, "READ");
    let result = client.read_u64(0, reg::RESULT).unwrap();
    let expected = read_guest(&memory, 0x3000, 100)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    assert_eq!(result, expected);
    assert_eq!(
        dirty_pages(&mut client, GUEST),
        vec![0x100],
        "COPY dirtied its destination, READ nothing"
    );

    // EFAULT at the end of the mapping; the bytes before it are written and reported.
    assert_eq!(
        engine_op(&mut client, 1, GUEST - 8, 0, 64, 0),
        libc::EFAULT as u64
    );
    assert_eq!(dirty_pages(&mut client, GUEST), vec![GUEST / PAGE - 1]);
    assert_eq!(client.read_u64(0, reg::OPS_DONE).unwrap(), 4);

    // A report larger than one message is split by the client: 64 GiB at 4 KiB is a 2 MiB
    // bitmap, above the 1 MiB max_data_xfer_size.
    let mut big = vec![0u64; dmalog::tracker::report_words(64 << 30, PAGE).unwrap() as usize];
    big[0] = 1;
    client
        .report(IovaRange::new(0, 64 << 30).unwrap(), PAGE, &mut big)
        .unwrap();
    assert_eq!(big[0], 1, "ORs into the caller's buffer");

    // The workload writes only inside its working set.
    for (offset, value) in [
        (reg::WL_BASE, 0x80_0000),
        (reg::WL_SPAN, 0x10_0000),
        (reg::WL_SIZE, 4096),
        (reg::WL_SEED, 5),
        (reg::WL_CTRL, 1),
    ] {
        client.write_u64(0, offset, value).unwrap();
    }
    while client.read_u64(0, reg::WL_WRITES).unwrap() < 100 {
        std::thread::yield_now();
    }
    client.write_u64(0, reg::WL_CTRL, 0).unwrap();
    let pages = dirty_pages(&mut client, GUEST);
    assert!(
        !pages.is_empty() && pages.iter().all(|p| (0x800..0x900).contains(p)),
        "{pages:?}"
    );
}

#[test]
fn a_disconnect_stops_logging_and_unmaps_everything() {
    let server = ServerProcess::start("soft");
    let memory = guest_memory(GUEST);
    {
        let mut client = server.connect();
        map_and_start_logging(&mut client, &memory, GUEST, PAGE);
    }
    let mut client = server.connect();
    // Logging was stopped: REPORT is EINVAL; the mapping is gone: the same DMA_MAP works.
    let mut bitmap = [0u64; 1];
    assert_eq!(
        client
            .report(IovaRange::new(0, 64 * PAGE).unwrap(), PAGE, &mut bitmap)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    client
        .dma_map(
            IovaRange::new(0, GUEST).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    client
        .dma_unmap(IovaRange::new(0, PAGE).unwrap())
        .unwrap_err();
    client.dma_unmap(IovaRange::new(0, GUEST).unwrap()).unwrap();
    client.dma_unmap_all().unwrap();
}

#[test]
fn migration_between_two_server_processes() {
    let memory_src = guest_memory(GUEST);
    let src_server = ServerProcess::start("soft");
    let mut src = src_server.connect();
    src.dma_map(
        IovaRange::new(0, GUEST).unwrap(),
        Some(memory_src.as_fd()),
        0,
        true,
    )
    .unwrap();
    let (base, span, size, seed) = (0x10_0000u64, 0x40_0000u64, 8192u64, 99u64);
    for (offset, value) in [
        (reg::WL_BASE, base),
        (reg::WL_SPAN, span),
        (reg::WL_SIZE, size),
        (reg::WL_SEED, seed),
        (reg::WL_CTRL, 1),
    ] {
        src.write_u64(0, offset, value).unwrap();
    }
    assert_eq!(
        MigrationDevice::migration_flags(&mut src).unwrap(),
        5,
        "STOP_COPY | PRE_COPY"
    );
    src.start(&[IovaRange::new(0, GUEST).unwrap()], PAGE)
        .unwrap();
    while src.read_u64(0, reg::WL_WRITES).unwrap() < 100 {
        std::thread::yield_now();
    }
    src.set_device_state(DeviceState::PreCopy).unwrap();
    let mut pre = vec![0u8; 4096];
    let n = src.read_migration_data(&mut pre).unwrap();
    assert!(n > 0, "PRE_COPY data");
    src.set_device_state(DeviceState::StopCopy).unwrap();
    let stopped_at = src.read_u64(0, reg::WL_WRITES).unwrap();
    let mut state = pre[..n].to_vec();
    loop {
        let mut buf = vec![0u8; 64];
        let got = src.read_migration_data(&mut buf).unwrap();
        if got == 0 {
            break;
        }
        state.extend_from_slice(&buf[..got]);
    }
    assert_eq!(
        src.read_u64(0, reg::WL_WRITES).unwrap(),
        stopped_at,
        "no DMA in STOP_COPY"
    );
    // The final report, then guest memory moves with the device state.
    let _ = dirty_pages(&mut src, GUEST);
    src.set_device_state(DeviceState::Stop).unwrap();
    let memory_dst = guest_memory(GUEST);
    rustix::io::pwrite(&memory_dst, &read_guest(&memory_src, 0, GUEST as usize), 0).unwrap();

    let dst_server = ServerProcess::start("soft");
    let mut dst = dst_server.connect();
    dst.set_device_state(DeviceState::Resuming).unwrap();
    assert_eq!(
        dst.read_migration_data(&mut [0u8; 8]).unwrap_err().errno(),
        libc::EINVAL,
        "no MIG_DATA_READ in RESUMING"
    );
    dst.write_migration_data(&state).unwrap();
    dst.set_device_state(DeviceState::Stop).unwrap();
    dst.dma_map(
        IovaRange::new(0, GUEST).unwrap(),
        Some(memory_dst.as_fd()),
        0,
        true,
    )
    .unwrap();
    assert_eq!(dst.read_u64(0, reg::WL_WRITES).unwrap(), stopped_at);
    dst.set_device_state(DeviceState::Running).unwrap();
    while dst.read_u64(0, reg::WL_WRITES).unwrap() < stopped_at + 20 {
        std::thread::yield_now();
    }
    // The destination continued the source's sequence: its last write is the one the
    // (seed, count) sequence puts there.
    dst.set_device_state(DeviceState::Stop).unwrap();
    let last = dst.read_u64(0, reg::WL_WRITES).unwrap() - 1;
    assert!(last >= stopped_at);
    let (iova, first_word) =
        dmalog_device::dma_engine::workload_write(base, span, size, seed, last).unwrap();
    let bytes = read_guest(&memory_dst, iova, 16);
    assert_eq!(
        u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
        first_word + 1,
        "write {last}"
    );
    // And the source's last write before the migration is in the destination's memory too.
    let (iova, first_word) =
        dmalog_device::dma_engine::workload_write(base, span, size, seed, stopped_at - 1).unwrap();
    let bytes = read_guest(&memory_src, iova, 8);
    assert_eq!(u64::from_le_bytes(bytes.try_into().unwrap()), first_word);
    assert_eq!(
        MigrationDevice::device_state(&mut dst).unwrap(),
        DeviceState::Stop
    );
    assert_eq!(
        src.set_device_state(DeviceState::PreCopy)
            .map(|_| ())
            .and_then(|_| src.set_device_state(DeviceState::StopCopy))
            .and_then(|_| src.set_device_state(DeviceState::PreCopy))
            .unwrap_err()
            .errno(),
        libc::EINVAL,
        "STOP_COPY -> PRE_COPY"
    );
}

#[test]
fn inspect_reports_what_the_server_offers() {
    let server = ServerProcess::start("mlx5:tiny");
    server.wait_listening();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["inspect", "--json", "--log-check", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["num_regions"], 9);
    assert_eq!(json["regions"][0]["size"], 4096);
    assert_eq!(json["migration"]["pre_copy"], true);
    assert_eq!(json["dma_logging"], true);
    assert_eq!(json["log_check"]["page_size"], 4096);
    assert_eq!(json["log_check"]["dirty_pages"], 0);
    assert!(json["log_check"]["error"].is_null());
    let none = ServerProcess::start("none");
    none.wait_listening();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["inspect", "--json", "--socket"])
        .arg(&none.socket)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["dma_logging"], false);
}
