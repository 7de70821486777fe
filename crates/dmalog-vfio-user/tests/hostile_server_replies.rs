//! A hostile or broken server must not crash the client (SPEC 8): numbers in its replies
//! reach no unchecked arithmetic, cast, allocation or index. A scripted fake server on a
//! socket pair answers each command as the test says.

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use dmalog::{DirtyTracker, IovaRange, MigrationDevice};
use dmalog_vfio_user::client::CLIENT_MAX_DATA_XFER;
use dmalog_vfio_user::transport::Transport;
use dmalog_vfio_user::wire::*;
use dmalog_vfio_user::{Client, ClientError};

/// What the fake server answers: a reply payload (success) or an errno.
type Answer = Result<Vec<u8>, i32>;

/// A fake server that answers VERSION with `capabilities`, then every command with
/// `answer(cmd, payload)`, until the client goes away.
fn fake_server(
    capabilities: serde_json::Value,
    mut answer: impl FnMut(u16, &[u8]) -> Answer + Send + 'static,
) -> (UnixStream, JoinHandle<()>) {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mut transport = Transport::new(server_end, 8 << 20);
        while let Ok(message) = transport.recv() {
            let result = if message.header.cmd == cmd::VERSION {
                Ok(Version {
                    major: 0,
                    minor: 2,
                    json: Some(serde_json::json!({ "capabilities": capabilities })),
                }
                .encode())
            } else {
                answer(message.header.cmd, &message.payload)
            };
            let (flags, errno, payload) = match result {
                Ok(payload) => (TYPE_REPLY, 0, payload),
                Err(errno) => (TYPE_REPLY | FLAG_ERROR, errno as u32, Vec::new()),
            };
            let header = Header {
                msg_id: message.header.msg_id,
                cmd: message.header.cmd,
                msg_size: 0,
                flags,
                error_no: errno,
            };
            if transport.send(header, &payload, &[]).is_err() {
                break;
            }
        }
    });
    (client_end, thread)
}

#[test]
fn a_max_data_xfer_size_past_u32_is_clamped_not_truncated_to_zero() {
    // 2^32 as u32 is 0: a client that cast first would split data into 0-byte chunks.
    let (stream, server) = fake_server(
        serde_json::json!({"max_data_xfer_size": 1u64 << 32}),
        |command, _| match command {
            cmd::MIG_DATA_WRITE => Ok(Vec::new()),
            _ => Err(libc::ENOSYS),
        },
    );
    let mut client = Client::with_stream(stream, CLIENT_MAX_DATA_XFER).unwrap();
    assert_eq!(client.max_data_xfer_size(), CLIENT_MAX_DATA_XFER);
    client.write_migration_data(&[7u8; 100]).unwrap();
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_tiny_max_data_xfer_size_is_raised_to_a_usable_minimum() {
    let (stream, server) = fake_server(serde_json::json!({"max_data_xfer_size": 1}), |_, _| {
        Ok(Vec::new())
    });
    let client = Client::with_stream(stream, CLIENT_MAX_DATA_XFER).unwrap();
    assert!(client.max_data_xfer_size() >= 64);
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_start_reply_with_a_bad_page_size_is_a_protocol_error() {
    for chosen in [0u64, 3 << 12] {
        let (stream, server) = fake_server(serde_json::json!({}), move |command, payload| {
            assert_eq!(command, cmd::DEVICE_FEATURE);
            // Echo the request with the "chosen" page size written in.
            let mut reply = payload.to_vec();
            reply[8..16].copy_from_slice(&chosen.to_le_bytes());
            Ok(reply)
        });
        let mut client = Client::with_stream(stream, CLIENT_MAX_DATA_XFER).unwrap();
        let err = client
            .start(&[IovaRange::new(0, 1 << 20).unwrap()], 4096)
            .expect_err("a page size that is not a power of two");
        assert_eq!(err.errno(), libc::EIO, "chosen {chosen}: {err}");
        drop(client);
        server.join().unwrap();
    }
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    let (stream, server) = fake_server(serde_json::json!({}), |command, payload| {
        match command {
            // Region info: a capability offset past the reply, a huge area count.
            cmd::DEVICE_GET_REGION_INFO => {
                let mut info = RegionInfoWire::decode(payload).unwrap();
                info.flags = 8;
                info.cap_offset = u32::MAX;
                info.argsz = RegionInfoWire::BYTES as u32;
                Ok(info.encode())
            }
            // A state read whose `size` claims 4 GiB of data in an 8-byte reply.
            cmd::MIG_DATA_READ => Ok(MigData {
                argsz: 8,
                size: u32::MAX,
            }
            .encode()),
            cmd::REGION_READ => Ok(vec![1, 2, 3]),
            cmd::DEVICE_GET_INFO => Ok(vec![0; 3]),
            cmd::DEVICE_FEATURE => Ok(vec![0xff; 9]),
            _ => Err(libc::ENOSYS),
        }
    });
    let mut client = Client::with_stream(stream, CLIENT_MAX_DATA_XFER).unwrap();
    assert!(matches!(
        client.region_info(1),
        Err(ClientError::Protocol(_))
    ));
    let mut buf = [0u8; 64];
    assert!(client.read_migration_data(&mut buf).is_err());
    assert!(client.read_u64(0, 0).is_err());
    assert!(client.device_info().is_err());
    assert!(client.device_state().is_err());
    assert!(client.migration_flags().is_err());
    drop(client);
    server.join().unwrap();
}

/// A server that answers VERSION (no capabilities), then does `after` with its end.
fn version_then(after: impl FnOnce(Transport) + Send + 'static) -> (UnixStream, JoinHandle<()>) {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut transport = Transport::new(server_end, 1 << 20);
        let version = transport.recv().unwrap();
        let reply = Header {
            msg_id: version.header.msg_id,
            cmd: cmd::VERSION,
            msg_size: 0,
            flags: TYPE_REPLY,
            error_no: 0,
        };
        let caps = Version {
            major: 0,
            minor: 2,
            json: None,
        };
        transport.send(reply, &caps.encode(), &[]).unwrap();
        after(transport);
    });
    (client_end, server)
}

