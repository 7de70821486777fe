//! Compiles a C program against the system's `<linux/...>` headers and reads the
//! `name value` lines it prints: the layout tests' check against the kernel's own headers.
//! Shared by the core's and dmalog-vfio's `uapi_layout` tests (`#[path]`-included).

use std::collections::HashMap;
use std::process::Command;

/// Runs `program` (C printing `name value` lines) and returns the values, or `None` (with a
/// message) where the machine has no `<linux/vfio.h>` or no C compiler.
pub fn printed_values(label: &str, program: &str) -> Option<HashMap<String, u64>> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    if !std::path::Path::new("/usr/include/linux/vfio.h").exists()
        || Command::new(&cc).arg("--version").output().is_err()
    {
        eprintln!("SKIPPED: no <linux/vfio.h> or no C compiler ({cc}) on this machine");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, binary) = (dir.join("layout.c"), dir.join("layout"));
    std::fs::write(&source, program).unwrap();
    let compiled = Command::new(&cc)
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        compiled.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let output = Command::new(&binary).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8(output.stdout).unwrap();
    Some(
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(name, value)| (name.to_string(), value.parse().unwrap()))
            .collect(),
    )
}
