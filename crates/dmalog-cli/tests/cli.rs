//! The `dmalog` binary as a user runs it.

use std::process::Command;

fn dmalog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmalog"))
}

#[test]
fn probe_says_plainly_when_there_is_no_vfio() {
    if std::path::Path::new("/dev/vfio/devices").exists() {
        eprintln!("SKIPPED: this machine has VFIO devices");
        return;
    }
    let out = dmalog().args(["probe", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["vfio"], false);
    assert!(json["errors"][0]
        .as_str()
        .unwrap()
        .contains("no VFIO on this machine"));
    let out = dmalog().args(["probe"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no VFIO on this machine"));
}

#[test]
fn probe_rejects_a_bad_range_with_a_message() {
    let out = dmalog()
        .args(["probe", "--try-start", "12"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IOVA:LENGTH"));
}

#[test]
fn help_lists_the_commands() {
    let out = dmalog().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bench") && text.contains("probe"));
}
