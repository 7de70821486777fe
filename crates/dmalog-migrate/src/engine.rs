//! The pre-copy migration engine (SPEC 7): dirty sources through [`DirtyTracker`], device
//! state through [`MigrationDevice`](dmalog::MigrationDevice), guest pages and device data over the migration
//! stream. The engine knows no transport beyond `Read`/`Write`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{DirtyTracker, IovaRange, TrackerError};
use tracing::{info, warn};

use crate::converge::{Convergence, Decision, FixedCosts, ThrottleParams};
use crate::dirty::{Bitmaps, DirtyPages, Tracking};
pub use crate::error::MigrateError;
use crate::guest::{GuestPages, LoggedGuestMemory};
pub use crate::report::{MigrationReport, RoundStats, StopTimes};
use crate::sender::{Sender, Tail};
use crate::source_device::Throttle;
pub use crate::source_device::{SourceDevice, Unthrottled};
use crate::stream::{
    Frame, FrameReader, FrameWriter, Kind, StreamError, Transport, MAX_PAGES_PER_FRAME,
};
use crate::vcpu::VcpuWorkload;

/// Guest page size the engine migrates at.
pub const PAGE: u64 = 4096;

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
pub fn plan_ranges(
    memory: &LoggedGuestMemory,
    plan: RangePlan,
    max_ranges: usize,
) -> Vec<IovaRange> {
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
    /// Go to the final round after this many rounds even if not converged (a last
    /// resort: the report then says the downtime budget was not met).
    pub max_rounds: u32,
    /// Auto-converge: when and how much to slow the guest down.
    pub throttle: ThrottleParams,
}

/// The source VM as the engine sees it.
pub struct SourceVm<'a> {
    /// Guest memory (vm-memory's, memfd-backed to be shared with a device server).
    pub memory: &'a LoggedGuestMemory,
    /// The device: a dirty source and migration data.
    pub device: &'a mut dyn SourceDevice,
    /// The VMM's own dirty log (vCPU writes): `DirtyRegions::tracker()` over the bitmaps of
    /// `memory` (`dmalog_vm_memory`), or any other tracker of those writes.
    pub cpu: &'a mut dyn DirtyTracker,
    /// The vCPUs, paused for the final round.
    pub vcpus: Option<&'a VcpuWorkload>,
}

impl SourceVm<'_> {
    /// The same VM, lent for a shorter while (the caller keeps it for what comes after).
    fn reborrow(&mut self) -> SourceVm<'_> {
        SourceVm {
            memory: self.memory,
            device: &mut *self.device,
            cpu: &mut *self.cpu,
            vcpus: self.vcpus,
        }
    }
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
pub fn migrate_source<S: Read + Write + Transport + Send>(
    config: &SourceConfig,
    vm: SourceVm<'_>,
    out: &mut FrameWriter<S>,
    replies: &mut FrameReader<impl Read>,
    on_round: impl FnMut(&RoundStats),
) -> Result<MigrationReport, MigrateError> {
    migrate_source_channels(
        config,
        vm,
        out,
        1,
        &mut |_| Err(std::io::ErrorKind::Unsupported.into()),
        replies,
        on_round,
    )
}

