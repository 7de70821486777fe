//! `dmalog migrate destination` when strangers reach its port before the real source (SPEC
//! 8: anyone who can reach the port can connect): a TLS handshake without a client
//! certificate, a handshake that stalls, garbage or frames that are not a Hello in
//! plaintext, a flood of silent connections. Each stranger is dropped with a warning
//! naming its address, at most MAX_PENDING_HANDSHAKES (32) are held at once, and the real
//! source connecting after them migrates and verifies.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::migrate::{self, gen_certs, json, migrated, run_guarded, text, tls_args, Destination};
use common::{ServerProcess, TempDir};
use dmalog_migrate::stream::{hello_payload, FrameReader, FrameWriter, Kind};

/// The destination's bound on connections held at once.
const MAX_PENDING: usize = dmalog_migrate::scenario::transport::MAX_PENDING_HANDSHAKES;

/// A listening `dmalog migrate destination` (64 MiB guest, `--json`), every step of a
/// connection within `timeout_ms`, with `extra` (its security).
fn destination(socket: &Path, timeout_ms: u64, extra: &[PathBuf]) -> Destination {
    let mut command = migrate::destination(socket);
    command
        .args(["--json", "--memory-mib", "64", "--timeout-ms"])
        .arg(timeout_ms.to_string())
        .args(extra);
    Destination::spawn(command)
}

/// The real source migrates to `dst` (`extra`: its security and channels): both sides
/// verify. Returns the destination's stderr.
fn the_real_source_verifies(dst: Destination, src_socket: &Path, extra: &[PathBuf]) -> String {
    let out = run_guarded(
        migrate::source("64", &dst.address, src_socket)
            .arg("--json")
            .args(extra),
        "dmalog migrate source",
    );
    let (dst_out, dst_stderr) = dst.wait();
    assert!(migrated(&out), "{}\ndestination: {dst_stderr}", text(&out));
    assert_eq!(json(&out)["verified"], true);
    assert!(dst_out.status.success(), "{dst_stderr}");
    assert_eq!(json(&dst_out)["verified"], true, "{dst_stderr}");
    dst_stderr
}

/// The destination's warning that it dropped `stranger`: the line naming its address.
fn warning_about<'a>(stderr: &'a str, stranger: &TcpStream) -> &'a str {
    let peer = stranger.local_addr().unwrap().to_string();
    stderr
        .lines()
        .find(|line| line.contains("WARN") && line.contains(&peer))
        .unwrap_or_else(|| panic!("no warning names {peer}: {stderr}"))
}

/// Two device servers (source and destination), listening.
fn servers() -> (ServerProcess, ServerProcess) {
    let (src, dst) = (ServerProcess::start("soft"), ServerProcess::start("soft"));
    src.wait_listening();
    dst.wait_listening();
    (src, dst)
}

