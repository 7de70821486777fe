//! The `dmalog` command.
//!
//! - `dmalog bench [--json]`: the quick benchmark subset (dirty log against vm-memory's
//!   `AtomicBitmap` and the other baselines), as a table or one JSON object;
//!   `dmalog bench peer --socket PATH`: DMA logging latency against any vfio-user server.
//! - `dmalog probe [DEVICE] [--try-start IOVA:LENGTH] [--json]`: what a kernel VFIO device
//!   supports.
//! - `dmalog serve --socket PATH [--once] [--device dma-engine] [--tracker soft|mlx5[:preset]]`: a
//!   vfio-user device server.
//! - `dmalog inspect --socket PATH [--log-check] [--json]`: what a vfio-user server offers.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;
mod bench_peer;
mod chart;
mod demo;
mod inspect;
mod probe;
mod progress;
mod serve;
mod transport;

/// Device DMA dirty-page logging for VFIO live migration.
#[derive(Parser, Debug)]
#[command(name = "dmalog", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Live-migrate a running guest with a DMA-writing device between two device servers
    /// on this machine, and verify every byte.
    Demo(demo::DemoArgs),
    /// The two halves of a migration for two hosts (or two network namespaces).
    #[command(subcommand)]
    Migrate(demo::MigrateCommand),
    /// Run the quick benchmark subset (under a minute) and print ratios against baselines
    /// measured in the same run.
    Bench(bench::BenchArgs),
    /// Report what a kernel VFIO device supports: DMA logging, migration, PRE_COPY (exit 2
    /// on a machine without VFIO).
    Probe(probe::ProbeArgs),
    /// Serve an emulated device over vfio-user (DMA logging and migration v2).
    Serve(serve::ServeArgs),
    /// Connect to any vfio-user server and print what it offers (add --log-check, --json).
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMALOG_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: piped or logged stderr stays plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args).context("dmalog demo"),
        Command::Migrate(command) => demo::run_migrate(&command).context("dmalog migrate"),
        Command::Bench(args) => bench::run(&args).context("dmalog bench"),
        Command::Probe(args) => probe::run(&args).context("dmalog probe"),
        Command::Serve(args) => serve::run(&args).context("dmalog serve"),
        Command::Inspect(args) => inspect::run(&args).context("dmalog inspect"),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
