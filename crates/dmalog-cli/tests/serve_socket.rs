//! `dmalog serve --socket P` (SPEC 8, "The socket"): P is created mode 0600; only a stale
//! socket is replaced; a regular file, a directory or a live server's socket is an error
//! and nothing is removed. And `--once`: exit 0 after the first client.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::migrate::{dmalog, wait_guarded};
use common::{ServerProcess, TempDir};

/// `dmalog serve ARGS --socket P`, its stderr to `stderr`.
fn serve(args: &[&str], socket: &Path, stderr: Stdio) -> Child {
    dmalog()
        .arg("serve")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Runs `dmalog serve --socket P` expecting it to give up at once; its output.
fn serve_refused(socket: &Path) -> Output {
    wait_guarded(serve(&[], socket, Stdio::piped()), "dmalog serve")
}

/// Connects to the `child` server at `socket`, retrying while it starts (and failing the
/// test if it exits instead).
fn connect(child: &mut Child, socket: &Path) -> dmalog_vfio_user::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match dmalog_vfio_user::Client::connect(socket) {
            Ok(client) => break client,
            Err(err) => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "dmalog serve exited: {err}"
                );
                assert!(
                    Instant::now() < deadline,
                    "no server on {}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn a_regular_file_at_the_socket_path_is_an_error_and_is_kept() {
    let dir = TempDir::new("sock-file");
    let path = dir.0.join("sock");
    std::fs::write(&path, b"precious").unwrap();
    let out = serve_refused(&path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"precious",
        "the file is kept"
    );
}

#[test]
fn a_directory_at_the_socket_path_is_an_error_and_is_kept() {
    let dir = TempDir::new("sock-dir");
    let path = dir.0.join("sock");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("inside"), b"x").unwrap();
    let out = serve_refused(&path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("directory"), "{stderr}");
    assert!(path.join("inside").exists(), "the directory is kept");
}

#[test]
fn a_live_servers_socket_is_not_taken_over() {
    let server = ServerProcess::start("soft");
    server.wait_listening();
    let out = serve_refused(&server.socket);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
    // The first server still owns the path and answers.
    let mut client = server.connect();
    assert_eq!(client.device_info().unwrap().num_regions, 9);
}

#[test]
fn a_stale_socket_is_replaced_and_the_socket_is_mode_0600() {
    let dir = TempDir::new("sock-stale");
    let path = dir.0.join("sock");
    drop(UnixListener::bind(&path).unwrap()); // the file stays; connecting is refused
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let mut child = serve(&[], &path, Stdio::inherit());
    let client = connect(&mut child, &path);
    drop(client);
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn once_exits_zero_after_the_first_client_disconnects() {
    let dir = TempDir::new("sock-once");
    let path = dir.0.join("sock");
    let mut child = serve(&["--once"], &path, Stdio::inherit());
    let mut client = connect(&mut child, &path);
    assert_eq!(client.device_info().unwrap().num_regions, 9);
    assert!(child.try_wait().unwrap().is_none(), "serving the client");
    drop(client);
    let status = wait_guarded(child, "dmalog serve --once after its client left").status;
    assert!(status.success(), "{status}");
}
