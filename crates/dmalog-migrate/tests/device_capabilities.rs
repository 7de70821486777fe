//! The engine adapts to what the device offers: no PRE_COPY means its state moves only in
//! STOP_COPY; no DMA logging means the vCPU log still runs and device-mapped memory is
//! dirty every round; no STOP_COPY means it cannot migrate at all. The destination maps
//! guest memory before it loads the device state (a server may refuse DMA_MAP after).

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use dmalog::uapi::{DeviceState, MIGRATION_STOP_COPY};
mod common;

use common::{config, cpu_log, FakeDevice, LAYOUT};
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::{
    memfd_guest_untracked, migrate_destination, migrate_source, GuestPages, MigrateError,
    MigrationReport, SourceVm,
};

/// Migrates `device` to a fresh fake device; the vCPUs write one page between rounds.
/// Returns the source report and what the destination device loaded.
fn migrate(device: &mut FakeDevice) -> (Result<MigrationReport, MigrateError>, Vec<u8>) {
    let src_memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    let (mut cpu, mut vcpu_writes) = cpu_log();
    let (a, b) = UnixStream::pair().unwrap();
    let destination = std::thread::spawn(move || {
        let memory = memfd_guest_untracked(&LAYOUT).unwrap();
        let (mut device, _) = FakeDevice::new(Vec::new());
        let mut input = FrameReader::new(b.try_clone().unwrap());
        let mut out = FrameWriter::new(b, None);
        // As libvfio-user: no DMA_MAP once the device left RUNNING for the migration.
        let _ = migrate_destination(
            &memory,
            &mut device,
            &mut |device: &mut FakeDevice, _| match device.states.last() {
                None | Some(DeviceState::Running) => Ok(()),
                Some(state) => Err(format!("DMA_MAP refused in {state:?}")),
            },
            &mut input,
            &mut out,
        );
        device.loaded
    });
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    let writer_memory = Arc::clone(&src_memory);
    let vm = SourceVm {
        memory: &src_memory,
        device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let mut rounds = 0u8;
    let report = migrate_source(&config(), vm, &mut out, &mut replies, |round| {
        if !round.final_round {
            rounds = rounds.wrapping_add(1);
            writer_memory.write_at(3 * 4096, &[rounds; 64]);
            vcpu_writes.record_write(3 * 4096, 64);
        }
    });
    drop(out);
    drop(replies);
    (report, destination.join().unwrap())
}

#[test]
fn a_device_without_pre_copy_moves_its_state_in_stop_copy_only() {
    let image: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let (mut device, _) = FakeDevice::new(image.clone());
    device.flags = MIGRATION_STOP_COPY;
    let (report, loaded) = migrate(&mut device);
    let report = report.unwrap();
    assert!(report.verified);
    assert!(
        !device.states.contains(&DeviceState::PreCopy),
        "never asked for PRE_COPY: {:?}",
        device.states
    );
    assert_eq!(loaded, image, "the state once, from STOP_COPY");
    assert_eq!(report.device_bytes, image.len() as u64);
    assert!(!report.device_pre_copy);
    assert!(report.rounds.len() >= 2, "memory still pre-copies");
}

#[test]
fn a_device_with_pre_copy_sends_data_every_round_and_reports_the_total() {
    let (mut device, _) = FakeDevice::new(vec![9u8; 3000]);
    let (report, loaded) = migrate(&mut device);
    let report = report.unwrap();
    assert!(report.verified && report.device_pre_copy);
    assert_eq!(
        report.device_bytes,
        report.rounds.iter().map(|r| r.device_bytes).sum::<u64>()
    );
    assert_eq!(report.device_bytes, loaded.len() as u64);
    assert_eq!(
        report.rounds[0].device_bytes, 3000,
        "round 0 reads PRE_COPY data"
    );
}

#[test]
fn a_device_without_dma_logging_keeps_the_vcpu_log() {
    let (mut device, _) = FakeDevice::new(vec![1u8; 100]);
    device.can_log = false;
    let (report, _) = migrate(&mut device);
    let report = report.unwrap();
    assert!(report.verified);
    assert!(!report.device_tracking);
    assert_eq!(device.starts, 0, "no START to a device that has no logging");
    // The device's memory is all dirty; the vCPU log still reports the page they wrote
    // (after each round: from round 2 on, as round 1's REPORTs are taken while round 0
    // still sends).
    let later = &report.rounds[2..report.rounds.len() - 1];
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|r| r.pages_both >= 1),
        "the vCPU page is seen by both sources: {later:?}"
    );
}

#[test]
fn a_device_without_stop_copy_cannot_migrate() {
    let (mut device, _) = FakeDevice::new(vec![1u8; 100]);
    device.flags = 0;
    let (report, _) = migrate(&mut device);
    let err = report.unwrap_err();
    assert!(err.to_string().contains("STOP_COPY"), "{err}");
    assert_eq!(device.state, DeviceState::Running);
    assert!(!device.logging);
}
