//! The pre-copy migration engine (SPEC 7): dirty sources through [`DirtyTracker`], device
//! state through [`MigrationDevice`], guest pages and device data over the migration
//! stream. The engine knows no transport beyond `Read`/`Write`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, TrackerError};
use tracing::{info, warn};

use crate::dirty::{collect_dirty, Bitmaps, Tracking};
use crate::guest::GuestMemory;
use crate::stream::{Frame, FrameReader, FrameWriter, Kind, StreamError};
use crate::vcpu::VcpuWorkload;

/// Guest page size the engine migrates at.
pub const PAGE: u64 = 4096;
/// Pages per Pages frame at most.
const PAGES_PER_FRAME: u64 = 256;

/// How to migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pre-copy rounds with device dirty tracking.
    PreCopy,
    /// Stop everything, then copy all memory and the device state.
    StopAndCopy,
    /// Pre-copy, but the device cannot track: its memory is dirty every round.
    NoDeviceTracking,
}

/// How START ranges are planned from the guest memory map (SPEC 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangePlan {
    /// One range per memory region.
    #[default]
    Exact,
    /// As QEMU: at most 3 ranges, one spanning everything below 4 GiB, one above (device
    /// BARs above 4 GiB would be the third; guest RAM has none), holes included.
    Qemu,
}

/// The START ranges for `memory` under `plan`, never more than `max_ranges` (merged by
/// smallest gaps, as the logging core would).
pub fn plan_ranges(memory: &GuestMemory, plan: RangePlan, max_ranges: usize) -> Vec<IovaRange> {
    let exact: Vec<IovaRange> = memory.regions().iter().map(|r| r.range()).collect();
    let planned = match plan {
        RangePlan::Exact => exact,
        RangePlan::Qemu => {
            let span = |ranges: Vec<&IovaRange>| -> Option<IovaRange> {
                let first = ranges.iter().map(|r| r.iova()).min()?;
                let end = ranges.iter().map(|r| r.end()).max()?;
                IovaRange::new(first, end - first).ok()
            };
            let low = span(exact.iter().filter(|r| r.end() <= 1 << 32).collect());
            let high = span(exact.iter().filter(|r| r.end() > 1 << 32).collect());
            low.into_iter().chain(high).collect()
        }
    };
    dmalog::ranges::merge_ranges(&planned, max_ranges)
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct SourceConfig {
    /// How START ranges are planned.
    pub ranges: RangePlan,
    /// The mode.
    pub mode: Mode,
    /// Stop the guest when the rest fits in this time at the measured bandwidth.
    pub max_downtime: Duration,
    /// Go to the final round after this many rounds even if not converged.
    pub max_rounds: u32,
}

/// One pre-copy round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundStats {
    /// 0 is the full copy; the last one is the final (stopped) round.
    pub round: u32,
    /// Pages only the device dirtied.
    pub pages_device: u64,
    /// Pages only the vCPUs dirtied.
    pub pages_cpu: u64,
    /// Pages both dirtied (sent once).
    pub pages_both: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Bytes sent in the round (pages, device data, framing).
    pub bytes_sent: u64,
    /// Device migration data bytes sent in the round.
    pub device_bytes: u64,
    /// Wall time of the round, ms.
    pub round_ms: f64,
    /// Time spent in REPORTs, ms.
    pub report_ms: f64,
    /// Whether this was the final round (guest stopped).
    pub final_round: bool,
    /// REPORT errors in this round (each: range treated as dirty, tracking restarted).
    pub report_errors: u32,
}

/// What a migration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    /// The mode.
    pub mode: Mode,
    /// Whether the destination's memory hashes matched the source's.
    pub verified: bool,
    /// From pausing the vCPUs to the destination device RUNNING with all pages in place.
    pub downtime_ms: f64,
    /// The whole migration, ms (verification excluded).
    pub total_ms: f64,
    /// Bytes on the stream.
    pub bytes_sent: u64,
    /// Guest memory bytes.
    pub guest_bytes: u64,
    /// Rounds.
    pub rounds: Vec<RoundStats>,
    /// Whether device dirty tracking was used (false: fell back to "all dirty").
    pub device_tracking: bool,
    /// Whether the device went through PRE_COPY (false: it offers no PRE_COPY, or the mode
    /// is stop-and-copy; its state moved in STOP_COPY only).
    pub device_pre_copy: bool,
    /// Device migration data bytes sent, all rounds.
    pub device_bytes: u64,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream failed (connection lost, corrupt frame).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The device failed.
    #[error("device: {0}")]
    Device(TrackerError),
    /// The connection to the device (its server) failed: the device is gone.
    #[error("lost the connection to the device server ({0}); the migration cannot go on")]
    DeviceLost(std::io::Error),
    /// The device server stopped answering (its socket timed out): as good as gone.
    #[error("the device server did not answer in time ({0}); the migration cannot go on")]
    DeviceSilent(std::io::Error),
    /// The other side gave up or answered out of turn.
    #[error("peer: {0}")]
    Peer(String),
    /// The destination was told to resume the guest and did not confirm it: the guest may
    /// run there, so the source VM stays paused (the guest never runs on both hosts).
    #[error("the destination was told to resume the guest and did not confirm it ({0}); the VM stays paused here: the guest may be running at the destination")]
    Unconfirmed(Box<MigrateError>),

    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(&'static str),
    /// The device offers no STOP_COPY (its MIGRATION flags): its state cannot be saved.
    #[error("the device cannot migrate: its MIGRATION flags {0:#x} lack STOP_COPY")]
    NotMigratable(u64),
}

