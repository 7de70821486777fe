//! `dmalog bench`: the quick benchmark subset, as a table or JSON.

use std::io::Write;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

/// Options of `dmalog bench`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// A benchmark other than the quick subset.
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Print one JSON object (`{"results": [...]}`) instead of a table.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a target is not met.
    #[arg(long)]
    strict: bool,
}

/// Benchmarks run on their own.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// START / REPORT / STOP latency and REPORT throughput against any vfio-user server
    /// with DMA logging.
    Peer(crate::bench_peer::PeerArgs),
}

#[derive(serde::Serialize)]
struct Report<'a> {
    tool: &'static str,
    version: &'static str,
    results: &'a [dmalog_bench::Row],
    all_targets_met: bool,
}

/// Runs the quick subset and prints it.
pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(BenchCommand::Peer(peer)) = &args.command {
        return crate::bench_peer::run(peer);
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    // DMALOG_BENCH_ONLY_MIGRATE: the migration rows alone (tuning the stream).
    let mut rows = if std::env::var_os("DMALOG_BENCH_ONLY_MIGRATE").is_some() {
        Vec::new()
    } else {
        dmalog_bench::quick_run(|step| spinner.set_message(step.to_string()))
    };
    // The migration stream's rows: loopback TCP, 5 interleaved batches each.
    rows.extend(dmalog_bench::migrate::rows(5, &mut |step: &str| {
        spinner.set_message(step.to_string())
    }));
    spinner.finish_and_clear();
    let all_targets_met = rows.iter().all(|row| row.met != Some(false));
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = Report {
            tool: "dmalog bench",
            version: env!("CARGO_PKG_VERSION"),
            results: &rows,
            all_targets_met,
        };
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        let header = [
            "measurement",
            "ours",
            "baseline",
            "baseline",
            "speedup",
            "target",
            "met",
        ];
        writeln!(
            out,
            "{:<42} {:>12} {:<40} {:>12} {:>9} {:<16} {}",
            header[0], header[1], header[2], header[3], header[4], header[5], header[6]
        )?;
        for row in &rows {
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            writeln!(
                out,
                "{:<42} {:>12} {:<40} {:>12} {:>8}x {:<16} {}",
                row.measurement,
                format_ns(row.ours_ns),
                row.baseline,
                format_ns(row.baseline_ns),
                format_ratio(row.speedup),
                row.target,
                met
            )?;
        }
    }
    Ok(if args.strict && !all_targets_met {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Three significant digits: 256, 13.8, 2.09, 0.00437.
fn format_ratio(ratio: f64) -> String {
    let digits = if ratio >= 100.0 {
        0
    } else if ratio >= 10.0 {
        1
    } else if ratio >= 1.0 {
        2
    } else {
        (2.0 - ratio.log10().floor()) as usize
    };
    format!("{ratio:.digits$}")
}

fn format_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.2} ns")
    }
}
