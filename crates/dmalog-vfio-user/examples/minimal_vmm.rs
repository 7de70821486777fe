//! A minimal VMM consumer of a vfio-user device's DMA logging: it connects, maps 1 MiB of guest
//! memory (a sealed memfd, so the device maps it and writes it directly), STARTs dirty logging,
//! has the device write, REPORTs, STOPs and prints the dirty pages; then it takes the device's
//! migration data (STOP_COPY) and resumes a reset device from it (RESUMING), as a migration's
//! two ends would.
//!
//! With the `minimal_device` example serving SOCKET:
//! `cargo run -p dmalog-vfio-user --example minimal_vmm -- SOCKET`.
use std::os::fd::AsFd;
use std::path::Path;

use dmalog::tracker::report_words;
use dmalog::uapi::DeviceState;
use dmalog::{DirtyTracker, IovaRange, MigrationDevice};
use dmalog_device::sealed_memfd;
use dmalog_vfio_user::Client;

/// Bytes of guest memory, at IOVA 0.
const GUEST_BYTES: u64 = 1 << 20;
/// The dirty-tracking granule asked for at START (the device may choose another).
const PAGE_SIZE: u64 = 4096;
/// What the device is told to write, `(IOVA, bytes)`: one byte in page 3, pages 10 and 11
/// exactly, and 16 bytes across the boundary of pages 99 and 100.
const WRITES: [(u64, u64); 3] = [(3 * 4096 + 100, 1), (10 * 4096, 8192), (100 * 4096 - 8, 16)];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::args().nth(1).ok_or("usage: minimal_vmm SOCKET")?;
    let guest = sealed_memfd("guest", GUEST_BYTES)?;
    let mut device = Client::connect(Path::new(&socket))?;
    let guest_range = IovaRange::new(0, GUEST_BYTES)?; // IOVA = guest physical address
    device.dma_map(guest_range, Some(guest.as_fd()), 0, true)?;
    if !device.probe()? {
        return Err("the device has no DMA logging".into());
    }
    let page_size = device.start(&[guest_range], PAGE_SIZE)?;

    for (iova, len_bytes) in WRITES {
        device.write_u64(0, 0, iova)?; // DST
        device.write_u64(0, 8, len_bytes)?; // LEN: the device does the DMA now
    }

    // One bit per page, 64 pages a word; REPORT also clears what it returns.
    let mut bitmap = vec![0u64; report_words(GUEST_BYTES, page_size)? as usize];
    device.report(guest_range, page_size, &mut bitmap)?;
    device.stop()?;
    let dirty: Vec<u64> = (0..GUEST_BYTES / page_size)
        .filter(|&page| bitmap[(page / 64) as usize] >> (page % 64) & 1 == 1)
        .collect();
    println!("page size {page_size}, dirty pages: {dirty:?}");

    let mut byte = [0u8];
    rustix::io::pread(&guest, &mut byte, WRITES[0].0)?;
    println!("guest byte at {:#x}: {:#04x}", WRITES[0].0, byte[0]);

    // Migration: in STOP_COPY the device does no DMA and hands over its state.
    device.set_device_state(DeviceState::StopCopy)?;
    let mut state = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = device.read_migration_data(&mut chunk)?;
        if n == 0 {
            break;
        }
        state.extend_from_slice(&chunk[..n]);
    }
    device.set_device_state(DeviceState::Running)?;
    println!("device state: {} bytes {state:02x?}", state.len());

    // And back, as a destination would: a reset device resumes from that state.
    device.reset()?;
    device.set_device_state(DeviceState::Resuming)?;
    device.write_migration_data(&state)?;
    device.set_device_state(DeviceState::Running)?;
    let (dst, len_bytes) = (device.read_u64(0, 0)?, device.read_u64(0, 8)?);
    println!("resumed: DST {dst:#x} LEN {len_bytes}");
    Ok(())
}
