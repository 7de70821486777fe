//! `dmalog migrate` over TLS as a user runs it (SPEC 8): without TLS options or
//! `--insecure-plaintext` neither side starts; plaintext warns; a TLS destination refuses a
//! plaintext source and a source whose certificate is another CA's, exiting non-zero with
//! the reason; a source refuses a destination whose certificate has another name.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{ServerProcess, TempDir};
use dmalog_migrate::stream::{FrameWriter, Kind};

/// A hang guard only.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn dmalog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmalog"))
}

fn wait_guarded(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + HANG_GUARD;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: still running after {HANG_GUARD:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `dmalog migrate gen-certs` into `dir`/`name`.
fn gen_certs(dir: &Path, name: &str) -> PathBuf {
    let certs = dir.join(name);
    let out = dmalog()
        .args(["migrate", "gen-certs", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    certs
}

/// `--tls-ca`, `--tls-cert`, `--tls-key` from a gen-certs directory; `role` is "server"
/// or "client".
fn tls_args(certs: &Path, role: &str) -> Vec<PathBuf> {
    vec![
        "--tls-ca".into(),
        certs.join("ca.pem"),
        "--tls-cert".into(),
        certs.join(format!("{role}.pem")),
        "--tls-key".into(),
        certs.join(format!("{role}-key.pem")),
    ]
}

/// A listening `dmalog migrate destination` (64 MiB guest) with `extra` options: the child,
/// its address, and its stderr before and after the listening line.
struct Destination {
    child: Child,
    address: String,
    before: String,
    rest: mpsc::Receiver<String>,
}

fn destination(socket: &Path, extra: &[PathBuf]) -> Destination {
    let mut child = dmalog()
        .args([
            "migrate",
            "destination",
            "--memory-mib",
            "64",
            "--listen",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(socket)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let (address_tx, address_rx) = mpsc::channel();
    let (rest_tx, rest) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(address) = line.trim().strip_prefix("waiting for a migration on ") {
                let _ = address_tx.send((address.to_string(), std::mem::take(&mut text)));
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

impl Destination {
    /// Its exit and the stderr after the listening line.
    fn wait(self) -> (Output, String) {
        let out = wait_guarded(self.child, "dmalog migrate destination");
        (out, self.rest.recv_timeout(HANG_GUARD).unwrap_or_default())
    }
}

/// `dmalog migrate source` (64 MiB guest, small working sets) to `address` with `extra`.
fn source(address: &str, socket: &Path, extra: &[PathBuf]) -> Output {
    let child = dmalog()
        .args([
            "migrate",
            "source",
            "--memory-mib",
            "64",
            "--device-wss-mib",
            "8",
            "--vcpu-wss-mib",
            "4",
            "--connect",
            address,
            "--socket",
        ])
        .arg(socket)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_guarded(child, "dmalog migrate source")
}

#[test]
fn neither_side_starts_without_tls_options_or_insecure_plaintext() {
    let dir = TempDir::new("tls-refuse");
    // No device server: the check must come first (it would otherwise wait for one).
    let socket = dir.0.join("absent.sock");
    for args in [
        &[
            "migrate",
            "destination",
            "--listen",
            "127.0.0.1:0",
            "--socket",
        ][..],
        &["migrate", "source", "--connect", "127.0.0.1:9", "--socket"][..],
    ] {
        let started = Instant::now();
        let out = dmalog().args(args).arg(&socket).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("needs TLS") && stderr.contains("--insecure-plaintext"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("waiting for a migration"), "{stderr}");
        // Not after the 20 s wait for a device server.
        assert!(started.elapsed() < Duration::from_secs(15), "{args:?}");
    }
    // Half a TLS configuration is a usage error.
    let out = dmalog()
        .args(["migrate", "destination", "--listen", "127.0.0.1:0"])
        .args(["--tls-ca", "/ca.pem", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn insecure_plaintext_warns_on_stderr() {
    let server = ServerProcess::start("soft");
    server.wait_listening();
    let dst = destination(&server.socket, &["--insecure-plaintext".into()]);
    assert!(
        dst.before.contains("--insecure-plaintext") && dst.before.contains("unauthenticated"),
        "{}",
        dst.before
    );
    let mut child = dst.child;
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_tls_destination_refuses_a_plaintext_source_before_any_frame() {
    let dir = TempDir::new("tls-plain");
    let certs = gen_certs(&dir.0, "certs");
    let server = ServerProcess::start("soft");
    server.wait_listening();
    let dst = destination(&server.socket, &tls_args(&certs, "server"));
    // A hostile plaintext source: a Hello and a page of 0xff, whatever the destination says.
    let tcp = TcpStream::connect(&dst.address).unwrap();
    tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut out = FrameWriter::new(tcp, None);
    let layout = dmalog_migrate::default_layout(64 << 20);
    let hello = dmalog_migrate::stream::hello_payload(4096, 1, 1, &layout);
    let _ = out.write(Kind::Hello, &[&hello]);
    let page = dmalog_migrate::stream::pages_payload(&[(0, 1, 0)], &[0xffu8; 4096]);
    let _ = out.write(Kind::Pages, &[&page]);
    let _ = out.flush();
    let _ = std::io::copy(out.get_mut(), &mut std::io::sink());
    let (output, stderr) = dst.wait();
    assert!(!output.status.success());
    assert!(
        stderr.contains("refused the migration source") && stderr.contains("TLS handshake"),
        "{stderr}"
    );
    assert!(stderr.contains("does not speak TLS"), "{stderr}");
    // Refused at the handshake: no report, no page counted.
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
}

#[test]
fn a_tls_destination_refuses_a_source_certified_by_another_ca() {
    let dir = TempDir::new("tls-ca");
    let ours = gen_certs(&dir.0, "ours");
    let theirs = gen_certs(&dir.0, "theirs");
    let dst_server = ServerProcess::start("soft");
    let src_server = ServerProcess::start("soft");
    dst_server.wait_listening();
    src_server.wait_listening();
    let dst = destination(&dst_server.socket, &tls_args(&ours, "server"));
    // The stranger trusts our destination's CA, but its own certificate is the other CA's.
    let mut stranger = tls_args(&theirs, "client");
    stranger[1] = ours.join("ca.pem");
    let out = source(&dst.address, &src_server.socket, &stranger);
    let src_stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(src_stderr.contains("TLS handshake"), "{src_stderr}");
    let (output, stderr) = dst.wait();
    assert!(!output.status.success());
    assert!(
        stderr.contains("refused the migration source")
            && stderr.contains("invalid peer certificate"),
        "{stderr}"
    );
    // The source VM runs on (the device back to RUNNING).
    let mut client = src_server.connect();
    assert_eq!(
        dmalog::MigrationDevice::device_state(&mut client).unwrap(),
        dmalog::uapi::DeviceState::Running
    );
}

#[test]
fn a_source_refuses_a_destination_with_another_name() {
    let dir = TempDir::new("tls-name");
    let certs = gen_certs(&dir.0, "certs");
    let dst_server = ServerProcess::start("soft");
    let src_server = ServerProcess::start("soft");
    dst_server.wait_listening();
    src_server.wait_listening();
    let dst = destination(&dst_server.socket, &tls_args(&certs, "server"));
    let mut args = tls_args(&certs, "client");
    args.extend([
        "--tls-server-name".into(),
        "migration-target.example".into(),
    ]);
    let out = source(&dst.address, &src_server.socket, &args);
    let src_stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(src_stderr.contains("not valid for name"), "{src_stderr}");
    let (output, stderr) = dst.wait();
    assert!(!output.status.success());
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    let _ = std::io::stderr().flush();
}
