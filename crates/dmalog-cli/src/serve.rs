//! `dmalog serve`: a vfio-user device server on a UNIX socket.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use dmalog_device::{DmaEngine, LvuSample};
use dmalog_vfio_user::{Server, ServerConfig, TrackerKind};

/// Options of `dmalog serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The UNIX socket to listen on (created mode 0600; a stale one is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// The emulated device.
    #[arg(long, default_value = "dma-engine", value_parser = ["dma-engine", "lvu-sample"])]
    device: String,
    /// The DMA tracker: soft, none, pds, pds:REGIONS, mlx5, or mlx5:PRESET[,field=value...] (presets cx7,
    /// tiny, unlimited).
    #[arg(long, default_value = "soft")]
    tracker: String,
    /// lvu-sample's BAR1 size in bytes (16 KiB; libvfio-user clients before its BAR-size
    /// fix expect 12288).
    #[arg(long, default_value_t = 0x4000)]
    lvu_bar1_size: u64,
    /// mlx5 tracker: inject FAULT before the N-th REPORT of each logging session
    /// (cq-error, catastrophic, object-changed-error, completion-error, malformed,
    /// oversized, bad-opcode).
    #[arg(long, value_name = "FAULT@N")]
    inject_fault: Option<String>,
    /// Largest data payload per message, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_data_xfer_size: u32,
    /// Memory budget of the tracker's state (dirty bitmaps, rings), MiB: a START that
    /// needs more fails with ENOMEM.
    #[arg(long, default_value_t = DEFAULT_MAX_LOG_MIB)]
    max_log_mib: u64,
}

/// The default `--max-log-mib` (the core's default budget).
pub const DEFAULT_MAX_LOG_MIB: u64 = dmalog::budget::DEFAULT_MAX_LOG_BYTES >> 20;

/// `--max-log-mib` in bytes, or an error when it does not fit in 64 bits.
pub fn max_log_bytes(max_log_mib: u64) -> anyhow::Result<u64> {
    max_log_mib
        .checked_mul(1 << 20)
        .context("--max-log-mib is too large")
}

/// Runs the server until killed.
pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let tracker: TrackerKind = args
        .tracker
        .parse()
        .with_context(|| format!("--tracker {}", args.tracker))?;
    let max_log_bytes = max_log_bytes(args.max_log_mib)?;
    if args.socket.exists() {
        std::fs::remove_file(&args.socket)
            .with_context(|| format!("removing stale {}", args.socket.display()))?;
    }
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", args.socket.display()))?;
    let fault_plan = match &args.inject_fault {
        Some(spec) => {
            let (fault, at) = spec
                .split_once('@')
                .context("--inject-fault wants FAULT@N")?;
            let fault: dmalog::Mlx5Fault = fault.parse().map_err(anyhow::Error::msg)?;
            Some((at.parse::<u64>().context("--inject-fault N")?, fault))
        }
        None => None,
    };
    let config = ServerConfig {
        tracker,
        max_data_xfer_size: args.max_data_xfer_size,
        fault_plan,
        max_log_bytes,
        ..ServerConfig::default()
    };
    let mut server = Server::try_new(
        config,
        |space| -> std::io::Result<Box<dyn dmalog_device::Device>> {
            Ok(match args.device.as_str() {
                "lvu-sample" => Box::new(LvuSample::with_bar1_size(space, args.lvu_bar1_size)?),
                _ => Box::new(DmaEngine::new(space)),
            })
        },
    )
    .context("creating the device")?;
    tracing::info!(socket = %args.socket.display(), device = %args.device, tracker = %args.tracker, "serving");
    let stop = AtomicBool::new(false);
    server.run(&listener, &stop).context("accepting clients")?;
    Ok(ExitCode::SUCCESS)
}
