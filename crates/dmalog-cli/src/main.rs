//! The `dmalog` command.
//!
//! `dmalog bench [--json]` runs the quick benchmark subset (dirty log against vm-memory's
//! `AtomicBitmap` and the other baselines) and prints a table or one JSON object.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;

/// Device DMA dirty-page logging for VFIO live migration.
#[derive(Parser, Debug)]
#[command(name = "dmalog", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the quick benchmark subset (under a minute) and print ratios against baselines
    /// measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMALOG_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args).context("dmalog bench"),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
