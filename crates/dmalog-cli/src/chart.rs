//! The convergence chart of `dmalog demo --chart FILE.svg`: dirty pages per round (device,
//! vCPU, both), MiB sent per round (log scale: round 0 moves all memory, the others a
//! thousandth of it), and the downtime: predicted at each round's REPORTs, the budget and
//! the actual one; rounds sent under an auto-converge throttle are shaded.

use std::path::Path;

use anyhow::Context;
use dmalog_migrate::{MigrationReport, RoundStats};
use plotters::coord::Shift;
use plotters::prelude::*;

/// A line of the dirty-pages plot: label, colour, and the count it shows.
type Series = (&'static str, RGBColor, fn(&RoundStats) -> u64);

/// The shade of throttled rounds.
const THROTTLED: RGBColor = RGBColor(255, 200, 120);
/// The smallest MiB the log axis shows (a round of a few frames still has a point).
const MIN_MIB: f64 = 1e-3;
/// The smallest downtime the log axis shows, ms.
const MIN_MS: f64 = 0.1;

/// Draws `report` into an SVG file at `path`.
pub fn write_svg(report: &MigrationReport, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 810)).into_drawing_area();
    root.fill(&WHITE).context("chart background")?;
    let panels = root.split_evenly((3, 1));
    draw_pages(report, &panels[0])?;
    draw_bytes(report, &panels[1])?;
    draw_downtime(report, &panels[2])?;
    root.present().context("writing the chart")?;
    Ok(())
}

/// A panel's chart: the margins and label areas every panel has.
fn panel<'a, 'b, DB: DrawingBackend>(area: &'a DrawingArea<DB, Shift>) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70);
    builder
}

/// The grid and axis labels of a panel (x: rounds).
fn draw_mesh<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    y_desc: &str,
) -> anyhow::Result<()>
where
    X: Ranged<FormatOption = plotters::coord::ranged1d::DefaultFormatting>
        + plotters::coord::ranged1d::ValueFormatter<X::ValueType>,
    Y: Ranged<FormatOption = plotters::coord::ranged1d::DefaultFormatting>
        + plotters::coord::ranged1d::ValueFormatter<Y::ValueType>,
{
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .draw()
        .context("chart mesh")?;
    Ok(())
}

/// A panel's legend, boxed, at `position`.
fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .context("chart legend")?;
    Ok(())
}

fn rounds_axis(report: &MigrationReport) -> std::ops::Range<u32> {
    0u32..(report.rounds.len() as u32).max(2)
}

