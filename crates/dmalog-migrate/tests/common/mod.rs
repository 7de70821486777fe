//! Shared by the engine tests: a fake device (soft-tracked DMA, migration data in
//! memory), a small guest layout and the engine settings.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dmalog::uapi::DeviceState;
use dmalog::{
    DirtyTracker, InProcessTracker, IovaRange, MigrationDevice, PendingBytes, SoftDriver,
    TrackerError, TrackerResult, WriteRecorder,
};
use dmalog_migrate::stream::{Frame, FrameReader, FrameWriter, Kind, Transport};
use dmalog_migrate::{
    memfd_guest, memfd_guest_untracked, migrate_destination, migrate_destination_channels,
    DestinationReport, DirtyRegions, Incoming, LoggedGuestMemory, MigrateError, Mode, SourceConfig,
    VcpuParams, VcpuWorkload, VmMemoryTracker,
};

/// A migratable device in memory: its state, the image it saves, what it loaded.
pub struct FakeDevice {
    pub tracker: InProcessTracker<SoftDriver>,
    pub state: DeviceState,
    pub image: Vec<u8>,
    pub cursor: usize,
    pub loaded: Vec<u8>,
    pub logging: bool,
    /// Once set, the device's server "stops answering": reading migration data times out
    /// and every later call is counted in `calls_while_silent` (and also times out).
    pub silent: bool,
    /// Calls made after the device went silent.
    pub calls_while_silent: u32,
    /// The MIGRATION flags it offers (STOP_COPY and PRE_COPY by default).
    pub flags: u64,
    /// Whether it offers DMA logging (its probe's answer).
    pub can_log: bool,
    /// Every state it was set to, in order.
    pub states: Vec<DeviceState>,
    /// START requests it got.
    pub starts: u32,
    /// Whether its DMA can be slowed (auto-converge); by default not.
    pub can_throttle: bool,
    /// Each throttle it took: the percent, and how many states it had been set to then.
    pub throttles: Vec<(u8, usize)>,
}

impl FakeDevice {
    pub fn new(image: Vec<u8>) -> (Self, WriteRecorder) {
        let driver = SoftDriver::new();
        let recorder = driver.recorder();
        (
            FakeDevice {
                tracker: InProcessTracker::new(driver),
                state: DeviceState::Running,
                image,
                cursor: 0,
                loaded: Vec::new(),
                logging: false,
                silent: false,
                calls_while_silent: 0,
                flags: dmalog::uapi::MIGRATION_STOP_COPY | dmalog::uapi::MIGRATION_PRE_COPY,
                can_log: true,
                states: Vec::new(),
                starts: 0,
                can_throttle: false,
                throttles: Vec::new(),
            },
            recorder,
        )
    }
}

impl FakeDevice {
    /// A timeout error (counted) once the device is silent.
    fn answer(&mut self) -> Result<(), TrackerError> {
        if self.silent {
            self.calls_while_silent += 1;
            return Err(TrackerError::Transport(
                std::io::ErrorKind::WouldBlock.into(),
            ));
        }
        Ok(())
    }
}

impl DirtyTracker for FakeDevice {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(self.can_log)
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.starts += 1;
        self.logging = true;
        self.tracker.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        self.tracker.report(range, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.answer()?;
        self.logging = false;
        self.tracker.stop()
    }
}

impl MigrationDevice for FakeDevice {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        Ok(self.flags)
    }
    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        Ok(self.state)
    }
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        self.answer()?;
        if state == DeviceState::StopCopy || state == DeviceState::PreCopy {
            self.cursor = 0;
        }
        self.state = state;
        self.states.push(state);
        Ok(())
    }
    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        if self.silent {
            return Err(TrackerError::Transport(
                std::io::ErrorKind::WouldBlock.into(),
            ));
        }
        let n = (self.image.len() - self.cursor).min(buf.len());
        buf[..n].copy_from_slice(&self.image[self.cursor..self.cursor + n]);
        self.cursor += n;
        Ok(n)
    }
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        self.loaded.extend_from_slice(data);
        Ok(())
    }
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        Ok(None)
    }
}

impl dmalog_migrate::engine::SourceDevice for FakeDevice {
    fn throttle_dma(&mut self, percent: u8) -> Result<bool, TrackerError> {
        if !self.can_throttle {
            return Ok(false);
        }
        self.answer()?;
        self.throttles.push((percent, self.states.len()));
        Ok(true)
    }
}

pub const LAYOUT: [(u64, u64); 2] = [(0, 8 << 20), (1 << 32, 4 << 20)];

pub fn config() -> SourceConfig {
    SourceConfig {
        ranges: dmalog_migrate::RangePlan::Exact,
        mode: Mode::PreCopy,
        max_downtime: Duration::from_millis(30),
        max_rounds: 10,
        throttle: dmalog_migrate::converge::ThrottleParams::default(),
    }
}

/// The Hello payload for `layout` at 4 KiB pages.
pub fn hello(layout: &[(u64, u64)]) -> Vec<u8> {
    dmalog_migrate::stream::hello_payload(4096, 0x5e55, 1, layout)
}

/// A CPU dirty log (soft-tracked) and the recorder the vCPUs' writes go through.
pub fn cpu_log() -> (InProcessTracker<SoftDriver>, WriteRecorder) {
    let driver = SoftDriver::new();
    let recorder = driver.recorder();
    (InProcessTracker::new(driver), recorder)
}

