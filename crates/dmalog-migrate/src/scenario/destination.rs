//! The destination half: one incoming migration resumed on the device, then dma-engine's
//! workload writes in the 100 ms after resuming (when the device is one) and the digests
//! of the regions asked for.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use dmalog_vfio_user::Client;

use super::device::{self, RegionDigests};
use super::failover;
use super::source::map_all;
use super::transport::{bound_stream_buffers, Listening, ServerSide};
use super::{ScenarioError, StepContext};
use crate::stream::{FrameReader, FrameWriter};
use crate::{default_layout, memfd_guest_untracked, migrate_destination_channels};

/// The destination's settings.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Guest memory, bytes (must match the source).
    pub guest_bytes: u64,
    /// How long the source may take to send one frame once connected.
    pub timeout: Duration,
    /// Regions whose CRC32C is taken after the device resumes.
    pub digest_regions: Vec<u32>,
    /// Socket buffer of each channel, bytes (0: the kernel's autotuning).
    pub stream_buffer_bytes: u64,
}

/// What the destination half did.
#[derive(Debug)]
pub struct DestinationOutcome {
    /// dma-engine's workload writes in the 100 ms after resuming (None: not dma-engine).
    pub device_writes_after_resume: Option<u64>,
    /// Guest pages received.
    pub pages: u64,
    /// Of `pages`, those that came as zero runs (no bytes on the wire).
    pub zero_pages: u64,
    /// Connections the migration used.
    pub channels: u32,
    /// Bytes of device state loaded.
    pub device_bytes: u64,
    /// Whether every page's digest matched the source's.
    pub verified: bool,
    /// The digests of the regions asked for, read after the resume.
    pub region_digests: RegionDigests,
}

/// Receives one migration on `listener` and resumes it on the device at `dst`. Waiting for
/// a source has no limit; the first connection that opens with a valid Hello is the
/// migration's, and from there every frame must come within `options.timeout`. Strangers
/// who connect before it (a failed TLS handshake, garbage, silence) are dropped with a
/// warning, each within a few of its own timeouts and at most
/// [`MAX_PENDING_HANDSHAKES`](super::transport::MAX_PENDING_HANDSHAKES)
/// held at once ([`Listening`]), so none of them ends or holds up the real source's
/// migration. A failed load leaves no guest state on the device.
pub fn run_destination(
    options: &DestinationOptions,
    mut dst: Client,
    listener: TcpListener,
    security: &ServerSide,
) -> Result<DestinationOutcome, ScenarioError> {
    let timeout = options.timeout;
    // Asked before the migration: after it, every request counts against the device's
    // time running.
    let dma_engine = device::is_dma_engine(&mut dst);
    let memory = memfd_guest_untracked(&default_layout(options.guest_bytes))
        .step(|| "destination guest memory".into())?;
    // Every channel's socket inherits the listener's buffers.
    bound_stream_buffers(&listener, options.stream_buffer_bytes)?;
    let mut listening = Listening::start(listener, security, timeout)?;
    let (reader, link) = listening.main_connection()?;
    let mut input = FrameReader::new(reader).with_timeout(timeout);
    let mut out = FrameWriter::new(link, None).with_timeout(timeout);
    let report = migrate_destination_channels(
        &memory,
        &mut dst,
        &mut |client, memory| map_all(client, memory),
        &mut input,
        &mut out,
        listening.into_acceptor(),
    )
    .inspect_err(|_| failover::discard_unresumed_load(&mut dst))
    .map_err(ScenarioError::Destination)?;
    // The device goes on where it stopped.
    let device_writes_after_resume = if dma_engine {
        Some(writes_after_resume(&mut dst)?)
    } else {
        None
    };
    let sizes = device::region_sizes(&mut dst, &options.digest_regions);
    Ok(DestinationOutcome {
        device_writes_after_resume,
        pages: report.pages,
        zero_pages: report.zero_pages,
        channels: report.channels,
        device_bytes: report.device_bytes,
        verified: report.verified,
        region_digests: device::region_digests(&mut dst, &sizes),
    })
}

/// dma-engine's workload writes in a 100 ms window once it has written again. On a busy
/// machine the device server may not have run since the resume: the window opens at its
/// first write (2 s at most).
fn writes_after_resume(dst: &mut Client) -> Result<u64, ScenarioError> {
    let mut before = device::workload_writes(dst)?;
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
        let now = device::workload_writes(dst)?;
        if now != before {
            before = now;
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = device::workload_writes(dst)?;
    Ok(after.saturating_sub(before))
}