impl MigrateError {
    /// This error as [`StreamError::PeerClosed`] by `peer` when it is the connection
    /// ending (the end of the stream, a reset, a broken pipe); otherwise unchanged.
    pub fn closed_by(self, peer: &'static str) -> Self {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            MigrateError::Stream(StreamError::Io(io))
                if matches!(
                    io.kind(),
                    UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted
                ) =>
            {
                MigrateError::Stream(StreamError::PeerClosed { peer, io })
            }
            other => other,
        }
    }
}

impl From<TrackerError> for MigrateError {
    fn from(err: TrackerError) -> Self {
        match err {
            TrackerError::Transport(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                MigrateError::DeviceSilent(io)
            }
            TrackerError::Transport(io) => MigrateError::DeviceLost(io),
            other => MigrateError::Device(other),
        }
    }
}

impl From<std::io::Error> for MigrateError {
    fn from(err: std::io::Error) -> Self {
        MigrateError::Stream(StreamError::Io(err))
    }
}

/// A migratable device that also tracks its DMA.
pub trait SourceDevice: DirtyTracker + MigrationDevice {}
impl<T: DirtyTracker + MigrationDevice> SourceDevice for T {}

struct Sender<'a, W: Write> {
    out: &'a mut FrameWriter<W>,
    memory: &'a GuestMemory,
    buffer: Vec<u8>,
}

impl<W: Write> Sender<'_, W> {
    /// Sends every page whose bit is set in `bitmaps`, in runs.
    fn send_dirty(&mut self, bitmaps: &Bitmaps) -> Result<u64, MigrateError> {
        let mut sent = 0;
        for (region, words) in self.memory.regions().iter().zip(&bitmaps.words) {
            let pages = region.size / PAGE;
            let mut page = 0u64;
            while page < pages {
                let word = words[(page / 64) as usize] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(word.trailing_zeros());
                let mut run = 0u64;
                while page + run < pages
                    && run < PAGES_PER_FRAME
                    && words[((page + run) / 64) as usize] >> ((page + run) % 64) & 1 == 1
                {
                    run += 1;
                }
                self.send_pages(region.gpa + page * PAGE, run)?;
                sent += run;
                page += run;
            }
        }
        Ok(sent)
    }

    fn send_pages(&mut self, gpa: u64, npages: u64) -> Result<(), MigrateError> {
        self.buffer.resize((npages * PAGE) as usize, 0);
        if !self.memory.read(gpa, &mut self.buffer) {
            return Err(MigrateError::Memory("page outside guest memory"));
        }
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&gpa.to_le_bytes());
        head[8..].copy_from_slice(&(npages as u32).to_le_bytes());
        self.out.write(Kind::Pages, &[&head, &self.buffer])?;
        Ok(())
    }

    /// Sends the device's migration data until it has nothing more now.
    fn send_device_data(&mut self, device: &mut dyn SourceDevice) -> Result<u64, MigrateError> {
        let mut chunk = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            let n = device.read_migration_data(&mut chunk)?;
            if n == 0 {
                return Ok(total);
            }
            self.out.write(Kind::DeviceData, &[&chunk[..n]])?;
            total += n as u64;
        }
    }
}

/// The source VM as the engine sees it.
pub struct SourceVm<'a> {
    /// Guest memory.
    pub memory: &'a GuestMemory,
    /// The device: a dirty source and migration data.
    pub device: &'a mut dyn SourceDevice,
    /// The VMM's own dirty log (vCPU writes).
    pub cpu: &'a mut dyn DirtyTracker,
    /// The vCPUs, paused for the final round.
    pub vcpus: Option<&'a VcpuWorkload>,
}