fn draw_pages(
    report: &MigrationReport,
    area: &DrawingArea<SVGBackend, Shift>,
) -> anyhow::Result<()> {
    let max_pages = report
        .rounds
        .iter()
        .skip(1)
        .map(|r| r.pages_device + r.pages_cpu + r.pages_both)
        .max()
        .unwrap_or(1)
        .max(1);
    let title = format!(
        "dmalog demo ({:?}): downtime {:.1} ms (budget {:.0} ms{}), {:.2}x guest memory sent",
        report.mode,
        report.downtime_ms,
        report.max_downtime_ms,
        if report.downtime_budget_met {
            ""
        } else {
            ", not met"
        },
        report.bytes_sent as f64 / report.guest_bytes as f64
    );
    let rounds = report.rounds.len() as u32;
    let mut chart = panel(area)
        .caption(title, ("sans-serif", 18))
        .build_cartesian_2d(1u32..rounds.max(2), 0u64..max_pages + max_pages / 10)
        .context("chart axes")?;
    draw_mesh(&mut chart, "dirty pages")?;
    let series: [Series; 3] = [
        ("device only", BLUE, |r| r.pages_device),
        ("vCPU only", RED, |r| r.pages_cpu),
        ("both (sent once)", GREEN, |r| r.pages_both),
    ];
    for (label, color, value) in series {
        chart
            .draw_series(LineSeries::new(
                report.rounds.iter().skip(1).map(|r| (r.round, value(r))),
                color.stroke_width(2),
            ))
            .context("chart series")?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// Shades the rounds sent under a throttle in `chart` (y from `low` to `high`), labelled
/// with the throttle.
fn shade_throttled<'a, Y>(
    report: &MigrationReport,
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordu32, Y>,
    >,
    low: Y::ValueType,
    high: Y::ValueType,
) -> anyhow::Result<()>
where
    Y: Ranged,
    Y::ValueType: Clone + 'static,
{
    let throttled: Vec<&RoundStats> = report
        .rounds
        .iter()
        .filter(|r| r.throttle_pct > 0)
        .collect();
    if throttled.is_empty() {
        return Ok(());
    }
    chart
        .draw_series(throttled.iter().map(|r| {
            Rectangle::new(
                [(r.round, high.clone()), (r.round + 1, low.clone())],
                THROTTLED.mix(0.5).filled(),
            )
        }))
        .context("throttled rounds")?
        .label("throttled (vCPU % in the bar)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], THROTTLED.filled()));
    chart
        .draw_series(throttled.iter().map(|r| {
            Text::new(
                format!("{}%", r.throttle_pct),
                (r.round, high.clone()),
                ("sans-serif", 10).into_font(),
            )
        }))
        .context("throttle labels")?;
    Ok(())
}

fn draw_bytes(
    report: &MigrationReport,
    area: &DrawingArea<SVGBackend, Shift>,
) -> anyhow::Result<()> {
    let mib = |bytes: u64| (bytes as f64 / (1u64 << 20) as f64).max(MIN_MIB);
    let max_mib = report
        .rounds
        .iter()
        .map(|r| mib(r.bytes_sent))
        .fold(1.0, f64::max);
    let mut chart = panel(area)
        .build_cartesian_2d(rounds_axis(report), (MIN_MIB..max_mib * 2.0).log_scale())
        .context("chart axes")?;
    draw_mesh(&mut chart, "MiB sent (log scale)")?;
    shade_throttled(report, &mut chart, MIN_MIB, max_mib * 2.0)?;
    chart
        .draw_series(LineSeries::new(
            report.rounds.iter().map(|r| (r.round, mib(r.bytes_sent))),
            BLACK.stroke_width(2),
        ))
        .context("chart series")?
        .label("MiB sent in the round")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(
            report
                .rounds
                .iter()
                .map(|r| Circle::new((r.round, mib(r.bytes_sent)), 3, BLACK.filled())),
        )
        .context("chart points")?;
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    Ok(())
}

fn draw_downtime(
    report: &MigrationReport,
    area: &DrawingArea<SVGBackend, Shift>,
) -> anyhow::Result<()> {
    let predicted: Vec<(u32, f64)> = report
        .rounds
        .iter()
        .filter_map(|r| {
            Some((
                r.round,
                r.predicted_downtime_ms.filter(|ms| ms.is_finite())?,
            ))
        })
        .map(|(round, ms)| (round, ms.max(MIN_MS)))
        .collect();
    let actual = report
        .rounds
        .iter()
        .find(|r| r.final_round)
        .map(|r| (r.round, report.downtime_ms.max(MIN_MS)));
    let max_ms = predicted
        .iter()
        .map(|&(_, ms)| ms)
        .chain(actual.map(|(_, ms)| ms))
        .chain([report.max_downtime_ms])
        .fold(1.0, f64::max);
    let top = max_ms * 2.0;
    let mut chart = panel(area)
        .build_cartesian_2d(rounds_axis(report), (MIN_MS..top).log_scale())
        .context("chart axes")?;
    draw_mesh(&mut chart, "downtime, ms (log scale)")?;
    shade_throttled(report, &mut chart, MIN_MS, top)?;
    let end = rounds_axis(report).end;
    let budget = report.max_downtime_ms.max(MIN_MS);
    chart
        .draw_series(LineSeries::new(
            [(0, budget), (end, budget)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .context("budget line")?
        .label("budget")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    chart
        .draw_series(LineSeries::new(
            predicted.iter().copied(),
            MAGENTA.stroke_width(2),
        ))
        .context("predicted downtime")?
        .label("predicted downtime (had it stopped at this round)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    chart
        .draw_series(
            predicted
                .iter()
                .map(|&point| Circle::new(point, 3, MAGENTA.filled())),
        )
        .context("predicted points")?;
    if let Some(point) = actual {
        chart
            .draw_series([Cross::new(point, 7, BLACK.stroke_width(3))])
            .context("actual downtime")?
            .label("actual downtime")
            .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmalog_migrate::{Mode, StopTimes};

    fn report(throttled: bool) -> MigrationReport {
        let mib = 1u64 << 20;
        let rounds = [
            (1024 * mib, None),
            (10 * mib, Some(80.0)),
            (mib, Some(12.0)),
        ]
        .into_iter()
        .enumerate()
        .map(|(round, (bytes_sent, predicted_downtime_ms))| RoundStats {
            round: round as u32,
            bytes_sent,
            pages_device: bytes_sent / 8192,
            pages_cpu: bytes_sent / 8192,
            predicted_downtime_ms,
            throttle_pct: if throttled && round == 1 { 20 } else { 0 },
            final_round: round == 2,
            round_ms: 9.0,
            ..RoundStats::default()
        })
        .collect();
        MigrationReport {
            mode: Mode::PreCopy,
            verified: true,
            downtime_ms: 9.0,
            total_ms: 1000.0,
            bytes_sent: 1035 * mib,
            guest_bytes: 1024 * mib,
            rounds,
            device_tracking: true,
            device_pre_copy: true,
            device_bytes: 0,
            max_downtime_ms: 30.0,
            downtime_budget_met: true,
            forced_stop: false,
            stop: StopTimes::default(),
            link_rtt_ms: 0.1,
        }
    }

    fn svg_of(report: &MigrationReport) -> String {
        let path = std::env::temp_dir().join(format!(
            "dmalog-chart-unit-{}-{}.svg",
            std::process::id(),
            report.rounds[1].throttle_pct
        ));
        write_svg(report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        svg
    }

    /// The y pixel of each point of the first polyline drawn in `stroke` at width 2.
    fn polyline_ys(svg: &str, stroke: &str) -> Vec<f64> {
        let line = svg
            .lines()
            .find(|l| {
                l.contains("<polyline")
                    && l.contains(&format!("stroke=\"{stroke}\""))
                    && l.contains("stroke-width=\"2\"")
            })
            .unwrap_or_else(|| panic!("no {stroke} polyline"));
        let points = line.split("points=\"").nth(1).unwrap();
        let points = &points[..points.find('"').unwrap()];
        points
            .split_whitespace()
            .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn the_chart_has_the_downtime_series_and_bytes_on_a_log_scale() {
        let svg = svg_of(&report(false));
        for text in [
            "MiB sent (log scale)",
            "predicted downtime",
            "actual downtime",
            "budget",
            "both (sent once)",
        ] {
            assert!(svg.contains(text), "{text:?} missing");
        }
        assert!(!svg.contains("throttled"), "no throttled round, no mark");
        // Log scale: 10 MiB and 1 MiB are far apart (on a linear axis up to 1 GiB they
        // would be within a pixel of each other and of zero).
        let ys = polyline_ys(&svg, "#000000");
        assert_eq!(ys.len(), 3);
        assert!(ys[2] - ys[1] > 20.0, "{ys:?}");
        assert!(ys[1] - ys[0] > 40.0, "{ys:?}");
        // The predicted downtime: 80 ms above 12 ms.
        let predicted = polyline_ys(&svg, "#FF00FF");
        assert_eq!(predicted.len(), 2);
        assert!(predicted[1] - predicted[0] > 20.0, "{predicted:?}");
    }

    #[test]
    fn throttled_rounds_are_marked_with_their_throttle() {
        let svg = svg_of(&report(true));
        assert!(svg.contains("throttled (vCPU % in the bar)"));
        assert!(svg.contains("\n20%\n"), "the throttle labels the round");
    }
}
