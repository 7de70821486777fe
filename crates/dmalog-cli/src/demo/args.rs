//! The flags of `dmalog demo` and `dmalog migrate`, and how they become the scenario's
//! typed options (`dmalog_migrate::scenario`).

use std::time::Duration;

use dmalog_migrate::converge::{AutoConverge, ThrottleParams};
use dmalog_migrate::scenario::{DestinationOptions, DeviceWorkload, RegisterWrite, SourceOptions};
use dmalog_migrate::{Mode, RangePlan, SourceConfig};

use crate::transport::TlsArgs;

pub use dmalog_migrate::scenario::MIB;
/// The default peer timeout, ms.
const DEFAULT_TIMEOUT_MS: u64 = dmalog_migrate::stream::DEFAULT_TIMEOUT.as_millis() as u64;
/// The longest peer timeout accepted, ms (a day).
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// The highest rate any rate flag takes, MB/s (10 TB/s: bytes per second fit a u64 with
/// room to spare).
const MAX_RATE_MBPS: u64 = 10_000_000;
/// The migration stream's socket buffers by default, KiB.
const DEFAULT_STREAM_BUFFER_KIB: u64 = 2048;

/// The guest, its workloads and the migration settings (shared by `demo` and `migrate`).
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest memory, MiB (3/4 at GPA 0, 1/4 at 4 GiB).
    #[arg(long, default_value_t = 1024)]
    pub(crate) memory_mib: u64,
    /// Share of guest memory written with data (no zero page) before the migration,
    /// percent: a booted guest's memory is mostly not zero. 0 leaves it all zero, which
    /// zero-page skipping sends as flags alone.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub(crate) prefill_pct: u64,
    /// Device workload working set, MiB.
    #[arg(long, default_value_t = 64)]
    pub(crate) device_wss_mib: u64,
    /// Device workload rate, MB/s (0: as fast as it can; auto-converge cannot slow it then).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    pub(crate) device_rate_mbps: u64,
    /// vCPU workload working set, MiB.
    #[arg(long, default_value_t = 16)]
    pub(crate) vcpu_wss_mib: u64,
    /// vCPU workload rate, MB/s (0: as fast as they can).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    pub(crate) vcpu_rate_mbps: u64,
    /// vCPU threads.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Link bandwidth, MB/s (0: uncapped).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE_MBPS))]
    pub(crate) link_mbps: u64,
    /// TCP connections for the migration stream, each with its own sender thread (and TLS
    /// session), as QEMU's multifd channels; the link cap is shared between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=dmalog_migrate::stream::MAX_CHANNELS as i64))]
    pub(crate) channels: u32,
    /// The share of the vCPUs' working set the device writes too, percent (the device's
    /// working set starts that far before the vCPUs' ends): pages dirtied by both are
    /// sent once (the "both" column).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub(crate) wss_overlap_pct: u64,
    /// Maximum downtime, ms.
    #[arg(long, default_value_t = 30)]
    pub(crate) max_downtime_ms: u64,
    /// Socket buffer of the migration stream on each side, KiB (0: the kernel's
    /// autotuning, up to tens of MiB). What sits in the buffers when the guest stops is
    /// applied by the destination inside the downtime: the bound keeps it to a few ms at
    /// 1 GB/s. Raise it for a link with more than that in flight (bandwidth x round trip).
    #[arg(long, default_value_t = DEFAULT_STREAM_BUFFER_KIB)]
    pub(crate) stream_buffer_kib: u64,
    /// Pre-copy rounds before the stop is forced although the rest does not fit the
    /// downtime (a last resort: the migration then reports the budget not met).
    #[arg(long, default_value_t = 30)]
    pub(crate) max_rounds: u32,
    /// Auto-converge: when rounds keep dirtying over half the bandwidth with the predicted
    /// downtime over the budget, slow the vCPUs (and dma-engine's workload) down.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub(crate) auto_converge: OnOff,
    /// Auto-converge's first throttle, percent of the guest's time (QEMU's
    /// cpu-throttle-initial).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub(crate) throttle_initial: u8,
    /// Auto-converge's step after that, percent (QEMU's cpu-throttle-increment).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub(crate) throttle_increment: u8,
    /// Auto-converge's most, percent (QEMU's max-cpu-throttle).
    #[arg(long, default_value_t = 99, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub(crate) throttle_max: u8,
    /// START range planning: exact (one range per memory region) or qemu (at most 3).
    #[arg(long, value_enum, default_value_t = RangesArg::Exact)]
    pub(crate) ranges: RangesArg,
    /// How to migrate.
    #[arg(long, value_enum, default_value_t = ModeArg::PreCopy)]
    pub(crate) mode: ModeArg,
    /// How long the destination may take to send or take one frame, and the device
    /// server to answer, ms (a silent peer fails the migration; the source VM runs on).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub(crate) timeout_ms: u64,
    /// Print one JSON object with the whole report.
    #[arg(long)]
    pub(crate) json: bool,
    /// dma-engine's DMA workload on the source device: auto (when its PCI IDs say
    /// dma-engine), on, or off.
    #[arg(long, value_enum, default_value_t = DeviceWorkloadArg::Auto)]
    pub(crate) device_workload: DeviceWorkloadArg,
    /// After the migration, print the CRC32C of this device region's contents (repeat for
    /// more; e.g. 1 for BAR1), to compare with the destination's.
    #[arg(long, value_name = "INDEX")]
    pub(crate) region_digest: Vec<u32>,
    /// Before the migration, fill this device region with a known pattern through region
    /// writes (repeat for more): device contents to check a migration with, on a device
    /// no guest programs here.
    #[arg(long, value_name = "INDEX")]
    pub(crate) fill_region: Vec<u32>,
    /// Before the migration (after any fill), write a 64-bit value into a device region:
    /// INDEX:OFFSET=VALUE (repeat for more).
    #[arg(long, value_name = "INDEX:OFFSET=VALUE", value_parser = parse_register_write)]
    pub(crate) region_write_u64: Vec<RegisterWrite>,
    /// Whether the device's PRE_COPY is used when it offers one (false: its state moves in
    /// STOP_COPY only, for devices whose RESUMING takes just the STOP_COPY data, as
    /// libvfio-user's sample server).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) device_pre_copy: bool,
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
    pub(crate) vm: VmArgs,
    /// Device tracker of the source server: soft, pds, pds:REGIONS, mlx5, mlx5:PRESET.
    #[arg(long, default_value = "soft")]
    pub(crate) tracker: String,
    /// Inject an mlx5 tracker fault into the source server: FAULT@N (see `dmalog serve`).
    #[arg(long, value_name = "FAULT@N")]
    pub(crate) inject_fault: Option<String>,
    /// Write a convergence chart (dirty pages and MiB sent per round) to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) chart: Option<std::path::PathBuf>,
    /// Memory budget of each server's tracker state, MiB (see `dmalog serve`).
    #[arg(long, default_value_t = crate::serve::DEFAULT_MAX_LOG_MIB)]
    pub(crate) max_log_mib: u64,
    /// Migrate over plaintext TCP instead of TLS with throwaway certificates (to compare).
    #[arg(long)]
    pub(crate) insecure_plaintext: bool,
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

