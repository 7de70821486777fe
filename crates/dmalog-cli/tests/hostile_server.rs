//! Hostile clients against `dmalog serve` (SPEC 8): flooding while the server waits for a
//! DMA reply, staying silent, claiming huge messages. Memory stays bounded, every wait has
//! a timeout, and the server goes on serving the next client.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use dmalog_vfio_user::transport::{RecvError, Transport};
use dmalog_vfio_user::wire::*;

/// A `dmalog serve` child whose pid the test reads /proc with; killed on drop.
struct Serve {
    child: Child,
    socket: std::path::PathBuf,
    _dir: TempDir,
}

impl Serve {
    fn start(extra: &[&str]) -> Self {
        let dir = TempDir::new("hostile");
        let socket = dir.0.join("sock");
        let child = Command::new(env!("CARGO_BIN_EXE_dmalog"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            socket,
            _dir: dir,
        };
        drop(serve.client());
        serve
    }

    /// A negotiated client (retrying until the server listens).
    fn client(&self) -> dmalog_vfio_user::Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match dmalog_vfio_user::Client::connect(&self.socket) {
                Ok(client) => return client,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(err) => panic!("connect: {err}"),
            }
        }
    }

    /// The server's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that speaks raw messages.
struct Raw {
    transport: Transport,
    id: u16,
}

impl Raw {
    fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        // Hang guards only.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            transport: Transport::new(stream, 2 << 20),
            id: 0,
        }
    }

    fn send(&mut self, command: u16, payload: &[u8]) -> std::io::Result<()> {
        self.id = self.id.wrapping_add(1);
        let header = Header {
            msg_id: self.id,
            cmd: command,
            msg_size: 0,
            flags: TYPE_COMMAND,
            error_no: 0,
        };
        self.transport.send(header, payload, &[])
    }

    /// Sends a command and takes its reply's errno (0: success).
    fn request(&mut self, command: u16, payload: &[u8]) -> i32 {
        self.send(command, payload).unwrap();
        let reply = self.transport.recv().unwrap();
        assert_eq!(reply.header.kind(), TYPE_REPLY);
        assert_eq!(reply.header.msg_id, self.id);
        if reply.header.flags & FLAG_ERROR != 0 {
            reply.header.error_no as i32
        } else {
            0
        }
    }

    /// VERSION 0.2 without capabilities.
    fn version(&mut self) {
        let version = Version {
            major: 0,
            minor: 2,
            json: None,
        };
        assert_eq!(self.request(cmd::VERSION, &version.encode()), 0);
    }

    /// VERSION, then a message-only DMA mapping (no fd: the device's DMA to it is DMA_READ
    /// and DMA_WRITE messages to this client), then lvu-sample's timer armed to fire now.
    fn arm_message_dma(&mut self) {
        let version = Version {
            major: 0,
            minor: 2,
            json: Some(serde_json::json!({"capabilities": {"max_data_xfer_size": 1 << 20}})),
        };
        assert_eq!(self.request(cmd::VERSION, &version.encode()), 0);
        let map = DmaMap {
            argsz: DmaMap::BYTES as u32,
            flags: DMA_FLAG_READ | DMA_FLAG_WRITE,
            offset: 0,
            addr: 0x10000,
            size: 0x4000,
        };
        assert_eq!(self.request(cmd::DMA_MAP, &map.encode()), 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut bar0 = RegionAccess {
            offset: 0,
            region: 0,
            count: 8,
        }
        .encode();
        bar0.extend_from_slice(&now.to_le_bytes());
        assert_eq!(self.request(cmd::REGION_WRITE, &bar0), 0);
    }

    /// The server's next command to this client (a DMA_WRITE or DMA_READ).
    fn server_command(&mut self) -> Header {
        let message = self.transport.recv().expect("the device's DMA message");
        assert_eq!(message.header.kind(), TYPE_COMMAND);
        message.header
    }
}

/// The server still serves: a new client negotiates and reads the device info.
fn assert_serves(server: &Serve) {
    let mut client = server.client();
    assert_eq!(client.device_info().unwrap().num_regions, 9);
}

