//! The source half: guest memory DMA-mapped into the device, the device and vCPU
//! workloads running, then the migration to the first destination that takes it (after a
//! failed attempt the VM runs on, and the next is tried).

use std::sync::Arc;
use std::time::Duration;

use dmalog::DirtyTracker;
use dmalog_vfio_user::Client;
use dmalog_vm_memory::DirtyRegions;

use super::device::{self, DeviceWorkload, MigratedDevice, RegionDigests, RegisterWrite};
use super::failover::{self, Attempt};
use super::transport::{connect_link, io_kind, ClientSide};
use super::{chain_text, ScenarioError, StepContext, MIB};
use crate::stream::{FrameReader, FrameWriter};
use crate::{
    default_layout, memfd_guest, migrate_source_channels, GuestPages, LoggedGuestMemory,
    MigrationReport, RoundStats, SourceConfig, SourceVm, VcpuParams, VcpuWorkload,
};

/// The source VM, its workloads and the migration's settings.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Guest memory, bytes (3/4 at GPA 0, 1/4 at 4 GiB; at least 64 MiB).
    pub guest_bytes: u64,
    /// Share of guest memory written with data (no zero page) before the migration,
    /// percent (0..=100).
    pub prefill_pct: u64,
    /// Device workload working set, bytes.
    pub device_wss_bytes: u64,
    /// Device workload rate, bytes per second (0: as fast as it can).
    pub device_rate_bytes_per_sec: u64,
    /// vCPU workload working set, bytes.
    pub vcpu_wss_bytes: u64,
    /// vCPU workload rate, bytes per second (0: as fast as they can).
    pub vcpu_rate_bytes_per_sec: u64,
    /// vCPU threads.
    pub vcpus: usize,
    /// Link bandwidth shared by the channels, bytes per second (0: uncapped).
    pub link_bytes_per_sec: u64,
    /// TCP connections of the migration stream (at least 1).
    pub channels: u32,
    /// The share of the vCPUs' working set the device writes too, percent.
    pub wss_overlap_pct: u64,
    /// Socket buffer of each link, bytes (0: the kernel's autotuning).
    pub stream_buffer_bytes: u64,
    /// How long the destination may take to send or take one frame.
    pub timeout: Duration,
    /// The engine's settings.
    pub engine: SourceConfig,
    /// Whether dma-engine's workload runs on the device.
    pub device_workload: DeviceWorkload,
    /// Regions whose CRC32C is taken after the migration.
    pub digest_regions: Vec<u32>,
    /// Regions filled with a known pattern before the migration.
    pub fill_regions: Vec<u32>,
    /// Register writes made before the migration (after any fill).
    pub region_writes: Vec<RegisterWrite>,
    /// Whether the device's PRE_COPY is used when it offers one.
    pub device_pre_copy: bool,
}

/// What the source half did.
#[derive(Debug)]
pub struct SourceOutcome {
    /// The engine's report of the migration that succeeded.
    pub report: MigrationReport,
    /// The digests of the regions asked for, read after the migration (device stopped).
    pub region_digests: RegionDigests,
    /// Each destination tried, in order (the last one took the VM).
    pub attempts: Vec<Attempt>,
}

/// What the caller shows of a migration attempt while it runs.
pub trait Progress {
    /// An attempt to migrate begins (before its link connects).
    fn attempt_started(&mut self) {}
    /// A round ended; `total_bytes` sent in this attempt so far.
    fn round(&mut self, _round: &RoundStats, _total_bytes: u64) {}
    /// The attempt ended, either way.
    fn attempt_ended(&mut self) {}
}

/// Shows nothing.
impl Progress for () {}

