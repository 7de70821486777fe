//! `dmalog bench peer` runs against a `dmalog serve` child and prints its JSON report; a
//! server without DMA logging is a clear error.

mod common;

use std::process::Command;

use common::ServerProcess;

fn bench_peer(server: &ServerProcess, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["bench", "peer", "--socket"])
        .arg(&server.socket)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn bench_peer_reports_latencies_and_throughput() {
    let server = ServerProcess::start("soft");
    server.wait_listening();
    let output = bench_peer(
        &server,
        &["--size-mib", "256", "--iterations", "3", "--json"],
    );
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["guest_bytes"], 256u64 << 20);
    assert_eq!(report["page_size"], 4096);
    assert_eq!(report["bitmap_bytes"], (256u64 << 20) / 4096 / 8);
    assert_eq!(report["iterations"], 3);
    for op in ["start", "report_one_word", "report_full", "stop"] {
        let spread = &report[op];
        let (min, median, max) = (
            spread["min_ns"].as_f64().unwrap(),
            spread["median_ns"].as_f64().unwrap(),
            spread["max_ns"].as_f64().unwrap(),
        );
        assert!(
            0.0 < min && min <= median && median <= max,
            "{op}: {spread}"
        );
    }
    assert!(report["report_full_mb_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_peer_without_logging_is_an_error() {
    let server = ServerProcess::start("none");
    server.wait_listening();
    let output = bench_peer(&server, &["--size-mib", "16", "--iterations", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not offer DMA logging"), "{stderr}");
}