/// As [`migrate_source`], with the pages of each round split between `out` and
/// `channels - 1` further connections to the same destination, each sent from its own
/// thread (the stream's Sync frames keep rounds in order across them). `connect` opens
/// further channel `index` (1, 2, ...); it is called after the Hello went out on `out`,
/// since the destination takes further connections only once it has read the Hello.
pub fn migrate_source_channels<S: Read + Write + Transport + Send>(
    config: &SourceConfig,
    vm: SourceVm<'_>,
    out: &mut FrameWriter<S>,
    channels: u32,
    connect: &mut dyn FnMut(u32) -> std::io::Result<FrameWriter<S>>,
    replies: &mut FrameReader<impl Read>,
    on_round: impl FnMut(&RoundStats),
) -> Result<MigrationReport, MigrateError> {
    // Before anything starts: the engine's copies are direct.
    crate::guest::check_guest_memory(vm.memory)?;
    let mut vm = vm;
    let mut committed = false;
    let err = match migrate_source_inner(
        config,
        vm.reborrow(),
        out,
        (channels, connect),
        replies,
        on_round,
        &mut committed,
    ) {
        Ok(report) => return Ok(report),
        Err(err) => err,
    };
    let SourceVm {
        device, cpu, vcpus, ..
    } = vm;
    if committed {
        // The destination was told to resume: the guest is its own now, and must not run
        // here again. Logging off, the device stopped, the vCPUs stay paused (their
        // throttle and the device's given back, as after any migration).
        warn!(%err, "the destination did not confirm that it resumed the guest; the source VM stays paused");
        let _ = device.throttle_dma(0);
        let _ = device.stop();
        let _ = cpu.stop();
        if let Err(err) = device.set_device_state(DeviceState::Stop) {
            warn!(%err, "source device did not go to STOP");
        }
        if let Some(vcpus) = vcpus {
            vcpus.set_throttle(0);
        }
        let err = why_the_peer_hung_up(err, replies);
        return Err(MigrateError::Unconfirmed(Box::new(err)));
    }
    recover(&err, device, cpu, vcpus);
    Err(why_the_peer_hung_up(err, replies))
}

/// After a failure before the destination was told to resume: the VM stays here, logging
/// off, the device and the vCPUs running again at full speed. A device server that is
/// gone or silent is not asked (each request would wait out its timeout with the guest
/// paused).
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
        let _ = device.throttle_dma(0);
        let _ = device.stop();
        if let Err(err) = device.set_device_state(DeviceState::Running) {
            warn!(%err, "could not return the device to RUNNING");
        }
    }
    let _ = cpu.stop();
    if let Some(vcpus) = vcpus {
        vcpus.set_throttle(0);
        vcpus.resume();
    }
}

