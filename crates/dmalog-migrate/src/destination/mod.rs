//! The destination side of a migration: the stream comes from a peer that is not trusted,
//! so every number in it is checked before it sizes, indexes or addresses anything (a
//! refused frame is an error naming what is wrong, never a panic or a write outside guest
//! memory).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use dmalog::uapi::DeviceState;
use dmalog::MigrationDevice;
use tracing::{info, warn};

use crate::engine::{aborted, expect_kind, MigrateError, PAGE};
use crate::guest::{GuestPages, LoggedGuestMemory};
use crate::known_zero::KnownZero;
use crate::round_sync::RoundSync;
use crate::stream::{
    Channel, Frame, FrameReader, FrameWriter, Kind, StreamError, Transport, DEFAULT_TIMEOUT,
    HELLO_HEAD_BYTES, MAX_CHANNELS, MAX_PAGES_PER_FRAME, MAX_REASON_BYTES, MAX_RUNS_PER_FRAME,
    MAX_ZERO_PAGES_PER_FRAME, PAGES_HEAD_BYTES, RUN_BYTES, RUN_ZERO,
};

mod decode;

pub use decode::{decode_hello, decode_pages, Hello, PageRun};
use decode::{decode_table, le_u32, le_u64, refused, table_end};

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestinationReport {
    /// Pages written (zero pages included).
    pub pages: u64,
    /// Pages that came as zero runs (no bytes on the wire).
    pub zero_pages: u64,
    /// Channels (connections) the migration used.
    pub channels: u32,
    /// Device data bytes loaded.
    pub device_bytes: u64,
    /// Whether the source's hashes matched ours.
    pub verified: bool,
}

/// A further connection of a multi-channel migration, as the caller accepted it (TLS
/// handshake and all): two handles on the one connection.
pub struct Incoming {
    /// Read by the channel's own thread.
    pub reader: Box<dyn Channel>,
    /// Kept to refuse the connection (an Abort) or shut it down when another channel fails.
    pub handle: Box<dyn Channel>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// Runs the destination side: maps DMA with `map_dma`, writes pages into `memory`, loads
/// the device state (RESUMING, data, STOP), answers Ready with its hashes, resumes the
/// device (RUNNING) on the source's Go, answers Resumed, then takes the source's verdict
/// on the hashes. A frame this side refuses is also reported to
/// the source (an Abort, best effort). Time limits are the reader's and writer's
/// ([`FrameReader::with_timeout`], [`FrameWriter::with_timeout`]). A source that asks for
/// more than one channel is refused (see [`migrate_destination_channels`]).
///
/// The device is resumed only on the source's Go: a migration that fails before (the
/// source gone, silent or refused) leaves the guest unresumed here (the device holds a
/// loaded state in STOP, or a partial one in RESUMING: the caller discards it with a
/// reset) and says so in a warning; one that fails after says that the guest runs here.
pub fn migrate_destination<W: Write, D: MigrationDevice>(
    memory: &LoggedGuestMemory,
    device: &mut D,
    map_dma: &mut dyn FnMut(&mut D, &LoggedGuestMemory) -> Result<(), String>,
    input: &mut FrameReader<impl Read + Transport>,
    out: &mut FrameWriter<W>,
) -> Result<DestinationReport, MigrateError> {
    migrate_destination_channels(memory, device, map_dma, input, out, || {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this destination takes a migration on one channel only",
        ))
    })
}

