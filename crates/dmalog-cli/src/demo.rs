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

use anyhow::{bail, Context};
use dmalog::{DirtyTracker, InProcessTracker, SoftDriver};
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::{
    default_layout, migrate_destination, migrate_source, GuestMemory, MigrationReport, Mode,
    SourceConfig, SourceVm, VcpuParams, VcpuWorkload,
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

/// The guest, its workloads and the migration settings (shared by `demo` and `migrate`).
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest memory, MiB (3/4 at GPA 0, 1/4 at 4 GiB).
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Device workload working set, MiB.
    #[arg(long, default_value_t = 64)]
    device_wss_mib: u64,
    /// Device workload rate, MB/s.
    #[arg(long, default_value_t = 200)]
    device_rate_mbps: u64,
    /// vCPU workload working set, MiB.
    #[arg(long, default_value_t = 16)]
    vcpu_wss_mib: u64,
    /// vCPU workload rate, MB/s.
    #[arg(long, default_value_t = 100)]
    vcpu_rate_mbps: u64,
    /// vCPU threads.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Link bandwidth, MB/s.
    #[arg(long, default_value_t = 1000)]
    link_mbps: u64,
    /// Maximum downtime, ms.
    #[arg(long, default_value_t = 30)]
    max_downtime_ms: u64,
    /// Rounds before forcing the stop.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// START range planning: exact (one range per memory region) or qemu (at most 3).
    #[arg(long, default_value = "exact", value_parser = ["exact", "qemu"])]
    ranges: String,
    /// pre-copy, stop-and-copy, or no-device-tracking.
    #[arg(long, default_value = "pre-copy", value_parser = ["pre-copy", "stop-and-copy", "no-device-tracking"])]
    mode: String,
    /// How long the destination may take to send or take one frame, and the device
    /// server to answer, ms (a silent peer fails the migration; the source VM runs on).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    timeout_ms: u64,
    /// Print one JSON object with the whole report.
    #[arg(long)]
    json: bool,
}