/// When the destination closed the connection, it may have said why first (an Abort it
/// sent while we were still writing): that reason is the error, not the broken pipe.
/// Without one, the error says that the destination closed the connection.
fn why_the_peer_hung_up(err: MigrateError, replies: &mut FrameReader<impl Read>) -> MigrateError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionRefused, ConnectionReset};
    // Refused: a further channel found the destination's listener closed, which it does
    // when it has given up (it stops listening once it fails).
    let hung_up = matches!(
        &err,
        MigrateError::Stream(StreamError::Io(io))
            if matches!(
                io.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | ConnectionRefused
            )
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

fn migrate_source_inner<S: Read + Write + Transport + Send>(
    config: &SourceConfig,
    vm: SourceVm<'_>,
    out: &mut FrameWriter<S>,
    (channels, connect): (u32, &mut dyn FnMut(u32) -> std::io::Result<FrameWriter<S>>),
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
    // The stop's device requests are predicted from this one's time until a state change
    // is measured.
    let mut fixed = FixedCosts {
        device_state_ms: started.elapsed().as_secs_f64() * 1e3,
        ..FixedCosts::default()
    };
    fixed.device_data_ms = fixed.device_state_ms;
    if flags & MIGRATION_STOP_COPY == 0 {
        return Err(MigrateError::NotMigratable(flags));
    }
    let device_pre_copy = config.mode != Mode::StopAndCopy && flags & MIGRATION_PRE_COPY != 0;
    let ranges = plan_ranges(
        memory,
        config.ranges,
        dmalog::ranges::DEFAULT_MAX_RANGES as usize,
    );
    let extra = crate::sender::send_hello(out, channels, connect, memory)?;
    fixed.link_rtt_ms = link_round_trip(out, replies)?.as_secs_f64() * 1e3;

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
    // The dirty logs run from here: the first REPORT covers everything dirtied since.
    let mut last_report = Instant::now();
    let mut dirty = DirtyPages::new(memory, &ranges, tracking)?;
    let mut rounds = Vec::new();
    let mut policy = Convergence::new(config.max_downtime, config.max_rounds, config.throttle);
    let mut throttle = Throttle::default();
    let mut sender = Sender::new(out, extra, memory);

    // The round the stop takes over (its REPORTs found what the final round sends).
    let mut stopping = None;
    if config.mode != Mode::StopAndCopy {
        if device_pre_copy {
            timed(&mut fixed.device_state_ms, || {
                device.set_device_state(DeviceState::PreCopy)
            })?;
        }
        // Round 0: everything. The REPORTs of each next round are taken while a round's
        // last pages go out (`cue_pages`; as QEMU's multifd syncs its bitmap while the
        // channels send), into `dirty` while `sending` goes out: a page written before a
        // REPORT is in it and sent after it, so overlapping loses none.
        let round_start = Instant::now();
        let bytes_before = sender.out.bytes();
        let mut sending = Bitmaps::new(memory)?;
        sending.fill(memory);
        let mut next = RoundStats {
            round: 1,
            ..RoundStats::default()
        };
        let mut next_report_at = Instant::now();
        let (sent, send_time) =
            send_overlapping_reports(&mut sender, &sending, MAX_PAGES_PER_FRAME, || {
                next_report_at = Instant::now();
                dirty.collect(device, cpu, memory, &mut next, false);
            })?;
        let device_start = Instant::now();
        let device_bytes = if device_pre_copy {
            timed(&mut fixed.device_data_ms, || {
                sender.send_device_data(device)
            })?
        } else {
            0
        };
        let bytes_sent = sender.out.bytes() - bytes_before;
        let elapsed = round_start.elapsed().as_secs_f64();
        // The link's time: not a REPORT's that outlasted the round.
        policy.sent_full_copy(
            bytes_sent,
            (send_time + device_start.elapsed()).as_secs_f64(),
        );
        let stats = RoundStats {
            round: 0,
            pages_sent: sent,
            bytes_sent,
            device_bytes,
            round_ms: elapsed * 1e3,
            bandwidth_bytes_per_sec: policy.bandwidth_bytes_per_sec().unwrap_or(0.0),
            ..RoundStats::default()
        };
        on_round(&stats);
        rounds.push(stats);
        let mut round_start = Instant::now();
        // Pre-copy rounds: each one's REPORTs say exactly what is dirty; the policy decides
        // from that whether the rest fits the downtime.
        loop {
            let round = rounds.len() as u32;
            let mut stats = std::mem::take(&mut next);
            stats.round = round;
            fixed.reports_ms = stats.report_ms;
            let window_secs = next_report_at
                .saturating_duration_since(last_report)
                .as_secs_f64();
            last_report = next_report_at;
            let pending_bytes = (stats.pages_device + stats.pages_cpu + stats.pages_both) * PAGE;
            let verdict = policy.decide(round, pending_bytes, window_secs, &fixed);
            stats.bandwidth_bytes_per_sec = verdict.bandwidth_bytes_per_sec.unwrap_or(0.0);
            stats.dirty_bytes_per_sec = verdict.dirty_bytes_per_sec;
            stats.predicted_downtime_ms = Some(verdict.predicted_downtime_ms);
            if verdict.decision != Decision::Continue {
                stats.throttle_pct = throttle.pct;
                stats.device_throttled = throttle.device;
                stopping = Some((stats, verdict.decision));
                break;
            }
            throttle.apply(verdict.throttle_pct, vcpus, device)?;
            stats.throttle_pct = throttle.pct;
            stats.device_throttled = throttle.device;
            let bytes_before = sender.out.bytes();
            // This round goes out of `sending`; the next REPORTs fill `dirty` meanwhile.
            std::mem::swap(&mut sending, &mut dirty.merged);
            let cue = cue_pages(fixed.reports_ms, policy.bandwidth_bytes_per_sec());
            let send_time;
            (stats.pages_sent, send_time) =
                send_overlapping_reports(&mut sender, &sending, cue, || {
                    next_report_at = Instant::now();
                    dirty.collect(device, cpu, memory, &mut next, false);
                })?;
            let device_start = Instant::now();
            if device_pre_copy {
                stats.device_bytes = timed(&mut fixed.device_data_ms, || {
                    sender.send_device_data(device)
                })?;
            }
            stats.bytes_sent = sender.out.bytes() - bytes_before;
            // The link's time: not a REPORT's that outlasted the round.
            policy.sent(
                stats.bytes_sent,
                (send_time + device_start.elapsed()).as_secs_f64(),
            );
            stats.round_ms = round_start.elapsed().as_secs_f64() * 1e3;
            round_start = Instant::now();
            on_round(&stats);
            rounds.push(stats);
        }
    }
    // The device's own speed back before its state is saved (the destination goes on at
    // it); the vCPUs stop anyway.
    throttle.apply(0, None, device)?;

    // The stop: vCPUs paused, the device to STOP_COPY (no DMA after this), final REPORTs.
    let pause = Instant::now();
    let mut stop = StopTimes::default();
    let mut lap = Lap(pause);
    if let Some(vcpus) = vcpus {
        vcpus.pause();
    }
    stop.pause_ms = lap.ms();
    device.set_device_state(DeviceState::StopCopy)?;
    stop.stop_copy_ms = lap.ms();
    let bytes_before = sender.out.bytes();
    let forced = matches!(stopping, Some((_, Decision::ForcedStop)));
    let mut stats = match stopping {
        Some((stats, _)) => stats,
        None => RoundStats {
            round: rounds.len() as u32,
            ..RoundStats::default()
        },
    };
    stats.final_round = true;
    if config.mode == Mode::StopAndCopy {
        dirty.merged.fill(memory);
        stats.pages_sent = sender.send_dirty(&dirty.merged)?;
    } else {
        // Onto what the deciding REPORTs found: the little dirtied since.
        dirty.collect(device, cpu, memory, &mut stats, true);
        stop.reports_ms = lap.ms();
        stats.pages_sent = sender.send_dirty(&dirty.merged)?;
    }
    stop.pages_ms = lap.ms();
    stats.device_bytes = sender.send_device_data(device)?;
    sender.end()?;
    stop.device_data_ms = lap.ms();
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
    stop.destination_ms = lap.ms();
    expect_kind(&resumed, Kind::Resumed)?;
    // The destination hashed its memory before resuming the device (so that the device's
    // new writes do not enter the comparison); that time is not part of a real downtime.
    let hash_ns = reply
        .payload
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    let downtime = elapsed.saturating_sub(Duration::from_nanos(hash_ns));
    stop.destination_ms = (stop.destination_ms - hash_ns as f64 / 1e6).max(0.0);
    info!(?stop, "the stop, phase by phase");
    stats.round_ms = downtime.as_secs_f64() * 1e3;
    on_round(&stats);
    rounds.push(stats);
    let total = started
        .elapsed()
        .saturating_sub(Duration::from_nanos(hash_ns));
    // Met only when the policy stopped because the rest fitted, and it did.
    let downtime_budget_met = !forced && downtime <= config.max_downtime;
    if !downtime_budget_met {
        warn!(
            downtime_ms = downtime.as_secs_f64() * 1e3,
            budget_ms = config.max_downtime.as_secs_f64() * 1e3,
            forced,
            "the downtime budget was not met"
        );
    }
    info!(
        downtime_ms = downtime.as_secs_f64() * 1e3,
        "destination resumed"
    );

    // Logging off (outside the downtime), then verification: our memory is frozen (vCPUs
    // paused, device stopped), so its hashes are the state at stop time.
    let _ = device.stop();
    let _ = cpu.stop();
    if let Some(vcpus) = vcpus {
        vcpus.set_throttle(0);
    }
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
        max_downtime_ms: config.max_downtime.as_secs_f64() * 1e3,
        downtime_budget_met,
        forced_stop: forced,
        stop,
        link_rtt_ms: fixed.link_rtt_ms,
    })
}

