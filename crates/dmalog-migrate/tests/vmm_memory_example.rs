//! `examples/vmm_memory.rs`, built and run (`cargo run --example` with this test's profile
//! and target dir, so that `cargo test -p dmalog-migrate --test vmm_memory_example` alone
//! runs today's source): the VMM's own `GuestMemoryMmap<DmalogBitmap>` migrates, the
//! device's vm-memory writes come out of the vCPU REPORT, and the destination verifies.

use std::path::Path;
use std::process::Command;

#[test]
fn the_vmm_memory_example_migrates_a_vmms_own_guest_memory_and_verifies() {
    // `target/<profile>/deps/vmm_memory_example-*`: the profile and the target dir.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory above {}", exe.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut command = Command::new(cargo);
    // Without the package variables cargo gave this test: build scripts that watch them
    // (ring's) would otherwise rebuild here and again in the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_") && name != "CARGO_HOME" {
            command.env_remove(name);
        }
    }
    let output = command
        .args([
            "run",
            "--quiet",
            "-p",
            "dmalog-migrate",
            "--example",
            "vmm_memory",
        ])
        .args(["--profile", profile, "--target-dir"])
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo run --example vmm_memory");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    // Three pages a round (the used-ring entry's and the buffer's two), at least one round
    // after round 0, all from the REPORT of the bitmaps the VMM attached.
    let cpu_pages: u64 = lines[0]
        .strip_prefix("vCPU pages after round 0: ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(cpu_pages >= 3, "{stdout}");
    let (source, destination) = lines[1]
        .strip_prefix("used-ring entry: source ")
        .and_then(|rest| rest.split_once(", destination "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(source, destination, "the last device write arrived");
    assert!(
        source.parse::<u64>().unwrap() >= 41,
        "written between rounds"
    );
    assert_eq!(lines[2], "VERIFIED");
}
