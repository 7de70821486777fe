//! lvu-sample across processes, in the order of libvfio-user's `samples/client.c`: IDs and
//! BAR1's sparse mmap, two one-page DMA regions, INTx through an eventfd, "log all" DMA
//! logging, the timer's direct and message DMA, REPORTs per region, and migration of BAR1
//! and BAR0 to a second server.

mod common;

use dmalog::IovaRange;
use std::os::fd::AsFd;
use std::time::Duration;

use common::{guest_memory, read_guest, ServerProcess};
use dmalog::uapi::DeviceState;
use dmalog::{DirtyTracker, MigrationDevice};

const PAGE: u64 = 4096;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn the_sample_client_sequence() {
    let server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let mut client = server.connect();
    let mut config = [0u8; 0x30];
    client.region_read(7, 0, &mut config).unwrap();
    assert_eq!(
        &config[0..4],
        &[0xad, 0xde, 0xef, 0xbe],
        "vendor 0xdead, device 0xbeef"
    );
    assert_eq!(
        &config[0x2c..0x30],
        &[0xfe, 0xca, 0xbe, 0xba],
        "subsystem 0xcafe:0xbabe"
    );
    let bar1 = client.region_info(1).unwrap();
    assert_eq!(bar1.info.size, 0x4000);
    assert_eq!(bar1.sparse_mmap, vec![(0, 0x1000), (0x2000, 0x1000)]);
    assert!(bar1.fd.is_some(), "BAR1 comes with an fd");
    client.reset().unwrap();

    // Two one-page regions from one file.
    let memory = guest_memory(2 * PAGE);
    client
        .dma_map(
            IovaRange::new(0x10000, PAGE).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    client
        .dma_map(
            IovaRange::new(0x20000, PAGE).unwrap(),
            Some(memory.as_fd()),
            PAGE,
            true,
        )
        .unwrap();
    let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    client.set_irq_eventfds(0, 0, &[eventfd.as_fd()]).unwrap();
    assert_eq!(
        client.start_logging(&[], PAGE).unwrap(),
        PAGE,
        "num_ranges 0: every mapped region"
    );

    // Arm the timer for now: it fires at once; serve the device's DMA messages.
    client.write_u64(0, 0, now() as u64).unwrap();
    let served = client.serve_requests(Duration::from_millis(500)).unwrap();
    assert_eq!(served, 6, "4 DMA_WRITE + 2 DMA_READ messages");
    let mut count = [0u8; 8];
    rustix::io::read(&eventfd, &mut count).unwrap();
    assert_eq!(u64::from_ne_bytes(count), 1, "INTx");
    assert_eq!(
        read_guest(&memory, 0, 1),
        vec![0xb0],
        "DMA_WRITE landed in region 0"
    );
    assert_eq!(
        read_guest(&memory, PAGE + 3 * 1024, 1),
        vec![0xa3],
        "direct write landed in region 1"
    );

    // Both regions are dirty: region 0 by the client (it served DMA_WRITE), region 1 by the
    // server's direct writes.
    for iova in [0x10000u64, 0x20000] {
        let mut bitmap = [0u64; 1];
        client
            .report(IovaRange::new(iova, PAGE).unwrap(), PAGE, &mut bitmap)
            .unwrap();
        assert_eq!(bitmap[0], 1, "region at {iova:#x}");
    }
    client.stop().unwrap();

    // BAR0 reads back the seconds since the deadline.
    assert!(client.read_u64(0, 0).unwrap() < 5);

    // Migration: BAR1 in PRE_COPY (16 reads of 1 KiB), BAR1 + BAR0 in STOP_COPY.
    let pattern: Vec<u8> = (0..0x4000u32).map(|i| (i * 31) as u8).collect();
    client.region_write(1, 0, &pattern[..0x2000]).unwrap();
    client.region_write(1, 0x2000, &pattern[0x2000..]).unwrap();
    client.write_u64(0, 0, (now() + 3600) as u64).unwrap();
    client.set_device_state(DeviceState::PreCopy).unwrap();
    let mut stream = Vec::new();
    let mut reads = 0;
    let mut chunk = [0u8; 1024];
    loop {
        let n = client.read_migration_data(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        reads += 1;
        stream.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(reads, 16);
    client.set_device_state(DeviceState::StopCopy).unwrap();
    loop {
        let n = client.read_migration_data(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(stream.len(), 0x4000 + 0x4000 + 8);
    client.set_device_state(DeviceState::Stop).unwrap();

    let dst_server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let mut dst = dst_server.connect();
    dst.set_device_state(DeviceState::Resuming).unwrap();
    dst.write_migration_data(&stream).unwrap();
    dst.set_device_state(DeviceState::Stop).unwrap();
    let mut bar1 = vec![0u8; 0x4000];
    dst.region_read(1, 0, &mut bar1[..0x2000]).unwrap();
    dst.region_read(1, 0x2000, &mut bar1[0x2000..]).unwrap();
    assert_eq!(bar1, pattern, "BAR1 moved");
    dst.set_device_state(DeviceState::Running).unwrap();
    assert!(
        (dst.read_u64(0, 0).unwrap() as i64) < 0,
        "BAR0's deadline moved (an hour ahead)"
    );
    client.dma_unmap_all().unwrap();
}