/// Runs the source side over `stream` (a connected, bidirectional transport): logging on
/// every source, round 0, pre-copy rounds, the stop, the final round, device state, and
/// verification. `vcpus` is paused for the final round and stays paused (the guest moved).
///
/// On any failure, before or after the stop, until the destination is told to resume (Go,
/// once its Ready says it has everything), the VM stays here: logging off, the device
/// RUNNING, the vCPUs resumed. After Go the guest is the destination's: a failure then
/// ([`MigrateError::Unconfirmed`]) leaves the VM paused here, so that it never runs on
/// both hosts. Time limits on the destination are the reader's and
/// writer's ([`FrameReader::with_timeout`], [`FrameWriter::with_timeout`]): without them a
/// silent destination is waited for forever.
pub fn migrate_source<S: Read + Write + Send>(
    config: &SourceConfig,
    vm: SourceVm<'_>,
    out: &mut FrameWriter<S>,
    replies: &mut FrameReader<impl Read>,
    on_round: impl FnMut(&RoundStats),
) -> Result<MigrationReport, MigrateError> {
    let SourceVm {
        memory,
        device,
        cpu,
        vcpus,
    } = vm;
    let vm = SourceVm {
        memory,
        device: &mut *device,
        cpu: &mut *cpu,
        vcpus,
    };
    let mut committed = false;
    let err = match migrate_source_inner(config, vm, out, replies, on_round, &mut committed) {
        Ok(report) => return Ok(report),
        Err(err) => err,
    };
    if committed {
        // The destination was told to resume: the guest is its own now, and must not run
        // here again. Logging off, the device stopped, the vCPUs stay paused.
        warn!(%err, "the destination did not confirm that it resumed the guest; the source VM stays paused");
        let _ = device.stop();
        let _ = cpu.stop();
        if let Err(err) = device.set_device_state(DeviceState::Stop) {
            warn!(%err, "source device did not go to STOP");
        }
        let err = why_the_peer_hung_up(err, replies);
        return Err(MigrateError::Unconfirmed(Box::new(err)));
    }
    recover(&err, device, cpu, vcpus);
    Err(why_the_peer_hung_up(err, replies))
}

/// After a failure before the destination was told to resume: the VM stays here, logging
/// off, the device and the vCPUs running again. A device server that is gone or silent is
/// not asked (each request would wait out its timeout with the guest paused).
fn recover(
    err: &MigrateError,
    device: &mut dyn SourceDevice,
    cpu: &mut dyn DirtyTracker,
    vcpus: Option<&VcpuWorkload>,
) {
    warn!(%err, "migration failed; the source VM keeps running");
    if !matches!(
        err,
        MigrateError::DeviceLost(_) | MigrateError::DeviceSilent(_)
    ) {
        let _ = device.stop();
        if let Err(err) = device.set_device_state(DeviceState::Running) {
            warn!(%err, "could not return the device to RUNNING");
        }
    }
    let _ = cpu.stop();
    if let Some(vcpus) = vcpus {
        vcpus.resume();
    }
}

/// When the destination closed the connection, it may have said why first (an Abort it
/// sent while we were still writing): that reason is the error, not the broken pipe.
/// Without one, the error says that the destination closed the connection.
fn why_the_peer_hung_up(err: MigrateError, replies: &mut FrameReader<impl Read>) -> MigrateError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    let hung_up = matches!(
        &err,
        MigrateError::Stream(StreamError::Io(io))
            if matches!(io.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
    );
    if !hung_up {
        return err.closed_by("destination");
    }
    // The peer is gone: this read returns at once (a frame left behind, the end, or
    // a reset), and is bounded by the reader's timeout anyway.
    match replies.read() {
        Ok(frame) if frame.kind == Kind::Abort => aborted(&frame),
        _ => err.closed_by("destination"),
    }
}

