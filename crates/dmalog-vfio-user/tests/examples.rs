//! The examples, built and run end to end: `minimal_device` serves a socket in its own
//! process, `minimal_vmm` (another process) maps guest memory, STARTs, has the device write,
//! REPORTs and STOPs (twice, one client after the other); the dirty pages it prints must be
//! exactly the pages the device wrote.
//!
//! The examples are built here (`cargo build --examples`, a no-op when `cargo test` has
//! already built them) so that `cargo test -p dmalog-vfio-user --test examples` alone runs
//! today's sources, not stale binaries.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A hang guard only: the pair runs in well under a second.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A child process killed (and reaped) on drop, so a failing assertion leaves none behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>`, from this test binary's `target/<profile>/deps/examples-*`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// Builds this crate's examples with this test's profile and target dir; their path.
fn built_examples() -> PathBuf {
    let profile_dir = profile_dir();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile directory above {}", profile_dir.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "dmalog-vfio-user", "--examples"])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(profile_dir.parent().expect("target dir"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --examples");
    assert!(status.success(), "cargo build --examples failed");
    profile_dir.join("examples")
}

/// Waits for `child` to exit within `timeout`; its stdout and whether it succeeded.
fn output_within(mut child: Killed, timeout: Duration) -> (String, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().expect("wait for the example") {
            let mut out = String::new();
            let stdout = child.0.stdout.as_mut().expect("piped stdout");
            stdout.read_to_string(&mut out).expect("read stdout");
            return (out, status.success());
        }
        assert!(
            Instant::now() < deadline,
            "the example did not finish within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_minimal_vmm_reports_exactly_the_pages_the_minimal_device_wrote() {
    let examples = built_examples();
    let dir = std::env::temp_dir().join(format!("dmalog-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("filler.sock");

    let mut device = Killed(
        Command::new(examples.join("minimal_device"))
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn minimal_device"),
    );
    // Its first line says the socket is bound; read it on a thread so a silent child times out.
    let stdout = device.0.stdout.take().expect("piped stdout");
    let (lines, ready) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let first = ready
        .recv_timeout(TIMEOUT)
        .expect("minimal_device did not start");
    assert_eq!(first.unwrap(), format!("listening on {}", socket.display()));

    // Twice: the server serves one client after another, each from a clean slate (the
    // first one's mappings, log and migration state gone when it hung up).
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let vmm = Killed(
            Command::new(examples.join("minimal_vmm"))
                .arg(&socket)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn minimal_vmm"),
        );
        outputs.push(output_within(vmm, TIMEOUT));
    }
    drop(device);
    let _ = std::fs::remove_dir_all(&dir);
    for (out, ok) in outputs {
        assert!(ok, "minimal_vmm failed; its output:\n{out}");
        let lines: Vec<&str> = out.lines().collect();
        // One byte in page 3, pages 10-11 exactly, 16 bytes across pages 99 and 100: no
        // more, no fewer.
        assert_eq!(
            lines,
            [
                "page size 4096, dirty pages: [3, 10, 11, 99, 100]",
                "guest byte at 0x3064: 0xd5",
                // DST 0x63ff8 and LEN 16, the registers of the last write, as migration data.
                "device state: 16 bytes [f8, 3f, 06, 00, 00, 00, 00, 00, 10, 00, 00, 00, 00, 00, 00, 00]",
                "resumed: DST 0x63ff8 LEN 16",
            ]
        );
    }
}

#[test]
fn the_minimal_device_is_under_100_lines() {
    let source = include_str!("../examples/minimal_device.rs");
    assert!(
        source.lines().count() < 100,
        "the example promises under 100 lines"
    );
}
