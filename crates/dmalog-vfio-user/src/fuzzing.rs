//! Harnesses shared by the `cargo fuzz` targets (`fuzz/`) and the deterministic replay in
//! the default test run: the message decoders, the server's dispatcher fed a byte stream
//! over a socket pair, and the client against a scripted hostile server.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use dmalog::uapi::UapiStruct;
use dmalog_device::{Device, DmaEngine, LvuSample};

use crate::server::{ServedTracker, Server, ServerConfig};
use crate::wire::*;

/// Runs every decoder on `data` (at every offset up to 16); none may panic.
pub fn decode_everything(data: &[u8]) {
    for start in 0..data.len().min(16) {
        let bytes = &data[start..];
        let _ = Header::decode(bytes);
        let _ = DmaMap::decode(bytes);
        let _ = DmaUnmap::decode(bytes);
        let _ = DeviceInfo::decode(bytes);
        let _ = RegionInfoWire::decode(bytes);
        let _ = IrqInfoWire::decode(bytes);
        let _ = SetIrqs::decode(bytes);
        let _ = RegionAccess::decode(bytes);
        let _ = MigData::decode(bytes);
        let _ = Version::decode(bytes);
        let _ = decode_sparse_mmap(bytes, 0);
        let _ = dmalog::uapi::UserLoggingControl::decode(bytes);
        let _ = dmalog::uapi::UserLoggingReport::decode(bytes);
    }
}

/// Which emulated device a fuzzed server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuzzDevice {
    /// dma-engine (SPEC 6.1).
    DmaEngine,
    /// lvu-sample (SPEC 6.2): a BAR0 timer, server-to-client DMA messages, migration data.
    LvuSample,
}

/// Which tracker a fuzzed server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuzzTracker {
    /// No DMA logging.
    None,
    /// The software tracker.
    Soft,
    /// The mlx5 model with these capabilities.
    Mlx5(dmalog_models::Mlx5Caps),
}

impl FuzzTracker {
    fn build(&self, live: &std::sync::Arc<dmalog::LiveLog>) -> ServedTracker {
        match self {
            FuzzTracker::None => ServedTracker::none(),
            FuzzTracker::Soft => ServedTracker::soft(live),
            FuzzTracker::Mlx5(caps) => ServedTracker::new(
                dmalog_models::Mlx5Driver::with_live_log(*caps, std::sync::Arc::clone(live)),
            ),
        }
    }
}

/// Feeds `stream_bytes` to a fresh server (dma-engine, `tracker`) as if a client sent them,
/// then closes the connection; returns the number of replies the server sent. The server
/// must neither panic nor hang, whatever the bytes.
pub fn dispatch_stream(stream_bytes: &[u8], tracker: FuzzTracker) -> usize {
    dispatch_stream_to(stream_bytes, tracker, FuzzDevice::DmaEngine)
}

