//! Helpers for tests that run `dmalog migrate` and `dmalog demo` as processes: the small
//! VM they migrate, children reaped on drop and waited for under a hang guard, a listening
//! destination, certificates, and the checks several tests make on the source's device.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::ServerProcess;

/// Generous: a hang guard, not a speed check (a loaded 2-core machine runs these slowly).
pub const HANG_GUARD: Duration = Duration::from_secs(180);

/// The `dmalog` binary under test.
pub fn dmalog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmalog"))
}

/// The small VM of most tests: `memory_mib` of guest memory, 8 MiB device and 4 MiB vCPU
/// working sets.
pub fn small_vm(memory_mib: &str) -> [&str; 6] {
    [
        "--memory-mib",
        memory_mib,
        "--device-wss-mib",
        "8",
        "--vcpu-wss-mib",
        "4",
    ]
}

/// `dmalog demo` of the small VM with 64 MiB of guest memory.
pub fn demo() -> Command {
    let mut command = dmalog();
    command.arg("demo").args(small_vm("64"));
    command
}

/// `dmalog migrate source` of the small VM connecting to `address`, its device server at
/// `socket` (TLS or `--insecure-plaintext` is the caller's to add).
pub fn source(memory_mib: &str, address: &str, socket: &Path) -> Command {
    let mut command = dmalog();
    command
        .args(["migrate", "source"])
        .args(small_vm(memory_mib))
        .args(["--connect", address, "--socket"])
        .arg(socket);
    command
}

/// `dmalog migrate destination` listening on a free loopback port, its device server at
/// `socket` (guest size, TLS and the rest are the caller's to add).
pub fn destination(socket: &Path) -> Command {
    let mut command = dmalog();
    command
        .args([
            "migrate",
            "destination",
            "--listen",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(socket);
    command
}

/// Spawns `command` with stdout and stderr piped.
pub fn spawn_piped(command: &mut Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `command` to its exit under the hang guard, stdout and stderr captured.
pub fn run_guarded(command: &mut Command, what: &str) -> Output {
    wait_guarded(spawn_piped(command), what)
}

/// A child killed and reaped on drop, even when the test fails half-way.
pub struct Reaped(Option<Child>);

impl Reaped {
    pub fn new(child: Child) -> Self {
        Reaped(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for it to exit (killing it and failing the test past the hang guard).
    pub fn wait(mut self, what: &str) -> Output {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + HANG_GUARD;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: still running after {HANG_GUARD:?} (a hang)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// Kills it now and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` to exit (killing it and failing the test past the hang guard).
pub fn wait_guarded(child: Child, what: &str) -> Output {
    Reaped::new(child).wait(what)
}

/// A listening `dmalog migrate destination`: the child, the address it printed, and its
/// stderr before and after the listening line.
pub struct Destination {
    pub child: Reaped,
    pub address: String,
    pub before: String,
    /// stderr after the listening line, line by line.
    rest: mpsc::Receiver<String>,
}

impl Destination {
    /// Spawns `command` (a `dmalog migrate destination`) and waits for its listening line.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = spawn_piped(&mut command);
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let child = Reaped::new(child);
        let (address_tx, address_rx) = mpsc::channel();
        let (rest_tx, rest) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut line = String::new();
            let mut listening = false;
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                if listening {
                    let _ = rest_tx.send(std::mem::take(&mut line));
                } else if let Some(address) =
                    line.trim().strip_prefix("waiting for a migration on ")
                {
                    let _ = address_tx.send((address.to_string(), std::mem::take(&mut text)));
                    listening = true;
                } else {
                    text.push_str(&line);
                }
                line.clear();
            }
            let _ = rest_tx.send(text);
        });
        let (address, before) = address_rx
            .recv_timeout(HANG_GUARD)
            .expect("the destination listens");
        Destination {
            child,
            address,
            before,
            rest,
        }
    }

    /// Its exit and the stderr after the listening line.
    pub fn wait(self) -> (Output, String) {
        let out = self.child.wait("dmalog migrate destination");
        (out, self.rest.iter().collect())
    }

    /// Kills it once its stderr has a line with `needle` (failing the test past the hang
    /// guard); returns what it wrote to stdout and the stderr after the listening line.
    pub fn kill_when_logged(mut self, needle: &str) -> (Vec<u8>, String) {
        let deadline = Instant::now() + HANG_GUARD;
        let mut text = String::new();
        while !text.lines().any(|line| line.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rest.recv_timeout(left) {
                Ok(line) => text.push_str(&line),
                Err(_) => panic!("the destination never logged {needle:?}: {text}"),
            }
        }
        let mut child = self.child.0.take().unwrap();
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        text.extend(self.rest.iter());
        (out.stdout, text)
    }
}

/// `dmalog migrate gen-certs` into `dir`/`name`, the server certificate also valid for
/// `server_names`.
pub fn gen_certs(dir: &Path, name: &str, server_names: &[String]) -> PathBuf {
    let certs = dir.join(name);
    let mut command = dmalog();
    command.args(["migrate", "gen-certs", "--dir"]).arg(&certs);
    for server_name in server_names {
        command.args(["--server-name", server_name]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    certs
}

/// `--tls-ca`, `--tls-cert`, `--tls-key` from a gen-certs directory; `role` is "server"
/// or "client".
pub fn tls_args(certs: &Path, role: &str) -> Vec<PathBuf> {
    vec![
        "--tls-ca".into(),
        certs.join("ca.pem"),
        "--tls-cert".into(),
        certs.join(format!("{role}.pem")),
        "--tls-key".into(),
        certs.join(format!("{role}-key.pem")),
    ]
}

/// A source's exit after a verified migration: 0, or 3 (verified over the downtime budget:
/// a loaded machine; the budget is not what most tests check).
pub fn migrated(out: &Output) -> bool {
    matches!(out.status.code(), Some(0 | 3))
}

/// stdout and stderr, for failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stdout as one JSON object.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("stdout is not one JSON object ({err}): {}", text(out)))
}

/// The source device is RUNNING with logging off (a new migration could START).
pub fn assert_device_ready_for_a_retry(server: &ServerProcess) {
    let mut client = server.connect();
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
        libc::EINVAL,
        "logging is off"
    );
}