/// Options of `dmalog demo`.
#[derive(clap::Args, Debug)]
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
pub enum MigrateCommand {
    /// Run the source VM against a running `dmalog serve` and migrate it to a destination.
    Source {
        /// The source device server's socket.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// The destination's `HOST:PORT`.
        #[arg(long)]
        connect: String,
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

// dma-engine workload registers (SPEC 6.1).
const WL_BASE: u64 = 0x80;
const WL_SPAN: u64 = 0x88;
const WL_SIZE: u64 = 0x90;
const WL_RATE: u64 = 0x98;
const WL_SEED: u64 = 0xa0;
const WL_CTRL: u64 = 0xa8;
const WL_WRITES: u64 = 0xb0;

#[derive(serde::Serialize)]
struct DemoOutput<'a> {
    #[serde(flatten)]
    report: &'a MigrationReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_writes_after_resume: Option<u64>,
    destination_pages: u64,
}

fn mode_of(vm: &VmArgs) -> Mode {
    match vm.mode.as_str() {
        "stop-and-copy" => Mode::StopAndCopy,
        "no-device-tracking" => Mode::NoDeviceTracking,
        _ => Mode::PreCopy,
    }
}

/// The source half: guest memory DMA-mapped into the device at `src`, the device and vCPU
/// workloads running, then the migration to `destination`.
fn run_source(
    vm_args: &VmArgs,
    mut src: Client,
    destination: &str,
    security: &ClientSide,
) -> anyhow::Result<MigrationReport> {
    let guest_bytes = vm_args.memory_mib * MIB;
    if guest_bytes < 64 * MIB {
        bail!("the guest needs at least 64 MiB");
    }
    let layout = default_layout(guest_bytes);
    let memory = Arc::new(GuestMemory::new(&layout).context("source guest memory")?);
    map_all(&mut src, &memory).map_err(anyhow::Error::msg)?;
    // The device's working set sits a third of the way into the low region (256 MiB for
    // the default 1 GiB guest), the vCPUs' at GPA 0.
    let low_region = layout[0].1;
    let device_base = (low_region / 3) & !0xfff;
    if device_base + vm_args.device_wss_mib * MIB > low_region
        || vm_args.vcpu_wss_mib * MIB > device_base
    {
        bail!(
            "the working sets do not fit the low memory region ({} MiB)",
            low_region >> 20
        );
    }
    for (offset, value) in [
        (WL_BASE, device_base),
        (WL_SPAN, vm_args.device_wss_mib * MIB),
        (WL_SIZE, 4096),
        (WL_RATE, vm_args.device_rate_mbps * 1_000_000),
        (WL_SEED, 0x5eed),
        (WL_CTRL, 1),
    ] {
        src.write_u64(0, offset, value)
            .context("programming the device workload")?;
    }
    let cpu_driver = SoftDriver::new();
    let recorder = cpu_driver.recorder();
    let mut cpu = InProcessTracker::new(cpu_driver);
    let vcpus = VcpuWorkload::start(
        Arc::clone(&memory),
        recorder,
        VcpuParams {
            threads: vm_args.vcpus,
            base: 0,
            span: vm_args.vcpu_wss_mib * MIB,
            rate: vm_args.vcpu_rate_mbps * 1_000_000,
            seed: 7,
        },
    )?;
    std::thread::sleep(Duration::from_millis(200)); // the guest is live

    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    progress.enable_steady_tick(Duration::from_millis(100));
    progress.set_message("migrating: round 0 (all memory)");
    let timeout = Duration::from_millis(vm_args.timeout_ms);
    let stream = connect_within(destination, timeout)
        .with_context(|| format!("connecting to the destination {destination}"))?;
    stream.set_nodelay(true)?;
    let stream = security
        .secure(stream, destination, timeout)
        .with_context(|| format!("securing the link to {destination}"))?;
    let mut replies = FrameReader::new(stream.try_clone()?).with_timeout(timeout);
    let mut out =
        FrameWriter::new(stream, Some(vm_args.link_mbps * 1_000_000)).with_timeout(timeout);
    let config = SourceConfig {
        ranges: if vm_args.ranges == "qemu" {
            dmalog_migrate::RangePlan::Qemu
        } else {
            dmalog_migrate::RangePlan::Exact
        },
        mode: mode_of(vm_args),
        max_downtime: Duration::from_millis(vm_args.max_downtime_ms),
        max_rounds: vm_args.max_rounds,
    };
    let vm = SourceVm {
        memory: &memory,
        device: &mut src,
        cpu: &mut cpu as &mut dyn DirtyTracker,
        vcpus: Some(&vcpus),
    };
    let report = migrate_source(&config, vm, &mut out, &mut replies, |round| {
        progress.set_message(format!(
            "round {} done: {} pages sent",
            round.round, round.pages_sent
        ));
    });
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
/// `dst`. Returns the device's workload writes in the 100 ms after resuming and the pages
/// received.
fn run_destination(
    memory_mib: u64,
    mut dst: Client,
    listener: TcpListener,
    timeout: Duration,
    security: &ServerSide,
) -> anyhow::Result<(u64, u64, bool)> {
    let memory =
        GuestMemory::new(&default_layout(memory_mib * MIB)).context("destination guest memory")?;
    // Waiting for a source to connect is this side's job and has no limit; once one has,
    // every frame must come within `timeout`.
    let (stream, _) = listener.accept()?;
    let stream = security.secure(stream, timeout)?;
    let mut input = FrameReader::new(stream.try_clone()?).with_timeout(timeout);
    let mut out = FrameWriter::new(stream, None).with_timeout(timeout);
    let report = migrate_destination(
        &memory,
        &mut dst,
        &mut |client, memory| map_all(client, memory),
        &mut input,
        &mut out,
    )
    .context("destination")?;
    // The device goes on where it stopped.
    let before = dst.read_u64(0, WL_WRITES)?;
    std::thread::sleep(Duration::from_millis(100));
    let after = dst.read_u64(0, WL_WRITES)?;
    Ok((after.saturating_sub(before), report.pages, report.verified))
}

fn print_report(
    vm_args: &VmArgs,
    report: &MigrationReport,
    device_writes_after_resume: Option<u64>,
    destination_pages: u64,
) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if vm_args.json {
        serde_json::to_writer_pretty(
            &mut stdout,
            &DemoOutput {
                report,
                device_writes_after_resume,
                destination_pages,
            },
        )?;
        writeln!(stdout)?;
    } else {
        print_table(&mut stdout, report, device_writes_after_resume)?;
    }
    Ok(if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the demo; exit code 1 unless VERIFIED.
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
    let destination = std::thread::spawn(move || {
        run_destination(memory_mib, dst, listener, timeout, &server_side)
    });
    let report = run_source(vm, src, &address, &client_side);
    let destination = destination
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    let (device_writes_after_resume, destination_pages, _) = destination?;
    if let Some(path) = &args.chart {
        crate::chart::write_svg(&report, path)
            .with_context(|| format!("--chart {}", path.display()))?;
    }
    print_report(
        vm,
        &report,
        Some(device_writes_after_resume),
        destination_pages,
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
            let report = run_source(vm, src, destination, &security)?;
            print_report(vm, &report, None, 0)
        }
        MigrateCommand::Destination {
            socket,
            listen,
            memory_mib,
            timeout_ms,
            json,
            tls,
        } => {
            let security = tls.server()?;
            let dst = connect(socket, Duration::from_millis(*timeout_ms))?;
            let listener =
                TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("waiting for a migration on {}", listener.local_addr()?);
            let (writes, pages, verified) = run_destination(
                *memory_mib,
                dst,
                listener,
                Duration::from_millis(*timeout_ms),
                &security,
            )?;
            let mut stdout = std::io::stdout().lock();
            if *json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({"verified": verified, "pages": pages, "device_writes_after_resume": writes})
                )?;
            } else {
                writeln!(stdout, "received {pages} pages; device resumed ({writes} workload writes in 100 ms); {}", if verified { "VERIFIED" } else { "FAILED" })?;
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

fn print_table(
    out: &mut impl Write,
    report: &MigrationReport,
    device_writes_after: Option<u64>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "mode {:?}, guest {} MiB, device tracking {}",
        report.mode,
        report.guest_bytes >> 20,
        if report.device_tracking { "on" } else { "off" }
    )?;
    writeln!(
        out,
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "round", "dev pages", "cpu pages", "both", "sent", "bytes", "round ms", "report ms"
    )?;
    for r in &report.rounds {
        writeln!(
            out,
            "{:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10.1} {:>10.2}{}",
            r.round,
            r.pages_device,
            r.pages_cpu,
            r.pages_both,
            r.pages_sent,
            r.bytes_sent,
            r.round_ms,
            r.report_ms,
            if r.final_round {
                "  (guest stopped)"
            } else {
                ""
            }
        )?;
    }
    writeln!(
        out,
        "downtime {:.1} ms, total {:.0} ms, sent {} bytes ({:.2}x guest memory)",
        report.downtime_ms,
        report.total_ms,
        report.bytes_sent,
        report.bytes_sent as f64 / report.guest_bytes as f64
    )?;
    if let Some(writes) = device_writes_after {
        writeln!(
            out,
            "destination device workload after resume: {writes} writes in 100 ms"
        )?;
    }
    writeln!(
        out,
        "{}",
        if report.verified {
            "VERIFIED"
        } else {
            "FAILED: destination memory differs"
        }
    )?;
    Ok(())
}
