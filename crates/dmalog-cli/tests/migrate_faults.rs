//! `dmalog migrate source|destination` as processes against hostile or failing peers: a
//! silent peer is an error within `--timeout-ms` (the source's device RUNNING again with
//! logging off), peer text reaches the terminal escaped, and a destination killed while
//! data flows leaves the source device ready for a retry that verifies.
//!
//! Every wait on a child is bounded by a hang guard: the test fails instead of hanging.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::migrate::{
    self, assert_device_ready_for_a_retry, json, migrated, spawn_piped, wait_guarded, Destination,
    Reaped, HANG_GUARD,
};
use common::ServerProcess;
use dmalog_migrate::stream::{Frame, FrameReader, FrameWriter, Kind};

/// `dmalog migrate source` with a small VM (64 MiB of guest memory).
fn source(address: &str, socket: &Path, extra: &[&str]) -> Child {
    spawn_piped(
        migrate::source("64", address, socket)
            // The hostile peers here speak the frames in plaintext (tests/migrate_tls.rs
            // covers TLS).
            .arg("--insecure-plaintext")
            .args(extra),
    )
}

/// `dmalog migrate destination` for a 64 MiB guest (unless `extra` says otherwise).
fn destination(socket: &Path, extra: &[&str]) -> Destination {
    let memory_mib = if extra.contains(&"--memory-mib") {
        &[][..]
    } else {
        &["--memory-mib", "64"][..]
    };
    let mut command = migrate::destination(socket);
    command
        .args(["--json", "--insecure-plaintext"])
        .args(memory_mib)
        .args(extra);
    Destination::spawn(command)
}

/// A fake destination: takes frames up to End, then does `after_end` with the stream (the
/// connection stays open until `release` is dropped).
fn fake_destination(
    after_end: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (String, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (release, hold) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut input = FrameReader::new(stream.try_clone().unwrap());
        let mut pongs = FrameWriter::new(stream.try_clone().unwrap(), None);
        while let Ok(frame) = input.read() {
            answer_ping(&frame, &mut pongs);
            if frame.kind == Kind::End {
                after_end(&mut stream);
                break;
            }
        }
        let _ = hold.recv_timeout(HANG_GUARD);
    });
    (address, release)
}

/// A stand-in destination answers the source's Pings (it times its link before round 0).
fn answer_ping(frame: &Frame, out: &mut FrameWriter<TcpStream>) {
    if frame.kind == Kind::Ping {
        let _ = out.write(Kind::Pong, &[&frame.payload]);
        let _ = out.flush();
    }
}

#[test]
fn a_destination_silent_after_the_final_data_fails_the_source_and_its_device_runs_on() {
    let server = ServerProcess::start("soft");
    let (address, release) = fake_destination(|_| {});
    let out = wait_guarded(
        source(&address, &server.socket, &["--timeout-ms", "500"]),
        "dmalog migrate source",
    );
    drop(release);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("within 500 ms"), "{stderr}");
    assert_device_ready_for_a_retry(&server);
}

/// A peer that connects and sends nothing is dropped within the timeout, with a warning
/// naming it; the destination waits on for the real source (tests/migrate_strangers.rs).
#[test]
fn a_destination_facing_a_silent_source_drops_it_within_the_timeout() {
    let server = ServerProcess::start("soft");
    let destination = destination(&server.socket, &["--timeout-ms", "500"]);
    // Connected, and not a byte.
    let mut silent = TcpStream::connect(&destination.address).unwrap();
    silent.set_read_timeout(Some(HANG_GUARD)).unwrap();
    assert!(
        matches!(silent.read(&mut [0u8; 1]), Ok(0) | Err(_)),
        "dropped"
    );
    let peer = silent.local_addr().unwrap().to_string();
    let (stdout, stderr) = destination.kill_when_logged(&peer);
    assert!(stderr.contains("within 500 ms"), "{stderr}");
    assert!(stdout.is_empty(), "no migration: {stdout:?}");
}

