//! `dmalog demo` as a user runs it, small: every mode verifies, and an mlx5 REPORT fault
//! on the source still gives identical memory.

mod common;

use std::process::Stdio;

use common::migrate::{
    self, assert_device_ready_for_a_retry, dmalog, gen_certs, json, migrated, run_guarded, text,
    tls_args, Destination,
};
use common::{ServerProcess, TempDir};

fn demo(extra: &[&str]) -> serde_json::Value {
    let out = migrate::demo()
        .args(["--json", "--max-rounds", "8"])
        .args(extra)
        .output()
        .unwrap();
    // 3: verified, over the downtime budget (a busy machine may not meet 30 ms; these
    // tests are about other things).
    assert!(migrated(&out), "{:?}\n{}", out.status, text(&out));
    let report = json(&out);
    assert_eq!(
        out.status.code() == Some(0),
        report["downtime_budget_met"] == true,
        "the exit status says whether the budget was met"
    );
    report
}

#[test]
fn rounds_carry_rate_prediction_and_throttle_and_the_report_the_budget() {
    let report = demo(&[]);
    assert!(report["downtime_budget_met"].is_boolean());
    assert!(report["forced_stop"].is_boolean());
    assert_eq!(report["max_downtime_ms"], 30.0);
    for phase in [
        "pause_ms",
        "stop_copy_ms",
        "reports_ms",
        "pages_ms",
        "device_data_ms",
        "destination_ms",
    ] {
        assert!(report["stop"][phase].is_number(), "stop.{phase}");
    }
    let rounds = report["rounds"].as_array().unwrap();
    for round in rounds {
        for field in ["bandwidth_bytes_per_sec", "dirty_bytes_per_sec"] {
            assert!(round[field].is_number(), "{field} in {round}");
        }
        assert!(round["throttle_pct"].is_u64(), "{round}");
        assert!(round["device_throttled"].is_boolean(), "{round}");
        assert!(round.get("predicted_downtime_ms").is_some(), "{round}");
    }
    assert!(
        rounds[0]["predicted_downtime_ms"].is_null(),
        "none for the full copy"
    );
    assert!(
        rounds.last().unwrap()["predicted_downtime_ms"].is_number(),
        "the prediction the stop was made on"
    );
    assert!(rounds[0]["bandwidth_bytes_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_stop_forced_over_the_budget_exits_3_and_says_so() {
    // vCPUs dirtying ten times what the link sends, no auto-converge, a 1 ms budget and two
    // rounds: the stop is forced over the budget.
    let out = migrate::demo()
        .args([
            "--json",
            "--link-mbps",
            "100",
            "--vcpu-rate-mbps",
            "1000",
            "--auto-converge",
            "off",
            "--max-rounds",
            "2",
            "--max-downtime-ms",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["downtime_budget_met"], false);
    assert_eq!(report["forced_stop"], true);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "round 0, two pre-copy rounds, the final");
    assert!(rounds.iter().all(|r| r["throttle_pct"] == 0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("budget was not met"), "{stderr}");
}

#[test]
fn auto_converge_throttles_the_vcpus_and_dma_engines_workload() {
    // vCPUs dirtying ten times the link's 100 MB/s over 4 MiB: each round finds about 4 MiB
    // dirty, 40 ms to send against a 5 ms budget, so auto-converge steps in.
    let report = demo(&[
        "--link-mbps",
        "100",
        "--vcpu-rate-mbps",
        "1000",
        "--max-downtime-ms",
        "5",
    ]);
    assert_eq!(report["verified"], true);
    let rounds = report["rounds"].as_array().unwrap();
    let throttled: Vec<_> = rounds
        .iter()
        .filter(|r| r["throttle_pct"].as_u64().unwrap() > 0)
        .collect();
    assert!(!throttled.is_empty(), "{rounds:?}");
    assert_eq!(throttled[0]["throttle_pct"], 20, "QEMU's initial throttle");
    assert!(
        throttled.iter().all(|r| r["device_throttled"] == true),
        "dma-engine's WL_RATE took the throttle: {throttled:?}"
    );
    assert!(
        report["device_writes_after_resume"].as_u64().unwrap() > 0,
        "the destination device runs on"
    );
}

#[test]
fn auto_converge_takes_on_or_off_and_throttles_in_percent_only() {
    for bad in [
        &["--auto-converge", "maybe"][..],
        &["--throttle-initial", "0"],
        &["--throttle-increment", "100"],
        &["--throttle-max", "-1"],
        &["--wss-overlap-pct", "101"],
        &["--link-mbps", "18446744073709551615"],
        &["--vcpu-rate-mbps", "10000001"],
    ] {
        let out = dmalog().arg("demo").args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    let help = dmalog().args(["demo", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Exit status") && help.contains("3 when"),
        "{help}"
    );
}

#[test]
fn pre_copy_verifies_with_rounds_and_timings() {
    let report = demo(&[]);
    assert_eq!(report["verified"], true);
    assert_eq!(report["mode"], "pre-copy");
    assert_eq!(report["guest_bytes"], 64u64 << 20);
    let rounds = report["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "round 0 and the final round at least");
    assert_eq!(
        rounds[0]["pages_sent"],
        (64u64 << 20) / 4096,
        "round 0 sends everything"
    );
    assert_eq!(rounds.last().unwrap()["final_round"], true);
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    // Zero pages cost a flag, not 4 KiB: the stream carries every round and a little more.
    let rounds_bytes: u64 = rounds
        .iter()
        .map(|r| r["bytes_sent"].as_u64().unwrap())
        .sum();
    assert!(rounds_bytes > 0);
    assert!(report["bytes_sent"].as_u64().unwrap() >= rounds_bytes);
    assert!(
        report["device_writes_after_resume"].as_u64().unwrap() > 0,
        "the device runs on at the destination"
    );
}

#[test]
fn stop_and_copy_and_no_device_tracking_verify() {
    let report = demo(&["--mode", "stop-and-copy"]);
    assert_eq!(report["verified"], true);
    assert_eq!(report["rounds"].as_array().unwrap().len(), 1);
    let report = demo(&["--mode", "no-device-tracking"]);
    assert_eq!(report["verified"], true);
    assert_eq!(report["device_tracking"], false);
}

/// REPORTs that failed, over all rounds.
fn report_errors(report: &serde_json::Value) -> u64 {
    report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["report_errors"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_report_fault_resends_memory_and_still_verifies() {
    let report = demo(&["--tracker", "mlx5:cx7", "--inject-fault", "malformed@2"]);
    assert_eq!(report["verified"], true);
    let errors = report_errors(&report);
    assert_eq!(errors, 1, "one REPORT failed");
}

#[test]
fn the_pds_tracker_with_two_regions_verifies() {
    // The default layout has two ranges: each REPORT stays inside one pds region.
    let report = demo(&["--tracker", "pds:2"]);
    assert_eq!(report["verified"], true);
    assert_eq!(report["device_tracking"], true);
    let errors = report_errors(&report);
    assert_eq!(errors, 0, "no REPORT spanned regions");
}

#[test]
fn migrate_source_and_destination_as_separate_processes() {
    migrate_as_separate_processes(1);
}

/// Three TCP connections (each its own TLS session), across the two processes.
#[test]
fn migrate_on_three_channels_as_separate_processes() {
    migrate_as_separate_processes(3);
}

fn migrate_as_separate_processes(channels: u32) {
    let dir = TempDir::new("migrate-test");
    let (src_dev, dst_dev) = (ServerProcess::start("soft"), ServerProcess::start("soft"));
    // Mutual TLS with a set from `migrate gen-certs`.
    let certs = gen_certs(&dir.0, "certs", &[]);
    let mut destination = migrate::destination(&dst_dev.socket);
    destination
        .args(["--json", "--memory-mib", "64"])
        .args(tls_args(&certs, "server"));
    let destination = Destination::spawn(destination);
    let source = run_guarded(
        migrate::source("64", &destination.address, &src_dev.socket)
            .arg("--json")
            .args(["--channels", &channels.to_string()])
            .args(tls_args(&certs, "client")),
        "dmalog migrate source",
    );
    // 3: verified over the downtime budget.
    assert!(migrated(&source), "{}", text(&source));
    let report = json(&source);
    assert_eq!(report["verified"], true);
    let (destination, stderr) = destination.wait();
    assert!(destination.status.success(), "{stderr}");
    let dst = json(&destination);
    assert_eq!(dst["verified"], true);
    assert_eq!(dst["channels"], channels);
    assert!(dst["device_writes_after_resume"].as_u64().unwrap() > 0);
}

#[test]
fn the_chart_is_an_svg_with_the_rounds() {
    let path = std::env::temp_dir().join(format!("dmalog-chart-{}.svg", std::process::id()));
    let out = migrate::demo().arg("--chart").arg(&path).output().unwrap();
    assert!(migrated(&out), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("VERIFIED"));
    let svg = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(svg.starts_with("<svg") && svg.contains("dirty pages") && svg.contains("MiB sent"));
    for series in [
        "predicted downtime",
        "actual downtime",
        "budget",
        "log scale",
    ] {
        assert!(svg.contains(series), "{series:?} in the chart");
    }
    assert!(
        svg.matches("<polyline").count() >= 6,
        "three dirty-page series, the bytes, the budget and the prediction"
    );
}

/// A destination that reads `read_bytes` (None: everything) and hangs up; returns its
/// address.
fn dying_destination(read_bytes: Option<usize>) -> String {
    use dmalog_migrate::stream::{FrameReader, FrameWriter, Kind};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            // Frames taken (the source's Pings answered: it times its link first) until
            // `read_bytes` of them, or all of them; then the connection drops.
            let mut input = FrameReader::new(stream.try_clone().unwrap());
            let mut pongs = FrameWriter::new(stream, None);
            let mut taken_bytes = 0;
            while let Ok(frame) = input.read() {
                if frame.kind == Kind::Ping {
                    let _ = pongs.write(Kind::Pong, &[&frame.payload]);
                    let _ = pongs.flush();
                }
                taken_bytes += frame.payload.len();
                if read_bytes.is_some_and(|n| taken_bytes >= n) {
                    break;
                }
            }
        }
    });
    address
}

#[test]
fn a_dead_destination_fails_the_migration_and_the_source_device_runs_on() {
    let server = ServerProcess::start("soft");
    let address = dying_destination(Some(1 << 20));
    let out = run_guarded(
        migrate::source("64", &address, &server.socket).arg("--insecure-plaintext"),
        "dmalog migrate source",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("migration"), "{stderr}");
    // The source device is RUNNING again (not left in PRE_COPY), with no logging.
    assert_device_ready_for_a_retry(&server);
}

#[test]
fn a_device_server_that_dies_fails_the_migration_with_a_clear_message() {
    let mut server = ServerProcess::start("soft");
    let address = dying_destination(None);
    let source = migrate::source("128", &address, &server.socket)
        .args(["--link-mbps", "100", "--insecure-plaintext"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600)); // round 0 takes over a second
    server.kill();
    let out = migrate::wait_guarded(source, "dmalog migrate source");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device") && stderr.contains("connection"),
        "{stderr}"
    );
}