/// Sends `sending`'s pages on a thread of its own and, once the round has `cue_pages` or
/// fewer left to send, runs `report` (the next round's REPORTs) here, so that they overlap
/// the end of the round instead of following it. Returns the pages sent and the time the
/// sending took (the link's, without REPORTs that outlast it); a sender that fails before
/// its cue is not waited on with REPORTs.
fn send_overlapping_reports<W: Write + Transport + Send>(
    sender: &mut Sender<'_, W>,
    sending: &Bitmaps,
    cue_pages: u64,
    report: impl FnOnce(),
) -> Result<(u64, Duration), MigrateError> {
    let (cue, cued) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::scope(|scope| {
        let round = scope.spawn(move || {
            let cue = move || {
                let _ = cue.try_send(());
            };
            let started = Instant::now();
            sender
                .send_dirty_with_tail(
                    sending,
                    Tail {
                        cue: &cue,
                        pages_left: cue_pages,
                    },
                )
                .map(|pages| (pages, started.elapsed()))
        });
        // The cue, or the sender's end without one (it failed): then no REPORTs.
        if cued.recv().is_ok() {
            report();
        }
        round
            .join()
            .unwrap_or(Err(MigrateError::Memory("the round's sender panicked")))
    })
}

/// Fewest pages a round has left when the next round's REPORTs start.
const MIN_CUE_PAGES: u64 = 32;

