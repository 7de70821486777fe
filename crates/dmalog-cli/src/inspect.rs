//! `dmalog inspect`: connects to any vfio-user server, negotiates, and prints what it
//! offers: capabilities, device info, regions, IRQs, migration, DMA logging; with
//! `--log-check`, maps a memfd, starts logging, reports and stops.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dmalog::uapi::{MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice};
use dmalog_vfio_user::{Client, ClientError};

/// Options of `dmalog inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The server's UNIX socket.
    #[arg(long)]
    socket: PathBuf,
    /// Also map a memfd, start DMA logging over it, report once, stop and unmap.
    #[arg(long)]
    log_check: bool,
    /// Bytes of the memfd for `--log-check`.
    #[arg(long, default_value_t = 16 << 20)]
    log_check_bytes: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize, Default)]
struct RegionOut {
    index: u32,
    size: u64,
    flags: u32,
    readable: bool,
    writable: bool,
    mmap: bool,
    fd: bool,
    sparse_mmap: Vec<(u64, u64)>,
}

#[derive(serde::Serialize, Default)]
struct MigrationOut {
    flags: u64,
    stop_copy: bool,
    pre_copy: bool,
    p2p: bool,
    state: Option<String>,
}

#[derive(serde::Serialize, Default)]
struct LogCheckOut {
    iova: u64,
    length: u64,
    page_size: Option<u64>,
    dirty_pages: Option<u64>,
    error: Option<String>,
}

#[derive(serde::Serialize, Default)]
struct InspectOut {
    socket: String,
    version: String,
    capabilities: serde_json::Value,
    device_flags: u32,
    num_regions: u32,
    num_irqs: u32,
    regions: Vec<RegionOut>,
    irqs: Vec<(u32, u32, u32)>,
    migration: Option<MigrationOut>,
    dma_logging: bool,
    log_check: Option<LogCheckOut>,
}

fn gather(args: &InspectArgs) -> anyhow::Result<InspectOut> {
    let mut client = Client::connect(&args.socket)
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    let version = client.server_version().clone();
    let mut out = InspectOut {
        socket: args.socket.display().to_string(),
        version: format!("{}.{}", version.major, version.minor),
        capabilities: version
            .json
            .as_ref()
            .and_then(|j| j.get("capabilities").cloned())
            .unwrap_or_default(),
        ..InspectOut::default()
    };
    let info = client.device_info().context("DEVICE_GET_INFO")?;
    (out.device_flags, out.num_regions, out.num_irqs) =
        (info.flags, info.num_regions, info.num_irqs);
    for index in 0..info.num_regions.min(64) {
        let region = client
            .region_info(index)
            .with_context(|| format!("region {index}"))?;
        out.regions.push(RegionOut {
            index,
            size: region.info.size,
            flags: region.info.flags,
            readable: region.info.flags & 1 != 0,
            writable: region.info.flags & 2 != 0,
            mmap: region.info.flags & 4 != 0,
            fd: region.fd.is_some(),
            sparse_mmap: region.sparse_mmap,
        });
    }
    for index in 0..info.num_irqs.min(64) {
        let irq = client
            .irq_info(index)
            .with_context(|| format!("IRQ {index}"))?;
        out.irqs.push((index, irq.count, irq.flags));
    }
    out.migration = match MigrationDevice::migration_flags(&mut client) {
        Ok(flags) => Some(MigrationOut {
            flags,
            stop_copy: flags & MIGRATION_STOP_COPY != 0,
            pre_copy: flags & MIGRATION_PRE_COPY != 0,
            p2p: flags & MIGRATION_P2P != 0,
            state: MigrationDevice::device_state(&mut client)
                .ok()
                .map(|s| format!("{s:?}")),
        }),
        Err(_) => None,
    };
    out.dma_logging = client.probe_dma_logging().context("PROBE of DMA logging")?;
    if args.log_check {
        out.log_check = Some(log_check(&mut client, args.log_check_bytes));
    }
    Ok(out)
}

fn log_check(client: &mut Client, bytes: u64) -> LogCheckOut {
    let mut out = LogCheckOut {
        iova: 0,
        length: bytes,
        ..LogCheckOut::default()
    };
    let result = (|| -> Result<(), String> {
        let fd = rustix::fs::memfd_create("dmalog-inspect", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| e.to_string())?;
        rustix::fs::ftruncate(&fd, bytes).map_err(|e| e.to_string())?;
        client
            .dma_map(0, bytes, Some(fd.as_fd()), 0, true)
            .map_err(|e: ClientError| format!("DMA_MAP: {e}"))?;
        let range = IovaRange::new(0, bytes).map_err(|e| e.to_string())?;
        let outcome = (|| {
            let page = client
                .start(&[range], 4096)
                .map_err(|e| format!("START: {e}"))?;
            out.page_size = Some(page);
            let mut bitmap = vec![
                0u64;
                dmalog::tracker::report_words(bytes, page).map_err(|e| e.to_string())?
                    as usize
            ];
            client
                .report(0, bytes, page, &mut bitmap)
                .map_err(|e| format!("REPORT: {e}"))?;
            out.dirty_pages = Some(bitmap.iter().map(|w| u64::from(w.count_ones())).sum());
            client.stop().map_err(|e| format!("STOP: {e}"))
        })();
        let unmapped = client
            .dma_unmap(0, bytes)
            .map_err(|e| format!("DMA_UNMAP: {e}"));
        outcome.and(unmapped)
    })();
    out.error = result.err();
    out
}

/// Runs `dmalog inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let out = gather(args)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &out)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "server {} (vfio-user {})", out.socket, out.version)?;
        writeln!(stdout, "  capabilities: {}", out.capabilities)?;
        writeln!(
            stdout,
            "  device flags {:#x}, {} regions, {} IRQ indexes",
            out.device_flags, out.num_regions, out.num_irqs
        )?;
        for r in out.regions.iter().filter(|r| r.size > 0) {
            writeln!(
                stdout,
                "  region {}: {:#x} bytes{}{}{}{}",
                r.index,
                r.size,
                if r.readable { " read" } else { "" },
                if r.writable { " write" } else { "" },
                if r.mmap { " mmap" } else { "" },
                if r.sparse_mmap.is_empty() {
                    String::new()
                } else {
                    format!(" sparse {:x?}", r.sparse_mmap)
                }
            )?;
        }
        for (index, count, flags) in &out.irqs {
            writeln!(stdout, "  irq {index}: {count} vectors, flags {flags:#x}")?;
        }
        match &out.migration {
            Some(m) => writeln!(
                stdout,
                "  migration: STOP_COPY {}, PRE_COPY {}, P2P {}, state {}",
                m.stop_copy,
                m.pre_copy,
                m.p2p,
                m.state.as_deref().unwrap_or("?")
            )?,
            None => writeln!(stdout, "  migration: not supported")?,
        }
        writeln!(
            stdout,
            "  DMA logging: {}",
            if out.dma_logging {
                "supported"
            } else {
                "not supported"
            }
        )?;
        if let Some(check) = &out.log_check {
            match &check.error {
                None => writeln!(
                    stdout,
                    "  log check: START page {} over {:#x} bytes, REPORT {} dirty pages, STOP ok",
                    check.page_size.unwrap_or(0),
                    check.length,
                    check.dirty_pages.unwrap_or(0)
                )?,
                Some(error) => writeln!(stdout, "  log check FAILED: {error}")?,
            }
        }
    }
    let failed = out.log_check.as_ref().is_some_and(|c| c.error.is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
