//! The destination's listening (`scenario::transport::Listening`) against strangers on its
//! port: one host that holds as many silent connections as the destination keeps pending
//! does not keep the real source, connecting from another host, out.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dmalog_migrate::scenario::transport::{Listening, MAX_PENDING_HANDSHAKES};
use dmalog_migrate::scenario::ServerSide;
use dmalog_migrate::stream::{hello_payload, FrameReader, FrameWriter, Kind};

/// Generous: only a hang guard.
const HANG_GUARD: Duration = Duration::from_secs(8);

/// A connection to `to` from `from` (any port): loopback answers every 127.0.0.0/8
/// address, so a test can be two hosts.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd: OwnedFd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    bind(&fd, &local).unwrap();
    connect(&fd, &to).unwrap();
    TcpStream::from(fd)
}

/// Whether the destination closed `client` (a read that waits a millisecond).
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
fn one_host_holding_every_pending_slot_does_not_keep_the_real_source_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (taken, main) = mpsc::channel();
    // Long: the strangers are held for the whole test unless they are refused.
    let timeout = Duration::from_secs(60);
    let mut listening = Listening::start(listener, &ServerSide::Plaintext, timeout).unwrap();
    std::thread::spawn(move || {
        let kind = listening
            .main_connection()
            .map(|(reader, _link)| FrameReader::new(reader).read().map(|frame| frame.kind));
        let _ = taken.send(format!("{kind:?}"));
    });
    // One stranger host, silent connections: more than the destination holds at once.
    let flood = MAX_PENDING_HANDSHAKES + 8;
    let strangers: Vec<TcpStream> = (0..flood)
        .map(|_| connect_from("127.0.0.2", address))
        .collect();
    // Until those past the bound are closed (every one accepted by then).
    let deadline = Instant::now() + HANG_GUARD;
    while strangers
        .iter()
        .filter(|s| closed_by_the_destination(s))
        .count()
        < flood - MAX_PENDING_HANDSHAKES
    {
        assert!(Instant::now() < deadline, "the strangers are all held");
    }
    // The real source, from its own host.
    let real = connect_from("127.0.0.1", address);
    let layout = [(0u64, 1u64 << 20)];
    let mut out = FrameWriter::new(real.try_clone().unwrap(), None);
    out.write(Kind::Hello, &[&hello_payload(4096, 7, 1, &layout)])
        .unwrap();
    out.flush().unwrap();
    let got = main.recv_timeout(HANG_GUARD);
    assert_eq!(
        got.as_deref(),
        Ok("Ok(Ok(Hello))"),
        "the real source's connection was closed: {} held for one stranger host",
        MAX_PENDING_HANDSHAKES
    );
    drop(strangers);
}
