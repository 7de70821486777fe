//! `dmalog migrate source|destination` with a device that is not dma-engine: two
//! `dmalog serve --device lvu-sample` servers (migration v2, PRE_COPY data = BAR1,
//! STOP_COPY data = BAR1 then BAR0). The source must not program dma-engine's workload
//! registers, must move the device state through MIG_DATA, and BAR1 must arrive intact.

mod common;

use std::process::Output;

use common::migrate::{self, json, migrated, run_guarded, text, Destination};
use common::ServerProcess;

const BAR1_BYTES: usize = 0x4000;
const BAR1: u32 = 1;

fn pattern() -> Vec<u8> {
    (0..BAR1_BYTES)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8)
        .collect()
}

fn read_bar1(server: &ServerProcess) -> Vec<u8> {
    let mut client = server.connect();
    let mut bar1 = vec![0u8; BAR1_BYTES];
    for (index, piece) in bar1.chunks_mut(4096).enumerate() {
        client
            .region_read(BAR1, (index * 4096) as u64, piece)
            .unwrap();
    }
    bar1
}

/// A loopback address nobody listens on now.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn migrate_source(src: &ServerProcess, address: &str, extra: &[&str]) -> Output {
    run_guarded(
        migrate::source("64", address, &src.socket)
            .args([
                "--json",
                // TLS has its own tests (migrate_tls.rs); this one is about the device.
                "--insecure-plaintext",
                // Few, quiet rounds: this test is about the device, not convergence.
                "--max-rounds",
                "2",
                "--vcpus",
                "1",
                "--vcpu-rate-mbps",
                "1",
                "--region-digest",
                "1",
            ])
            .args(extra),
        "dmalog migrate source",
    )
}

/// Migrates a patterned BAR1 between two lvu-sample servers with `extra` source options;
/// checks what holds either way (VERIFIED on both sides, the same device bytes loaded as
/// sent, no dma-engine workload, BAR1 equal by digest and by reading it back) and returns
/// the source's report.
fn migrate_lvu_sample(extra: &[&str]) -> serde_json::Value {
    let src = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let dst = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let bar1 = pattern();
    {
        let mut client = src.connect();
        for (index, piece) in bar1.chunks(4096).enumerate() {
            client
                .region_write(BAR1, (index * 4096) as u64, piece)
                .unwrap();
        }
    }
    assert_ne!(read_bar1(&dst), bar1, "the destination starts without it");

    let mut destination = migrate::destination(&dst.socket);
    destination.args([
        "--json",
        "--insecure-plaintext",
        "--memory-mib",
        "64",
        "--region-digest",
        "1",
    ]);
    let destination = Destination::spawn(destination);
    let source = migrate_source(&src, &destination.address, extra);
    // 3: verified over the downtime budget (a busy machine).
    assert!(migrated(&source), "{}", text(&source));
    let report = json(&source);
    let (destination, stderr) = destination.wait();
    assert!(
        destination.status.success(),
        "{}{stderr}",
        text(&destination)
    );
    let dst_report = json(&destination);

    assert_eq!(report["verified"], true);
    assert_eq!(dst_report["verified"], true);
    let device_bytes = report["device_bytes"].as_u64().unwrap();
    assert_eq!(dst_report["device_bytes"], device_bytes, "all of it loaded");
    assert!(
        report.get("device_writes_after_resume").is_none()
            && dst_report["device_writes_after_resume"].is_null(),
        "no dma-engine workload on lvu-sample"
    );
    let src_digest = &report["region_digests"]["1"];
    assert!(
        src_digest.as_str().unwrap().starts_with("0x"),
        "{src_digest}"
    );
    assert_eq!(src_digest, &dst_report["region_digests"]["1"]);

    assert_eq!(read_bar1(&dst), bar1, "BAR1 arrived on the destination");
    assert_eq!(read_bar1(&src), bar1, "and the source kept it");
    report
}

#[test]
fn lvu_sample_migrates_with_its_bar1() {
    let report = migrate_lvu_sample(&[]);
    assert_eq!(
        report["device_pre_copy"], true,
        "lvu-sample offers PRE_COPY"
    );
    assert!(
        report["rounds"][0]["device_bytes"].as_u64().unwrap() >= BAR1_BYTES as u64,
        "PRE_COPY data (BAR1) moved in round 0: {report}"
    );
    assert!(
        report["device_bytes"].as_u64().unwrap() >= 2 * BAR1_BYTES as u64 + 8,
        "PRE_COPY BAR1, STOP_COPY BAR1 and BAR0: {report}"
    );
}

#[test]
fn without_device_pre_copy_the_state_moves_in_stop_copy_only() {
    let report = migrate_lvu_sample(&["--device-pre-copy", "false"]);
    assert_eq!(report["device_pre_copy"], false);
    assert_eq!(report["rounds"][0]["device_bytes"], 0);
    assert_eq!(
        report["device_bytes"],
        BAR1_BYTES as u64 + 8,
        "STOP_COPY: BAR1 then BAR0"
    );
    assert!(
        report["rounds"].as_array().unwrap().len() >= 2,
        "memory still pre-copies"
    );
}

#[test]
fn the_dma_engine_workload_on_a_device_without_it_fails_clearly() {
    let src = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    let out = migrate_source(&src, &free_address(), &["--device-workload", "on"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("programming the dma-engine workload"),
        "{}",
        text(&out)
    );
}