#[test]
fn a_silent_server_times_the_request_out_and_later_requests_fail_at_once() {
    // Answers VERSION, then reads requests and never answers.
    let (client_end, server) = version_then(|mut transport| while transport.recv().is_ok() {});
    let mut client = Client::with_stream(client_end, CLIENT_MAX_DATA_XFER).unwrap();
    client
        .set_reply_timeout(std::time::Duration::from_millis(100))
        .unwrap();
    let err = client.device_info().expect_err("no reply");
    assert_eq!(err.errno(), libc::ETIMEDOUT, "{err}");
    // A late reply would now be out of step: later requests fail without waiting (a
    // wait would take the 20 s timeout).
    client
        .set_reply_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(client.device_info().unwrap_err().errno(), libc::ETIMEDOUT);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_server_that_is_gone_is_reported_gone_by_every_later_request_not_as_silent() {
    // Answers VERSION, then exits: its end of the socket closes.
    let (client_end, server) = version_then(drop);
    let mut client = Client::with_stream(client_end, CLIENT_MAX_DATA_XFER).unwrap();
    server.join().unwrap();
    let first = client.device_info().expect_err("the server is gone");
    assert_eq!(first.errno(), libc::EPIPE, "{first}");
    // The connection is out of step now; what it says must still be that the server is
    // gone (a migration tells "lost the device server" from "it did not answer").
    for _ in 0..2 {
        let later = client.device_info().expect_err("still gone");
        assert_eq!(later.errno(), libc::EPIPE, "{later}");
    }
}

#[test]
fn a_request_refused_before_any_byte_is_sent_leaves_the_connection_usable() {
    use std::os::fd::AsFd;
    let (stream, server) = fake_server(serde_json::json!({}), |command, _| match command {
        cmd::MIG_DATA_WRITE => Ok(Vec::new()),
        _ => Err(libc::ENOSYS),
    });
    let mut client = Client::with_stream(stream, CLIENT_MAX_DATA_XFER).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = vec![null.as_fd(); dmalog_vfio_user::transport::MAX_FDS_PER_MESSAGE + 1];
    let refused = client
        .request(cmd::DMA_MAP, &[], &fds)
        .expect_err("more fds than a message carries");
    assert_eq!(refused.errno(), libc::E2BIG, "{refused}");
    // Nothing of it went: the connection is in step, the next request is answered.
    client
        .write_migration_data(&[7u8; 100])
        .expect("the request after a refused one");
    drop(client);
    server.join().unwrap();
}
