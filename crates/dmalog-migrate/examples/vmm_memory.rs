//! A VMM with its own vm-memory guest hands it to the migration engine: it maps its sealed
//! memfds with vm-memory (`from_ranges_with_files`) and attaches dmalog's bitmaps
//! (`DirtyRegions::attach_memory`); DMA_MAP gives a dma-engine device each region's fd and
//! offset. A rust-vmm style device writes through vm-memory while the guest migrates over
//! loopback TCP to a destination that checks every byte.
//! Run: `cargo run -p dmalog-migrate --example vmm_memory`.
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use dmalog_device::{sealed_memfd, DmaEngine};
use dmalog_migrate::converge::ThrottleParams;
use dmalog_migrate::engine::Unthrottled;
use dmalog_migrate::scenario::source::map_all;
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use dmalog_migrate::{migrate_destination, migrate_source, DirtyRegions, LoggedGuestMemory};
use dmalog_migrate::{Mode, RangePlan, SourceConfig, SourceVm};
use dmalog_vfio_user::{Client, Server, ServerConfig};

const LAYOUT: [(u64, usize); 2] = [(0, 48 << 20), (4 << 30, 16 << 20)]; // GPA, bytes

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The VMM's own guest memory: vm-memory maps its memfds; dmalog's bitmaps attach after.
fn vmm_guest(regions: &DirtyRegions) -> Result<LoggedGuestMemory, Error> {
    let mut ranges = Vec::new();
    for (gpa, len_bytes) in LAYOUT {
        let file = std::fs::File::from(sealed_memfd("vmm-guest", len_bytes as u64)?);
        ranges.push((GuestAddress(gpa), len_bytes, Some(FileOffset::new(file, 0))));
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    regions.attach_memory(&memory)?; // from now on every vm-memory write is logged
    Ok(memory)
}

/// A dma-engine device served on its own thread, and the VMM's client of it.
fn device() -> Result<Client, Error> {
    let (vmm_end, device_end) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let config = ServerConfig::default();
        Server::new(config, |space| Box::new(DmaEngine::new(space))).serve(device_end)
    });
    Ok(Client::with_stream(vmm_end, 1 << 20)?)
}

/// The migration stream's two directions over one TCP connection.
fn link(tcp: TcpStream) -> Result<(FrameReader<TcpStream>, FrameWriter<TcpStream>), Error> {
    let reader = FrameReader::new(tcp.try_clone()?);
    Ok((reader, FrameWriter::new(tcp, None)))
}

fn main() -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let destination = std::thread::spawn(move || -> Result<(bool, u64), Error> {
        let regions = DirtyRegions::new(4096)?; // nothing reports them here
        let (memory, mut device) = (vmm_guest(&regions)?, device()?);
        let (tcp, _) = listener.accept()?;
        let (mut input, mut out) = link(tcp)?;
        let report = migrate_destination(&memory, &mut device, &mut map_all, &mut input, &mut out)?;
        Ok((report.verified, memory.read_obj(GuestAddress(0x1000))?))
    });

    let regions = DirtyRegions::new(4096)?;
    let memory = vmm_guest(&regions)?;
    memory.write_slice(&[0x5a; 1 << 20], GuestAddress(4 << 30))?; // the guest before
    let mut device = device()?;
    map_all(&mut device, &memory)?; // each region's fd and file offset
    let mut cpu = regions.tracker(); // the vCPU dirty source: the bitmaps just attached
    let (mut replies, mut out) = link(TcpStream::connect(address)?)?;
    let config = SourceConfig {
        ranges: RangePlan::Exact,
        mode: Mode::PreCopy,
        max_downtime: Duration::from_millis(30),
        max_rounds: 10,
        throttle: ThrottleParams::default(),
    };
    let device = &mut Unthrottled(&mut device);
    let vm = SourceVm {
        memory: &memory,
        device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let mut cpu_pages_after_round_0 = 0;
    let report = migrate_source(&config, vm, &mut out, &mut replies, |round| {
        cpu_pages_after_round_0 += if round.round > 0 { round.pages_cpu } else { 0 };
        if !round.final_round {
            // A virtio-style device between rounds: a used-ring entry and a buffer.
            let (entry, buffer) = (41 + u64::from(round.round), [round.round as u8; 8192]);
            memory.write_obj(entry, GuestAddress(0x1000)).unwrap();
            memory.write_slice(&buffer, GuestAddress(2 << 20)).unwrap();
        }
    })?;
    let (verified, used) = destination.join().unwrap()?;
    let ours: u64 = memory.read_obj(GuestAddress(0x1000))?;
    println!("vCPU pages after round 0: {cpu_pages_after_round_0}");
    println!("used-ring entry: source {ours}, destination {used}");
    let both = report.verified && verified;
    println!("{}", if both { "VERIFIED" } else { "MISMATCH" });
    Ok(())
}
