//! Peer-chosen numbers reaching the emulated devices (SPEC 8, first row): every register,
//! region offset and migration state field, at its extremes. Each case ends in a value or a
//! clean error, never a panic, a huge allocation or a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmalog::uapi::DeviceState;
use dmalog::SoftDriver;
use dmalog_device::dma_engine::{op, reg, STATE_RECORD_BYTES};
use dmalog_device::{
    Device, DeviceError, DmaBacking, DmaEngine, DmaRegion, DmaSpace, LvuSample, MessageDma,
    MigrationMachine, SharedMapping,
};

const EXTREMES: [u64; 9] = [
    0,
    1,
    3,
    0x1000,
    1 << 32,
    1 << 63,
    u64::MAX - 7,
    u64::MAX - 1,
    u64::MAX,
];

fn space_with(regions: &[(u64, u64)]) -> DmaSpace {
    let driver = SoftDriver::new();
    let space = DmaSpace::new(Arc::clone(driver.live_log()));
    for &(iova, size) in regions {
        let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        let mapping = SharedMapping::map(&fd, 0, size as usize, true).unwrap();
        space
            .map(DmaRegion {
                iova,
                size,
                readable: true,
                writable: true,
                backing: DmaBacking::Mapped(Arc::new(mapping)),
            })
            .unwrap();
    }
    space
}

fn write(device: &mut dyn Device, offset: u64, value: u64) {
    device
        .region_write(0, offset, &value.to_le_bytes())
        .unwrap();
}

fn read(device: &mut dyn Device, offset: u64) -> u64 {
    let mut out = [0u8; 8];
    device.region_read(0, offset, &mut out).unwrap();
    u64::from_le_bytes(out)
}

/// Message DMA that refuses everything (the timer's message half is not under test).
struct NoMessages;

impl MessageDma for NoMessages {
    fn dma_read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Io("no connection"))
    }
    fn dma_write(&mut self, _: u64, _: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Io("no connection"))
    }
}

#[test]
fn lvu_sample_bar0_takes_any_time_t() {
    let space = space_with(&[]);
    let mut device = LvuSample::new(&space).unwrap();
    for value in [
        i64::MAX,
        i64::MIN,
        i64::MAX - 1,
        i64::MIN + 1,
        -1,
        1,
        1 << 62,
    ] {
        write(&mut device, 0, value as u64);
        let deadline = device.next_event();
        if value < 1_000_000 {
            // Long past: fires at once.
            assert!(
                deadline.is_some_and(|d| d <= Instant::now()),
                "{value}: {deadline:?}"
            );
        } else if value > 1 << 40 {
            assert_eq!(deadline, None, "{value}: too far ahead to arm");
        }
        // The read is saturating seconds since the deadline.
        let since = read(&mut device, 0) as i64;
        if value == i64::MIN {
            assert_eq!(since, i64::MAX);
        }
        if value == i64::MAX {
            assert!(since < 0);
        }
    }
    // A time an hour ahead still arms normally.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    write(&mut device, 0, (now + 3600) as u64);
    let deadline = device.next_event().expect("armed");
    assert!(deadline > Instant::now() + Duration::from_secs(3500));
}

#[test]
fn lvu_sample_migration_state_with_any_time_t() {
    for value in [i64::MAX, i64::MIN, -1] {
        let space = space_with(&[]);
        let mut device = LvuSample::new(&space).unwrap();
        let mut machine = MigrationMachine::default();
        machine
            .set_state(&mut device, DeviceState::Resuming)
            .unwrap();
        let mut stream = vec![0u8; 0x4000];
        stream.extend_from_slice(&value.to_le_bytes());
        machine.write_data(&mut device, &stream).unwrap();
        machine
            .set_state(&mut device, DeviceState::Running)
            .unwrap();
        let _ = device.next_event();
        read(&mut device, 0);
    }
}

#[test]
fn lvu_sample_timer_dma_at_the_top_of_the_iova_space() {
    // Two tiny mappings at the very top: the timer's 4 x 1 KiB writes would step past 2^64.
    let space = space_with(&[(u64::MAX - 0x2000, 0x1000), (u64::MAX - 1, 1)]);
    let mut device = LvuSample::new(&space).unwrap();
    write(&mut device, 0, 1);
    device.run_event(&mut NoMessages);
    assert_eq!(device.expiry.expiries, 1);
    assert!(!device.expiry.errors.is_empty(), "the steps past 2^64 fail");
}

