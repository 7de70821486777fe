//! `dmalog serve`: a vfio-user device server on a UNIX socket.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use std::sync::Arc;

use anyhow::Context;
use dmalog::{LiveLog, SoftDriver};
use dmalog_device::{DmaEngine, LvuSample};
use dmalog_models::mlx5::CapsError;
use dmalog_models::pds::{PdsDriver, PDS_DEFAULT_MAX_REGIONS};
use dmalog_models::{Mlx5Caps, Mlx5Driver, Mlx5Fault};
use dmalog_vfio_user::{ServedTracker, Server, ServerConfig};

/// Options of `dmalog serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The UNIX socket to listen on (created mode 0600; a stale one is replaced; a
    /// regular file, a directory or a live server's socket there is an error).
    #[arg(long)]
    socket: PathBuf,
    /// Serve one client, then exit 0 when it disconnects.
    #[arg(long)]
    once: bool,
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
    /// How long a client may keep the server waiting, in milliseconds: its reply to the
    /// device's DMA_READ/DMA_WRITE, the rest of a message it began, reading a reply. Then
    /// the client is dropped (a DMA waiting for it fails). Idle clients are not timed out.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    peer_timeout_ms: u64,
    /// Memory budget of the tracker's state (dirty bitmaps, rings), MiB: a START that
    /// needs more fails with ENOMEM.
    #[arg(long, default_value_t = DEFAULT_MAX_LOG_MIB)]
    max_log_mib: u64,
}

/// Which tracker logs the device's DMA writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerKind {
    /// No DMA logging (the logging features are ENOTTY).
    None,
    /// The software tracker.
    Soft,
    /// The mlx5 model with these capabilities.
    Mlx5(Mlx5Caps),
    /// The pds (AMD/Pensando) model with this many regions.
    Pds(usize),
}

/// Why a tracker name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrackerKindError {
    /// Not one of the tracker names.
    #[error("unknown tracker {0:?} (known: soft, none, pds, pds:REGIONS, mlx5, mlx5:PRESET[,field=value...])")]
    Unknown(String),
    /// `pds:` followed by something other than a region count of at least 1.
    #[error("bad pds region count {0:?} (a number of at least 1)")]
    PdsRegions(String),
    /// The mlx5 capabilities did not parse.
    #[error(transparent)]
    Mlx5(#[from] CapsError),
}

impl std::str::FromStr for TrackerKind {
    type Err = TrackerKindError;

    /// `soft`, `none`, `pds`, `pds:REGIONS`, `mlx5`, or `mlx5:PRESET[,field=value...]`.
    fn from_str(text: &str) -> Result<Self, TrackerKindError> {
        match text {
            "soft" => Ok(TrackerKind::Soft),
            "none" => Ok(TrackerKind::None),
            "mlx5" => Ok(TrackerKind::Mlx5(Mlx5Caps::cx7())),
            "pds" => Ok(TrackerKind::Pds(PDS_DEFAULT_MAX_REGIONS)),
            other => {
                if let Some(regions) = other.strip_prefix("pds:") {
                    return match regions.parse::<usize>() {
                        Ok(count) if count > 0 => Ok(TrackerKind::Pds(count)),
                        _ => Err(TrackerKindError::PdsRegions(regions.to_string())),
                    };
                }
                match other.strip_prefix("mlx5:") {
                    Some(spec) => Ok(TrackerKind::Mlx5(Mlx5Caps::parse(spec)?)),
                    None => Err(TrackerKindError::Unknown(other.to_string())),
                }
            }
        }
    }
}

/// `--inject-fault FAULT@N`: the mlx5 fault to inject before the N-th REPORT (1-based) the
/// server carries out, once.
pub type FaultPlan = (u64, Mlx5Fault);