/// Writes data into the leading `pct` percent of each guest region: every page differs
/// (its GPA in its first 8 bytes) and none is zero.
pub fn prefill(memory: &LoggedGuestMemory, pct: u64) -> Result<(), ScenarioError> {
    const CHUNK_BYTES: u64 = 1 << 20;
    let mut chunk = vec![0xa5u8; CHUNK_BYTES as usize];
    for region in memory.regions() {
        let fill_bytes = (region.size / 100 * pct) & !0xfff;
        let mut done = 0;
        while done < fill_bytes {
            let len = (fill_bytes - done).min(CHUNK_BYTES);
            for (i, page) in chunk[..len as usize].chunks_mut(4096).enumerate() {
                let gpa = region.gpa + done + i as u64 * 4096;
                page[..8].copy_from_slice(&gpa.to_le_bytes());
            }
            if !memory.write_at(region.gpa + done, &chunk[..len as usize]) {
                return Err(ScenarioError::Failed(format!(
                    "prefilling guest memory at {:#x}",
                    region.gpa + done
                )));
            }
            done += len;
        }
    }
    Ok(())
}

/// DMA-maps every region of `memory` into the device behind `client` (by its memfd).
pub fn map_all(client: &mut Client, memory: &LoggedGuestMemory) -> Result<(), String> {
    for region in memory.regions() {
        let fd = region
            .fd()
            .ok_or_else(|| format!("guest memory at {:#x} has no file to share", region.gpa))?;
        client
            .dma_map(region.range(), Some(fd), region.file_offset(), true)
            .map_err(|e| format!("DMA_MAP to the device server: {e}"))?;
    }
    Ok(())
}

/// Where the two working sets go, as GPAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkingSets {
    device_base: u64,
    vcpu_base: u64,
}

/// The device's working set sits a third of the way into the low region (256 MiB for the
/// default 1 GiB guest), the vCPUs' just below it, overlapping it by `wss_overlap_pct` of
/// the vCPUs' set.
fn working_sets(
    options: &SourceOptions,
    low_region_bytes: u64,
) -> Result<WorkingSets, ScenarioError> {
    let device_base = (low_region_bytes / 3) & !0xfff;
    let vcpu_wss = options.vcpu_wss_bytes;
    let overlap = (vcpu_wss / 100 * options.wss_overlap_pct) & !0xfff;
    if overlap > options.device_wss_bytes {
        return Err(ScenarioError::Failed(
            "--wss-overlap-pct: the overlap is larger than the device's working set".into(),
        ));
    }
    if device_base + options.device_wss_bytes > low_region_bytes || vcpu_wss > device_base + overlap
    {
        return Err(ScenarioError::Failed(format!(
            "the working sets do not fit the low memory region ({} MiB)",
            low_region_bytes >> 20
        )));
    }
    Ok(WorkingSets {
        device_base,
        vcpu_base: device_base + overlap - vcpu_wss,
    })
}

