//! `dmalog demo` as a user runs it, small: every mode verifies, and an mlx5 REPORT fault
//! on the source still gives identical memory.

use std::process::Command;

fn demo(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args([
            "demo",
            "--json",
            "--memory-mib",
            "64",
            "--device-wss-mib",
            "8",
            "--vcpu-wss-mib",
            "4",
            "--max-rounds",
            "8",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
    assert!(report["bytes_sent"].as_u64().unwrap() >= 64 << 20);
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

#[test]
fn a_report_fault_resends_memory_and_still_verifies() {
    let report = demo(&["--tracker", "mlx5:cx7", "--inject-fault", "malformed@2"]);
    assert_eq!(report["verified"], true);
    let errors: u64 = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["report_errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, 1, "one REPORT failed");
}
