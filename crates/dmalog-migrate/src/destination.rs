//! The destination side of a migration: the stream comes from a peer that is not trusted,
//! so every number in it is checked before it sizes, indexes or addresses anything (a
//! refused frame is an error naming what is wrong, never a panic or a write outside guest
//! memory).

use std::io::{Read, Write};
use std::time::Instant;

use dmalog::uapi::DeviceState;
use dmalog::MigrationDevice;
use tracing::warn;

use crate::engine::{aborted, expect_kind, MigrateError, PAGE};
use crate::guest::GuestMemory;
use crate::stream::{
    Frame, FrameReader, FrameWriter, Kind, StreamError, MAX_PAGES_PER_FRAME, MAX_REASON_BYTES,
    PAGES_HEAD_BYTES,
};

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestinationReport {
    /// Pages written.
    pub pages: u64,
    /// Device data bytes loaded.
    pub device_bytes: u64,
    /// Whether the source's hashes matched ours.
    pub verified: bool,
}

/// A decoded Hello: the source's page size and memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The source's page size, bytes.
    pub page_size: u32,
    /// `(gpa, size)` of each region.
    pub regions: Vec<(u64, u64)>,
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn refused(kind: Kind, why: &'static str) -> MigrateError {
    MigrateError::Stream(StreamError::Refused { kind, why })
}

/// Decodes a Hello payload: `page_size u32, count u32`, then `count` times `gpa u64,
/// size u64`, nothing more.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, MigrateError> {
    let malformed = || MigrateError::Stream(StreamError::Malformed(Kind::Hello));
    let page_size = le_u32(payload, 0).ok_or_else(malformed)?;
    let count = le_u32(payload, 4).ok_or_else(malformed)? as usize;
    // The frame limit bounds the payload, so `count` is checked against what was sent
    // before any arithmetic on it.
    if (payload.len() - 8) / 16 != count || (payload.len() - 8) % 16 != 0 {
        return Err(malformed());
    }
    let regions = (0..count)
        .map(|i| {
            let at = 8 + 16 * i;
            Some((le_u64(payload, at)?, le_u64(payload, at + 8)?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(malformed)?;
    Ok(Hello { page_size, regions })
}

/// Decodes a Pages payload into `(gpa, data)`: `gpa` page-aligned, 1 to
/// [`MAX_PAGES_PER_FRAME`] pages, exactly `npages` pages of data. Whether the pages lie in
/// guest memory is the caller's check.
pub fn decode_pages(payload: &[u8]) -> Result<(u64, &[u8]), MigrateError> {
    let gpa = le_u64(payload, 0).ok_or(StreamError::Malformed(Kind::Pages))?;
    let npages = u64::from(le_u32(payload, 8).ok_or(StreamError::Malformed(Kind::Pages))?);
    let data = payload.get(PAGES_HEAD_BYTES..).unwrap_or_default();
    if npages == 0 || npages > MAX_PAGES_PER_FRAME {
        return Err(refused(Kind::Pages, "page count out of range"));
    }
    // npages <= MAX_PAGES_PER_FRAME: the product cannot overflow.
    if data.len() as u64 != npages * PAGE {
        return Err(refused(
            Kind::Pages,
            "data length differs from the page count",
        ));
    }
    if gpa % PAGE != 0 {
        return Err(refused(Kind::Pages, "guest address not page-aligned"));
    }
    Ok((gpa, data))
}

/// Runs the destination side: maps DMA with `map_dma`, writes pages into `memory`, loads
/// the device state (RESUMING, data, STOP), answers Ready with its hashes, resumes the
/// device (RUNNING) on the source's Go, answers Resumed, then takes the source's verdict
/// on the hashes. A frame this side refuses is also reported to
/// the source (an Abort, best effort). Time limits are the reader's and writer's
/// ([`FrameReader::with_timeout`], [`FrameWriter::with_timeout`]).
///
/// The device is resumed only on the source's Go: a migration that fails before (the
/// source gone, silent or refused) leaves the guest unresumed here (the device holds a
/// loaded state in STOP, or a partial one in RESUMING: the caller discards it with a
/// reset) and says so in a warning; one that fails after says that the guest runs here.
pub fn migrate_destination<W: Write, D: MigrationDevice>(
    memory: &GuestMemory,
    device: &mut D,
    map_dma: &mut dyn FnMut(&mut D, &GuestMemory) -> Result<(), String>,
    input: &mut FrameReader<impl Read>,
    out: &mut FrameWriter<W>,
) -> Result<DestinationReport, MigrateError> {
    let mut resumed = false;
    let result = receive(memory, device, map_dma, input, out, &mut resumed)
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
            let mut reason = err.to_string();
            reason.truncate(MAX_REASON_BYTES.min(reason.len()));
            while !reason.is_char_boundary(reason.len()) {
                reason.pop();
            }
            if let Err(write_err) = out.write(Kind::Abort, &[reason.as_bytes()]) {
                warn!(%write_err, "could not tell the source why the migration failed");
            }
            let _ = out.flush();
        }
    }
    result
}

fn receive<W: Write, D: MigrationDevice>(
    memory: &GuestMemory,
    device: &mut D,
    map_dma: &mut dyn FnMut(&mut D, &GuestMemory) -> Result<(), String>,
    input: &mut FrameReader<impl Read>,
    out: &mut FrameWriter<W>,
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
    // Guest memory is mapped before the device state loads, as a VMM maps it when the
    // destination VM is created: some servers (libvfio-user) take no DMA_MAP in STOP or
    // RESUMING. The device does no DMA until RUNNING, and the hashes below are taken
    // before that.
    map_dma(device, memory).map_err(MigrateError::Peer)?;
    device.set_device_state(DeviceState::Resuming)?;
    loop {
        let frame = input.read()?;
        match frame.kind {
            Kind::Pages => report.pages += write_pages(memory, &frame)?,
            Kind::DeviceData => {
                device.write_migration_data(&frame.payload)?;
                report.device_bytes += frame.payload.len() as u64;
            }
            Kind::End => break,
            Kind::Abort => return Err(aborted(&frame)),
            other => return Err(MigrateError::Peer(format!("unexpected {other:?} frame"))),
        }
    }
    device.set_device_state(DeviceState::Stop)?;
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
    device.set_device_state(DeviceState::Running)?;
    *resumed = true;
    out.write(Kind::Resumed, &[])?;
    out.flush()?;
    let verdict = input.read()?;
    expect_kind(&verdict, Kind::Verified)?;
    report.verified = verdict.payload.first() == Some(&1);
    Ok(report)
}

/// Writes one Pages frame into guest memory; returns the pages written.
fn write_pages(memory: &GuestMemory, frame: &Frame) -> Result<u64, MigrateError> {
    let (gpa, data) = decode_pages(&frame.payload)?;
    if !memory.write(gpa, data) {
        return Err(refused(Kind::Pages, "pages outside guest memory"));
    }
    Ok(data.len() as u64 / PAGE)
}
