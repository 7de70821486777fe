//! `dmalog demo`: a live migration on one machine. Two `dmalog serve` children (dma-engine)
//! are the source and destination devices; this process is the VMM on both sides: guest
//! memory in memfds, a vCPU workload, the device workload, pre-copy over loopback TCP with a
//! link cap, then verification of every byte.

use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device_workload::{self, DeviceWorkload, WorkloadParams};
use crate::failover::{self, Attempt};
use anyhow::{bail, Context};
use dmalog::{DirtyTracker, InProcessTracker, SoftDriver};
use dmalog_migrate::converge::{AutoConverge, ThrottleParams};
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::{
    default_layout, migrate_destination_channels, migrate_source_channels, GuestMemory,
    MigrationReport, Mode, SourceConfig, SourceVm, VcpuParams, VcpuWorkload,
};
use dmalog_vfio_user::client::CLIENT_MAX_DATA_XFER;
use dmalog_vfio_user::Client;

use crate::transport::{ClientSide, ServerSide, TlsArgs};
use indicatif::{ProgressBar, ProgressStyle};

const MIB: u64 = 1 << 20;
/// The default peer timeout, ms.
const DEFAULT_TIMEOUT_MS: u64 = dmalog_migrate::stream::DEFAULT_TIMEOUT.as_millis() as u64;
/// The longest peer timeout accepted, ms (a day).
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// The highest rate any rate flag takes, MB/s (10 TB/s: bytes per second fit a u64 with
/// room to spare).
const MAX_RATE_MBPS: u64 = 10_000_000;
/// The migration stream's socket buffers by default, KiB.
const DEFAULT_STREAM_BUFFER_KIB: u64 = 2048;

/// Bounds the bytes in flight on `stream` (or every socket a listener accepts) to about
/// `kib` KiB each way (0: leaves the kernel's autotuning): the destination applies what is in flight at the stop inside
/// the downtime, and autotuned buffers on loopback hold tens of MiB.
fn bound_stream_buffers(stream: impl rustix::fd::AsFd, kib: u64) -> anyhow::Result<()> {
    if kib == 0 {
        return Ok(());
    }
    let bytes = usize::try_from(kib.saturating_mul(1024)).unwrap_or(usize::MAX);
    rustix::net::sockopt::set_socket_send_buffer_size(&stream, bytes)
        .context("setting the migration stream's send buffer")?;
    rustix::net::sockopt::set_socket_recv_buffer_size(&stream, bytes)
        .context("setting the migration stream's receive buffer")?;
    Ok(())
}