/// Pages of a round left to send when the next round's REPORTs start: as many as the link
/// sends in the time the last REPORTs took (`report_ms`, at `bandwidth_bytes_per_sec`), so
/// that they end about with the round; a frame's worth before either is known. The pages
/// dirtied after those REPORTs wait for the round after, and for the last one that is the
/// downtime: overlapping more than the REPORTs take would only lengthen it.
fn cue_pages(report_ms: f64, bandwidth_bytes_per_sec: Option<f64>) -> u64 {
    match bandwidth_bytes_per_sec {
        Some(bandwidth) if report_ms > 0.0 && bandwidth.is_finite() => {
            let pages = (report_ms / 1e3 * bandwidth / PAGE as f64).ceil();
            (pages.min(MAX_PAGES_PER_FRAME as f64) as u64).max(MIN_CUE_PAGES)
        }
        _ => MAX_PAGES_PER_FRAME,
    }
}

/// Pings the source sends before round 0 to time the link (each answered by a Pong
/// before the next): the first waits out the destination's setup, the shortest of the
/// others counts.
pub const LINK_PINGS: u64 = 5;

/// Times one round trip on the link: Pings on `out`, each answered by a Pong on
/// `replies`. The first also waits out the destination's setup (its channels, DMA maps,
/// RESUMING) and is not counted; of the others (up to [`LINK_PINGS`]) the shortest counts, since a
/// lost packet costs one of them a retransmission timeout (200 ms or more) that is not the
/// link's round trip.
fn link_round_trip<W: Write>(
    out: &mut FrameWriter<W>,
    replies: &mut FrameReader<impl Read>,
) -> Result<Duration, MigrateError> {
    let mut round_trip = Duration::MAX;
    for nonce in 0..LINK_PINGS {
        let sent = Instant::now();
        out.write(Kind::Ping, &[&nonce.to_le_bytes()])?;
        out.flush()?;
        let pong = replies.read()?;
        expect_kind(&pong, Kind::Pong)?;
        if pong.payload != nonce.to_le_bytes() {
            return Err(MigrateError::Peer("a Pong that answers no Ping".into()));
        }
        if nonce > 0 {
            round_trip = round_trip.min(sent.elapsed());
        }
    }
    Ok(round_trip)
}

/// Runs `step`, keeping how long it took in `ms` (the cost the stop will have again).
fn timed<T>(ms: &mut f64, step: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = step();
    *ms = start.elapsed().as_secs_f64() * 1e3;
    out
}

/// A stopwatch of consecutive phases.
struct Lap(Instant);

impl Lap {
    /// Milliseconds since the last lap.
    fn ms(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.0).as_secs_f64() * 1e3;
        self.0 = now;
        ms
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reports_start_as_many_pages_before_the_end_of_a_round_as_the_link_sends_meanwhile() {
        // Nothing timed yet: a frame's worth.
        assert_eq!(cue_pages(0.0, None), MAX_PAGES_PER_FRAME);
        assert_eq!(cue_pages(0.4, None), MAX_PAGES_PER_FRAME);
        // 0.4 ms at 1 GB/s: 400,000 bytes, 98 pages.
        assert_eq!(cue_pages(0.4, Some(1e9)), 98);
        // Never more than a frame, never fewer than the floor.
        assert_eq!(cue_pages(100.0, Some(1e9)), MAX_PAGES_PER_FRAME);
        assert_eq!(cue_pages(0.001, Some(1e6)), MIN_CUE_PAGES);
        assert_eq!(cue_pages(1.0, Some(f64::INFINITY)), MAX_PAGES_PER_FRAME);
    }
}