/// The `--tracker` driver over the server's live log, its state capped at `max_log_bytes`,
/// with the mlx5 `fault_plan` (ignored by the other trackers).
pub fn build_tracker(
    kind: &TrackerKind,
    max_log_bytes: u64,
    fault_plan: Option<FaultPlan>,
    live: &Arc<LiveLog>,
) -> ServedTracker {
    let live = Arc::clone(live);
    match kind {
        TrackerKind::None => ServedTracker::none(),
        TrackerKind::Soft => {
            ServedTracker::new(SoftDriver::with_live_log(live).with_max_log_bytes(max_log_bytes))
        }
        TrackerKind::Mlx5(caps) => {
            let driver = Mlx5Driver::with_live_log(*caps, live).with_max_log_bytes(max_log_bytes);
            let faults = driver.faults();
            let tracker = ServedTracker::new(driver);
            let Some((at, fault)) = fault_plan else {
                return tracker;
            };
            let mut reports_seen = 0u64;
            tracker.before_each_report(move || {
                reports_seen += 1;
                if reports_seen == at {
                    tracing::warn!(?fault, report = at, "injecting an mlx5 fault");
                    faults.inject(fault);
                }
            })
        }
        TrackerKind::Pds(max_regions) => ServedTracker::new(
            PdsDriver::with_live_log(*max_regions, live).with_max_log_bytes(max_log_bytes),
        ),
    }
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
    // Before the device exists: no other thread yet, so the umask change in `listen` is
    // seen by nothing else.
    let Bound { listener, file } = listen(&args.socket)?;
    let fault_plan = match &args.inject_fault {
        Some(spec) => {
            let (fault, at) = spec
                .split_once('@')
                .context("--inject-fault wants FAULT@N")?;
            let fault: Mlx5Fault = fault.parse().map_err(anyhow::Error::msg)?;
            Some((at.parse::<u64>().context("--inject-fault N")?, fault))
        }
        None => None,
    };
    let config = ServerConfig {
        max_data_xfer_size: args.max_data_xfer_size,
        peer_timeout: std::time::Duration::from_millis(args.peer_timeout_ms),
        ..ServerConfig::default()
    };
    let mut server = Server::try_with_tracker(
        config,
        |live| build_tracker(&tracker, max_log_bytes, fault_plan, live),
        |space| -> std::io::Result<Box<dyn dmalog_device::Device>> {
            Ok(match args.device.as_str() {
                "lvu-sample" => Box::new(LvuSample::with_bar1_size(space, args.lvu_bar1_size)?),
                _ => Box::new(DmaEngine::new(space)),
            })
        },
    )
    .context("creating the device")?;
    tracing::info!(socket = %args.socket.display(), device = %args.device, tracker = %args.tracker, "serving");
    if args.once {
        let (stream, _) = listener.accept().context("accepting the client")?;
        server.serve(stream);
        remove_own_socket(&args.socket, file);
        return Ok(ExitCode::SUCCESS);
    }
    let stop = AtomicBool::new(false);
    server.run(&listener, &stop).context("accepting clients")?;
    Ok(ExitCode::SUCCESS)
}

/// A bound socket and the identity (device, inode) of its file.
struct Bound {
    listener: UnixListener,
    file: (u64, u64),
}

/// Binds `path` with mode 0600 from the start. An existing `path` is replaced only when it
/// is a stale socket (connecting is refused); anything else there is an error and stays.
fn listen(path: &Path) -> anyhow::Result<Bound> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {shown}")),
        Ok(meta) if meta.is_dir() => anyhow::bail!("{shown} is a directory"),
        Ok(meta) if !meta.file_type().is_socket() => {
            anyhow::bail!("{shown} exists and is not a socket; not removing it")
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => anyhow::bail!("a server is already listening on {shown}"),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %shown, "replacing a stale socket");
                std::fs::remove_file(path).with_context(|| format!("removing stale {shown}"))?;
            }
            Err(err) => {
                return Err(err).with_context(|| format!("cannot tell whether {shown} is in use"))
            }
        },
    }
    // bind() creates the socket file with 0777 & !umask: with umask 0177 it is 0600 from
    // its first instant (a chmod after bind would leave a window). bind fails (EADDRINUSE)
    // if something appeared at `path` since the checks: nothing is overwritten.
    let old_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old_umask);
    let listener = bound.with_context(|| format!("binding {shown}"))?;
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("inspecting {shown}"))?;
    Ok(Bound {
        listener,
        file: (meta.dev(), meta.ino()),
    })
}

/// Removes `path` if it is still the socket file this server created.
fn remove_own_socket(path: &Path, file: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == file {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_kinds_parse_and_bad_ones_are_errors() {
        assert_eq!("soft".parse(), Ok(TrackerKind::Soft));
        assert_eq!("none".parse(), Ok(TrackerKind::None));
        assert_eq!("pds".parse(), Ok(TrackerKind::Pds(PDS_DEFAULT_MAX_REGIONS)));
        assert_eq!("pds:3".parse(), Ok(TrackerKind::Pds(3)));
        assert_eq!("mlx5".parse(), Ok(TrackerKind::Mlx5(Mlx5Caps::cx7())));
        for bad in ["pds:0", "pds:x", "pds:"] {
            assert!(
                matches!(
                    bad.parse::<TrackerKind>(),
                    Err(TrackerKindError::PdsRegions(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            "hisi".parse::<TrackerKind>(),
            Err(TrackerKindError::Unknown("hisi".into()))
        );
        assert!(matches!(
            "mlx5:nope".parse::<TrackerKind>(),
            Err(TrackerKindError::Mlx5(CapsError::UnknownPreset(_)))
        ));
    }
}