/// The guest, its workloads and the migration settings (shared by `demo` and `migrate`).
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest memory, MiB (3/4 at GPA 0, 1/4 at 4 GiB).
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Share of guest memory written with data (no zero page) before the migration,
    /// percent: a booted guest's memory is mostly not zero. 0 leaves it all zero, which
    /// zero-page skipping sends as flags alone.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100))]
    prefill_pct: u64,
    /// Device workload working set, MiB.
    #[arg(long, default_value_t = 64)]
    device_wss_mib: u64,
    /// Device workload rate, MB/s (0: as fast as it can; auto-converge cannot slow it then).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    device_rate_mbps: u64,
    /// vCPU workload working set, MiB.
    #[arg(long, default_value_t = 16)]
    vcpu_wss_mib: u64,
    /// vCPU workload rate, MB/s (0: as fast as they can).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    vcpu_rate_mbps: u64,
    /// vCPU threads.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Link bandwidth, MB/s (0: uncapped).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    link_mbps: u64,
    /// TCP connections for the migration stream, each with its own sender thread (and TLS
    /// session), as QEMU's multifd channels; the link cap is shared between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=dmalog_migrate::stream::MAX_CHANNELS as i64))]
    channels: u32,
    /// The share of the vCPUs' working set the device writes too, percent (the device's
    /// working set starts that far before the vCPUs' ends): pages dirtied by both are
    /// sent once (the "both" column).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100))]
    wss_overlap_pct: u64,
    /// Maximum downtime, ms.
    #[arg(long, default_value_t = 30)]
    max_downtime_ms: u64,
    /// Socket buffer of the migration stream on each side, KiB (0: the kernel's
    /// autotuning, up to tens of MiB). What sits in the buffers when the guest stops is
    /// applied by the destination inside the downtime: the bound keeps it to a few ms at
    /// 1 GB/s. Raise it for a link with more than that in flight (bandwidth x round trip).
    #[arg(long, default_value_t = DEFAULT_STREAM_BUFFER_KIB)]
    stream_buffer_kib: u64,
    /// Pre-copy rounds before the stop is forced although the rest does not fit the
    /// downtime (a last resort: the migration then reports the budget not met).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Auto-converge: when rounds keep dirtying over half the bandwidth with the predicted
    /// downtime over the budget, slow the vCPUs (and dma-engine's workload) down.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    auto_converge: OnOff,
    /// Auto-converge's first throttle, percent of the guest's time (QEMU's
    /// cpu-throttle-initial).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_initial: u8,
    /// Auto-converge's step after that, percent (QEMU's cpu-throttle-increment).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_increment: u8,
    /// Auto-converge's most, percent (QEMU's max-cpu-throttle).
    #[arg(long, default_value_t = 99, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_max: u8,
    /// START range planning: exact (one range per memory region) or qemu (at most 3).
    #[arg(long, value_enum, default_value_t = RangesArg::Exact)]
    ranges: RangesArg,
    /// How to migrate.
    #[arg(long, value_enum, default_value_t = ModeArg::PreCopy)]
    mode: ModeArg,
    /// How long the destination may take to send or take one frame, and the device
    /// server to answer, ms (a silent peer fails the migration; the source VM runs on).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    timeout_ms: u64,
    /// Print one JSON object with the whole report.
    #[arg(long)]
    json: bool,
    /// dma-engine's DMA workload on the source device: auto (when its PCI IDs say
    /// dma-engine), on, or off.
    #[arg(long, value_enum, default_value_t = DeviceWorkload::Auto)]
    device_workload: DeviceWorkload,
    /// After the migration, print the CRC32C of this device region's contents (repeat for
    /// more; e.g. 1 for BAR1), to compare with the destination's.
    #[arg(long, value_name = "INDEX")]
    region_digest: Vec<u32>,
    /// Before the migration, fill this device region with a known pattern through region
    /// writes (repeat for more): device contents to check a migration with, on a device
    /// no guest programs here.
    #[arg(long, value_name = "INDEX")]
    fill_region: Vec<u32>,
    /// Before the migration (after any fill), write a 64-bit value into a device region:
    /// INDEX:OFFSET=VALUE (repeat for more).
    #[arg(long, value_name = "INDEX:OFFSET=VALUE", value_parser = device_workload::parse_register_write)]
    region_write_u64: Vec<device_workload::RegisterWrite>,
    /// Whether the device's PRE_COPY is used when it offers one (false: its state moves in
    /// STOP_COPY only, for devices whose RESUMING takes just the STOP_COPY data, as
    /// libvfio-user's sample server).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    device_pre_copy: bool,
}

/// On or off.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// The exit status of a migration that verified but stopped over its downtime budget.
pub const EXIT_OVER_BUDGET: u8 = 3;

/// What `dmalog demo` and `dmalog migrate source` exit with.
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 when the migration verified within the \
    downtime budget; 3 when it verified but stopped over the budget (--max-rounds forced \
    the stop, or the stop took longer than predicted); 1 on any failure (not verified, \
    peer or device lost); 2 on bad arguments.";

/// Options of `dmalog demo`.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct DemoArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Device tracker of the source server: soft, pds, pds:REGIONS, mlx5, mlx5:PRESET.
    #[arg(long, default_value = "soft")]
    tracker: String,
    /// Inject an mlx5 tracker fault into the source server: FAULT@N (see `dmalog serve`).
    #[arg(long, value_name = "FAULT@N")]
    inject_fault: Option<String>,
    /// Write a convergence chart (dirty pages and MiB sent per round) to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<std::path::PathBuf>,
    /// Memory budget of each server's tracker state, MiB (see `dmalog serve`).
    #[arg(long, default_value_t = crate::serve::DEFAULT_MAX_LOG_MIB)]
    max_log_mib: u64,
    /// Migrate over plaintext TCP instead of TLS with throwaway certificates (to compare).
    #[arg(long)]
    insecure_plaintext: bool,
}

