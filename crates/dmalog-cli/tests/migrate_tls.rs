//! `dmalog migrate` over TLS as a user runs it (SPEC 8): without TLS options or
//! `--insecure-plaintext` neither side starts; plaintext warns; a TLS destination refuses a
//! plaintext source and a source whose certificate is another CA's, warning with the
//! reason and waiting on for the real source (tests/migrate_strangers.rs); a source
//! refuses a destination whose certificate has another name.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

mod common;

use common::migrate::{self, dmalog, gen_certs, run_guarded, tls_args, Destination, HANG_GUARD};
use common::{ServerProcess, TempDir};
use dmalog_migrate::stream::{FrameWriter, Kind};

/// A listening `dmalog migrate destination` (64 MiB guest) with `extra` options.
fn destination(socket: &Path, extra: &[PathBuf]) -> Destination {
    let mut command = migrate::destination(socket);
    command.args(["--memory-mib", "64"]).args(extra);
    Destination::spawn(command)
}

/// `dmalog migrate source` (64 MiB guest, small working sets) to `address` with `extra`.
fn source(address: &str, socket: &Path, extra: &[PathBuf]) -> Output {
    run_guarded(
        migrate::source("64", address, socket).args(extra),
        "dmalog migrate source",
    )
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
    drop(dst);
}

#[test]
fn a_tls_destination_refuses_a_plaintext_source_before_any_frame() {
    let dir = TempDir::new("tls-plain");
    let certs = gen_certs(&dir.0, "certs", &[]);
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
    let (stdout, stderr) = dst.kill_when_logged("does not speak TLS");
    assert!(
        stderr.contains("refused the migration source") && stderr.contains("TLS handshake"),
        "{stderr}"
    );
    // Refused at the handshake: no report, no page counted.
    assert!(stdout.is_empty(), "{stdout:?}");
}

#[test]
fn a_tls_destination_refuses_a_source_certified_by_another_ca() {
    let dir = TempDir::new("tls-ca");
    let ours = gen_certs(&dir.0, "ours", &[]);
    let theirs = gen_certs(&dir.0, "theirs", &[]);
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
    let (stdout, stderr) = dst.kill_when_logged("invalid peer certificate");
    assert!(stderr.contains("refused the migration source"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout:?}");
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
    let certs = gen_certs(&dir.0, "certs", &[]);
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
    let (_, stderr) = dst.kill_when_logged("TLS handshake");
    assert!(stderr.contains("refused the migration source"), "{stderr}");
    let _ = std::io::stderr().flush();
}