const HOSTILE_TEXT: &[u8] = b"\x1b[2J\nerror: fake \x07\x1b]0;title\x07";

fn assert_escaped(stderr: &[u8]) {
    let text = String::from_utf8_lossy(stderr);
    assert!(
        !stderr.iter().any(|&b| b == 0x1b || b == 0x07),
        "a raw control character reached the terminal: {text:?}"
    );
    assert!(
        text.contains("\\u{1b}[2J\\nerror: fake \\u{7}\\u{1b}]0;title\\u{7}"),
        "{text}"
    );
}

#[test]
fn an_abort_reason_from_the_destination_is_printed_escaped() {
    let server = ServerProcess::start("soft");
    let (address, release) = fake_destination(|stream| {
        let mut out = FrameWriter::new(stream, None);
        let _ = out.write(Kind::Abort, &[HOSTILE_TEXT]);
    });
    let out = wait_guarded(
        source(&address, &server.socket, &[]),
        "dmalog migrate source",
    );
    drop(release);
    assert!(!out.status.success());
    assert_escaped(&out.stderr);
    assert_device_ready_for_a_retry(&server);
}

#[test]
fn an_abort_reason_from_the_source_is_printed_escaped() {
    let server = ServerProcess::start("soft");
    let destination = destination(&server.socket, &[]);
    let mut stream = TcpStream::connect(&destination.address).unwrap();
    let layout = dmalog_migrate::default_layout(64 << 20);
    let hello = dmalog_migrate::stream::hello_payload(4096, 1, 1, &layout);
    let mut out = FrameWriter::new(&mut stream, None);
    out.write(Kind::Hello, &[&hello]).unwrap();
    out.write(Kind::Abort, &[HOSTILE_TEXT]).unwrap();
    out.flush().unwrap();
    let (output, stderr) = destination.wait();
    assert!(!output.status.success(), "{stderr}");
    assert_escaped(stderr.as_bytes());
}

/// Forwards one connection to `upstream`; once `kill_after_bytes` have gone from the
/// source to the destination, kills `victim` (the destination process) with data still
/// flowing. Returns the proxy's address and, on join, whether the kill happened.
fn killing_proxy(
    upstream: String,
    kill_after_bytes: u64,
    mut victim: Reaped,
) -> (String, std::thread::JoinHandle<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let proxy = std::thread::spawn(move || {
        let (mut from_source, _) = listener.accept().unwrap();
        let mut to_destination = TcpStream::connect(&upstream).unwrap();
        let mut back_source = from_source.try_clone().unwrap();
        let mut back_destination = to_destination.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_destination, &mut back_source);
        });
        from_source.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut forwarded = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        let mut killed = false;
        loop {
            let n = match from_source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_destination.write_all(&buf[..n]).is_err() {
                break;
            }
            forwarded += n as u64;
            if !killed && forwarded >= kill_after_bytes {
                victim.kill();
                killed = true;
            }
        }
        // The destination is gone: so is the source's connection.
        let _ = from_source.shutdown(std::net::Shutdown::Both);
        drop(victim);
        killed
    });
    (address, proxy)
}