fn migrate_source_inner<S: Read + Write + Send>(
    config: &SourceConfig,
    vm: SourceVm<'_>,
    out: &mut FrameWriter<S>,
    replies: &mut FrameReader<impl Read>,
    mut on_round: impl FnMut(&RoundStats),
    committed: &mut bool,
) -> Result<MigrationReport, MigrateError> {
    let SourceVm {
        memory,
        device,
        cpu,
        vcpus,
    } = vm;
    let started = Instant::now();
    // What the device offers decides the path: STOP_COPY is the least a migratable device
    // has; without PRE_COPY its state moves only once it is stopped.
    let flags = device.migration_flags()?;
    if flags & MIGRATION_STOP_COPY == 0 {
        return Err(MigrateError::NotMigratable(flags));
    }
    let device_pre_copy = config.mode != Mode::StopAndCopy && flags & MIGRATION_PRE_COPY != 0;
    let ranges = plan_ranges(
        memory,
        config.ranges,
        dmalog::ranges::DEFAULT_MAX_RANGES as usize,
    );
    let mut hello = Vec::new();
    hello.extend_from_slice(&(PAGE as u32).to_le_bytes());
    hello.extend_from_slice(&(memory.regions().len() as u32).to_le_bytes());
    for region in memory.regions() {
        hello.extend_from_slice(&region.gpa.to_le_bytes());
        hello.extend_from_slice(&region.size.to_le_bytes());
    }
    out.write(Kind::Hello, &[&hello])?;

    // Dirty tracking on every source; if one cannot start, all are rolled back and every
    // page counts as dirty every round (correct, but it will not converge).
    let mut tracking = Tracking {
        device: config.mode == Mode::PreCopy && device_logs_dma(device)?,
        cpu: config.mode != Mode::StopAndCopy,
    };
    if tracking.cpu {
        if let Err(err) = cpu.start(&ranges, PAGE) {
            warn!(%err, "vCPU dirty log unavailable: all memory is treated as dirty every round");
            tracking = Tracking {
                device: false,
                cpu: false,
            };
        }
    }
    if tracking.device {
        if let Err(err) = device.start(&ranges, PAGE) {
            warn!(%err, "device dirty tracking unavailable: tracking rolled back, all memory is treated as dirty every round");
            let _ = cpu.stop();
            tracking = Tracking {
                device: false,
                cpu: false,
            };
        }
    }
    let device_tracking = tracking.device;
    let mut device_bitmaps = Bitmaps::new(memory)?;
    let mut cpu_bitmaps = Bitmaps::new(memory)?;
    let mut merged = Bitmaps::new(memory)?;
    let mut rounds = Vec::new();
    let mut sender = Sender {
        out,
        memory,
        buffer: Vec::new(),
    };

    if config.mode != Mode::StopAndCopy {
        if device_pre_copy {
            device.set_device_state(DeviceState::PreCopy)?;
        }
        // Round 0: everything.
        let round_start = Instant::now();
        let bytes_before = sender.out.bytes();
        merged.fill(memory);
        let sent = sender.send_dirty(&merged)?;
        let device_bytes = if device_pre_copy {
            sender.send_device_data(device)?
        } else {
            0
        };
        let stats = RoundStats {
            round: 0,
            pages_sent: sent,
            bytes_sent: sender.out.bytes() - bytes_before,
            device_bytes,
            round_ms: round_start.elapsed().as_secs_f64() * 1e3,
            ..RoundStats::default()
        };
        // Bytes per second, measured on the link (paced to its cap when there is one).
        let mut bandwidth = stats.bytes_sent as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
        on_round(&stats);
        rounds.push(stats);
        // Pre-copy rounds until the rest fits in the downtime.
        loop {
            let round = rounds.len() as u32;
            let round_start = Instant::now();
            let bytes_before = sender.out.bytes();
            let mut stats = RoundStats {
                round,
                ..RoundStats::default()
            };
            collect_dirty(
                &ranges,
                tracking,
                device,
                cpu,
                memory,
                [&mut device_bitmaps, &mut cpu_bitmaps, &mut merged],
                &mut stats,
            );
            stats.pages_sent = sender.send_dirty(&merged)?;
            if device_pre_copy {
                stats.device_bytes = sender.send_device_data(device)?;
            }
            stats.bytes_sent = sender.out.bytes() - bytes_before;
            let elapsed = round_start.elapsed().as_secs_f64();
            stats.round_ms = elapsed * 1e3;
            if stats.bytes_sent > (1 << 20) {
                bandwidth = stats.bytes_sent as f64 / elapsed.max(1e-6);
            }
            let remaining = stats.pages_sent * PAGE;
            on_round(&stats);
            rounds.push(stats);
            // The stop also pays fixed costs (device STOP_COPY, final REPORTs, device state,
            // the destination's resume): aim the last transfer at half the budget.
            let fits = bandwidth > 0.0
                && (remaining as f64 / bandwidth) <= config.max_downtime.as_secs_f64() / 2.0;
            if fits || round >= config.max_rounds {
                break;
            }
        }
    }

    // The stop: vCPUs paused, the device to STOP_COPY (no DMA after this), final REPORTs.
    let pause = Instant::now();
    if let Some(vcpus) = vcpus {
        vcpus.pause();
    }
    device.set_device_state(DeviceState::StopCopy)?;
    let round = rounds.len() as u32;
    let bytes_before = sender.out.bytes();
    let mut stats = RoundStats {
        round,
        final_round: true,
        ..RoundStats::default()
    };
    if config.mode == Mode::StopAndCopy {
        merged.fill(memory);
        stats.pages_sent = sender.send_dirty(&merged)?;
    } else {
        collect_dirty(
            &ranges,
            tracking,
            device,
            cpu,
            memory,
            [&mut device_bitmaps, &mut cpu_bitmaps, &mut merged],
            &mut stats,
        );
        stats.pages_sent = sender.send_dirty(&merged)?;
    }
    stats.device_bytes = sender.send_device_data(device)?;
    sender.out.write(Kind::End, &[])?;
    sender.out.flush()?;
    stats.bytes_sent = sender.out.bytes() - bytes_before;
    // The destination has everything, its device stopped, and resumes only on our Go: so
    // the guest never runs on both hosts. Until Go is sent, any failure gives the VM back
    // here; from the moment it may have reached the destination, the guest is the
    // destination's, confirmed or not.
    let reply = replies.read()?;
    expect_kind(&reply, Kind::Ready)?;
    *committed = true;
    sender.out.write(Kind::Go, &[])?;
    sender.out.flush()?;
    let resumed = replies.read()?;
    let elapsed = pause.elapsed();
    expect_kind(&resumed, Kind::Resumed)?;
    // The destination hashed its memory before resuming the device (so that the device's
    // new writes do not enter the comparison); that time is not part of a real downtime.
    let hash_ns = reply
        .payload
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    let downtime = elapsed.saturating_sub(Duration::from_nanos(hash_ns));
    stats.round_ms = downtime.as_secs_f64() * 1e3;
    on_round(&stats);
    rounds.push(stats);
    let total = started
        .elapsed()
        .saturating_sub(Duration::from_nanos(hash_ns));
    info!(
        downtime_ms = downtime.as_secs_f64() * 1e3,
        "destination resumed"
    );

    // Logging off (outside the downtime), then verification: our memory is frozen (vCPUs
    // paused, device stopped), so its hashes are the state at stop time.
    let _ = device.stop();
    let _ = cpu.stop();
    // From here on the guest runs on the destination: nothing may fail the migration.
    if let Err(err) = device.set_device_state(DeviceState::Stop) {
        warn!(%err, "source device did not go to STOP after the migration");
    }
    let ours: Vec<u8> = memory
        .region_hashes()
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    let verified = reply.payload.get(8..) == Some(ours.as_slice());
    if let Err(err) = out_write(&mut sender, Kind::Verified, &[u8::from(verified)]) {
        warn!(%err, "could not tell the destination the verification result");
    }
    Ok(MigrationReport {
        mode: config.mode,
        verified,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        total_ms: total.as_secs_f64() * 1e3,
        bytes_sent: sender.out.bytes(),
        guest_bytes: memory.total_bytes(),
        device_bytes: rounds.iter().map(|r| r.device_bytes).sum(),
        rounds,
        device_tracking,
        device_pre_copy,
    })
}