/// `dmalog migrate`: the two halves of the demo for two hosts.
#[derive(clap::Subcommand, Debug)]
// Parsed once per process: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum MigrateCommand {
    /// Run the source VM against a running `dmalog serve` and migrate it to a destination.
    #[command(after_help = EXIT_STATUS_HELP)]
    Source {
        /// The source device server's socket.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// The destination's `HOST:PORT`. Repeat for fallbacks, tried in turn: after a
        /// failed attempt the VM runs on here (vCPUs and device RUNNING, dirty logging off)
        /// and migrates to the next one.
        #[arg(long, required = true, value_name = "HOST:PORT")]
        connect: Vec<String>,
        /// The name the destination's certificate must carry (default: HOST).
        #[arg(long, value_name = "NAME")]
        tls_server_name: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Receive one migration and resume the device on a running `dmalog serve`.
    Destination {
        /// The destination device server's socket.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Address to listen on, `HOST:PORT`.
        #[arg(long)]
        listen: String,
        /// Guest memory, MiB (must match the source).
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// How long the source may take to send one frame once connected, and the device
        /// server to answer, ms.
        #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
        timeout_ms: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// After the device resumes, print the CRC32C of this device region's contents
        /// (repeat for more; e.g. 1 for BAR1), to compare with the source's.
        #[arg(long, value_name = "INDEX")]
        region_digest: Vec<u32>,
        /// Socket buffer of the migration stream, KiB (0: the kernel's autotuning); see
        /// `migrate source --stream-buffer-kib`.
        #[arg(long, default_value_t = DEFAULT_STREAM_BUFFER_KIB)]
        stream_buffer_kib: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Write a CA and certificates for both hosts into DIR (ca.pem, server.pem,
    /// server-key.pem, client.pem, client-key.pem).
    GenCerts {
        /// Directory to write into (created if missing; existing files are not replaced).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A DNS name or IP address of the destination (repeat for several).
        #[arg(long = "server-name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
}

struct ServerChild {
    child: Child,
    socket: std::path::PathBuf,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn spawn_server(
    dir: &Path,
    name: &str,
    tracker: &str,
    fault: Option<&str>,
    max_log_mib: u64,
) -> anyhow::Result<ServerChild> {
    let socket = dir.join(name);
    let exe = std::env::current_exe().context("finding the dmalog binary")?;
    let mut command = Command::new(exe);
    command
        .args([
            "serve",
            "--device",
            "dma-engine",
            "--tracker",
            tracker,
            "--socket",
        ])
        .arg(&socket)
        .arg("--max-log-mib")
        .arg(max_log_mib.to_string());
    if let Some(fault) = fault {
        command.args(["--inject-fault", fault]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting dmalog serve")?;
    Ok(ServerChild { child, socket })
}

/// A client of the device server at `path` (retrying while it starts), each of its
/// socket reads and writes bounded by `timeout`: a device server that stops answering
/// fails the migration instead of hanging it.
fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = UnixStream::connect(path)
            .and_then(|stream| {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                Ok(stream)
            })
            .map_err(anyhow::Error::from)
            .and_then(|stream| {
                Client::with_stream(stream, CLIENT_MAX_DATA_XFER).map_err(anyhow::Error::from)
            });
        match attempt {
            Ok(client) => return Ok(client),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => return Err(err).context("connecting to dmalog serve"),
        }
    }
}

fn map_all(client: &mut Client, memory: &GuestMemory) -> Result<(), String> {
    for region in memory.regions() {
        client
            .dma_map(region.gpa, region.size, Some(region.fd()), 0, true)
            .map_err(|e| format!("DMA_MAP to the device server: {e}"))?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct DemoOutput<'a> {
    #[serde(flatten)]
    report: &'a MigrationReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_writes_after_resume: Option<u64>,
    destination_pages: u64,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    region_digests: &'a serde_json::Map<String, serde_json::Value>,
    /// Each destination tried, in order (the last one took the VM).
    attempts: &'a [Attempt],
}

/// What the source half did: the engine's report and the digests of the regions asked for
/// (read after the migration, the device stopped).
struct SourceOutcome {
    report: MigrationReport,
    region_digests: serde_json::Map<String, serde_json::Value>,
    /// Each destination tried, in order.
    attempts: Vec<Attempt>,
}

/// What the destination half did.
struct DestinationOutcome {
    /// dma-engine's workload writes in the 100 ms after resuming (None: not dma-engine).
    device_writes_after_resume: Option<u64>,
    pages: u64,
    /// Of `pages`, those that came as zero runs (no bytes on the wire).
    zero_pages: u64,
    /// Connections the migration used.
    channels: u32,
    device_bytes: u64,
    verified: bool,
    region_digests: serde_json::Map<String, serde_json::Value>,
}

/// `--mode`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    /// Pre-copy rounds with device dirty tracking.
    PreCopy,
    /// Stop everything, then copy all memory and the device state.
    StopAndCopy,
    /// Pre-copy without device tracking: device-mapped memory is dirty every round.
    NoDeviceTracking,
}

/// `--ranges`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangesArg {
    /// One START range per memory region.
    Exact,
    /// As QEMU: at most 3.
    Qemu,
}

fn mode_of(vm: &VmArgs) -> Mode {
    match vm.mode {
        ModeArg::PreCopy => Mode::PreCopy,
        ModeArg::StopAndCopy => Mode::StopAndCopy,
        ModeArg::NoDeviceTracking => Mode::NoDeviceTracking,
    }
}

/// The source half: guest memory DMA-mapped into the device at `src`, the device and vCPU
/// workloads running, then the migration to the first of `destinations` that takes it
/// (after a failed attempt the VM runs on, and the next is tried).
fn run_source(
    vm_args: &VmArgs,
    mut src: Client,
    destinations: &[String],
    security: &ClientSide,
) -> anyhow::Result<SourceOutcome> {
    let guest_bytes = vm_args.memory_mib * MIB;
    if guest_bytes < 64 * MIB {
        bail!("the guest needs at least 64 MiB");
    }
    let layout = default_layout(guest_bytes);
    let memory = Arc::new(GuestMemory::new(&layout).context("source guest memory")?);
    prefill(&memory, vm_args.prefill_pct)?;
    map_all(&mut src, &memory).map_err(anyhow::Error::msg)?;
    // The device's working set sits a third of the way into the low region (256 MiB for
    // the default 1 GiB guest), the vCPUs' just below it, overlapping it by
    // --wss-overlap-mib.
    let low_region = layout[0].1;
    let device_base = (low_region / 3) & !0xfff;
    let vcpu_wss = vm_args.vcpu_wss_mib * MIB;
    let overlap = (vcpu_wss / 100 * vm_args.wss_overlap_pct) & !0xfff;
    if overlap > vm_args.device_wss_mib * MIB {
        bail!("--wss-overlap-pct: the overlap is larger than the device's working set");
    }
    if device_base + vm_args.device_wss_mib * MIB > low_region || vcpu_wss > device_base + overlap {
        bail!(
            "the working sets do not fit the low memory region ({} MiB)",
            low_region >> 20
        );
    }
    let vcpu_base = device_base + overlap - vcpu_wss;
    let digest_sizes = device_workload::region_sizes(&mut src, &vm_args.region_digest);
    for &index in &vm_args.fill_region {
        device_workload::fill_region(&mut src, index)?;
    }
    for write in &vm_args.region_write_u64 {
        src.write_u64(write.index, write.offset, write.value)
            .with_context(|| format!("writing region {} at {:#x}", write.index, write.offset))?;
    }
    let workload = device_workload::wanted(vm_args.device_workload, &mut src);
    if workload {
        device_workload::start(
            &mut src,
            WorkloadParams {
                base: device_base,
                span_bytes: vm_args.device_wss_mib * MIB,
                rate_bytes_per_sec: vm_args.device_rate_mbps * 1_000_000,
            },
        )?;
    }
    let cpu_driver = SoftDriver::new();
    let recorder = cpu_driver.recorder();
    let mut cpu = InProcessTracker::new(cpu_driver);
    let vcpus = VcpuWorkload::start(
        Arc::clone(&memory),
        recorder,
        VcpuParams {
            threads: vm_args.vcpus,
            base: vcpu_base,
            span: vcpu_wss,
            rate: vm_args.vcpu_rate_mbps * 1_000_000,
            seed: 7,
        },
    )?;
    std::thread::sleep(Duration::from_millis(200)); // the guest is live

    let first_gpa = layout[0].0;
    let outcome = failover::try_in_turn(
        destinations,
        &mut (&mut src, &mut cpu),
        |(src, cpu), destination| {
            let vm = LiveVm {
                memory: &memory,
                src,
                cpu: *cpu,
                vcpus: &vcpus,
                workload,
            };
            migrate_once(vm_args, destination, security, vm)
        },
        |(src, cpu)| failover::VmState::read(*src, *cpu, &vcpus, first_gpa),
    );
    let (report, attempts) = match outcome {
        Ok(done) => done,
        Err(failed) => {
            if vm_args.json {
                let mut stdout = std::io::stdout().lock();
                serde_json::to_writer_pretty(
                    &mut stdout,
                    &serde_json::json!({ "attempts": failed.0 }),
                )?;
                writeln!(stdout)?;
            }
            return Err(failed.into());
        }
    };
    let region_digests = device_workload::region_digests(&mut src, &digest_sizes);
    Ok(SourceOutcome {
        report,
        region_digests,
        attempts,
    })
}

/// The running source VM, as one migration attempt uses it.
struct LiveVm<'a> {
    memory: &'a GuestMemory,
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
    vm_args: &VmArgs,
    destination: &str,
    security: &ClientSide,
    vm: LiveVm<'_>,
) -> anyhow::Result<MigrationReport> {
    let LiveVm {
        memory,
        src,
        cpu,
        vcpus,
        workload,
    } = vm;

    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    progress.enable_steady_tick(Duration::from_millis(100));
    progress.set_message("migrating: round 0 (all memory)");
    let timeout = Duration::from_millis(vm_args.timeout_ms);
    let link = || {
        let stream = connect_within(destination, timeout)
            .with_context(|| format!("connecting to the destination {destination}"))?;
        stream.set_nodelay(true)?;
        bound_stream_buffers(&stream, vm_args.stream_buffer_kib)?;
        security
            .secure(stream, destination, timeout)
            .with_context(|| format!("securing the link to {destination}"))
    };
    let stream = link()?;
    // The link cap is the sum over the channels.
    let rate = Some(vm_args.link_mbps * 1_000_000 / u64::from(vm_args.channels));
    // Further channels connect once the Hello is out (the destination takes them then).
    let mut connect_extra = |_| {
        link()
            .map(|l| FrameWriter::new(l, rate).with_timeout(timeout))
            .map_err(|err| {
                // The kind says whether the destination hung up (then the engine looks for
                // the reason it sent on the first channel).
                let kind = err
                    .chain()
                    .find_map(|cause| {
                        cause.downcast_ref::<std::io::Error>().or_else(|| {
                            match cause.downcast_ref::<dmalog_migrate::tls::TlsError>() {
                                Some(dmalog_migrate::tls::TlsError::Handshake {
                                    cause, ..
                                }) => Some(cause),
                                _ => None,
                            }
                        })
                    })
                    .map_or(std::io::ErrorKind::Other, std::io::Error::kind);
                std::io::Error::new(kind, format!("{err:#}"))
            })
    };
    let mut replies = FrameReader::new(stream.try_clone()?).with_timeout(timeout);
    let mut out = FrameWriter::new(stream, rate).with_timeout(timeout);
    let config = SourceConfig {
        ranges: match vm_args.ranges {
            RangesArg::Exact => dmalog_migrate::RangePlan::Exact,
            RangesArg::Qemu => dmalog_migrate::RangePlan::Qemu,
        },
        mode: mode_of(vm_args),
        max_downtime: Duration::from_millis(vm_args.max_downtime_ms),
        max_rounds: vm_args.max_rounds,
        throttle: ThrottleParams {
            mode: match vm_args.auto_converge {
                OnOff::On => AutoConverge::On,
                OnOff::Off => AutoConverge::Off,
            },
            initial_pct: vm_args.throttle_initial,
            increment_pct: vm_args.throttle_increment,
            max_pct: vm_args.throttle_max,
            ..ThrottleParams::default()
        },
    };
    let mut device = device_workload::MigratedDevice::new(
        src,
        vm_args.device_pre_copy,
        workload.then_some(vm_args.device_rate_mbps * 1_000_000),
    );
    let vm = SourceVm {
        memory,
        device: &mut device,
        cpu,
        vcpus: Some(vcpus),
    };
    let mut sent_bytes = 0u64;
    let report = migrate_source_channels(
        &config,
        vm,
        &mut out,
        vm_args.channels,
        &mut connect_extra,
        &mut replies,
        |round| {
            sent_bytes += round.bytes_sent;
            progress.set_message(crate::progress::round_line(round, sent_bytes));
        },
    );
    progress.finish_and_clear();
    report.context("migration")
}

/// A connection to `address` (each of its resolved addresses in turn), each attempt
/// bounded by `timeout`.
fn connect_within(address: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for addr in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(err) => last = Some(err),
        }
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("{address} resolves to no address"),
        Into::into,
    ))
}

