//! `dmalog inspect` reads a PCI device's configuration space (region 7) and prints its
//! identity, BARs with their sizes and its capability list, in text and in `--json`.

mod common;

use std::process::Command;

use common::ServerProcess;

fn inspect_json(server: &ServerProcess) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["inspect", "--json", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn inspect_prints_pci_identity_of_both_devices() {
    let lvu = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    lvu.wait_listening();
    let out = inspect_json(&lvu);
    let pci = &out["pci"];
    assert_eq!(pci["vendor_id"], 0xdead);
    assert_eq!(pci["device_id"], 0xbeef);
    assert_eq!(pci["subsystem_vendor_id"], 0xcafe);
    assert_eq!(pci["subsystem_id"], 0xbabe);
    let sizes: Vec<(u64, u64)> = pci["bar_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["index"].as_u64().unwrap(), b["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, vec![(0, 8), (1, 0x4000)]);

    let engine = ServerProcess::start("soft");
    engine.wait_listening();
    let out = inspect_json(&engine);
    assert_eq!(out["pci"]["vendor_id"], 0x1b36);
    assert_eq!(out["pci"]["device_id"], 0x10d1);
    assert_eq!(out["pci"]["class_code"], serde_json::json!([0xff, 0, 0]));
    assert_eq!(out["pci"]["bar_sizes"][0]["size"], 4096);

    let text = Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["inspect", "--socket"])
        .arg(&engine.socket)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("PCI 1b36:10d1"), "{text}");
    assert!(
        text.contains("BAR0: memory 32-bit, address 0x0, size 0x1000"),
        "{text}"
    );
}