/// As [`migrate_destination`], taking as many channels as the source's Hello asks for:
/// `accept` gives each further connection (bounding its own wait), whose first frame must
/// be a Join of this migration's session with a channel index not yet taken; any other
/// connection is refused (an Abort) and closed. An `accept` error of kind `TimedOut` or
/// `Unsupported` ends the wait (no channel comes); any other is one refused connection
/// (its TLS handshake failed), so that a third party connecting cannot end the migration:
/// only the channels not all joining within the reader's timeout of the Hello does.
/// Once every channel has joined, `accept` is dropped (a caller whose closure owns the
/// listener stops listening then, so later connections are refused by the kernel).
pub fn migrate_destination_channels<W: Write, D: MigrationDevice>(
    memory: &LoggedGuestMemory,
    device: &mut D,
    map_dma: &mut dyn FnMut(&mut D, &LoggedGuestMemory) -> Result<(), String>,
    input: &mut FrameReader<impl Read + Transport>,
    out: &mut FrameWriter<W>,
    accept: impl FnMut() -> std::io::Result<Incoming>,
) -> Result<DestinationReport, MigrateError> {
    // Before anything is read: pages are copied into guest memory directly.
    crate::guest::check_guest_memory(memory)?;
    let mut resumed = false;
    let result = receive(memory, device, map_dma, input, out, accept, &mut resumed)
        .map_err(|err| err.closed_by("source"));
    if let Err(err) = &result {
        if resumed {
            warn!(%err, "the migration failed after the guest was resumed here: it runs here");
        } else {
            warn!("the migration failed: the guest was not resumed here");
        }
        // The source learns why, unless the link itself failed or the source gave up.
        let tell = !matches!(
            err,
            MigrateError::Peer(_)
                | MigrateError::Stream(
                    StreamError::Io(_) | StreamError::TimedOut(_) | StreamError::PeerClosed { .. }
                )
        );
        if tell {
            abort(out, &err.to_string());
        }
    }
    result
}

/// Tells the peer why, best effort.
fn abort<W: Write>(out: &mut FrameWriter<W>, reason: &str) {
    let mut reason = reason.to_owned();
    reason.truncate(MAX_REASON_BYTES.min(reason.len()));
    while !reason.is_char_boundary(reason.len()) {
        reason.pop();
    }
    if let Err(write_err) = out.write(Kind::Abort, &[reason.as_bytes()]) {
        warn!(%write_err, "could not tell the source why the migration failed");
    }
    let _ = out.flush();
}

/// The channels did not all join before `deadline`; `refused_count` connections came that
/// were not channels.
fn past_the_deadline(timeout: Duration, refused_count: u32) -> MigrateError {
    MigrateError::Peer(format!(
        "the migration's channels did not all join within {} ms (refused {refused_count} \
         connections that were not this migration's channels)",
        timeout.as_millis()
    ))
}

/// One joined further channel.
struct Joined {
    input: FrameReader<Box<dyn Channel>>,
    handle: Box<dyn Channel>,
}

