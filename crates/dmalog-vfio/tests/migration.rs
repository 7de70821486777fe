//! Migration v2 through the kernel consumer: the source side of a pre-copy migration (DMA
//! logging rounds, PRE_COPY data with PRECOPY_INFO, STOP_COPY, the final report) and the
//! destination (RESUMING, data written through the data fd, STOP validates it), over the
//! test seam with a real data fd.

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{DirtyTracker, IovaRange, LoggingCore, MigrationDevice, SoftDriver};
use dmalog_vfio::fake::{FakeMigration, FakeVfioDevice};
use dmalog_vfio::VfioDevice;

const PAGE: u64 = 4096;

fn device(
    initial: Vec<u8>,
    final_part: Vec<u8>,
) -> (
    VfioDevice<FakeVfioDevice<SoftDriver>>,
    dmalog::WriteRecorder,
) {
    let driver = SoftDriver::new();
    let writes = driver.recorder();
    let migration = FakeMigration::new(
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        initial,
        final_part,
    );
    (
        VfioDevice::new(FakeVfioDevice::new(
            LoggingCore::new(driver),
            Some(migration),
        )),
        writes,
    )
}

fn drain(dev: &mut dyn MigrationDevice, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = dev.read_migration_data(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn source_and_destination_of_a_precopy_migration() {
    let initial: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let final_part: Vec<u8> = (0..5_000u32).map(|i| (i * 13) as u8).collect();
    let (mut src, mut dma) = device(initial.clone(), final_part.clone());
    assert_eq!(
        MigrationDevice::migration_flags(&mut src).unwrap(),
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    );
    assert_eq!(
        MigrationDevice::device_state(&mut src).unwrap(),
        DeviceState::Running
    );

    // Dirty tracking on; round 0 would send everything.
    let guest = IovaRange::new(0, 1 << 30).unwrap();
    let page = DirtyTracker::start(&mut src, &[guest], PAGE).unwrap();
    let mut bitmap = vec![0u64; dmalog::tracker::report_words(1 << 30, page).unwrap() as usize];

    // PRE_COPY: the initial data, with PRECOPY_INFO counting down.
    MigrationDevice::set_device_state(&mut src, DeviceState::PreCopy).unwrap();
    let pending = src.pending_migration_bytes().unwrap().unwrap();
    assert_eq!(pending.initial_bytes, initial.len() as u64);
    let mut sent = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let n = MigrationDevice::read_migration_data(&mut src, &mut buf).unwrap();
    sent.extend_from_slice(&buf[..n]);
    assert_eq!(
        src.pending_migration_bytes()
            .unwrap()
            .unwrap()
            .initial_bytes,
        (initial.len() - n) as u64
    );
    // Rounds: the device keeps writing; each round reports and clears.
    for round in 0..3u64 {
        dma.record_write(round * (1 << 20), 3 * PAGE);
        bitmap.fill(0);
        src.report(IovaRange::new(0, 1 << 30).unwrap(), page, &mut bitmap)
            .unwrap();
        let dirty: u32 = bitmap.iter().map(|w| w.count_ones()).sum();
        assert_eq!(dirty, 3, "round {round}");
    }
    sent.extend(drain(&mut src, 64 << 10));
    assert_eq!(
        sent, initial,
        "PRE_COPY delivers the initial data, then nothing more now"
    );
    assert_eq!(
        src.pending_migration_bytes()
            .unwrap()
            .unwrap()
            .initial_bytes,
        0
    );

    // STOP_COPY: no more DMA; the final report, then the rest of the state until EOF.
    MigrationDevice::set_device_state(&mut src, DeviceState::StopCopy).unwrap();
    bitmap.fill(0);
    src.report(IovaRange::new(0, 1 << 30).unwrap(), page, &mut bitmap)
        .unwrap();
    assert!(
        bitmap.iter().all(|&w| w == 0),
        "nothing written since the last round"
    );
    sent.extend(drain(&mut src, 4096));
    assert_eq!(sent.len(), initial.len() + final_part.len());
    MigrationDevice::set_device_state(&mut src, DeviceState::Stop).unwrap();
    DirtyTracker::stop(&mut src).unwrap();

    // Destination: RESUMING, write, STOP (the device checks the image), RUNNING.
    let (mut dst, _) = device(initial.clone(), final_part.clone());
    MigrationDevice::set_device_state(&mut dst, DeviceState::Resuming).unwrap();
    for chunk in sent.chunks(100_000) {
        MigrationDevice::write_migration_data(&mut dst, chunk).unwrap();
    }
    MigrationDevice::set_device_state(&mut dst, DeviceState::Running).unwrap();
    let fake = dst.ioctl().migration.as_ref().unwrap();
    assert_eq!(fake.loaded.as_deref(), Some(sent.as_slice()));
    use DeviceState::*;
    assert_eq!(
        fake.arcs,
        vec![
            (Running, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
            (Stop, Running)
        ]
    );
}

#[test]
fn incomplete_state_fails_resuming_and_paths_avoid_saving_states() {
    let (mut dst, _) = device(vec![1; 100], vec![2; 10]);
    MigrationDevice::set_device_state(&mut dst, DeviceState::Resuming).unwrap();
    MigrationDevice::write_migration_data(&mut dst, &[1; 50]).unwrap();
    let err = MigrationDevice::set_device_state(&mut dst, DeviceState::Stop).unwrap_err();
    assert_eq!(
        err.errno(),
        libc::EINVAL,
        "incomplete data fails RESUMING -> STOP"
    );

    let (mut dev, _) = device(vec![1; 10], vec![2; 10]);
    MigrationDevice::set_device_state(&mut dev, DeviceState::PreCopy).unwrap();
    // PRE_COPY -> STOP goes through RUNNING, not through STOP_COPY.
    MigrationDevice::set_device_state(&mut dev, DeviceState::Stop).unwrap();
    use DeviceState::*;
    assert_eq!(
        dev.ioctl().migration.as_ref().unwrap().arcs,
        vec![(Running, PreCopy), (PreCopy, Running), (Running, Stop)]
    );
    MigrationDevice::set_device_state(&mut dev, DeviceState::StopCopy).unwrap();
    assert_eq!(
        MigrationDevice::set_device_state(&mut dev, DeviceState::PreCopy)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(MigrationDevice::device_state(&mut dev).unwrap(), StopCopy);
    // STOP_COPY reports the data size still to come.
    assert_eq!(
        dev.pending_migration_bytes().unwrap().unwrap().dirty_bytes,
        20
    );
    assert!(dev.read_migration_data(&mut [0u8; 0]).is_ok());
}
