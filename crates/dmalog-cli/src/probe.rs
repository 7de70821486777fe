//! `dmalog probe`: what a kernel VFIO device supports (DMA logging, migration, PRE_COPY),
//! optionally trying a START/REPORT/STOP over a range.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dmalog::IovaRange;
use dmalog_vfio::probe::{
    open_cdev, probe_device, scan_devices, OpenError, ProbeReport, VFIO_DEVICES_DIR,
};

/// Options of `dmalog probe`.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// A VFIO device cdev (`/dev/vfio/devices/vfioN`); all of them when omitted.
    device: Option<PathBuf>,
    /// Start logging over `IOVA:LENGTH` (hex with 0x, or decimal), report once, stop.
    #[arg(long, value_name = "IOVA:LENGTH")]
    try_start: Option<String>,
    /// Page size hint for `--try-start`, in bytes.
    #[arg(long, default_value_t = 4096)]
    page_size: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Output {
    vfio: bool,
    devices: Vec<ProbeReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<String>,
}

fn parse_u64(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    Ok(
        match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16)?,
            None => text.parse()?,
        },
    )
}

fn parse_range(text: &str) -> anyhow::Result<IovaRange> {
    let Some((iova, length)) = text.split_once(':') else {
        bail!("expected IOVA:LENGTH, got {text:?}")
    };
    let (iova, length) = (
        parse_u64(iova).context("IOVA")?,
        parse_u64(length).context("LENGTH")?,
    );
    IovaRange::new(iova, length).map_err(|err| anyhow::anyhow!("bad range {text:?}: {err}"))
}

/// Runs `dmalog probe`: exit 0 on success, 2 when the machine has no VFIO, 1 on errors.
pub fn run(args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    let try_start = args
        .try_start
        .as_deref()
        .map(parse_range)
        .transpose()?
        .map(|range| (range, args.page_size));
    let paths = match &args.device {
        Some(path) => Ok(vec![path.clone()]),
        None => scan_devices(std::path::Path::new(VFIO_DEVICES_DIR)),
    };
    let mut output = Output {
        vfio: true,
        devices: Vec::new(),
        errors: Vec::new(),
    };
    let mut no_vfio = false;
    match paths {
        Err(err) => {
            no_vfio = matches!(err, OpenError::NoVfio(_));
            output.errors.push(err.to_string());
        }
        Ok(paths) if paths.is_empty() => {
            no_vfio = true;
            output.errors.push(format!(
                "no VFIO devices in {VFIO_DEVICES_DIR} (bind a device to vfio-pci)"
            ));
        }
        Ok(paths) => {
            for path in paths {
                match open_cdev(&path) {
                    Ok(mut bound) => {
                        output.devices.push(probe_device(
                            &path.display().to_string(),
                            &mut bound.device,
                            try_start,
                        ));
                    }
                    Err(err) => {
                        no_vfio |= matches!(err, OpenError::NoVfio(_));
                        output.errors.push(err.to_string());
                    }
                }
            }
        }
    }
    output.vfio = !no_vfio;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &output)?;
        writeln!(out)?;
    } else {
        for device in &output.devices {
            print_report(&mut out, device)?;
        }
        for error in &output.errors {
            writeln!(out, "{error}")?;
        }
    }
    Ok(if no_vfio {
        ExitCode::from(2)
    } else if output.errors.is_empty() && output.devices.iter().all(|d| d.errors.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn yes(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

fn print_report(out: &mut impl Write, report: &ProbeReport) -> std::io::Result<()> {
    writeln!(out, "{}", report.device)?;
    writeln!(out, "  DMA logging:  {}", yes(report.dma_logging))?;
    match &report.migration {
        Some(m) => writeln!(
            out,
            "  migration v2: yes (STOP_COPY {}, PRE_COPY {}, P2P {})",
            yes(m.stop_copy),
            yes(m.pre_copy),
            yes(m.p2p)
        )?,
        None => writeln!(out, "  migration v2: no")?,
    }
    if let Some(t) = &report.try_start {
        match t.chosen_page_size {
            Some(page) => writeln!(
                out,
                "  try-start:    [{:#x}, +{:#x}) hint {} -> page size {}, report {}, stop {}",
                t.iova,
                t.length,
                t.page_size_hint,
                page,
                if t.report_ok { "ok" } else { "FAILED" },
                if t.stop_ok { "ok" } else { "FAILED" }
            )?,
            None => writeln!(out, "  try-start:    FAILED")?,
        }
        if let Some(error) = &t.error {
            writeln!(out, "                {error}")?;
        }
    }
    for error in &report.errors {
        writeln!(out, "  error: {error}")?;
    }
    Ok(())
}
