//! What a person watching `dmalog demo` or `dmalog migrate source` sees: one live line per
//! round (round, bytes, rate, dirty rate, predicted downtime, throttle) and the table of
//! every round at the end.

use std::io::Write;

use dmalog_migrate::{MigrationReport, RoundStats};

const MIB: f64 = (1u64 << 20) as f64;

/// Megabytes (10^6 bytes) per second, the unit of `--link-mbps`.
fn mb_per_sec(bytes_per_sec: f64) -> f64 {
    bytes_per_sec / 1e6
}

/// The throttle of `round`, as shown: "-" when none, "20%" or "20% +dev".
fn throttle_text(round: &RoundStats) -> String {
    match (round.throttle_pct, round.device_throttled) {
        (0, _) => "-".into(),
        (pct, false) => format!("{pct}%"),
        (pct, true) => format!("{pct}% +dev"),
    }
}

/// The live line after `round`; `total_bytes` were sent so far.
pub fn round_line(round: &RoundStats, total_bytes: u64) -> String {
    let rate = if round.round_ms > 0.0 {
        round.bytes_sent as f64 / (round.round_ms / 1e3)
    } else {
        0.0
    };
    let head = format!(
        "round {}: {:.1} MiB ({:.0} MiB in all)",
        round.round,
        round.bytes_sent as f64 / MIB,
        total_bytes as f64 / MIB
    );
    if round.final_round {
        return format!(
            "{head}, guest stopped: downtime {:.1} ms (predicted {})",
            round.round_ms,
            predicted_text(round)
        );
    }
    format!(
        "{head} at {:.0} MB/s; dirtying {:.0} MB/s; predicted downtime {}; throttle {}",
        mb_per_sec(rate),
        mb_per_sec(round.dirty_bytes_per_sec),
        predicted_text(round),
        throttle_text(round)
    )
}

fn predicted_text(round: &RoundStats) -> String {
    match round.predicted_downtime_ms {
        Some(ms) if ms.is_finite() => format!("{ms:.1} ms"),
        Some(_) => "unbounded".into(),
        None => "-".into(),
    }
}

/// Prints `digests` (region index to CRC32C), one line each.
pub fn print_digests(
    out: &mut impl Write,
    digests: &serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    for (index, digest) in digests {
        writeln!(
            out,
            "region {index} digest: {}",
            digest.as_str().unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Prints the report: the rounds, the downtime and where it went, the verdict.
pub fn print_table(
    out: &mut impl Write,
    report: &MigrationReport,
    device_writes_after: Option<u64>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "mode {:?}, guest {} MiB, device tracking {}",
        report.mode,
        report.guest_bytes >> 20,
        if report.device_tracking { "on" } else { "off" }
    )?;
    writeln!(
        out,
        "device state: {} bytes{}",
        report.device_bytes,
        if report.device_pre_copy {
            " (PRE_COPY and STOP_COPY)"
        } else {
            " (STOP_COPY only)"
        }
    )?;
    writeln!(
        out,
        "{:>5} {:>9} {:>9} {:>7} {:>9} {:>11} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9}",
        "round",
        "dev pages",
        "cpu pages",
        "both",
        "sent",
        "bytes",
        "MB/s",
        "dirty",
        "pred ms",
        "round ms",
        "rep ms",
        "throttle"
    )?;
    for r in &report.rounds {
        writeln!(
            out,
            "{:>5} {:>9} {:>9} {:>7} {:>9} {:>11} {:>7.0} {:>7.0} {:>8} {:>8.1} {:>7.2} {:>9}{}",
            r.round,
            r.pages_device,
            r.pages_cpu,
            r.pages_both,
            r.pages_sent,
            r.bytes_sent,
            mb_per_sec(r.bandwidth_bytes_per_sec),
            mb_per_sec(r.dirty_bytes_per_sec),
            match r.predicted_downtime_ms {
                Some(ms) if ms.is_finite() => format!("{ms:.1}"),
                Some(_) => "inf".into(),
                None => "-".into(),
            },
            r.round_ms,
            r.report_ms,
            throttle_text(r),
            if r.final_round {
                "  (guest stopped)"
            } else {
                ""
            }
        )?;
    }
    let stop = &report.stop;
    writeln!(
        out,
        "downtime {:.1} ms (budget {:.0} ms{}), total {:.0} ms, sent {} bytes ({:.2}x guest memory)",
        report.downtime_ms,
        report.max_downtime_ms,
        if report.downtime_budget_met {
            ", met"
        } else {
            ", NOT MET"
        },
        report.total_ms,
        report.bytes_sent,
        report.bytes_sent as f64 / report.guest_bytes as f64
    )?;
    writeln!(
        out,
        "the stop, ms: pause {:.2}, device STOP_COPY {:.2}, final REPORTs {:.2}, pages {:.2}, \
         device data {:.2}, destination {:.2}",
        stop.pause_ms,
        stop.stop_copy_ms,
        stop.reports_ms,
        stop.pages_ms,
        stop.device_data_ms,
        stop.destination_ms
    )?;
    if let Some(writes) = device_writes_after {
        writeln!(
            out,
            "destination device workload after resume: {writes} writes in 100 ms"
        )?;
    }
    writeln!(
        out,
        "{}",
        if report.verified {
            "VERIFIED"
        } else {
            "FAILED: destination memory differs"
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_line_says_round_bytes_rate_prediction_and_throttle() {
        let round = RoundStats {
            round: 4,
            bytes_sent: 8 << 20,
            round_ms: 10.0,
            dirty_bytes_per_sec: 300e6,
            predicted_downtime_ms: Some(42.25),
            throttle_pct: 30,
            device_throttled: true,
            ..RoundStats::default()
        };
        let line = round_line(&round, 1 << 30);
        for part in [
            "round 4",
            "8.0 MiB",
            "1024 MiB in all",
            "839 MB/s",
            "dirtying 300 MB/s",
            "predicted downtime 42.2 ms",
            "throttle 30% +dev",
        ] {
            assert!(line.contains(part), "{part:?} in {line:?}");
        }
        let stopped = RoundStats {
            final_round: true,
            round_ms: 12.5,
            predicted_downtime_ms: Some(9.0),
            ..round
        };
        assert!(round_line(&stopped, 0).contains("downtime 12.5 ms (predicted 9.0 ms)"));
        let unthrottled = RoundStats {
            throttle_pct: 0,
            predicted_downtime_ms: None,
            ..RoundStats::default()
        };
        let line = round_line(&unthrottled, 0);
        assert!(line.contains("throttle -") && line.contains("predicted downtime -"));
    }
}
