//! `dmalog demo`: a live migration on one machine. Two `dmalog serve` children (dma-engine)
//! are the source and destination devices; this process is the VMM on both sides (the
//! scenario of `dmalog_migrate::scenario`: guest memory in memfds, a vCPU workload, the
//! device workload, pre-copy over loopback TCP with a link cap, then verification of every
//! byte). `dmalog migrate source|destination`: the two halves for two hosts. This module
//! parses, starts the device servers, calls the scenario and prints.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use dmalog_migrate::scenario::{
    connect_device, run_destination, run_source, Attempt, ClientSide, Progress, RegionDigests,
    ScenarioError, ServerSide, SourceOutcome,
};
use dmalog_migrate::{MigrationReport, RoundStats};
use indicatif::{ProgressBar, ProgressStyle};

use crate::transport::TlsArgs;

mod args;

pub use args::{DemoArgs, MigrateCommand, VmArgs, EXIT_OVER_BUDGET};

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

/// A spinner on stderr for each migration attempt, with the latest round.
#[derive(Default)]
struct Spinner {
    bar: Option<ProgressBar>,
}

impl Progress for Spinner {
    fn attempt_started(&mut self) {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        bar.set_message("migrating: round 0 (all memory)");
        self.bar = Some(bar);
    }
    fn round(&mut self, round: &RoundStats, total_bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(crate::progress::round_line(round, total_bytes));
        }
    }
    fn attempt_ended(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The region digests as `index -> "0x…"` (a region that could not be read maps to its
/// error).
fn digests_json(digests: &RegionDigests) -> serde_json::Map<String, serde_json::Value> {
    digests
        .iter()
        .map(|(index, digest)| {
            let value = match digest {
                Ok(crc) => format!("{crc:#010x}"),
                Err(err) => format!("error: {err}"),
            };
            (index.to_string(), serde_json::Value::String(value))
        })
        .collect()
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

/// The source half, with `--json`'s list of attempts printed when every one failed.
fn source_half(
    vm: &VmArgs,
    src: dmalog_vfio_user::Client,
    destinations: &[String],
    security: &ClientSide,
) -> anyhow::Result<SourceOutcome> {
    let outcome = run_source(
        &vm.source_options(),
        src,
        destinations,
        security,
        &mut Spinner::default(),
    );
    if let Err(ScenarioError::AllFailed(failed)) = &outcome {
        if vm.json {
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(
                &mut stdout,
                &serde_json::json!({ "attempts": failed.0 }),
            )?;
            writeln!(stdout)?;
        }
    }
    Ok(outcome?)
}

/// One line per destination that failed before the one that took the VM.
fn print_failed_attempts(out: &mut impl Write, attempts: &[Attempt]) -> std::io::Result<()> {
    for (i, attempt) in attempts.iter().enumerate().filter(|(_, a)| !a.ok) {
        let vm = attempt.vm_after_failure.as_ref();
        writeln!(
            out,
            "attempt {} to {} failed: {}; the VM ran on here (device {}, vCPUs {})",
            i + 1,
            attempt.destination,
            attempt.error.as_deref().unwrap_or("?"),
            vm.map_or("?", |vm| vm.device_state.as_str()),
            if vm.is_some_and(|vm| vm.vcpus_running) {
                "running"
            } else {
                "paused"
            },
        )?;
    }
    Ok(())
}

fn print_report(
    vm_args: &VmArgs,
    source: &SourceOutcome,
    device_writes_after_resume: Option<u64>,
    destination_pages: u64,
) -> anyhow::Result<ExitCode> {
    let report = &source.report;
    let region_digests = digests_json(&source.region_digests);
    let mut stdout = std::io::stdout().lock();
    if vm_args.json {
        serde_json::to_writer_pretty(
            &mut stdout,
            &DemoOutput {
                report,
                device_writes_after_resume,
                destination_pages,
                region_digests: &region_digests,
                attempts: &source.attempts,
            },
        )?;
        writeln!(stdout)?;
    } else {
        print_failed_attempts(&mut stdout, &source.attempts)?;
        crate::progress::print_table(&mut stdout, report, device_writes_after_resume)?;
        crate::progress::print_digests(&mut stdout, &region_digests)?;
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
    let src = connect_device(&src_server.socket, timeout)?;
    let dst = connect_device(&dst_server.socket, timeout)?;
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
    let destination_options = vm.destination_options();
    let destination = std::thread::spawn(move || {
        run_destination(&destination_options, dst, listener, &server_side)
    });
    let source = source_half(vm, src, &[address], &client_side);
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
            let src = connect_device(socket, Duration::from_millis(vm.timeout_ms))?;
            let source = source_half(vm, src, destination, &security)?;
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
            let timeout = Duration::from_millis(*timeout_ms);
            let dst = connect_device(socket, timeout)?;
            let listener =
                TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("waiting for a migration on {}", listener.local_addr()?);
            let options = dmalog_migrate::scenario::DestinationOptions {
                guest_bytes: memory_mib.saturating_mul(args::MIB),
                timeout,
                digest_regions: region_digest.clone(),
                stream_buffer_bytes: stream_buffer_kib.saturating_mul(1024),
            };
            let outcome = run_destination(&options, dst, listener, &security)?;
            let verified = outcome.verified;
            let region_digests = digests_json(&outcome.region_digests);
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
                if !region_digests.is_empty() {
                    object["region_digests"] = region_digests.into();
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
                crate::progress::print_digests(&mut stdout, &region_digests)?;
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