/// Accepts the `hello.channels - 1` further channels, all within `timeout` of the Hello.
/// Connections that are not channels (no Join, another session, a failed handshake) are
/// refused one by one; they cannot end the migration before that deadline, however many
/// a third party opens, only the channels' absence can.
fn accept_channels(
    hello: &Hello,
    timeout: Duration,
    mut accept: impl FnMut() -> std::io::Result<Incoming>,
) -> Result<Vec<Joined>, MigrateError> {
    let extra = (hello.channels - 1) as usize;
    let mut joined: Vec<Option<Joined>> = (0..extra).map(|_| None).collect();
    let mut refused_count = 0;
    let deadline = Instant::now() + timeout;
    while joined.iter().any(Option::is_none) {
        if Instant::now() >= deadline {
            return Err(past_the_deadline(timeout, refused_count));
        }
        let index = joined.iter().position(Option::is_none).unwrap_or(0) + 1;
        let incoming = match accept() {
            Ok(incoming) => incoming,
            // The acceptor's own wait ran out, or it takes no channels: none is coming.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::Unsupported
                ) =>
            {
                return Err(MigrateError::Peer(format!(
                    "waiting for channel {index} of the migration: {err}"
                )))
            }
            // One connection failed (a TLS handshake without a valid certificate, a port
            // scanner): a third party must not end the migration by connecting.
            Err(err) => {
                warn!(%err, "refused a connection that failed before it could join");
                refused_count += 1;
                continue;
            }
        };
        let mut input = FrameReader::new(incoming.reader).with_timeout(timeout);
        let why = match input.read() {
            Ok(frame) if frame.kind == Kind::Join => match (
                le_u64(&frame.payload, 0),
                le_u32(&frame.payload, 8),
                frame.payload.len(),
            ) {
                (Some(session), Some(index), 12) => {
                    if session != hello.session {
                        "its Join names another migration"
                    } else if index == 0 || index as usize > extra {
                        "its Join names a channel this migration does not have"
                    } else if joined[index as usize - 1].is_some() {
                        "its Join names a channel already joined"
                    } else {
                        joined[index as usize - 1] = Some(Joined {
                            input,
                            handle: incoming.handle,
                        });
                        continue;
                    }
                }
                _ => "its Join is malformed",
            },
            Ok(_) => "it did not open with a Join",
            Err(_) => "it sent no valid frame",
        };
        warn!(
            why,
            "refused a connection that is not a channel of this migration"
        );
        let mut refusal = FrameWriter::new(incoming.handle, None).with_timeout(timeout);
        abort(
            &mut refusal,
            &format!("not a channel of this migration: {why}"),
        );
        refusal.get_mut().shut_down();
        refused_count += 1;
    }
    drop(accept);
    info!(
        channels = hello.channels,
        "every channel of the migration joined"
    );
    Ok(joined.into_iter().flatten().collect())
}

/// What one channel applied.
#[derive(Debug, Default, Clone, Copy)]
struct Applied {
    pages: u64,
    zero_pages: u64,
}

/// Applies one further channel's frames until its End.
fn run_channel(
    index: usize,
    memory: &LoggedGuestMemory,
    known: &KnownZero,
    sync: &RoundSync,
    input: &mut FrameReader<Box<dyn Channel>>,
) -> Result<Applied, MigrateError> {
    let mut applied = Applied::default();
    let result = (|| loop {
        let (frame, data_bytes) = input.read_deferred()?;
        sync.check()?;
        match frame.kind {
            Kind::Pages => write_pages(memory, known, input, &frame, data_bytes, &mut applied)?,
            Kind::Sync => sync.arrive(index, decode_sync(&frame)?)?,
            Kind::End => {
                sync.finish();
                return Ok(applied);
            }
            Kind::Abort => return Err(aborted(&frame)),
            other => {
                return Err(MigrateError::Peer(format!(
                    "unexpected {other:?} frame on channel {index}"
                )))
            }
        }
    })();
    if result.is_err() {
        sync.fail(index);
    }
    result
}

fn decode_sync(frame: &Frame) -> Result<u32, MigrateError> {
    match frame.payload.len() {
        4 => le_u32(&frame.payload, 0)
            .ok_or(MigrateError::Stream(StreamError::Malformed(Kind::Sync))),
        _ => Err(MigrateError::Stream(StreamError::Malformed(Kind::Sync))),
    }
}

