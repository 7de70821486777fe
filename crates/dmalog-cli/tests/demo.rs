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
    // 3: verified, over the downtime budget (a busy machine may not meet 30 ms; these
    // tests are about other things).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
        let out = Command::new(env!("CARGO_BIN_EXE_dmalog"))
            .arg("demo")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["demo", "--help"])
        .output()
        .unwrap();
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

#[test]
fn the_pds_tracker_with_two_regions_verifies() {
    // The default layout has two ranges: each REPORT stays inside one pds region.
    let report = demo(&["--tracker", "pds:2"]);
    assert_eq!(report["verified"], true);
    assert_eq!(report["device_tracking"], true);
    let errors: u64 = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["report_errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, 0, "no REPORT spanned regions");
}

/// `dmalog migrate source` with a small VM (`memory_mib` of guest memory, 8 MiB device and
/// 4 MiB vCPU working sets) connecting to `address`, its device server at `socket` (TLS or
/// `--insecure-plaintext` is the caller's to add).
fn migrate_source(memory_mib: &str, address: &str, socket: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dmalog"));
    command
        .args([
            "migrate",
            "source",
            "--memory-mib",
            memory_mib,
            "--device-wss-mib",
            "8",
            "--vcpu-wss-mib",
            "4",
            "--connect",
            address,
            "--socket",
        ])
        .arg(socket);
    command
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
    let dir = std::env::temp_dir().join(format!(
        "dmalog-migrate-test-{}-{channels}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = env!("CARGO_BIN_EXE_dmalog");
    let mut servers: Vec<std::process::Child> = ["src.sock", "dst.sock"]
        .iter()
        .map(|name| {
            Command::new(exe)
                .args(["serve", "--socket"])
                .arg(dir.join(name))
                .spawn()
                .unwrap()
        })
        .collect();
    let port = 40000 + ((std::process::id() + channels * 1000) % 20000) as u16;
    let address = format!("127.0.0.1:{port}");
    // Mutual TLS with a set from `migrate gen-certs`.
    let certs = dir.join("certs");
    let status = Command::new(exe)
        .args(["migrate", "gen-certs", "--dir"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(status.success());
    let tls = |cert: &str, key: &str| {
        [
            "--tls-ca".into(),
            certs.join("ca.pem"),
            "--tls-cert".into(),
            certs.join(cert),
            "--tls-key".into(),
            certs.join(key),
        ]
    };
    let destination = Command::new(exe)
        .args([
            "migrate",
            "destination",
            "--json",
            "--memory-mib",
            "64",
            "--listen",
            &address,
            "--socket",
        ])
        .arg(dir.join("dst.sock"))
        .args(tls("server.pem", "server-key.pem"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The destination listens once its device server answers; the source retries connecting.
    let mut source = None;
    for _ in 0..100 {
        let out = migrate_source("64", &address, &dir.join("src.sock"))
            .arg("--json")
            .args(["--channels", &channels.to_string()])
            .args(tls("client.pem", "client-key.pem"))
            .output()
            .unwrap();
        // 3: verified over the downtime budget.
        if matches!(out.status.code(), Some(0 | 3)) {
            source = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let source = source.expect("the source migrated");
    assert!(matches!(source.status.code(), Some(0 | 3)), "{source:?}");
    let report: serde_json::Value = serde_json::from_slice(&source.stdout).unwrap();
    assert_eq!(report["verified"], true);
    let destination = destination.wait_with_output().unwrap();
    assert!(destination.status.success());
    let dst: serde_json::Value = serde_json::from_slice(&destination.stdout).unwrap();
    assert_eq!(dst["verified"], true);
    assert_eq!(dst["channels"], channels);
    assert!(dst["device_writes_after_resume"].as_u64().unwrap() > 0);
    for server in &mut servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_chart_is_an_svg_with_the_rounds() {
    let path = std::env::temp_dir().join(format!("dmalog-chart-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args([
            "demo",
            "--memory-mib",
            "64",
            "--device-wss-mib",
            "8",
            "--vcpu-wss-mib",
            "4",
            "--chart",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 3)), "{out:?}");
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            match read_bytes {
                Some(n) => {
                    let mut buf = vec![0u8; n];
                    let _ = std::io::Read::read_exact(&mut stream, &mut buf);
                }
                None => {
                    let _ = std::io::copy(&mut stream, &mut std::io::sink());
                }
            }
        }
    });
    address
}

fn serve(dir: &std::path::Path, name: &str) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["serve", "--socket"])
        .arg(dir.join(name))
        .spawn()
        .unwrap();
    while !dir.join(name).exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    child
}

#[test]
fn a_dead_destination_fails_the_migration_and_the_source_device_runs_on() {
    let dir = std::env::temp_dir().join(format!("dmalog-dead-dst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = serve(&dir, "src.sock");
    let address = dying_destination(Some(1 << 20));
    let out = migrate_source("64", &address, &dir.join("src.sock"))
        .arg("--insecure-plaintext")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("migration"), "{stderr}");
    // The source device is RUNNING again (not left in PRE_COPY), with no logging.
    let mut client = dmalog_vfio_user::Client::connect(&dir.join("src.sock")).unwrap();
    assert_eq!(
        dmalog::MigrationDevice::device_state(&mut client).unwrap(),
        dmalog::uapi::DeviceState::Running
    );
    let mut bitmap = [0u64; 1];
    assert_eq!(
        dmalog::DirtyTracker::report(
            &mut client,
            dmalog::IovaRange::new(0, 4096).unwrap(),
            4096,
            &mut bitmap
        )
        .unwrap_err()
        .errno(),
        libc::EINVAL
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_server_that_dies_fails_the_migration_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("dmalog-dead-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = serve(&dir, "src.sock");
    let address = dying_destination(None);
    let source = migrate_source("128", &address, &dir.join("src.sock"))
        .args(["--link-mbps", "100", "--insecure-plaintext"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600)); // round 0 takes over a second
    let _ = server.kill();
    let _ = server.wait();
    let out = source.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device") && stderr.contains("connection"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