/// As [`dispatch_stream`], with the device chosen. Server-to-client DMA messages the device
/// sends (lvu-sample) are read like replies and never answered: the server must give up on
/// them (the peer timeout, or the end of the stream) instead of waiting for ever.
pub fn dispatch_stream_to(stream_bytes: &[u8], tracker: FuzzTracker, device: FuzzDevice) -> usize {
    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let config = ServerConfig {
        max_data_xfer_size: 64 << 10,
        // A fuzzed stream never answers the device's DMA messages: give up quickly.
        peer_timeout: std::time::Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let server = std::thread::spawn(move || {
        let server = match device {
            FuzzDevice::DmaEngine => Server::try_with_tracker(
                config,
                |live| tracker.build(live),
                |space| Ok::<_, std::io::Error>(Box::new(DmaEngine::new(space)) as Box<dyn Device>),
            ),
            FuzzDevice::LvuSample => Server::try_with_tracker(
                config,
                |live| tracker.build(live),
                |space| Ok::<_, std::io::Error>(Box::new(LvuSample::new(space)?) as Box<dyn Device>),
            ),
        };
        // A device that cannot be created (no memfd) is not a finding of the fuzzer.
        if let Ok(mut server) = server {
            server.serve(server_end);
        }
    });
    // Read replies concurrently so the server never blocks on a full socket buffer.
    let mut reader = client.try_clone().expect("clone");
    let replies = std::thread::spawn(move || {
        let mut count = 0usize;
        let mut head = [0u8; HEADER_BYTES];
        while reader.read_exact(&mut head).is_ok() {
            let Ok(header) = Header::decode(&head) else {
                break;
            };
            let mut rest = vec![0u8; (header.msg_size as usize).saturating_sub(HEADER_BYTES)];
            if reader.read_exact(&mut rest).is_err() {
                break;
            }
            count += 1;
        }
        count
    });
    let mut writer = client;
    let _ = writer.write_all(stream_bytes);
    let _ = writer.shutdown(Shutdown::Write);
    server.join().expect("the server thread panicked");
    let _ = writer.shutdown(Shutdown::Both);
    replies.join().expect("reader")
}

/// A stream that starts with a valid VERSION, then `body`: lets fuzzing reach past the
/// "VERSION comes first" rule.
pub fn with_version(body: &[u8]) -> Vec<u8> {
    let version = Version {
        major: 0,
        minor: 2,
        json: Some(serde_json::json!({"capabilities": {}})),
    }
    .encode();
    let header = Header {
        msg_id: 0,
        cmd: cmd::VERSION,
        msg_size: (HEADER_BYTES + version.len()) as u32,
        flags: 0,
        error_no: 0,
    };
    [header.encode().as_slice(), &version, body].concat()
}

/// Runs a client against a fake server scripted by `script`, through every client call;
/// nothing the server sends may panic the client or hang it (each wait is bounded by a
/// read timeout). The server answers VERSION with `max_data_xfer_size` = the script's
/// first 8 bytes, then each request with the next script entry: a mode byte, a u16 length
/// and that many payload bytes. Mode % 4: 0 a reply with the payload, 1 an error reply
/// (errno from the payload), 2 first a server DMA_READ (bit 2 clear) or DMA_WRITE (set)
/// with the payload, then the reply, 3 a reply to another msg_id or command. Returns how
/// many requests the fake server answered from the script.
pub fn client_against_script(script: &[u8]) -> usize {
    use std::os::fd::AsFd;

    use dmalog::{DirtyTracker, IovaRange, MigrationDevice};

    use crate::client::Client;
    use crate::transport::Transport;

    let (client_end, server_end) = UnixStream::pair().expect("socketpair");
    let timeout = Some(std::time::Duration::from_secs(5));
    client_end.set_read_timeout(timeout).expect("timeout");
    server_end.set_read_timeout(timeout).expect("timeout");
    let script = script.to_vec();
    let server = std::thread::spawn(move || {
        let mut transport = Transport::new(server_end, 1 << 20);
        let xfer = script
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(1 << 20);
        let mut entries = script.get(8..).unwrap_or_default();
        let mut answered = 0usize;
        while let Ok(request) = transport.recv() {
            let reply_to = |mut header: Header| {
                header.flags = TYPE_REPLY;
                header.msg_size = 0;
                header
            };
            if request.header.cmd == cmd::VERSION {
                let version = Version {
                    major: 0,
                    minor: 2,
                    json: Some(serde_json::json!({"capabilities": {"max_data_xfer_size": xfer}})),
                };
                if transport
                    .send(reply_to(request.header), &version.encode(), &[])
                    .is_err()
                {
                    return answered;
                }
                continue;
            }
            let [mode, lo, hi, rest @ ..] = entries else {
                return answered; // end of the script: hang up
            };
            let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
            let (payload, tail) = rest.split_at(len);
            entries = tail;
            let mut header = reply_to(request.header);
            match mode % 4 {
                1 => {
                    header.flags |= FLAG_ERROR;
                    header.error_no = dmalog::uapi::read_u32(payload, 0).unwrap_or(0);
                }
                2 => {
                    let command = Header {
                        msg_id: 0x9000,
                        cmd: if mode & 4 == 0 {
                            cmd::DMA_READ
                        } else {
                            cmd::DMA_WRITE
                        },
                        msg_size: 0,
                        flags: TYPE_COMMAND,
                        error_no: 0,
                    };
                    if transport.send(command, payload, &[]).is_err() || transport.recv().is_err() {
                        return answered;
                    }
                }
                3 => header.msg_id = header.msg_id.wrapping_add(1 + u16::from(*mode >> 2)),
                _ => {}
            }
            if transport.send(header, payload, &[]).is_err() {
                return answered;
            }
            answered += 1;
        }
        answered
    });
    let memory =
        rustix::fs::memfd_create("fuzz-guest", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&memory, 1 << 20).expect("ftruncate");
    if let Ok(mut client) = Client::with_stream(client_end, 64 << 10) {
        client
            .set_reply_timeout(std::time::Duration::from_secs(5))
            .expect("timeout");
        let _ = client.device_info();
        let _ = client.region_info(1);
        let _ = client.irq_info(0);
        let (low, high) = (IovaRange::new(0, 1 << 20), IovaRange::new(1 << 20, 1 << 20));
        if let (Ok(low), Ok(high)) = (low, high) {
            let _ = client.dma_map(low, Some(memory.as_fd()), 0, true);
            let _ = client.dma_map_message_only(high, memory.as_fd(), 0, true);
        }
        let _ = client.read_u64(0, 0);
        let _ = client.write_u64(0, 8, 1);
        let _ = client.probe();
        let mut bitmap = vec![0u64; 8];
        if let Ok(range) = IovaRange::new(0, 2 << 20) {
            let _ = client.start(&[range], 4096);
            let _ = client.report(range, 4096, &mut bitmap);
        }
        let _ = client.stop();
        let _ = client.migration_flags();
        let _ = client.device_state();
        let _ = client.set_device_state(dmalog::uapi::DeviceState::StopCopy);
        let mut buf = vec![0u8; 4096];
        let _ = client.read_migration_data(&mut buf);
        let _ = client.write_migration_data(&[0u8; 300]);
        let _ = client.serve_requests(std::time::Duration::ZERO);
        if let Ok(low) = IovaRange::new(0, 1 << 20) {
            let _ = client.dma_unmap(low);
        }
        let _ = client.reset();
    }
    server.join().expect("the fake server panicked")
}