fn receive<W: Write, D: MigrationDevice>(
    memory: &LoggedGuestMemory,
    device: &mut D,
    map_dma: &mut dyn FnMut(&mut D, &LoggedGuestMemory) -> Result<(), String>,
    input: &mut FrameReader<impl Read + Transport>,
    out: &mut FrameWriter<W>,
    accept: impl FnMut() -> std::io::Result<Incoming>,
    resumed: &mut bool,
) -> Result<DestinationReport, MigrateError> {
    let mut report = DestinationReport::default();
    let hello = input.read()?;
    expect_kind(&hello, Kind::Hello)?;
    let hello = decode_hello(&hello.payload)?;
    let ours: Vec<(u64, u64)> = memory.regions().iter().map(|r| (r.gpa, r.size)).collect();
    if hello.page_size as u64 != PAGE {
        out.write(Kind::Abort, &[b"page size differs"])?;
        return Err(MigrateError::Peer(format!(
            "the source's page size ({} bytes) differs from ours ({PAGE})",
            hello.page_size
        )));
    }
    if hello.regions != ours {
        out.write(Kind::Abort, &[b"guest memory layout differs"])?;
        return Err(MigrateError::Peer(
            "the source's memory layout differs from ours".into(),
        ));
    }
    let timeout = input.timeout().unwrap_or(DEFAULT_TIMEOUT);
    let (mut inputs, handles): (Vec<_>, Vec<_>) = accept_channels(&hello, timeout, accept)?
        .into_iter()
        .map(|joined| (joined.input, joined.handle))
        .unzip();
    report.channels = hello.channels;
    // Guest memory is mapped before the device state loads, as a VMM maps it when the
    // destination VM is created: some servers (libvfio-user) take no DMA_MAP in STOP or
    // RESUMING. The device does no DMA until RUNNING, and the hashes below are taken
    // before that.
    map_dma(device, memory).map_err(MigrateError::Peer)?;
    device.set_device_state(DeviceState::Resuming)?;
    let sync = RoundSync::new(hello.channels, timeout);
    let known = KnownZero::new(memory);
    let mut applied = Applied::default();
    let (main, others) = std::thread::scope(|scope| {
        let threads: Vec<_> = inputs
            .iter_mut()
            .enumerate()
            .map(|(i, input)| {
                let (sync, known) = (&sync, &known);
                scope.spawn(move || run_channel(i + 1, memory, known, sync, input))
            })
            .collect();
        let main = receive_main(
            (memory, &known),
            device,
            (input, &mut *out),
            &sync,
            &mut applied,
            &mut report,
        );
        if main.is_err() {
            sync.fail(0);
            // Readers blocked on the other channels return at once.
            for handle in &handles {
                handle.shut_down();
            }
        }
        let others: Vec<_> = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or(Err(MigrateError::Memory("a channel's receiver panicked")))
            })
            .collect();
        (main, others)
    });
    // The error that came first is the one that explains the others.
    let first_failed = sync.failed();
    let mut errors = Vec::new();
    match main {
        Ok(()) => {}
        Err(err) => errors.push((0, err)),
    }
    for (i, other) in others.into_iter().enumerate() {
        match other {
            Ok(more) => {
                applied.pages += more.pages;
                applied.zero_pages += more.zero_pages;
            }
            Err(err) => errors.push((i + 1, err)),
        }
    }
    if !errors.is_empty() {
        let at = errors
            .iter()
            .position(|(i, _)| Some(*i) == first_failed)
            .unwrap_or(0);
        return Err(errors.swap_remove(at).1);
    }
    report.pages = applied.pages;
    report.zero_pages = applied.zero_pages;
    let end_at = Instant::now();
    device.set_device_state(DeviceState::Stop)?;
    let loaded_at = Instant::now();
    // Hash before the device runs again and writes (the source subtracts this time from
    // the downtime it measures).
    let hash_start = Instant::now();
    let hashes: Vec<u8> = memory
        .region_hashes()
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    let hash_ns = hash_start.elapsed().as_nanos() as u64;
    out.write(Kind::Ready, &[&hash_ns.to_le_bytes(), &hashes])?;
    out.flush()?;
    // Only on the source's word: until then the guest is the source's (it runs there
    // again if anything fails), and must not run here too.
    let go = input.read()?;
    expect_kind(&go, Kind::Go)?;
    let running_at = Instant::now();
    device.set_device_state(DeviceState::Running)?;
    *resumed = true;
    out.write(Kind::Resumed, &[])?;
    out.flush()?;
    tracing::info!(
        load_ms = (loaded_at - end_at).as_secs_f64() * 1e3,
        hash_ms = hash_ns as f64 / 1e6,
        resume_ms = running_at.elapsed().as_secs_f64() * 1e3,
        "destination: End to Resumed"
    );
    let verdict = input.read()?;
    expect_kind(&verdict, Kind::Verified)?;
    report.verified = verdict.payload.first() == Some(&1);
    Ok(report)
}