/// Runs the source VM on the device at `src` and migrates it to the first of
/// `destinations` that takes it.
pub fn run_source(
    options: &SourceOptions,
    mut src: Client,
    destinations: &[String],
    security: &ClientSide,
    progress: &mut dyn Progress,
) -> Result<SourceOutcome, ScenarioError> {
    if options.guest_bytes < 64 * MIB {
        return Err(ScenarioError::Failed(
            "the guest needs at least 64 MiB".into(),
        ));
    }
    let layout = default_layout(options.guest_bytes);
    // The vCPUs' writes are logged by the memory's bitmaps and REPORTed from this set.
    let regions = DirtyRegions::new(crate::engine::PAGE)
        .map_err(|err| ScenarioError::Failed(format!("vCPU dirty log: {err}")))?;
    let memory = Arc::new(memfd_guest(&regions, &layout).step(|| "source guest memory".into())?);
    prefill(&memory, options.prefill_pct)?;
    map_all(&mut src, &memory).map_err(ScenarioError::Failed)?;
    let sets = working_sets(options, layout[0].1)?;
    let digest_sizes = device::region_sizes(&mut src, &options.digest_regions);
    for &index in &options.fill_regions {
        device::fill_region(&mut src, index)?;
    }
    for write in &options.region_writes {
        src.write_u64(write.index, write.offset, write.value)
            .step(|| format!("writing region {} at {:#x}", write.index, write.offset))?;
    }
    let workload = device::wanted(options.device_workload, &mut src);
    if workload {
        device::start_workload(
            &mut src,
            sets.device_base,
            options.device_wss_bytes,
            options.device_rate_bytes_per_sec,
        )?;
    }
    let mut cpu = regions.tracker();
    let vcpus = VcpuWorkload::start(
        Arc::clone(&memory),
        VcpuParams {
            threads: options.vcpus,
            base: sets.vcpu_base,
            span: options.vcpu_wss_bytes,
            rate: options.vcpu_rate_bytes_per_sec,
            seed: 7,
        },
    )?;
    std::thread::sleep(Duration::from_millis(200)); // the guest is live

    let first_gpa = layout[0].0;
    let (report, attempts) = failover::try_in_turn(
        destinations,
        &mut (&mut src, &mut cpu, &mut *progress),
        |(src, cpu, progress), destination| {
            let vm = LiveVm {
                memory: &memory,
                src,
                cpu: *cpu,
                vcpus: &vcpus,
                workload,
            };
            progress.attempt_started();
            let done = migrate_once(options, destination, security, vm, &mut **progress);
            progress.attempt_ended();
            done
        },
        |(src, cpu, _)| failover::VmState::read(*src, *cpu, &vcpus, first_gpa),
    )?;
    let region_digests = device::region_digests(&mut src, &digest_sizes);
    Ok(SourceOutcome {
        report,
        region_digests,
        attempts,
    })
}

/// The running source VM, as one migration attempt uses it.
struct LiveVm<'a> {
    memory: &'a LoggedGuestMemory,
    src: &'a mut Client,
    cpu: &'a mut dyn DirtyTracker,
    vcpus: &'a VcpuWorkload,
    /// Whether dma-engine's workload runs on the device.
    workload: bool,
}

/// One migration of the running VM to `destination`. On failure the engine has left the
/// VM running here (vCPUs resumed, device RUNNING, logging off), unless the destination
/// had been told to resume it.
fn migrate_once(
    options: &SourceOptions,
    destination: &str,
    security: &ClientSide,
    vm: LiveVm<'_>,
    progress: &mut dyn Progress,
) -> Result<MigrationReport, ScenarioError> {
    let LiveVm {
        memory,
        src,
        cpu,
        vcpus,
        workload,
    } = vm;
    let timeout = options.timeout;
    let link = || connect_link(destination, security, timeout, options.stream_buffer_bytes);
    let stream = link()?;
    // The link cap is the sum over the channels.
    let rate = Some(options.link_bytes_per_sec / u64::from(options.channels));
    // Further channels connect once the Hello is out (the destination takes them then).
    let mut connect_extra = |_| {
        link()
            .map(|l| FrameWriter::new(l, rate).with_timeout(timeout))
            .map_err(|err| std::io::Error::new(io_kind(&err), chain_text(&err)))
    };
    let mut replies = FrameReader::new(stream.try_clone()?).with_timeout(timeout);
    let mut out = FrameWriter::new(stream, rate).with_timeout(timeout);
    let mut device = MigratedDevice::new(
        src,
        options.device_pre_copy,
        workload.then_some(options.device_rate_bytes_per_sec),
    );
    let vm = SourceVm {
        memory,
        device: &mut device,
        cpu,
        vcpus: Some(vcpus),
    };
    let mut sent_bytes = 0u64;
    migrate_source_channels(
        &options.engine,
        vm,
        &mut out,
        options.channels,
        &mut connect_extra,
        &mut replies,
        |round| {
            sent_bytes += round.bytes_sent;
            progress.round(round, sent_bytes);
        },
    )
    .map_err(ScenarioError::Migration)
}
