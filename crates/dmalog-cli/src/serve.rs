//! `dmalog serve`: a vfio-user device server on a UNIX socket.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use dmalog_device::{DmaEngine, LvuSample};
use dmalog_vfio_user::{Server, ServerConfig, TrackerKind};

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
            let fault: dmalog_models::Mlx5Fault = fault.parse().map_err(anyhow::Error::msg)?;
            Some((at.parse::<u64>().context("--inject-fault N")?, fault))
        }
        None => None,
    };
    let config = ServerConfig {
        tracker,
        max_data_xfer_size: args.max_data_xfer_size,
        fault_plan,
        peer_timeout: std::time::Duration::from_millis(args.peer_timeout_ms),
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