/// The main channel's frames until End (a Ping answered at once with its Pong).
fn receive_main<D: MigrationDevice, W: Write>(
    (memory, known): (&LoggedGuestMemory, &KnownZero),
    device: &mut D,
    (input, out): (&mut FrameReader<impl Read + Transport>, &mut FrameWriter<W>),
    sync: &RoundSync,
    applied: &mut Applied,
    report: &mut DestinationReport,
) -> Result<(), MigrateError> {
    loop {
        let (frame, data_bytes) = input.read_deferred()?;
        sync.check()?;
        match frame.kind {
            Kind::Pages => write_pages(memory, known, input, &frame, data_bytes, applied)?,
            Kind::Sync => sync.arrive(0, decode_sync(&frame)?)?,
            Kind::DeviceData => {
                device.write_migration_data(&frame.payload)?;
                report.device_bytes += frame.payload.len() as u64;
            }
            Kind::End => {
                sync.finish();
                return Ok(());
            }
            // The payload is at most 8 bytes (the reader's limit for the kind).
            Kind::Ping => {
                out.write(Kind::Pong, &[&frame.payload])?;
                out.flush()?;
            }
            Kind::Abort => return Err(aborted(&frame)),
            other => return Err(MigrateError::Peer(format!("unexpected {other:?} frame"))),
        }
    }
}

/// Writes one Pages frame into guest memory, every run checked before any is written:
/// its page bytes are in the frame, or (`data_bytes` > 0, a plaintext socket) still on the
/// socket, read straight into guest memory.
fn write_pages(
    memory: &LoggedGuestMemory,
    known: &KnownZero,
    input: &mut FrameReader<impl Read + Transport>,
    frame: &Frame,
    data_bytes: usize,
    applied: &mut Applied,
) -> Result<(), MigrateError> {
    let outside = || refused(Kind::Pages, "pages outside guest memory");
    // decode_table bounds npages * PAGE (no overflow).
    let inside = |gpa: u64, npages: u64| {
        usize::try_from(npages * PAGE).is_ok_and(|len| memory.piece(gpa, len).is_some())
    };
    if data_bytes > 0 {
        let (runs, needed) = decode_table(&frame.payload)?;
        if frame.payload.len() != table_end(runs.len()) || needed != data_bytes as u64 {
            return Err(refused(
                Kind::Pages,
                "data length differs from the page count",
            ));
        }
        if !runs.iter().all(|r| inside(r.gpa, r.npages)) {
            return Err(outside());
        }
        let pieces = runs
            .iter()
            .filter(|r| !r.zero)
            .map(|r| memory.piece_mut(r.gpa, (r.npages * PAGE) as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(outside)?;
        for run in runs.iter().filter(|r| !r.zero) {
            known.forget(run.gpa, run.npages);
        }
        input.read_pages_data(&pieces)?;
        for run in &runs {
            if run.zero {
                applied.zero_pages += run.npages;
                if !known.zero(memory, run.gpa, run.npages) {
                    return Err(outside());
                }
            }
            applied.pages += run.npages;
        }
        return Ok(());
    }
    let runs = decode_pages(&frame.payload)?;
    if !runs.iter().all(|r| inside(r.gpa, r.npages)) {
        return Err(outside());
    }
    for run in &runs {
        let written = match run.data {
            Some(data) => {
                known.forget(run.gpa, run.npages);
                memory.write_at(run.gpa, data)
            }
            None => {
                applied.zero_pages += run.npages;
                known.zero(memory, run.gpa, run.npages)
            }
        };
        if !written {
            return Err(outside());
        }
        applied.pages += run.npages;
    }
    Ok(())
}