#[test]
fn region_offsets_and_counts_at_their_extremes_are_errors() {
    let space = space_with(&[]);
    let mut devices: Vec<Box<dyn Device>> = vec![
        Box::new(DmaEngine::new(&space)),
        Box::new(LvuSample::new(&space).unwrap()),
    ];
    for device in &mut devices {
        for index in [0u32, 1, 7, 8, 9, u32::MAX] {
            for offset in [u64::MAX, u64::MAX - 7, 1 << 63, 0x4000, 0x3ffc] {
                let mut out = [0u8; 8];
                assert!(
                    device.region_read(index, offset, &mut out).is_err(),
                    "{} read {index} {offset:#x}",
                    device.name()
                );
                assert!(
                    device.region_write(index, offset, &out).is_err(),
                    "{} write {index} {offset:#x}",
                    device.name()
                );
            }
        }
    }
}

#[test]
fn dma_engine_ops_with_extreme_registers_end_in_a_status() {
    // 64 KiB mapped at 0 and 64 KiB at the top of the IOVA space.
    let space = space_with(&[(0, 0x1_0000), (u64::MAX - 0x1_0000, 0x1_0000)]);
    let mut engine = DmaEngine::new(&space);
    for op_code in [op::FILL, op::COPY, op::READ, 0, 4, u64::MAX] {
        for dst in EXTREMES {
            for len in EXTREMES {
                let src = dst.rotate_left(7);
                write(&mut engine, reg::DST, dst);
                write(&mut engine, reg::SRC, src);
                write(&mut engine, reg::LEN, len);
                write(&mut engine, reg::OP, op_code);
                write(&mut engine, reg::DOORBELL, 1);
                let status = read(&mut engine, reg::STATUS);
                assert!(
                    [0, libc::EFAULT as u64, libc::EINVAL as u64].contains(&status),
                    "op {op_code} dst {dst:#x} len {len:#x}: {status}"
                );
            }
        }
    }
    // LEN = 2^63 over a 64 KiB mapping: the mapping is written, then EFAULT.
    let before = read(&mut engine, reg::BYTES_WRITTEN);
    write(&mut engine, reg::DST, 0);
    write(&mut engine, reg::LEN, 1 << 63);
    write(&mut engine, reg::OP, op::FILL);
    write(&mut engine, reg::DOORBELL, 1);
    assert_eq!(read(&mut engine, reg::STATUS), libc::EFAULT as u64);
    assert_eq!(read(&mut engine, reg::BYTES_WRITTEN) - before, 0x1_0000);
}

#[test]
fn dma_engine_workload_with_extreme_registers_stops_or_runs() {
    let space = space_with(&[(0, 0x1_0000)]);
    let mut engine = DmaEngine::new(&space);
    for (base, span, size, rate) in [
        (0, 0x1_0000, 0, 0),
        (0, 0x1_0000, 3, 0),
        (0, 0x1_0000, 0x2_0000, 0),
        (0, 0x1_0000, u64::MAX, 0),
        (0, u64::MAX, 1 << 40, 0),
        (0, u64::MAX, u64::MAX, 0),
        (u64::MAX - 4095, u64::MAX, 4096, 0),
        (u64::MAX, 8, 8, 0),
        (0, 0x1_0000, 4096, 1),
        (0, 0x1_0000, 4096, u64::MAX),
    ] {
        write(&mut engine, reg::WL_BASE, base);
        write(&mut engine, reg::WL_SPAN, span);
        write(&mut engine, reg::WL_SIZE, size);
        write(&mut engine, reg::WL_RATE, rate);
        write(&mut engine, reg::WL_CTRL, 1);
        std::thread::sleep(Duration::from_millis(5));
        write(&mut engine, reg::WL_CTRL, 0);
        read(&mut engine, reg::WL_WRITES);
    }
}

#[test]
fn dma_engine_migration_state_with_extreme_counters() {
    let space = space_with(&[(0, 0x1_0000)]);
    // A record every register of which is u64::MAX (but the magic words).
    let mut record = Vec::with_capacity(STATE_RECORD_BYTES);
    record.extend_from_slice(b"DMAENGST");
    record.extend_from_slice(&dmalog_device::dma_engine::MAGIC.to_le_bytes());
    while record.len() < STATE_RECORD_BYTES {
        record.extend_from_slice(&u64::MAX.to_le_bytes());
    }
    let mut engine = DmaEngine::new(&space);
    let mut machine = MigrationMachine::default();
    machine
        .set_state(&mut engine, DeviceState::Resuming)
        .unwrap();
    machine.write_data(&mut engine, &record).unwrap();
    machine
        .set_state(&mut engine, DeviceState::Running)
        .unwrap();
    // The counters wrap instead of overflowing.
    write(&mut engine, reg::DST, 0);
    write(&mut engine, reg::LEN, 8);
    write(&mut engine, reg::OP, op::FILL);
    write(&mut engine, reg::DOORBELL, 1);
    assert_eq!(read(&mut engine, reg::STATUS), 0);
    assert_eq!(read(&mut engine, reg::OPS_DONE), 0, "u64::MAX + 1 wraps");
    read(&mut engine, reg::BYTES_WRITTEN);
    write(&mut engine, reg::WL_CTRL, 0);
}
