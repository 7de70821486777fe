//! `dmalog bench peer --socket S`: DMA logging latency and REPORT throughput against any
//! vfio-user server that offers DMA logging (dmalog's own, libvfio-user's samples, ...).
//!
//! It maps one sparse memfd of the size asked for at IOVA 0 (one DMA region: libvfio-user
//! only answers REPORTs that start at a region's first IOVA), then times, over
//! `--iterations` rounds: START of that range, a one-word REPORT (64 pages), a REPORT of
//! the whole range, and STOP. Each figure is the median with the minimum and maximum of
//! the rounds. Nothing is written, so every REPORT is all clean: the figure is the cost of
//! asking, walking the log and carrying the bitmap, which is what a migration round pays.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dmalog::{DirtyTracker, IovaRange};
use dmalog_vfio_user::Client;

/// Options of `dmalog bench peer`.
#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    /// The server's UNIX socket.
    #[arg(long)]
    socket: PathBuf,
    /// Bytes of guest memory to map and log, in MiB (sparse: nothing is allocated). The
    /// default (16 GiB at 4 KiB pages) makes a 512 KiB bitmap, one message at the usual
    /// 1 MiB transfer size.
    #[arg(long, default_value_t = 16 << 10)]
    size_mib: u64,
    /// Page size asked for at START, in bytes.
    #[arg(long, default_value_t = 4096)]
    page_size: u64,
    /// Rounds of START / REPORT / REPORT / STOP.
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Median, minimum and maximum of one operation over the rounds, in nanoseconds.
#[derive(serde::Serialize, Debug, Clone, Copy)]
struct Spread {
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
}

impl Spread {
    fn of(samples: &mut [f64]) -> Spread {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median_ns = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Spread {
            median_ns,
            min_ns: samples[0],
            max_ns: samples[n - 1],
        }
    }
}

#[derive(serde::Serialize, Debug)]
struct PeerReport {
    socket: String,
    server_version: String,
    guest_bytes: u64,
    page_size: u64,
    bitmap_bytes: u64,
    iterations: usize,
    start: Spread,
    report_one_word: Spread,
    report_full: Spread,
    stop: Spread,
    /// Bitmap bytes per second of the full REPORT at its median.
    report_full_mb_per_s: f64,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let began = Instant::now();
    let out = f();
    (out, began.elapsed().as_nanos() as f64)
}

fn measure(args: &PeerArgs) -> anyhow::Result<PeerReport> {
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    let guest_bytes = args
        .size_mib
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .context("--size-mib must be between 1 and 2^44")?;
    let mut client = Client::connect(&args.socket)
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    anyhow::ensure!(
        client.probe_dma_logging().context("PROBE of DMA logging")?,
        "the server does not offer DMA logging"
    );
    let memory = rustix::fs::memfd_create("dmalog-bench-peer", rustix::fs::MemfdFlags::CLOEXEC)
        .context("memfd_create")?;
    rustix::fs::ftruncate(&memory, guest_bytes).context("sizing the memfd")?;
    let range = IovaRange::new(0, guest_bytes)?;
    client
        .dma_map(range, Some(memory.as_fd()), 0, true)
        .context("DMA_MAP")?;
    let one_word_range = IovaRange::new(0, (64 * args.page_size).min(guest_bytes))?;
    let mut bitmap = Vec::new();
    let (mut start, mut one_word, mut full, mut stop) = (vec![], vec![], vec![], vec![]);
    let mut chosen_page = args.page_size;
    for _ in 0..args.iterations {
        let (page, ns) = timed(|| client.start(&[range], args.page_size));
        chosen_page = page.context("START")?;
        start.push(ns);
        let words = dmalog::tracker::report_words(guest_bytes, chosen_page)? as usize;
        bitmap.resize(words, 0);
        let (result, ns) = timed(|| client.report(one_word_range, chosen_page, &mut bitmap));
        result.context("REPORT of one word")?;
        one_word.push(ns);
        let (result, ns) = timed(|| client.report(range, chosen_page, &mut bitmap));
        result.context("REPORT of the whole range")?;
        full.push(ns);
        let (result, ns) = timed(|| client.stop());
        result.context("STOP")?;
        stop.push(ns);
    }
    client.dma_unmap(range).context("DMA_UNMAP")?;
    let bitmap_bytes = dmalog::iova_bitmap::report_bytes(guest_bytes, chosen_page)?;
    let report_full = Spread::of(&mut full);
    let version = client.server_version();
    Ok(PeerReport {
        socket: args.socket.display().to_string(),
        server_version: format!("{}.{}", version.major, version.minor),
        guest_bytes,
        page_size: chosen_page,
        bitmap_bytes,
        iterations: args.iterations,
        start: Spread::of(&mut start),
        report_one_word: Spread::of(&mut one_word),
        report_full,
        stop: Spread::of(&mut stop),
        report_full_mb_per_s: bitmap_bytes as f64 / report_full.median_ns * 1e3,
    })
}

fn micros(ns: f64) -> String {
    format!("{:.1}", ns / 1e3)
}

/// Runs `dmalog bench peer`.
pub fn run(args: &PeerArgs) -> anyhow::Result<ExitCode> {
    let report = measure(args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "peer {} (vfio-user {}), {} MiB at {} B pages ({} bitmap bytes), {} rounds",
        report.socket,
        report.server_version,
        report.guest_bytes >> 20,
        report.page_size,
        report.bitmap_bytes,
        report.iterations
    )?;
    writeln!(
        out,
        "{:<28} {:>12} {:>12} {:>12}",
        "operation", "median us", "min us", "max us"
    )?;
    for (name, spread) in [
        ("START", report.start),
        ("REPORT 64 pages", report.report_one_word),
        ("REPORT whole range", report.report_full),
        ("STOP", report.stop),
    ] {
        writeln!(
            out,
            "{:<28} {:>12} {:>12} {:>12}",
            name,
            micros(spread.median_ns),
            micros(spread.min_ns),
            micros(spread.max_ns)
        )?;
    }
    writeln!(
        out,
        "REPORT whole range: {:.0} MB/s of bitmap at the median",
        report.report_full_mb_per_s
    )?;
    Ok(ExitCode::SUCCESS)
}
