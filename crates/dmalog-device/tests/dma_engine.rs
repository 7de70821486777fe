//! dma-engine in process: register map, ops, faults, logging, the workload, migration.

use std::sync::Arc;

use dmalog::uapi::DeviceState;
use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver};
use dmalog_device::dma_engine::{fnv1a, op, reg, workload_write, FNV_OFFSET, MAGIC};
use dmalog_device::{
    Device, DmaBacking, DmaEngine, DmaRegion, DmaSpace, MigrationMachine, SharedMapping,
};

const PAGE: u64 = 4096;
const GUEST: u64 = 1 << 20;

struct Rig {
    engine: DmaEngine,
    space: DmaSpace,
    tracker: InProcessTracker<SoftDriver>,
    memory: SharedMapping,
}

fn rig() -> Rig {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, GUEST).unwrap();
    let driver = SoftDriver::new();
    let space = DmaSpace::new(Arc::clone(driver.live_log()));
    let mapping = SharedMapping::map(&fd, 0, GUEST as usize, true).unwrap();
    space
        .map(DmaRegion {
            iova: 0,
            size: GUEST,
            readable: true,
            writable: true,
            backing: DmaBacking::Mapped(Arc::new(mapping)),
        })
        .unwrap();
    let memory = SharedMapping::map(&fd, 0, GUEST as usize, false).unwrap();
    Rig {
        engine: DmaEngine::new(&space),
        space,
        tracker: InProcessTracker::new(driver),
        memory,
    }
}

fn write(engine: &mut DmaEngine, offset: u64, value: u64) {
    engine
        .region_write(0, offset, &value.to_le_bytes())
        .unwrap();
}

fn read(engine: &mut DmaEngine, offset: u64) -> u64 {
    let mut out = [0u8; 8];
    engine.region_read(0, offset, &mut out).unwrap();
    u64::from_le_bytes(out)
}

fn dirty_pages(tracker: &mut InProcessTracker<SoftDriver>) -> Vec<u64> {
    let mut bitmap = vec![0u64; (GUEST / PAGE / 64) as usize];
    tracker
        .report(IovaRange::new(0, GUEST).unwrap(), PAGE, &mut bitmap)
        .unwrap();
    (0..GUEST / PAGE)
        .filter(|p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect()
}

#[test]
fn registers_ops_and_faults() {
    let mut r = rig();
    assert_eq!(read(&mut r.engine, reg::MAGIC), MAGIC);
    assert!(
        r.engine.region_read(0, 4, &mut [0u8; 8]).is_err(),
        "unaligned"
    );
    assert!(
        r.engine.region_read(0, 0, &mut [0u8; 4]).is_err(),
        "not 8 bytes"
    );
    let mut config = [0u8; 4];
    r.engine.region_read(7, 0, &mut config).unwrap();
    assert_eq!(config, [0x36, 0x1b, 0xd1, 0x10]);
    r.tracker
        .start(&[IovaRange::new(0, GUEST).unwrap()], PAGE)
        .unwrap();

    // FILL 100 bytes at 0x2000: word k = PATTERN + k, the last word cut to 4 bytes.
    for (o, v) in [
        (reg::DST, 0x2000),
        (reg::LEN, 100),
        (reg::PATTERN, 0x1000),
        (reg::OP, op::FILL),
    ] {
        write(&mut r.engine, o, v);
    }
    write(&mut r.engine, reg::DOORBELL, 1);
    assert_eq!(read(&mut r.engine, reg::STATUS), 0);
    let mut bytes = [0u8; 104];
    r.memory.read(0x2000, &mut bytes);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 0x1001);
    assert_eq!(&bytes[96..100], &0x100cu64.to_le_bytes()[..4]);
    assert_eq!(&bytes[100..104], &[0, 0, 0, 0], "the partial word is cut");
    assert_eq!(dirty_pages(&mut r.tracker), vec![2]);

    // COPY it to 0x5ff0 (two pages), then READ both copies: same hash.
    for (o, v) in [(reg::SRC, 0x2000), (reg::DST, 0x5ff0), (reg::OP, op::COPY)] {
        write(&mut r.engine, o, v);
    }
    write(&mut r.engine, reg::DOORBELL, 1);
    assert_eq!(dirty_pages(&mut r.tracker), vec![5, 6]);
    let mut hashes = Vec::new();
    for src in [0x2000u64, 0x5ff0] {
        for (o, v) in [(reg::SRC, src), (reg::OP, op::READ)] {
            write(&mut r.engine, o, v);
        }
        write(&mut r.engine, reg::DOORBELL, 1);
        hashes.push(read(&mut r.engine, reg::RESULT));
    }
    r.memory.read(0x2000, &mut bytes[..100]);
    assert_eq!(hashes, vec![fnv1a(FNV_OFFSET, &bytes[..100]); 2]);
    assert!(dirty_pages(&mut r.tracker).is_empty(), "READ never dirties");

    // A FILL running off the end of the mapping: EFAULT, the bytes before written and logged.
    for (o, v) in [(reg::DST, GUEST - 16), (reg::LEN, 64), (reg::OP, op::FILL)] {
        write(&mut r.engine, o, v);
    }
    let before = read(&mut r.engine, reg::BYTES_WRITTEN);
    write(&mut r.engine, reg::DOORBELL, 1);
    assert_eq!(read(&mut r.engine, reg::STATUS), libc::EFAULT as u64);
    assert_eq!(read(&mut r.engine, reg::BYTES_WRITTEN) - before, 16);
    assert_eq!(dirty_pages(&mut r.tracker), vec![GUEST / PAGE - 1]);
    assert_eq!(read(&mut r.engine, reg::OPS_DONE), 5);
    drop(r.space);
}