#[test]
fn flooding_while_the_server_waits_for_a_dma_reply_keeps_its_memory_bounded() {
    let mut server = Serve::start(&["--device", "lvu-sample"]);
    let before_kib = server.rss_kib();
    let mut raw = Raw::connect(&server.socket);
    raw.arm_message_dma();
    let dma = raw.server_command();
    assert_eq!(dma.cmd, cmd::DMA_WRITE);
    // Never answer; send 256 one-MiB commands instead (REGION_WRITEs).
    const FLOOD_MESSAGES: usize = 256;
    let mut payload = RegionAccess {
        offset: 0,
        region: 1,
        count: 1 << 20,
    }
    .encode();
    payload.resize(RegionAccess::BYTES + (1 << 20), 0x5a);
    let mut peak_kib = 0;
    let mut sent = 0;
    for _ in 0..FLOOD_MESSAGES {
        if raw.send(cmd::REGION_WRITE, &payload).is_err() {
            break; // the server dropped this client
        }
        sent += 1;
        if sent % 8 == 0 {
            peak_kib = peak_kib.max(server.rss_kib());
        }
    }
    // Give a server that keeps everything time to show it.
    std::thread::sleep(Duration::from_millis(300));
    peak_kib = peak_kib.max(server.rss_kib());
    assert!(server.is_running(), "the server survived the flood");
    let grown_mib = peak_kib.saturating_sub(before_kib) / 1024;
    eprintln!("flood: {sent} MiB sent before the drop; the server grew by {grown_mib} MiB");
    assert!(
        grown_mib < 96,
        "the server grew by {grown_mib} MiB under a flood of {sent} MiB"
    );
    assert!(sent < FLOOD_MESSAGES, "the flooding client was dropped");
    drop(raw);
    assert_serves(&server);
}

#[test]
fn a_silent_client_fails_the_dma_after_the_reply_timeout_and_is_dropped() {
    let mut server = Serve::start(&["--device", "lvu-sample", "--peer-timeout-ms", "200"]);
    let mut raw = Raw::connect(&server.socket);
    raw.arm_message_dma();
    let dma = raw.server_command();
    assert_eq!(dma.cmd, cmd::DMA_WRITE);
    // Say nothing: the server gives up on the DMA and drops the connection (EOF here; a
    // hung server would trip the 20 s read timeout instead).
    let started = Instant::now();
    match raw.transport.recv() {
        Err(RecvError::Closed) => {}
        other => panic!("expected the server to drop the silent client, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(server.is_running());
    assert_serves(&server);
}

#[test]
fn a_huge_msg_size_is_not_allocated() {
    let mut server = Serve::start(&[]);
    let before_kib = server.rss_kib();
    let mut stream = UnixStream::connect(&server.socket).unwrap();
    // A header claiming a 4 GiB message, then 32 MiB of it.
    let header = Header {
        msg_id: 1,
        cmd: cmd::VERSION,
        msg_size: u32::MAX,
        flags: TYPE_COMMAND,
        error_no: 0,
    };
    use std::io::Write;
    stream.write_all(&header.encode()).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..32 {
        stream.write_all(&chunk).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let grown_mib = server.rss_kib().saturating_sub(before_kib) / 1024;
    assert!(grown_mib < 16, "grew by {grown_mib} MiB");
    drop(stream);
    assert!(server.is_running());
    assert_serves(&server);
}

#[test]
fn a_client_stopping_in_the_middle_of_a_message_is_dropped() {
    let mut server = Serve::start(&["--peer-timeout-ms", "200"]);
    let mut raw = Raw::connect(&server.socket);
    raw.version();
    // Idle for longer than the peer timeout: fine, nothing is owed.
    std::thread::sleep(Duration::from_millis(500));
    let info = DeviceInfo {
        argsz: DeviceInfo::BYTES as u32,
        ..DeviceInfo::default()
    };
    assert_eq!(raw.request(cmd::DEVICE_GET_INFO, &info.encode()), 0);
    // A header announcing 100 bytes, 10 of them, then silence.
    let header = Header {
        msg_id: 9,
        cmd: cmd::DEVICE_GET_INFO,
        msg_size: 100,
        flags: TYPE_COMMAND,
        error_no: 0,
    };
    use std::io::Write;
    let mut stream = raw.transport.stream();
    stream.write_all(&header.encode()).unwrap();
    stream.write_all(&[0u8; 10]).unwrap();
    match raw.transport.recv() {
        Err(RecvError::Closed) => {}
        other => panic!("expected the server to drop the stalled client, got {other:?}"),
    }
    assert!(server.is_running());
    assert_serves(&server);
}

#[test]
fn a_client_that_does_not_read_its_replies_is_dropped() {
    let server = Serve::start(&["--device", "lvu-sample", "--peer-timeout-ms", "200"]);
    let mut raw = Raw::connect(&server.socket);
    raw.version();
    // 1024 reads of BAR1 (16 KiB replies, 16 MiB in all) whose replies are never read:
    // the server's send blocks once the socket buffers are full.
    let read_bar1 = RegionAccess {
        offset: 0,
        region: 1,
        count: 0x4000,
    }
    .encode();
    for _ in 0..1024 {
        if raw.send(cmd::REGION_READ, &read_bar1).is_err() {
            break; // dropped already
        }
    }
    // Another client is served once the stuck one has been dropped.
    let stream = UnixStream::connect(&server.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut other = dmalog_vfio_user::Client::with_stream(stream, 1 << 20)
        .expect("served while a client ignores its replies");
    assert_eq!(other.device_info().unwrap().num_regions, 9);
    drop(raw);
}