/// The destination half: one incoming migration on `listener`, resumed on the device at
/// `dst`; then dma-engine's workload writes in the 100 ms after resuming (when the device
/// is one) and the digests of `digest_regions`.
fn run_destination(
    memory_mib: u64,
    mut dst: Client,
    listener: TcpListener,
    timeout: Duration,
    security: &ServerSide,
    digest_regions: &[u32],
    stream_buffer_kib: u64,
) -> anyhow::Result<DestinationOutcome> {
    // Asked before the migration: after it, every request counts against the device's
    // time running.
    let dma_engine = device_workload::is_dma_engine(&mut dst);
    let memory =
        GuestMemory::new(&default_layout(memory_mib * MIB)).context("destination guest memory")?;
    // Every channel's socket inherits the listener's buffers.
    bound_stream_buffers(&listener, stream_buffer_kib)?;
    // Waiting for a source to connect is this side's job and has no limit; once one has,
    // every frame must come within `timeout`.
    let (stream, _) = listener.accept()?;
    // Small frames (Resumed) go out at once: with Nagle, a frame written in parts waits for
    // the source's delayed ACK (40 ms on Linux), inside the downtime.
    stream.set_nodelay(true)?;
    let stream = security.secure(stream, timeout)?;
    let mut input = FrameReader::new(stream.try_clone()?).with_timeout(timeout);
    let mut out = FrameWriter::new(stream, None).with_timeout(timeout);
    let report = migrate_destination_channels(
        &memory,
        &mut dst,
        &mut |client, memory| map_all(client, memory),
        &mut input,
        &mut out,
        crate::transport::acceptor(listener, security, timeout),
    )
    .inspect_err(|_| failover::discard_unresumed_load(&mut dst))
    .context("destination")?;
    // The device goes on where it stopped.
    let device_writes_after_resume = if dma_engine {
        // On a busy machine the device server may not have run since the resume: wait for
        // its first write (2 s at most), then count a 100 ms window.
        let mut before = device_workload::writes(&mut dst)?;
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
            let now = device_workload::writes(&mut dst)?;
            if now != before {
                before = now;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let after = device_workload::writes(&mut dst)?;
        Some(after.saturating_sub(before))
    } else {
        None
    };
    Ok(DestinationOutcome {
        device_writes_after_resume,
        pages: report.pages,
        zero_pages: report.zero_pages,
        channels: report.channels,
        device_bytes: report.device_bytes,
        verified: report.verified,
        region_digests: {
            let sizes = device_workload::region_sizes(&mut dst, digest_regions);
            device_workload::region_digests(&mut dst, &sizes)
        },
    })
}

fn print_report(
    vm_args: &VmArgs,
    source: &SourceOutcome,
    device_writes_after_resume: Option<u64>,
    destination_pages: u64,
) -> anyhow::Result<ExitCode> {
    let report = &source.report;
    let mut stdout = std::io::stdout().lock();
    if vm_args.json {
        serde_json::to_writer_pretty(
            &mut stdout,
            &DemoOutput {
                report,
                device_writes_after_resume,
                destination_pages,
                region_digests: &source.region_digests,
                attempts: &source.attempts,
            },
        )?;
        writeln!(stdout)?;
    } else {
        failover::print_failed_attempts(&mut stdout, &source.attempts)?;
        crate::progress::print_table(&mut stdout, report, device_writes_after_resume)?;
        crate::progress::print_digests(&mut stdout, &source.region_digests)?;
    }
    Ok(if !report.verified {
        ExitCode::FAILURE
    } else if !report.downtime_budget_met {
        ExitCode::from(EXIT_OVER_BUDGET)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the demo; exit code 1 unless VERIFIED, [`EXIT_OVER_BUDGET`] when it verified over
/// the downtime budget.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let vm = &args.vm;
    if vm.device_wss_mib + vm.vcpu_wss_mib > vm.memory_mib / 2 {
        bail!("the guest needs twice the two working sets");
    }
    crate::serve::max_log_bytes(args.max_log_mib)?;
    let dir = std::env::temp_dir().join(format!("dmalog-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let src_server = spawn_server(
        &dir,
        "src.sock",
        &args.tracker,
        args.inject_fault.as_deref(),
        args.max_log_mib,
    )?;
    let dst_server = spawn_server(&dir, "dst.sock", &args.tracker, None, args.max_log_mib)?;
    let timeout = Duration::from_millis(vm.timeout_ms);
    let src = connect(&src_server.socket, timeout)?;
    let dst = connect(&dst_server.socket, timeout)?;
    // TLS with a throwaway CA in the demo's directory, unless asked for plaintext.
    let (server_side, client_side) = if args.insecure_plaintext {
        crate::transport::warn_plaintext();
        (ServerSide::Plaintext, ClientSide::Plaintext)
    } else {
        let pki = dmalog_migrate::pki::write_set(&dir, &["localhost".into(), "127.0.0.1".into()])
            .context("throwaway certificates")?;
        (
            TlsArgs::from_files(&pki.ca, &pki.server_cert, &pki.server_key).server()?,
            TlsArgs::from_files(&pki.ca, &pki.client_cert, &pki.client_key).client(None)?,
        )
    };
    let listener = TcpListener::bind("127.0.0.1:0").context("listening on loopback")?;
    let address = listener.local_addr()?.to_string();
    let memory_mib = vm.memory_mib;
    let stream_buffer_kib = vm.stream_buffer_kib;
    let destination = std::thread::spawn(move || {
        run_destination(
            memory_mib,
            dst,
            listener,
            timeout,
            &server_side,
            &[],
            stream_buffer_kib,
        )
    });
    let source = run_source(vm, src, &[address], &client_side);
    let destination = destination
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let source = source?;
    let destination = destination?;
    if let Some(path) = &args.chart {
        crate::chart::write_svg(&source.report, path)
            .with_context(|| format!("--chart {}", path.display()))?;
    }
    print_report(
        vm,
        &source,
        destination.device_writes_after_resume,
        destination.pages,
    )
}

/// Runs `dmalog migrate source|destination`.
pub fn run_migrate(command: &MigrateCommand) -> anyhow::Result<ExitCode> {
    match command {
        MigrateCommand::Source {
            socket,
            connect: destination,
            tls_server_name,
            tls,
            vm,
        } => {
            let security = tls.client(tls_server_name.as_deref())?;
            let src = connect(socket, Duration::from_millis(vm.timeout_ms))?;
            let source = run_source(vm, src, destination, &security)?;
            print_report(vm, &source, None, 0)
        }
        MigrateCommand::Destination {
            socket,
            listen,
            memory_mib,
            timeout_ms,
            json,
            tls,
            region_digest,
            stream_buffer_kib,
        } => {
            let security = tls.server()?;
            let dst = connect(socket, Duration::from_millis(*timeout_ms))?;
            let listener =
                TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("waiting for a migration on {}", listener.local_addr()?);
            let outcome = run_destination(
                *memory_mib,
                dst,
                listener,
                Duration::from_millis(*timeout_ms),
                &security,
                region_digest,
                *stream_buffer_kib,
            )?;
            let verified = outcome.verified;
            let mut stdout = std::io::stdout().lock();
            if *json {
                let mut object = serde_json::json!({
                    "verified": verified,
                    "pages": outcome.pages,
                    "zero_pages": outcome.zero_pages,
                    "channels": outcome.channels,
                    "device_bytes": outcome.device_bytes,
                    "device_writes_after_resume": outcome.device_writes_after_resume,
                });
                if !outcome.region_digests.is_empty() {
                    object["region_digests"] = outcome.region_digests.into();
                }
                writeln!(stdout, "{object}")?;
            } else {
                let workload = match outcome.device_writes_after_resume {
                    Some(writes) => format!(" ({writes} workload writes in 100 ms)"),
                    None => String::new(),
                };
                writeln!(
                    stdout,
                    "received {} pages and {} bytes of device state; device resumed{workload}; {}",
                    outcome.pages,
                    outcome.device_bytes,
                    if verified { "VERIFIED" } else { "FAILED" }
                )?;
                crate::progress::print_digests(&mut stdout, &outcome.region_digests)?;
            }
            Ok(if verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        MigrateCommand::GenCerts { dir, server_names } => {
            crate::transport::gen_certs(dir, server_names)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes data into the leading `pct` percent of each guest region: every page differs
/// (its GPA in its first 8 bytes) and none is zero.
fn prefill(memory: &GuestMemory, pct: u64) -> anyhow::Result<()> {
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
            if !memory.write(region.gpa + done, &chunk[..len as usize]) {
                bail!("prefilling guest memory at {:#x}", region.gpa + done);
            }
            done += len;
        }
    }
    Ok(())
}
