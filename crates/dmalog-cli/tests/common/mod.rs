//! Helpers for tests across processes: a `dmalog serve` child and guest memory.

#![allow(dead_code)]

pub mod migrate;

use dmalog::IovaRange;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmalog_vfio_user::Client;

/// A `dmalog serve` child process, killed on drop.
pub struct ServerProcess {
    child: Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("dmalog-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Maps `memory` at IOVA 0 for `len_bytes` (readable and writable) and starts dirty
/// logging of it at `page_size`.
pub fn map_and_start_logging(
    client: &mut Client,
    memory: &OwnedFd,
    len_bytes: u64,
    page_size: u64,
) {
    use std::os::fd::AsFd;
    client
        .dma_map(
            IovaRange::new(0, len_bytes).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    dmalog::DirtyTracker::start(
        client,
        &[dmalog::IovaRange::new(0, len_bytes).unwrap()],
        page_size,
    )
    .unwrap();
}

impl ServerProcess {
    /// Starts `dmalog serve --tracker TRACKER` and waits until it accepts connections.
    pub fn start(tracker: &str) -> Self {
        Self::start_with(tracker, &[])
    }

    pub fn start_with(tracker: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new("serve");
        let socket = dir.0.join("sock");
        let child = Command::new(env!("CARGO_BIN_EXE_dmalog"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(["--tracker", tracker])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dmalog serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "dmalog serve did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ServerProcess {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Connects, retrying while the server is between bind() and listen().
    pub fn connect(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Client::connect(&self.socket) {
                Ok(client) => return client,
                Err(err) if Instant::now() < deadline && err.errno() == libc::ECONNREFUSED => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => panic!("connect: {err:?}"),
            }
        }
    }

    /// Waits until the server accepts connections (for tests that connect raw sockets).
    pub fn wait_listening(&self) {
        drop(self.connect());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills the server now (a device server that dies under its client).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Guest memory: a memfd of `size` bytes.
pub fn guest_memory(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Reads `len` bytes of the memfd at `offset`.
pub fn read_guest(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let n = rustix::io::pread(fd, &mut out, offset).unwrap();
    assert_eq!(n, len);
    out
}

/// dma-engine's register map (the device's own definition).
#[allow(unused_imports)] // not every test binary programs the device by register
pub use dmalog_device::dma_engine::reg;

/// Runs one dma-engine op and returns STATUS.
pub fn engine_op(client: &mut Client, op: u64, dst: u64, src: u64, len: u64, pattern: u64) -> u64 {
    dmalog_migrate::scenario::device::dma_engine(client)
        .run_op(op, dst, src, len, pattern)
        .unwrap()
}