/// A migration whose destination is killed mid-stream, then a second one from the same
/// source device server (a new source process) to a new destination process, on a new
/// destination device server or on the one the killed destination left half-loaded.
fn killed_then_retried(same_destination_server: bool) {
    let src_server = ServerProcess::start("soft");
    let dst_server = ServerProcess::start("soft");
    let first = destination(&dst_server.socket, &[]);
    // Kill it 8 MiB into round 0 (64 MiB), at a link cap that keeps data flowing.
    let (address, proxy) = killing_proxy(first.address.clone(), 8 << 20, first.child);
    let out = wait_guarded(
        source(&address, &src_server.socket, &["--link-mbps", "200"]),
        "the first dmalog migrate source",
    );
    assert!(
        proxy.join().unwrap(),
        "the destination was killed mid-stream"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("migration"), "{stderr}");
    assert_device_ready_for_a_retry(&src_server);

    // Again, from the same source device server, to a new destination.
    let new_server;
    let retry_server = if same_destination_server {
        &dst_server
    } else {
        new_server = ServerProcess::start("soft");
        &new_server
    };
    let second = destination(&retry_server.socket, &[]);
    let out = wait_guarded(
        source(&second.address, &src_server.socket, &["--json"]),
        "the second dmalog migrate source",
    );
    let (dst_out, dst_stderr) = second.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 3: verified over the downtime budget (a busy machine).
    assert!(migrated(&out), "{stderr}\n{dst_stderr}");
    assert_eq!(json(&out)["verified"], true);
    assert!(dst_out.status.success(), "{dst_stderr}");
    assert_eq!(json(&dst_out)["verified"], true);
}

#[test]
fn a_destination_killed_mid_stream_then_a_retry_to_a_new_destination_verifies() {
    killed_then_retried(false);
}

#[test]
fn a_destination_killed_mid_stream_then_a_retry_on_the_same_destination_device_verifies() {
    killed_then_retried(true);
}

/// `kill -SIG pid` (no unsafe code for a signal); whether it was delivered.
fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|status| status.success())
}

/// A child process that is continued (if stopped) and killed on drop, even when the test
/// fails half-way.
struct ContinuedAndKilled(Child);

impl Drop for ContinuedAndKilled {
    fn drop(&mut self) {
        signal(self.0.id(), "-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_source_device_server_that_stops_answering_fails_the_migration_within_the_timeout() {
    let dir = common::TempDir::new("hung-dev");
    let socket = dir.0.join("src.sock");
    let server = ContinuedAndKilled(
        Command::new(env!("CARGO_BIN_EXE_dmalog"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // A destination that takes everything and says when data flows.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (flowing_tx, flowing) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut input = FrameReader::new(stream.try_clone().unwrap());
        let mut pongs = FrameWriter::new(stream, None);
        let mut taken_bytes = 0;
        while let Ok(frame) = input.read() {
            answer_ping(&frame, &mut pongs);
            taken_bytes += frame.payload.len();
            if taken_bytes >= 1 << 20 {
                let _ = flowing_tx.send(());
            }
        }
    });
    let source = source(
        &address,
        &socket,
        &["--timeout-ms", "1000", "--link-mbps", "50"],
    );
    flowing
        .recv_timeout(HANG_GUARD)
        .expect("the migration started");
    // The device server freezes (alive, socket open, never answering).
    assert!(signal(server.0.id(), "-STOP"));
    let out = wait_guarded(source, "dmalog migrate source");
    drop(server);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("device server did not answer in time"),
        "{stderr}"
    );
}

#[test]
fn a_layout_mismatch_fails_the_source_with_the_destination_s_reason() {
    layout_mismatch_on_channels(1);
}

/// With further channels, the one that finds the destination gone (refused or reset)
/// must not hide the reason the destination sent on the first.
#[test]
fn a_layout_mismatch_on_two_channels_fails_the_source_with_the_destination_s_reason() {
    layout_mismatch_on_channels(2);
}

fn layout_mismatch_on_channels(channels: u32) {
    let src_server = ServerProcess::start("soft");
    let dst_server = ServerProcess::start("soft");
    let destination = destination(&dst_server.socket, &["--memory-mib", "128"]);
    let channels = channels.to_string();
    let out = wait_guarded(
        source(
            &destination.address,
            &src_server.socket,
            &["--channels", &channels],
        ),
        "dmalog migrate source",
    );
    let (dst_out, dst_stderr) = destination.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !dst_out.status.success());
    assert!(
        stderr.contains("aborted: guest memory layout differs"),
        "{stderr}"
    );
    assert!(dst_stderr.contains("layout differs"), "{dst_stderr}");
    assert_device_ready_for_a_retry(&src_server);
}
