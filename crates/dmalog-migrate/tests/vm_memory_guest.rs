//! Guest memory from vm-memory: a rust-vmm style device writing the guest through
//! `GuestMemoryMmap<DmalogBitmap>` after START has its pages come out of the engine's vCPU
//! REPORT (`DirtyRegions::tracker`), sent, and verified on the destination.

use std::os::unix::net::UnixStream;

mod common;

use common::{config, source_guest, spawn_destination, FakeDevice, LAYOUT};
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use dmalog_migrate::{
    check_guest_memory, memfd_guest_untracked, migrate_source, GuestPages, LoggedGuestMemory,
    MigrateError, RoundStats, SourceVm,
};

/// Where the device writes: a descriptor-like object, a buffer, a `VolatileSlice` write, in
/// both regions, each on its own page.
const USED_RING_GPA: u64 = 3 * 4096 + 8;
const BUFFER_GPA: u64 = (1 << 32) + 5 * 4096;
const SLICE_GPA: u64 = (6 << 20) + 100;

/// What a virtio-style device does once the migration runs: it writes guest memory only
/// through vm-memory's API, as a rust-vmm device would (no dmalog call anywhere).
fn device_writes(memory: &LoggedGuestMemory) {
    memory
        .write_obj(0x1234_5678_9abc_def0u64, GuestAddress(USED_RING_GPA))
        .unwrap();
    memory
        .write_slice(&[0xa5; 4096], GuestAddress(BUFFER_GPA))
        .unwrap();
    memory
        .get_slice(GuestAddress(SLICE_GPA), 16)
        .unwrap()
        .write_slice(&[0x3c; 16], 0)
        .unwrap();
}

#[test]
fn vm_memory_writes_after_start_come_out_of_the_vcpu_report_and_verify() {
    let (memory, regions) = source_guest(&LAYOUT);
    let mut cpu = regions.tracker();
    let (mut device, _) = FakeDevice::new(vec![1u8; 64]);
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    let writer = std::sync::Arc::clone(&memory);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let mut rounds: Vec<RoundStats> = Vec::new();
    let report = migrate_source(&config(), vm, &mut out, &mut replies, |round| {
        if round.round == 0 {
            // After round 0 sent every page: only a REPORT can bring these to the
            // destination (the device's own tracker sees none of them).
            device_writes(&writer);
        }
        rounds.push(round.clone());
    })
    .unwrap();
    let after_round_0: u64 = rounds[1..].iter().map(|r| r.pages_cpu + r.pages_both).sum();
    assert!(
        after_round_0 >= 3,
        "the three written pages came out of the vCPU REPORT (rounds {rounds:?})"
    );
    assert_eq!(
        rounds[1..].iter().map(|r| r.pages_device).sum::<u64>(),
        0,
        "the device tracker saw none of them"
    );
    assert!(report.verified, "the source's hashes match");
    let (dst, dst_memory, _) = destination.join().unwrap();
    assert!(dst.unwrap().verified);
    let used: u64 = dst_memory.read_obj(GuestAddress(USED_RING_GPA)).unwrap();
    assert_eq!(used, 0x1234_5678_9abc_def0);
    let mut buffer = [0u8; 4096];
    assert!(dst_memory.read_at(BUFFER_GPA, &mut buffer));
    assert!(buffer.iter().all(|&b| b == 0xa5), "write_slice arrived");
    let mut slice = [0u8; 16];
    assert!(dst_memory.read_at(SLICE_GPA, &mut slice));
    assert_eq!(slice, [0x3c; 16], "the VolatileSlice write arrived");
}

#[test]
fn memfd_guest_regions_carry_their_sealed_files_and_pages_stay_inside() {
    let memory = memfd_guest_untracked(&LAYOUT).unwrap();
    let regions = memory.regions();
    assert_eq!(
        regions.iter().map(|r| (r.gpa, r.size)).collect::<Vec<_>>(),
        LAYOUT.to_vec()
    );
    for region in &regions {
        assert!(region.fd().is_some(), "DMA_MAP needs the fd");
        assert_eq!(region.file_offset(), 0);
    }
    assert!(check_guest_memory(&memory).is_ok());
    assert_eq!(memory.total_bytes(), (8 << 20) + (4 << 20));
    let end = 8 << 20;
    assert!(memory.piece(end - 4096, 4096).is_some());
    assert!(memory.piece(end - 4096, 4097).is_none(), "past the region");
    assert!(memory.piece(end, 1).is_none(), "in the hole");
    assert!(memory.piece_mut(u64::MAX, 1).is_none());
    assert_eq!(memory.is_zero(0, 4096), Some(true));
    assert!(memory.write_at(4095, &[1]));
    assert_eq!(memory.is_zero(0, 4096), Some(false));
    assert!(memory.zero_pages(0, 1, 4096));
    assert_eq!(memory.is_zero(0, 4096), Some(true));
    assert!(!memory.write_at(end - 1, &[1, 2]), "across the end");
    assert_eq!(
        memory.region_hashes(),
        memfd_guest_untracked(&LAYOUT).unwrap().region_hashes()
    );
}