#[test]
fn a_tls_stranger_without_a_certificate_first_does_not_stop_the_real_source() {
    let dir = TempDir::new("strangers-tls");
    let certs = gen_certs(&dir.0, "certs", &[]);
    let (src_server, dst_server) = servers();
    let dst = destination(&dst_server.socket, 10_000, &tls_args(&certs, "server"));

    // The stranger trusts the destination but has no certificate of its own: its handshake
    // fails there.
    let roots = {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(certs.join("ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
            .unwrap();
        roots
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(&dst.address).unwrap();
    tcp.set_read_timeout(Some(migrate::HANG_GUARD)).unwrap();
    let stranger = tcp.try_clone().unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let _ = tls.write_all(&[0u8; 16]).and_then(|()| tls.flush());
    let mut byte = [0u8; 1];
    assert!(
        !matches!(tls.read(&mut byte), Ok(1)),
        "the destination takes no stranger"
    );

    let stderr = the_real_source_verifies(dst, &src_server.socket, &tls_args(&certs, "client"));
    let warning = warning_about(&stderr, &stranger);
    assert!(warning.contains("no certificates"), "{warning}");
}

#[test]
fn a_tls_stranger_that_stalls_first_does_not_hold_up_the_real_source() {
    let dir = TempDir::new("strangers-stall");
    let certs = gen_certs(&dir.0, "certs", &[]);
    let (src_server, dst_server) = servers();
    // A long timeout: a destination serving connections one at a time would wait all of
    // it on the stranger first.
    let timeout = Duration::from_secs(60);
    let dst = destination(
        &dst_server.socket,
        timeout.as_millis() as u64,
        &tls_args(&certs, "server"),
    );
    // TCP only, not a byte of a handshake, the socket kept open.
    let stalled = TcpStream::connect(&dst.address).unwrap();
    let started = Instant::now();
    let stderr = the_real_source_verifies(dst, &src_server.socket, &tls_args(&certs, "client"));
    eprintln!(
        "verified behind a stalled stranger in {:?}",
        started.elapsed()
    );
    // A hang guard, not a speed check: well inside the stranger's timeout.
    assert!(
        started.elapsed() < timeout - Duration::from_secs(10),
        "{stderr}"
    );
    drop(stalled);
}

/// A frame header of `kind` claiming `len_bytes` of payload (checksum zero).
fn header(kind: Kind, len_bytes: u32) -> Vec<u8> {
    dmalog_migrate::stream::frame_header(kind, len_bytes as usize, 0).to_vec()
}

#[test]
fn plaintext_strangers_sending_garbage_or_no_hello_first_do_not_stop_the_real_source() {
    let (src_server, dst_server) = servers();
    let dst = destination(&dst_server.socket, 3000, &["--insecure-plaintext".into()]);
    let layout = dmalog_migrate::default_layout(64 << 20);
    let join = [7u64.to_le_bytes().as_slice(), &1u32.to_le_bytes()].concat();
    let mut pages_4_mib = header(Kind::Pages, 4 << 20);
    pages_4_mib.extend_from_slice(&[0u8; 20_000]);
    let mut strangers = Vec::new();
    for (bytes, why) in [
        (b"GET / HTTP/1.0\r\n\r\n".to_vec(), "bad magic"),
        // A Hello's length prefix of 4 GiB.
        (header(Kind::Hello, u32::MAX), "exceeds"),
        // A Pages frame claiming 4 MiB, more than any first frame may be.
        (pages_4_mib, "larger than any Hello"),
        // Half a header, then nothing: the destination reads until the timeout.
        (
            header(Kind::Hello, 100)[..7].to_vec(),
            "no complete frame within",
        ),
    ] {
        let mut stranger = TcpStream::connect(&dst.address).unwrap();
        let _ = stranger.write_all(&bytes);
        strangers.push((stranger, why));
    }
    // Valid frames, not a Hello: a Join of a guessed session (offered as a further channel
    // of a migration that has none yet), and a Hello the destination refuses (no
    // channel), which hears why.
    let mut join_stranger = FrameWriter::new(TcpStream::connect(&dst.address).unwrap(), None);
    join_stranger.write(Kind::Join, &[&join]).unwrap();
    let refused = TcpStream::connect(&dst.address).unwrap();
    refused.set_read_timeout(Some(migrate::HANG_GUARD)).unwrap();
    let mut no_channels = FrameWriter::new(refused.try_clone().unwrap(), None);
    no_channels
        .write(Kind::Hello, &[&hello_payload(4096, 9, 0, &layout)])
        .unwrap();
    let reply = FrameReader::new(refused.try_clone().unwrap())
        .read()
        .unwrap();
    assert_eq!(reply.kind, Kind::Abort);
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("channel count out of range"),
        "{reply:?}"
    );

    // The one that stalls is dropped at its timeout (the destination waits on).
    let (stalled, _) = &strangers[3];
    stalled.set_read_timeout(Some(migrate::HANG_GUARD)).unwrap();
    assert!(matches!((&*stalled).read(&mut [0u8; 1]), Ok(0) | Err(_)));

    // Two channels: the stranger's Join came before the real ones.
    let stderr = the_real_source_verifies(
        dst,
        &src_server.socket,
        &[
            "--insecure-plaintext".into(),
            "--channels".into(),
            "2".into(),
        ],
    );
    for (stranger, why) in &strangers {
        let warning = warning_about(&stderr, stranger);
        assert!(warning.contains(why), "{why}: {warning}");
    }
    warning_about(&stderr, &refused);
}

/// The number of fds and of threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (fds, threads)
}

/// Whether the destination closed `client` (a read that does not wait).
fn closed_by_the_destination(mut client: &TcpStream) -> bool {
    client
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    match client.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn a_flood_of_silent_connections_is_held_to_the_bound_and_the_real_source_then_verifies() {
    let (src_server, dst_server) = servers();
    // Short: the strangers held time out soon, and the real source comes after them.
    let dst = destination(&dst_server.socket, 2000, &["--insecure-plaintext".into()]);
    let pid = dst.child.pid();
    let flood = 3 * MAX_PENDING;
    let clients: Vec<TcpStream> = (0..flood)
        .map(|_| TcpStream::connect(&dst.address).unwrap())
        .collect();
    let mut most = (0, 0);
    let mut closed = vec![false; flood];
    let deadline = Instant::now() + Duration::from_secs(60);
    while closed.iter().any(|&c| !c) {
        assert!(Instant::now() < deadline, "the destination keeps strangers");
        let (fds, threads) = fds_and_threads(pid);
        most = (most.0.max(fds), most.1.max(threads));
        for (client, closed) in clients.iter().zip(closed.iter_mut()) {
            *closed = *closed || closed_by_the_destination(client);
        }
    }
    // Every stranger gone: the destination as it waits for a source.
    std::thread::sleep(Duration::from_millis(200));
    let idle = fds_and_threads(pid);
    eprintln!("flood of {flood}: at most {most:?} fds and threads, {idle:?} idle");
    assert!(
        most.0 <= idle.0 + MAX_PENDING + 1,
        "{} fds at most, {} idle: more than {MAX_PENDING} connections held",
        most.0,
        idle.0
    );
    assert!(
        most.1 <= idle.1 + MAX_PENDING,
        "{} threads at most, {} idle",
        most.1,
        idle.1
    );
    the_real_source_verifies(dst, &src_server.socket, &["--insecure-plaintext".into()]);
}

/// A plaintext stranger that sends garbage and waits until the destination closes it.
fn garbage_stranger(address: &str) {
    let mut stranger = TcpStream::connect(address).unwrap();
    let _ = stranger.write_all(b"GET / HTTP/1.0\r\n\r\n");
    stranger
        .set_read_timeout(Some(migrate::HANG_GUARD))
        .unwrap();
    let _ = stranger.read_to_end(&mut Vec::new());
}

#[test]
fn a_flood_of_garbage_connections_is_logged_within_the_warning_budget() {
    const STRANGERS: u64 = 300;
    let (src_server, dst_server) = servers();
    let plaintext = [PathBuf::from("--insecure-plaintext")];
    let dst = destination(&dst_server.socket, 5_000, &plaintext);
    // Each dropped at once for its garbage: without a budget, one warning each.
    let started = Instant::now();
    for _ in 0..STRANGERS {
        garbage_stranger(&dst.address);
    }
    // One more a budget window later: its warning tells how many were left out.
    std::thread::sleep(Duration::from_millis(1100));
    garbage_stranger(&dst.address);
    let stderr = the_real_source_verifies(dst, &src_server.socket, &plaintext);
    let dropped: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("dropped a connection"))
        .collect();
    let seconds = started.elapsed().as_secs() + 1;
    assert!(
        dropped.len() as u64 <= 16 * seconds,
        "{} warnings in about {seconds} s",
        dropped.len()
    );
    let suppressed: u64 = dropped
        .iter()
        .filter_map(|line| line.split("suppressed=").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(
        dropped.len() as u64 + suppressed,
        STRANGERS + 1,
        "every stranger is logged or counted: {dropped:?}"
    );
}
