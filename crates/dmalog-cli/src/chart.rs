//! The convergence chart of `dmalog demo --chart FILE.svg`: dirty pages per round (device,
//! vCPU, both) and MiB sent per round.

use std::path::Path;

use anyhow::Context;
use dmalog_migrate::MigrationReport;
use plotters::prelude::*;

/// A line of the dirty-pages plot: label, colour, and the count it shows.
type Series = (
    &'static str,
    RGBColor,
    fn(&dmalog_migrate::RoundStats) -> u64,
);

/// Draws `report` into an SVG file at `path`.
pub fn write_svg(report: &MigrationReport, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).context("chart background")?;
    let (top, bottom) = root.split_vertically(270);
    let rounds = report.rounds.len() as u32;
    let max_pages = report
        .rounds
        .iter()
        .skip(1)
        .map(|r| r.pages_device + r.pages_cpu + r.pages_both)
        .max()
        .unwrap_or(1)
        .max(1);
    let title = format!(
        "dmalog demo ({:?}): downtime {:.1} ms, {:.2}x guest memory sent",
        report.mode,
        report.downtime_ms,
        report.bytes_sent as f64 / report.guest_bytes as f64
    );
    let mut pages = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(1u32..rounds.max(2), 0u64..max_pages + max_pages / 10)
        .context("chart axes")?;
    pages
        .configure_mesh()
        .x_desc("round")
        .y_desc("dirty pages")
        .draw()
        .context("chart mesh")?;
    let series: [Series; 3] = [
        ("device only", BLUE, |r| r.pages_device),
        ("vCPU only", RED, |r| r.pages_cpu),
        ("both", GREEN, |r| r.pages_both),
    ];
    for (label, color, value) in series {
        pages
            .draw_series(LineSeries::new(
                report.rounds.iter().skip(1).map(|r| (r.round, value(r))),
                color.stroke_width(2),
            ))
            .context("chart series")?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    pages
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .context("chart legend")?;
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let max_mib = report
        .rounds
        .iter()
        .map(|r| mib(r.bytes_sent))
        .fold(1.0, f64::max);
    let mut sent = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u32..rounds.max(1), 0f64..max_mib * 1.1)
        .context("chart axes")?;
    sent.configure_mesh()
        .x_desc("round")
        .y_desc("MiB sent")
        .draw()
        .context("chart mesh")?;
    sent.draw_series(LineSeries::new(
        report.rounds.iter().map(|r| (r.round, mib(r.bytes_sent))),
        BLACK.stroke_width(2),
    ))
    .context("chart series")?;
    sent.draw_series(
        report
            .rounds
            .iter()
            .map(|r| Circle::new((r.round, mib(r.bytes_sent)), 3, BLACK.filled())),
    )
    .context("chart points")?;
    root.present().context("writing the chart")?;
    Ok(())
}