/// Whether the device can log its DMA. A device that says no, or cannot answer the probe
/// (a refusal, not a lost connection), is migrated with the vCPU log alone and its
/// memory treated as dirty every round.
fn device_logs_dma(device: &mut dyn SourceDevice) -> Result<bool, MigrateError> {
    match device.probe() {
        Ok(true) => Ok(true),
        Ok(false) => {
            info!("the device has no DMA logging: vCPU writes are tracked, all device-mapped memory is dirty every round");
            Ok(false)
        }
        Err(err @ TrackerError::Transport(_)) => Err(err.into()),
        Err(err) => {
            warn!(%err, "DMA logging probe refused: vCPU writes are tracked, all device-mapped memory is dirty every round");
            Ok(false)
        }
    }
}

fn out_write<W: Write>(
    sender: &mut Sender<'_, W>,
    kind: Kind,
    payload: &[u8],
) -> Result<(), MigrateError> {
    sender.out.write(kind, &[payload])?;
    sender.out.flush()?;
    Ok(())
}

/// The peer's abort reason, safe to print.
pub(crate) fn aborted(frame: &Frame) -> MigrateError {
    MigrateError::Peer(format!(
        "aborted: {}",
        crate::peer_text::sanitize(&frame.payload)
    ))
}

pub(crate) fn expect_kind(frame: &Frame, kind: Kind) -> Result<(), MigrateError> {
    if frame.kind == Kind::Abort {
        return Err(aborted(frame));
    }
    if frame.kind != kind {
        return Err(MigrateError::Peer(format!(
            "expected {kind:?}, got {:?}",
            frame.kind
        )));
    }
    Ok(())
}
