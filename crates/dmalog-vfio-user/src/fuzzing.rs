//! Harnesses shared by the `cargo fuzz` targets (`fuzz/`) and the deterministic replay in
//! the default test run: the message decoders, and the server's dispatcher fed a byte
//! stream over a socket pair.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use dmalog_device::{Device, DmaEngine, LvuSample};

use crate::server::{Server, ServerConfig, TrackerKind};
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

/// Feeds `stream_bytes` to a fresh server (dma-engine, `tracker`) as if a client sent them,
/// then closes the connection; returns the number of replies the server sent. The server
/// must neither panic nor hang, whatever the bytes.
pub fn dispatch_stream(stream_bytes: &[u8], tracker: TrackerKind) -> usize {
    dispatch_stream_to(stream_bytes, tracker, FuzzDevice::DmaEngine)
}

/// As [`dispatch_stream`], with the device chosen. Server-to-client DMA messages the device
/// sends (lvu-sample) are read like replies and never answered: the server must give up on
/// them (the peer timeout, or the end of the stream) instead of waiting for ever.
pub fn dispatch_stream_to(stream_bytes: &[u8], tracker: TrackerKind, device: FuzzDevice) -> usize {
    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let config = ServerConfig {
        tracker,
        max_data_xfer_size: 64 << 10,
        // A fuzzed stream never answers the device's DMA messages: give up quickly.
        peer_timeout: std::time::Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let server = std::thread::spawn(move || {
        let server = match device {
            FuzzDevice::DmaEngine => Server::try_new(config, |space| {
                Ok::<_, std::io::Error>(Box::new(DmaEngine::new(space)) as Box<dyn Device>)
            }),
            FuzzDevice::LvuSample => Server::try_new(config, |space| {
                Ok::<_, std::io::Error>(Box::new(LvuSample::new(space)?) as Box<dyn Device>)
            }),
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