/// Whether to start dma-engine's DMA workload on the source device.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWorkloadArg {
    /// When the device's PCI IDs say dma-engine.
    #[default]
    Auto,
    /// Always (the device must have dma-engine's workload registers).
    On,
    /// Never: the device does only what the guest (nobody, here) asks.
    Off,
}

fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|err| format!("{text:?}: {err}"))
}

/// Parses `INDEX:OFFSET=VALUE`.
pub fn parse_register_write(text: &str) -> Result<RegisterWrite, String> {
    let (place, value) = text.split_once('=').ok_or("expected INDEX:OFFSET=VALUE")?;
    let (index, offset) = place.split_once(':').ok_or("expected INDEX:OFFSET=VALUE")?;
    Ok(RegisterWrite {
        index: u32::try_from(parse_number(index)?).map_err(|_| "region index too large")?,
        offset: parse_number(offset)?,
        value: parse_number(value)?,
    })
}

/// Bytes of `mib` MiB (saturating: a size past 16 EiB fails where it is used).
fn mib_bytes(mib: u64) -> u64 {
    mib.saturating_mul(MIB)
}

impl VmArgs {
    /// The source half's options.
    pub fn source_options(&self) -> SourceOptions {
        SourceOptions {
            guest_bytes: mib_bytes(self.memory_mib),
            prefill_pct: self.prefill_pct,
            device_wss_bytes: mib_bytes(self.device_wss_mib),
            device_rate_bytes_per_sec: self.device_rate_mbps * 1_000_000,
            vcpu_wss_bytes: mib_bytes(self.vcpu_wss_mib),
            vcpu_rate_bytes_per_sec: self.vcpu_rate_mbps * 1_000_000,
            vcpus: self.vcpus,
            link_bytes_per_sec: self.link_mbps * 1_000_000,
            channels: self.channels,
            wss_overlap_pct: self.wss_overlap_pct,
            stream_buffer_bytes: self.stream_buffer_kib.saturating_mul(1024),
            timeout: Duration::from_millis(self.timeout_ms),
            engine: SourceConfig {
                ranges: match self.ranges {
                    RangesArg::Exact => RangePlan::Exact,
                    RangesArg::Qemu => RangePlan::Qemu,
                },
                mode: match self.mode {
                    ModeArg::PreCopy => Mode::PreCopy,
                    ModeArg::StopAndCopy => Mode::StopAndCopy,
                    ModeArg::NoDeviceTracking => Mode::NoDeviceTracking,
                },
                max_downtime: Duration::from_millis(self.max_downtime_ms),
                max_rounds: self.max_rounds,
                throttle: ThrottleParams {
                    mode: match self.auto_converge {
                        OnOff::On => AutoConverge::On,
                        OnOff::Off => AutoConverge::Off,
                    },
                    initial_pct: self.throttle_initial,
                    increment_pct: self.throttle_increment,
                    max_pct: self.throttle_max,
                    ..ThrottleParams::default()
                },
            },
            device_workload: match self.device_workload {
                DeviceWorkloadArg::Auto => DeviceWorkload::Auto,
                DeviceWorkloadArg::On => DeviceWorkload::On,
                DeviceWorkloadArg::Off => DeviceWorkload::Off,
            },
            digest_regions: self.region_digest.clone(),
            fill_regions: self.fill_region.clone(),
            region_writes: self.region_write_u64.clone(),
            device_pre_copy: self.device_pre_copy,
        }
    }

    /// The destination half's options for the same guest (the demo's own destination).
    pub fn destination_options(&self) -> DestinationOptions {
        DestinationOptions {
            guest_bytes: mib_bytes(self.memory_mib),
            timeout: Duration::from_millis(self.timeout_ms),
            digest_regions: Vec::new(),
            stream_buffer_bytes: self.stream_buffer_kib.saturating_mul(1024),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_writes_parse_and_refuse_garbage() {
        assert_eq!(
            parse_register_write("0:0=0x10").unwrap(),
            RegisterWrite {
                index: 0,
                offset: 0,
                value: 16
            }
        );
        assert_eq!(parse_register_write("1:0x8=7").unwrap().offset, 8);
        for bad in ["", "0:0", "0=1", "x:0=1", "0:0=", "4294967296:0=1"] {
            assert!(parse_register_write(bad).is_err(), "{bad}");
        }
    }
}