/// A source guest of `layout` and the set its bitmaps log into (`regions.tracker()` is
/// its vCPU dirty log).
pub fn source_guest(layout: &[(u64, u64)]) -> (Arc<LoggedGuestMemory>, Arc<DirtyRegions>) {
    let regions = DirtyRegions::new(4096).unwrap();
    let memory = Arc::new(memfd_guest(&regions, layout).unwrap());
    (memory, regions)
}

/// The vCPU side of a source VM: its CPU dirty log (the memory's bitmaps) and one vCPU
/// thread.
pub struct Vcpus {
    pub cpu: VmMemoryTracker,
    pub workload: VcpuWorkload,
}

/// One vCPU thread writing pages of `memory` in `span_bytes` from `base` at
/// `bytes_per_sec`, its page sequence from `seed`, REPORTed from `regions` (the set
/// `memory`'s bitmaps log into, [`source_guest`]).
pub fn start_vcpus(
    (memory, regions): (&Arc<LoggedGuestMemory>, &Arc<DirtyRegions>),
    (base, span_bytes): (u64, u64),
    bytes_per_sec: u64,
    seed: u64,
) -> Vcpus {
    let workload = VcpuWorkload::start(
        Arc::clone(memory),
        VcpuParams {
            threads: 1,
            base,
            span: span_bytes,
            rate: bytes_per_sec,
            seed,
        },
    )
    .unwrap();
    Vcpus {
        cpu: regions.tracker(),
        workload,
    }
}

/// A fresh destination (the [`LAYOUT`] guest, a fake device, every DMA mapping accepted)
/// taking a migration from `input`, replying on `out`: its result, memory and device.
pub fn run_destination<R: Read + Transport, W: Write>(
    input: &mut FrameReader<R>,
    out: &mut FrameWriter<W>,
) -> (
    Result<DestinationReport, MigrateError>,
    LoggedGuestMemory,
    FakeDevice,
) {
    let memory = memfd_guest_untracked(&LAYOUT).unwrap();
    let (mut device, _) = FakeDevice::new(Vec::new());
    let result = migrate_destination(&memory, &mut device, &mut |_, _| Ok(()), input, out);
    (result, memory, device)
}

/// [`run_destination`] on its own thread, on `stream` (no timeouts).
pub fn spawn_destination(
    stream: UnixStream,
) -> JoinHandle<(
    Result<DestinationReport, MigrateError>,
    LoggedGuestMemory,
    FakeDevice,
)> {
    std::thread::spawn(move || {
        let mut input = FrameReader::new(stream.try_clone().unwrap());
        let mut out = FrameWriter::new(stream, None);
        run_destination(&mut input, &mut out)
    })
}

/// Accepts a further channel of a migration on `listener`.
pub fn accept_channel(listener: &TcpListener) -> std::io::Result<Incoming> {
    let (tcp, _) = listener.accept()?;
    Ok(Incoming {
        reader: Box::new(tcp.try_clone()?),
        handle: Box::new(tcp),
    })
}

/// What a destination thread gives back: its result, guest memory and device.
pub type DestinationThread<D> = JoinHandle<(
    Result<DestinationReport, MigrateError>,
    LoggedGuestMemory,
    D,
)>;

/// A destination on a fresh loopback listener, on its own thread: a guest of `layout`,
/// `device` loading what arrives, every frame within `timeout`, every DMA mapping
/// accepted, further channels through the acceptor `accept` makes of the listener (which
/// it owns: dropping it stops listening). Returns the address and the thread.
pub fn destination_on_loopback<D, A>(
    layout: &'static [(u64, u64)],
    timeout: Duration,
    mut device: D,
    accept: impl FnOnce(TcpListener) -> A + Send + 'static,
) -> (String, DestinationThread<D>)
where
    D: MigrationDevice + Send + 'static,
    A: FnMut() -> std::io::Result<Incoming>,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let thread = std::thread::spawn(move || {
        let memory = memfd_guest_untracked(layout).unwrap();
        let (main, _) = listener.accept().unwrap();
        let mut input = FrameReader::new(main.try_clone().unwrap()).with_timeout(timeout);
        let mut out = FrameWriter::new(main, None).with_timeout(timeout);
        let result = migrate_destination_channels(
            &memory,
            &mut device,
            &mut |_, _| Ok(()),
            &mut input,
            &mut out,
            accept(listener),
        );
        (result, memory, device)
    });
    (address, thread)
}

/// A stand-in destination's reading: takes the frames on `stream`, answering each Ping
/// with its Pong (the source times its link before round 0), until `stop` says so for a
/// frame taken or the stream ends.
#[allow(dead_code)]
pub fn take_frames_answering_pings(stream: &UnixStream, mut stop: impl FnMut(&Frame) -> bool) {
    let mut input = FrameReader::new(stream.try_clone().unwrap());
    let mut out = FrameWriter::new(stream.try_clone().unwrap(), None);
    while let Ok(frame) = input.read() {
        if frame.kind == Kind::Ping {
            let _ = out.write(Kind::Pong, &[&frame.payload]);
            let _ = out.flush();
        }
        if stop(&frame) {
            return;
        }
    }
}
