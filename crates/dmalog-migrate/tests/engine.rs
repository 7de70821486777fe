//! The engine in process with a fake device (soft-tracked DMA, migration data in memory):
//! a migration over a socket pair verifies; a corrupt or truncated stream fails loudly on
//! the destination; a destination that dies leaves the source running with logging off.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use dmalog::uapi::DeviceState;
mod common;

use common::{config, cpu_log, run_destination, spawn_destination, FakeDevice, LAYOUT};
use dmalog_migrate::stream::{pages_payload, FrameReader, FrameWriter, Kind};
use dmalog_migrate::{memfd_guest_untracked, migrate_source, GuestPages, MigrateError, SourceVm};

#[test]
fn a_migration_over_a_socket_pair_verifies() {
    let src_memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    src_memory.write_at(4096, &[7u8; 100]);
    let (mut device, mut dma) = FakeDevice::new(vec![3u8; 5000]);
    let (mut cpu, _) = cpu_log();
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    // The device writes while the migration runs (logged through its recorder).
    let writer_memory = Arc::clone(&src_memory);
    let vm = SourceVm {
        memory: &src_memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let mut rounds = 0;
    let report = migrate_source(&config(), vm, &mut out, &mut replies, |round| {
        if !round.final_round {
            rounds += 1;
            writer_memory.write_at((1 << 32) + 8192, &[rounds as u8; 100]);
            dma.record_write((1 << 32) + 8192, 100);
        }
    })
    .unwrap();
    assert!(report.verified);
    let (dst, memory, dst_device) = destination.join().unwrap();
    assert!(dst.unwrap().verified);
    let mut page = [0u8; 100];
    memory.read_at((1 << 32) + 8192, &mut page);
    assert_eq!(
        dst_device.loaded.len(),
        5000 * 2,
        "PRE_COPY and STOP_COPY data"
    );
    assert_eq!(dst_device.state, DeviceState::Running);
    assert!(
        page.iter().all(|&b| b == page[0] && b > 0),
        "the last device write arrived"
    );
    assert_eq!(
        device.state,
        DeviceState::Stop,
        "the source device stays stopped"
    );
    assert!(!device.logging);
}

#[test]
fn a_corrupt_or_truncated_stream_fails_loudly() {
    let mut good = FrameWriter::new(Vec::new(), None);
    let hello = common::hello(&LAYOUT);
    good.write(Kind::Hello, &[&hello]).unwrap();
    // A flip in the run table (the checksum covers it; page bytes rely on TCP/TLS).
    good.write(Kind::Pages, &[&pages_payload(&[(0, 1, 0)], &[9u8; 4096])])
        .unwrap();
    let bytes = good.get_mut().clone();
    let run = |stream: &[u8]| {
        run_destination(
            &mut FrameReader::new(stream),
            &mut FrameWriter::new(Vec::new(), None),
        )
        .0
    };
    let mut corrupt = bytes.clone();
    // A byte of the run's guest address.
    let gpa_byte = corrupt.len() - 4096 - 16 + 2;
    corrupt[gpa_byte] ^= 0xff;
    assert!(matches!(
        run(&corrupt),
        Err(MigrateError::Stream(
            dmalog_migrate::stream::StreamError::Checksum { .. }
        ))
    ));
    assert!(
        matches!(
            run(&bytes[..bytes.len() - 10]),
            Err(MigrateError::Stream(_))
        ),
        "truncated"
    );
    // The source gone before its End: said as such, not as an I/O error.
    let err = run(&bytes).unwrap_err();
    assert!(
        matches!(
            &err,
            MigrateError::Stream(dmalog_migrate::stream::StreamError::PeerClosed {
                peer: "source",
                ..
            })
        ),
        "ends before End: {err}"
    );
    assert!(
        err.to_string()
            .contains("the source closed the connection in the middle of the migration"),
        "{err}"
    );
    // Pages outside guest memory are refused.
    let mut outside = FrameWriter::new(Vec::new(), None);
    outside.write(Kind::Hello, &[&hello]).unwrap();
    outside
        .write(
            Kind::Pages,
            &[&pages_payload(&[(2u64 << 32, 1, 0)], &[9u8; 4096])],
        )
        .unwrap();
    assert!(run(outside.get_mut()).is_err());
}

#[test]
fn a_dead_destination_leaves_the_source_running_with_logging_off() {
    let memory = memfd_guest_untracked(&LAYOUT).unwrap();
    let (mut device, _) = FakeDevice::new(vec![1u8; 10]);
    let (mut cpu, _) = cpu_log();
    let (a, b) = UnixStream::pair().unwrap();
    drop(b); // the destination is gone
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let err = migrate_source(&config(), vm, &mut out, &mut replies, |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("the destination closed the connection in the middle of the migration"),
        "{err}"
    );
    assert_eq!(device.state, DeviceState::Running);
    assert!(!device.logging, "logging stopped");
    let _ = std::io::stdout().flush();
}

#[test]
fn range_plans() {
    let memory =
        memfd_guest_untracked(&[(0, 1 << 20), (2 << 20, 1 << 20), (1 << 32, 1 << 20)]).unwrap();
    let exact = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Exact, 256);
    assert_eq!(exact.len(), 3);
    let qemu = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Qemu, 256);
    let spans: Vec<(u64, u64)> = qemu.iter().map(|r| (r.iova(), r.end())).collect();
    assert_eq!(
        spans,
        vec![(0, 3 << 20), (1 << 32, (1 << 32) + (1 << 20))],
        "below and above 4 GiB, holes included"
    );
    let one = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Exact, 1);
    assert_eq!(
        (one[0].iova(), one[0].end()),
        (0, (1 << 32) + (1 << 20)),
        "clipped to the device's limit"
    );
}