#[test]
fn guest_memory_over_a_file_that_can_shrink_or_off_the_page_grid_is_refused() {
    use dmalog_migrate::vm_memory::{FileOffset, GuestMemoryMmap};
    // What a VMM might hand in: a plain (unsealed) memfd the device server could truncate.
    let fd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
    let file = FileOffset::new(std::fs::File::from(fd), 0);
    let memory: LoggedGuestMemory =
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), 1 << 20, Some(file))]).unwrap();
    assert_eq!(memory.num_regions(), 1);
    let err = check_guest_memory(&memory).unwrap_err();
    assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    // The destination refuses it before reading a byte or mapping anything.
    let (mut device, _) = FakeDevice::new(Vec::new());
    let mut input = FrameReader::new(&[][..]);
    let mut out = FrameWriter::new(Vec::new(), None);
    let mut mapped = false;
    let result = dmalog_migrate::migrate_destination(
        &memory,
        &mut device,
        &mut |_, _| {
            mapped = true;
            Ok(())
        },
        &mut input,
        &mut out,
    );
    assert!(matches!(result, Err(MigrateError::Memory(_))), "{result:?}");
    assert!(!mapped);

    // Anonymous memory is fine, but not off the 4 KiB grid.
    let anonymous: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 20), 8192)]).unwrap();
    assert!(check_guest_memory(&anonymous).is_ok());
    let off_grid: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x800), 8192)]).unwrap();
    let err = check_guest_memory(&off_grid).unwrap_err();
    assert!(err.to_string().contains("4 KiB"), "{err}");
}

/// Two regions in one sealed memfd, the second at file offset 1 MiB: `map_all` gives the
/// device each region's own offset, so a DMA at a GPA of the second region lands where the
/// VMM's vm-memory mapping of that GPA reads it (with offset 0 it would land in the first).
#[test]
fn map_all_shares_each_regions_fd_and_file_offset_with_the_device() {
    use dmalog_device::dma_engine::{op, reg};
    use dmalog_device::{sealed_memfd, DmaEngine};
    use dmalog_migrate::vm_memory::FileOffset;
    use dmalog_vfio_user::{Client, Server, ServerConfig};

    const MIB: usize = 1 << 20;
    let file = std::sync::Arc::new(std::fs::File::from(
        sealed_memfd("two-regions", 2 * MIB as u64).unwrap(),
    ));
    let regions = dmalog_migrate::DirtyRegions::new(4096).unwrap();
    let layout = [(0, 0), (1 << 32, MIB as u64)]; // (GPA, file offset)
    let memory = LoggedGuestMemory::from_regions(
        layout
            .iter()
            .map(|&(gpa, offset)| {
                let file = FileOffset::from_arc(std::sync::Arc::clone(&file), offset);
                regions.region(GuestAddress(gpa), MIB, Some(file)).unwrap()
            })
            .collect(),
    )
    .unwrap();
    assert_eq!(memory.regions()[1].file_offset(), MIB as u64);
    assert!(check_guest_memory(&memory).is_ok());

    let (vmm_end, device_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        Server::new(ServerConfig::default(), |space| {
            Box::new(DmaEngine::new(space))
        })
        .serve(device_end)
    });
    let mut client = Client::with_stream(vmm_end, 1 << 20).unwrap();
    dmalog_migrate::scenario::source::map_all(&mut client, &memory).unwrap();
    let target = (1u64 << 32) + 3 * 4096;
    let fill = [
        (reg::DST, target),
        (reg::LEN, 64),
        (reg::PATTERN, 0x77),
        (reg::OP, op::FILL),
    ];
    for (offset, value) in fill {
        client.write_u64(0, offset, value).unwrap();
    }
    client.write_u64(0, reg::DOORBELL, 1).unwrap();
    assert_eq!(
        client.read_u64(0, reg::STATUS).unwrap(),
        0,
        "the DMA succeeded"
    );
    let first: u64 = memory.read_obj(GuestAddress(target)).unwrap();
    assert_eq!(
        first, 0x77,
        "the device wrote the second region's file offset"
    );
    assert_eq!(
        memory.is_zero(3 * 4096, 64),
        Some(true),
        "not the first region's"
    );
    drop(client);
    server.join().unwrap();
}