#[test]
fn the_workload_migrates_and_continues_identically() {
    let mut src = rig();
    let (base, span, size, seed) = (0x10000u64, 0x40000u64, 512u64, 42u64);
    for (o, v) in [
        (reg::WL_BASE, base),
        (reg::WL_SPAN, span),
        (reg::WL_SIZE, size),
        (reg::WL_SEED, seed),
        (reg::WL_CTRL, 1),
    ] {
        write(&mut src.engine, o, v);
    }
    while read(&mut src.engine, reg::WL_WRITES) < 200 {
        std::thread::yield_now();
    }
    // Migrate: PRE_COPY, STOP_COPY (no DMA after this returns), read the state.
    let mut machine = MigrationMachine::default();
    machine
        .set_state(&mut src.engine, DeviceState::PreCopy)
        .unwrap();
    machine
        .set_state(&mut src.engine, DeviceState::StopCopy)
        .unwrap();
    let stopped_at = read(&mut src.engine, reg::WL_WRITES);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        read(&mut src.engine, reg::WL_WRITES),
        stopped_at,
        "no DMA in STOP_COPY"
    );
    let mut state = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let n = machine.read_data(&mut src.engine, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        state.extend_from_slice(&buf[..n]);
    }
    assert!(
        machine.write_data(&mut src.engine, &state).is_err(),
        "MIG_DATA_WRITE outside RESUMING"
    );
    // Every write so far is where the sequence says.
    let expected = |k: u64| workload_write(base, span, size, seed, k).unwrap();
    let (iova, first) = expected(stopped_at - 1);
    let mut word = [0u8; 8];
    src.memory.read(iova as usize + 8, &mut word);
    assert_eq!(u64::from_le_bytes(word), first + 1);

    // Destination: RESUMING, load, RUNNING: the workload goes on from the same position.
    let mut dst = rig();
    let mut dst_machine = MigrationMachine::default();
    dst_machine
        .set_state(&mut dst.engine, DeviceState::Resuming)
        .unwrap();
    assert!(
        dst_machine.read_data(&mut dst.engine, &mut buf).is_err(),
        "MIG_DATA_READ outside saving states"
    );
    dst_machine
        .write_data(&mut dst.engine, &state[..10])
        .unwrap();
    assert!(
        dst_machine
            .set_state(&mut dst.engine, DeviceState::Stop)
            .is_err(),
        "incomplete state fails RESUMING -> STOP"
    );
    let mut dst = rig();
    let mut dst_machine = MigrationMachine::default();
    dst_machine
        .set_state(&mut dst.engine, DeviceState::Resuming)
        .unwrap();
    dst_machine.write_data(&mut dst.engine, &state).unwrap();
    dst_machine
        .set_state(&mut dst.engine, DeviceState::Stop)
        .unwrap();
    assert_eq!(read(&mut dst.engine, reg::WL_WRITES), stopped_at);
    assert_eq!(read(&mut dst.engine, reg::WL_SEED), seed);
    dst_machine
        .set_state(&mut dst.engine, DeviceState::Running)
        .unwrap();
    while read(&mut dst.engine, reg::WL_WRITES) < stopped_at + 50 {
        std::thread::yield_now();
    }
    dst_machine
        .set_state(&mut dst.engine, DeviceState::Stop)
        .unwrap();
    let last = read(&mut dst.engine, reg::WL_WRITES) - 1;
    let (iova, first) = expected(last);
    dst.memory.read(iova as usize + 16, &mut word);
    assert_eq!(
        u64::from_le_bytes(word),
        first + 2,
        "write k = {last} continues the sequence"
    );
}
