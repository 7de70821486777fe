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
use dmalog_vfio_user::pci_config::{read_config_space, PciConfig, PCI_CONFIG_REGION_INDEX};
use dmalog_vfio_user::{Client, ClientError};

/// DEVICE_GET_INFO flag: a PCI device (VFIO_DEVICE_FLAGS_PCI).
const DEVICE_FLAGS_PCI: u32 = 1 << 1;

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

#[derive(serde::Serialize)]
struct BarOut {
    index: usize,
    kind: &'static str,
    prefetchable: bool,
    address: u64,
    /// From the region info (the BAR's region).
    size: u64,
}

#[derive(serde::Serialize)]
struct PciOut {
    #[serde(flatten)]
    config: PciConfig,
    /// The BARs with a non-zero region, with their sizes.
    bar_sizes: Vec<BarOut>,
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
    pci: Option<PciOut>,
    /// Why configuration space could not be read or decoded.
    pci_error: Option<String>,
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
    if info.flags & DEVICE_FLAGS_PCI != 0 && info.num_regions > PCI_CONFIG_REGION_INDEX {
        match pci_identity(&mut client, &out.regions) {
            Ok(pci) => out.pci = Some(pci),
            Err(err) => out.pci_error = Some(err),
        }
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

/// Reads and decodes configuration space; BAR sizes come from the BAR regions' infos.
fn pci_identity(client: &mut Client, regions: &[RegionOut]) -> Result<PciOut, String> {
    let bytes = read_config_space(client).map_err(|e| format!("reading config space: {e}"))?;
    let config = PciConfig::parse(&bytes).map_err(|e| e.to_string())?;
    let bar_sizes = config
        .bars
        .iter()
        .filter_map(|bar| {
            let size = regions.iter().find(|r| r.index as usize == bar.index)?.size;
            (size > 0).then_some(BarOut {
                index: bar.index,
                kind: match (bar.io, bar.is_64bit) {
                    (true, _) => "I/O",
                    (false, true) => "memory 64-bit",
                    (false, false) => "memory 32-bit",
                },
                prefetchable: bar.prefetchable,
                address: bar.address,
                size,
            })
        })
        .collect();
    Ok(PciOut { config, bar_sizes })
}

/// Text from a peer, with control characters escaped before it reaches a terminal.
fn sanitized(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn print_pci(stdout: &mut impl Write, pci: &PciOut) -> std::io::Result<()> {
    let c = &pci.config;
    writeln!(
        stdout,
        "  PCI {:04x}:{:04x} (rev {:02x}), subsystem {:04x}:{:04x}, class {}, header type {:02x}{}",
        c.vendor_id,
        c.device_id,
        c.revision,
        c.subsystem_vendor_id,
        c.subsystem_id,
        c.class_text(),
        c.header_type,
        match c.interrupt_pin {
            0 => String::new(),
            pin @ 1..=4 => format!(", interrupt pin {}", (b'A' + pin - 1) as char),
            pin => format!(", interrupt pin {pin} (invalid)"),
        }
    )?;
    for bar in &pci.bar_sizes {
        writeln!(
            stdout,
            "    BAR{}: {}{}, address {:#x}, size {:#x}",
            bar.index,
            bar.kind,
            if bar.prefetchable {
                ", prefetchable"
            } else {
                ""
            },
            bar.address,
            bar.size
        )?;
    }
    if c.capabilities.is_empty() {
        writeln!(stdout, "    capabilities: none")?;
    }
    for cap in &c.capabilities {
        write!(
            stdout,
            "    capability [{:02x}] {} ({:#04x})",
            cap.offset, cap.name, cap.id
        )?;
        if let Some(msi) = &cap.msi {
            write!(
                stdout,
                ": enable{} count {} {}{}",
                if msi.enabled { "+" } else { "-" },
                msi.vectors,
                if msi.address_64bit { "64bit" } else { "32bit" },
                if msi.per_vector_mask { " maskable" } else { "" }
            )?;
        }
        if let Some(msix) = &cap.msix {
            write!(
                stdout,
                ": enable{} masked{} count {}, table BAR{} offset {:#x}, PBA BAR{} offset {:#x}",
                if msix.enabled { "+" } else { "-" },
                if msix.masked { "+" } else { "-" },
                msix.table_entries,
                msix.table_bar,
                msix.table_offset,
                msix.pba_bar,
                msix.pba_offset
            )?;
        }
        writeln!(stdout)?;
    }
    if let Some(why) = &c.capability_walk_error {
        writeln!(stdout, "    capability list ends early: {}", sanitized(why))?;
    }
    Ok(())
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
        let range = IovaRange::new(0, bytes).map_err(|e| e.to_string())?;
        client
            .dma_map(range, Some(fd.as_fd()), 0, true)
            .map_err(|e: ClientError| format!("DMA_MAP: {e}"))?;
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
                .report(range, page, &mut bitmap)
                .map_err(|e| format!("REPORT: {e}"))?;
            out.dirty_pages = Some(bitmap.iter().map(|w| u64::from(w.count_ones())).sum());
            client.stop().map_err(|e| format!("STOP: {e}"))
        })();
        let unmapped = client
            .dma_unmap(range)
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
        writeln!(
            stdout,
            "  capabilities: {}",
            sanitized(&out.capabilities.to_string())
        )?;
        writeln!(
            stdout,
            "  device flags {:#x}, {} regions, {} IRQ indexes",
            out.device_flags, out.num_regions, out.num_irqs
        )?;
        if let Some(pci) = &out.pci {
            print_pci(&mut stdout, pci)?;
        }
        if let Some(error) = &out.pci_error {
            writeln!(stdout, "  PCI config space: {}", sanitized(error))?;
        }
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
