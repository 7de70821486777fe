//! The migration stream's TLS (SPEC 8): a migration between mutually authenticated hosts
//! verifies; the destination refuses a source without a certificate, with one from another
//! CA, or speaking plaintext, before any guest page is written (even if that source ignores
//! the refusal and sends pages anyway); the source refuses a destination whose certificate
//! does not match the name or the CA; a silent peer times out in the handshake.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{config, cpu_log, hello, run_destination, FakeDevice, LAYOUT};
use dmalog_migrate::pki::{Authority, Leaf};
use dmalog_migrate::stream::{pages_payload, FrameReader, FrameWriter, Kind};
use dmalog_migrate::tls::{self, TlsConfig, TlsError};
use dmalog_migrate::{memfd_guest_untracked, migrate_source, GuestPages, SourceVm};
use rustls::pki_types::ServerName;

/// A hang guard only.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A CA with a destination certificate for localhost and 127.0.0.1 and a source one.
struct Pki {
    ca: Authority,
    server: Leaf,
    client: Leaf,
}

fn pki() -> Pki {
    let ca = Authority::new("test CA").unwrap();
    let server = ca
        .server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let client = ca.client("test source").unwrap();
    Pki { ca, server, client }
}

fn config_of(ca: &Authority, leaf: &Leaf) -> TlsConfig {
    TlsConfig::from_pem(&ca.cert_pem, &leaf.cert_pem, &leaf.key_pem).unwrap()
}

/// The destination as `migrate destination` runs it: one connection, TLS accepted, then
/// the migration. Returns the outcome and whether guest memory is still all zero.
fn destination(
    server: TlsConfig,
    listener: TcpListener,
) -> std::thread::JoinHandle<(Result<bool, String>, bool)> {
    std::thread::spawn(move || {
        let pristine = memfd_guest_untracked(&LAYOUT).unwrap().region_hashes();
        let (tcp, _) = listener.accept().unwrap();
        match tls::accept(&server.server_config().unwrap(), tcp, TIMEOUT) {
            // Refused at the handshake: guest memory was not touched.
            Err(err) => (Err(err.to_string()), true),
            Ok(stream) => {
                let mut input = FrameReader::new(stream.try_clone().unwrap()).with_timeout(TIMEOUT);
                let mut out = FrameWriter::new(stream, None).with_timeout(TIMEOUT);
                let (result, memory, _) = run_destination(&mut input, &mut out);
                (
                    result
                        .map(|report| report.verified)
                        .map_err(|e| e.to_string()),
                    memory.region_hashes() == pristine,
                )
            }
        }
    })
}

fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    (listener, address)
}

#[test]
fn a_tls_migration_between_authenticated_hosts_verifies() {
    let pki = pki();
    let (listener, address) = listen();
    let dst = destination(config_of(&pki.ca, &pki.server), listener);

    let client = config_of(&pki.ca, &pki.client).client_config().unwrap();
    let tcp = TcpStream::connect(&address).unwrap();
    let stream = tls::connect(&client, "localhost", tcp, TIMEOUT).unwrap();
    let memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    memory.write_at(4096, &[7u8; 100]);
    let (mut device, _) = FakeDevice::new(vec![3u8; 5000]);
    let (mut cpu, _) = cpu_log();
    let mut replies = FrameReader::new(stream.try_clone().unwrap()).with_timeout(TIMEOUT);
    let mut out = FrameWriter::new(stream, None).with_timeout(TIMEOUT);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let report = migrate_source(&config(), vm, &mut out, &mut replies, |_| {}).unwrap();
    assert!(report.verified);
    let (result, untouched) = dst.join().unwrap();
    assert_eq!(result, Ok(true), "the destination verified");
    assert!(!untouched, "the page arrived");
}

/// A hostile source on `tcp` (TLS done or not): sends a Hello and one page of 0xff at GPA
/// 0 whatever the destination said, ignoring every error, then stays connected until the
/// destination hangs up (so that a destination that took the page had the time to write
/// it).
fn push_a_page<S: Read + Write>(stream: S) {
    let mut out = FrameWriter::new(stream, None);
    let _ = out.write(Kind::Hello, &[&hello(&LAYOUT)]);
    let _ = out.write(
        Kind::Pages,
        &[&pages_payload(&[(0, 1, 0)], &[0xffu8; 4096])],
    );
    let _ = out.flush();
    let _ = std::io::copy(out.get_mut(), &mut std::io::sink());
}

/// A hostile TLS client: `config`'s handshake, then a page pushed regardless.
fn tls_client_pushing_a_page(config: rustls::ClientConfig, address: &str) {
    let tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    push_a_page(rustls::StreamOwned::new(conn, tcp));
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Authority) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    roots
}

fn assert_refused_untouched(
    dst: std::thread::JoinHandle<(Result<bool, String>, bool)>,
    expect: &str,
) {
    let (result, untouched) = dst.join().unwrap();
    assert!(untouched, "no page may be written: {result:?}");
    let err = result.expect_err("the destination must refuse");
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(err.contains(expect), "{err:?} should mention {expect:?}");
}

#[test]
fn the_destination_refuses_a_source_without_a_certificate() {
    let pki = pki();
    let (listener, address) = listen();
    let dst = destination(config_of(&pki.ca, &pki.server), listener);
    let no_cert = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&pki.ca))
        .with_no_client_auth();
    tls_client_pushing_a_page(no_cert, &address);
    assert_refused_untouched(dst, "no certificates");
}

#[test]
fn the_destination_refuses_a_certificate_from_another_ca() {
    let pki = pki();
    let (listener, address) = listen();
    let dst = destination(config_of(&pki.ca, &pki.server), listener);
    let other_ca = Authority::new("another CA").unwrap();
    let stranger = other_ca.client("stranger").unwrap();
    // The stranger trusts our destination; its own certificate is the other CA's.
    let config = TlsConfig::from_pem(&pki.ca.cert_pem, &stranger.cert_pem, &stranger.key_pem)
        .unwrap()
        .client_config()
        .unwrap();
    let tcp = TcpStream::connect(&address).unwrap();
    let err = tls::connect(&config, "localhost", tcp, TIMEOUT).unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert_refused_untouched(dst, "UnknownIssuer");

    // And one that ignores the refusal and pushes a page anyway.
    let (listener, address) = listen();
    let dst = destination(config_of(&pki.ca, &pki.server), listener);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&pki.ca))
        .with_client_auth_cert(
            vec![
                rustls::pki_types::pem::PemObject::from_pem_slice(stranger.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls::pki_types::pem::PemObject::from_pem_slice(stranger.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    tls_client_pushing_a_page(config, &address);
    assert_refused_untouched(dst, "UnknownIssuer");
}

#[test]
fn the_destination_refuses_a_plaintext_source() {
    let pki = pki();
    let (listener, address) = listen();
    let dst = destination(config_of(&pki.ca, &pki.server), listener);
    let tcp = TcpStream::connect(&address).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    push_a_page(tcp);
    assert_refused_untouched(dst, "corrupt message");
}

/// The source's handshake against a destination with `server`'s certificate, checked for
/// `name`: the source's error, and the destination's.
fn source_against(server: TlsConfig, client: TlsConfig, name: &str) -> (TlsError, String) {
    let (listener, address) = listen();
    let dst = destination(server, listener);
    let tcp = TcpStream::connect(&address).unwrap();
    let err = tls::connect(&client.client_config().unwrap(), name, tcp, TIMEOUT).unwrap_err();
    let (result, untouched) = dst.join().unwrap();
    assert!(untouched);
    (err, result.unwrap_err())
}

#[test]
fn the_source_refuses_a_destination_with_another_name() {
    let pki = pki();
    let (err, dst_err) = source_against(
        config_of(&pki.ca, &pki.server),
        config_of(&pki.ca, &pki.client),
        "migration-target.example",
    );
    let text = err.to_string();
    assert!(text.contains("not valid for name"), "{text}");
    assert!(dst_err.contains("BadCertificate"), "{dst_err}");
}

#[test]
fn the_source_refuses_a_destination_from_another_ca() {
    let pki = pki();
    let other_ca = Authority::new("another CA").unwrap();
    let impostor = other_ca.server(&["localhost".into()]).unwrap();
    // The impostor would take our source; its own certificate is the other CA's.
    let server =
        TlsConfig::from_pem(&pki.ca.cert_pem, &impostor.cert_pem, &impostor.key_pem).unwrap();
    let (err, _) = source_against(server, config_of(&pki.ca, &pki.client), "localhost");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[test]
fn a_silent_peer_times_out_in_the_handshake() {
    let pki = pki();
    let (listener, address) = listen();
    let _silent = TcpStream::connect(&address).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let server = config_of(&pki.ca, &pki.server).server_config().unwrap();
    let err = tls::accept(&server, tcp, Duration::from_millis(200)).unwrap_err();
    assert!(
        matches!(&err, TlsError::Handshake { cause, .. }
            if matches!(cause.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
        "{err}"
    );
}

#[test]
fn bad_pem_files_are_named_in_the_error() {
    let pki = pki();
    let err = TlsConfig::from_pem(&pki.ca.cert_pem, "not a certificate", &pki.client.key_pem)
        .unwrap_err();
    assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    let err = TlsConfig::from_pem_files(
        std::path::Path::new("/nonexistent/ca.pem"),
        std::path::Path::new("/nonexistent/c.pem"),
        std::path::Path::new("/nonexistent/k.pem"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    // A key that is not the certificate's.
    let err = TlsConfig::from_pem(&pki.ca.cert_pem, &pki.client.cert_pem, &pki.server.key_pem)
        .unwrap()
        .client_config()
        .unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err}");
}

/// A Pages frame of several runs, larger than the chunks the writer copies through,
/// crosses a TLS session intact into the destination's guest memory, and the session is
/// TLS 1.3 on AES-128-GCM (the fastest of TLS 1.3's suites with AES instructions).
#[test]
fn pages_frames_cross_a_tls_session_intact_on_aes_128_gcm() {
    use dmalog_migrate::stream::{FRAME_HEADER_BYTES, PAGES_HEAD_BYTES};
    let pki = pki();
    let (listener, address) = listen();
    let server = config_of(&pki.ca, &pki.server).server_config().unwrap();
    // Runs of 17, 1 and 40 pages: 232 KiB, several 64 KiB chunks, a run across two.
    let runs: [(u64, u32); 3] = [(0, 17), (40 * 4096, 1), (100 * 4096, 40)];
    let source = memfd_guest_untracked(&LAYOUT).unwrap();
    let mut pattern = vec![0u8; 200 * 4096];
    for (i, byte) in pattern.iter_mut().enumerate() {
        *byte = (i * 7 + i / 4096) as u8;
    }
    assert!(source.write_at(0, &pattern));
    let dst = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let stream = tls::accept(&server, tcp, TIMEOUT).unwrap();
        let negotiated = stream.negotiated();
        let mut input = FrameReader::new(stream).with_timeout(TIMEOUT);
        let memory = memfd_guest_untracked(&LAYOUT).unwrap();
        let (frame, data_bytes) = input.read_deferred().unwrap();
        assert_eq!(frame.kind, Kind::Pages);
        let pieces: Vec<_> = runs
            .iter()
            .map(|&(gpa, n)| memory.piece_mut(gpa, n as usize * 4096).unwrap())
            .collect();
        assert_eq!(data_bytes, pieces.iter().map(|p| p.len()).sum::<usize>());
        input.read_pages_data(&pieces).unwrap();
        let mut got = vec![0u8; 200 * 4096];
        assert!(memory.read_at(0, &mut got));
        (negotiated, got)
    });
    let client = config_of(&pki.ca, &pki.client).client_config().unwrap();
    let tcp = TcpStream::connect(&address).unwrap();
    let stream = tls::connect(&client, "localhost", tcp, TIMEOUT).unwrap();
    let negotiated = stream.negotiated();
    let mut out = FrameWriter::new(stream, None).with_timeout(TIMEOUT);
    let mut table = vec![0u8; FRAME_HEADER_BYTES];
    table.extend_from_slice(&pages_payload(&runs.map(|(gpa, n)| (gpa, n, 0)), &[]));
    assert_eq!(table.len(), FRAME_HEADER_BYTES + PAGES_HEAD_BYTES + 3 * 16);
    let pieces: Vec<_> = runs
        .iter()
        .map(|&(gpa, n)| source.piece(gpa, n as usize * 4096).unwrap())
        .collect();
    out.write_pages(&mut table, &pieces, &mut Vec::new())
        .unwrap();
    out.flush().unwrap();
    let (dst_negotiated, got) = dst.join().unwrap();
    let expected = Some((
        rustls::ProtocolVersion::TLSv1_3,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    ));
    assert_eq!(negotiated, expected);
    assert_eq!(dst_negotiated, expected);
    let mut want = vec![0u8; 200 * 4096];
    for &(gpa, n) in &runs {
        let range = gpa as usize..gpa as usize + n as usize * 4096;
        want[range.clone()].copy_from_slice(&pattern[range]);
    }
    assert!(got == want, "the pages arrived as they were sent");
}

/// A connection that stalls its TLS handshake (TCP only, not a byte sent: anyone who can
/// reach the port can open one) does not keep a real channel out: the destination's
/// acceptor secures connections side by side, so the channel that connected after the
/// stalled one is handed out first. (A serial acceptor would spend the stalled
/// handshake's whole timeout first, and then refuse it.) Dropping the acceptor closes the
/// port.
#[test]
fn a_stalled_handshake_does_not_hold_up_the_channel_behind_it() {
    use dmalog_migrate::scenario::transport::acceptor;
    use dmalog_migrate::scenario::ServerSide;

    let pki = pki();
    let (listener, address) = listen();
    let server = ServerSide::tls(&config_of(&pki.ca, &pki.server)).unwrap();
    let mut accept = acceptor(listener, &server, TIMEOUT);
    let stalled = TcpStream::connect(&address).unwrap();
    let client = config_of(&pki.ca, &pki.client).client_config().unwrap();
    let to = address.clone();
    let channel = std::thread::spawn(move || {
        let tcp = TcpStream::connect(&to).unwrap();
        let stream = tls::connect(&client, "localhost", tcp, TIMEOUT).unwrap();
        let mut out = FrameWriter::new(stream, None);
        out.write(Kind::Join, &[&[7u8; 12]]).unwrap();
        out.flush().unwrap();
        out
    });
    let first = accept().expect("the real channel, not the stalled handshake");
    let said = FrameReader::new(first.reader).read().unwrap();
    assert_eq!((said.kind, said.payload), (Kind::Join, vec![7u8; 12]));
    let _stream = channel.join().unwrap();

    drop(accept);
    let refused = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        TcpStream::connect(&address).is_err()
    });
    assert!(refused, "the port is closed once the acceptor is dropped");
    drop(stalled);
}

/// A flood of connections the migration does not take (plaintext: nothing slows them)
/// costs the destination a bounded number of fds: past MAX_PENDING_HANDSHAKES waiting to
/// be taken, the acceptor closes each new one at once.
#[test]
fn a_flood_of_connections_is_held_to_the_pending_bound() {
    use dmalog_migrate::scenario::transport::{acceptor, MAX_PENDING_HANDSHAKES};
    use dmalog_migrate::scenario::ServerSide;

    let (listener, address) = listen();
    let mut accept = acceptor(listener, &ServerSide::Plaintext, TIMEOUT);
    let flood = 3 * MAX_PENDING_HANDSHAKES;
    let mut clients: Vec<TcpStream> = (0..flood)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    // Takes one (starts the listening; the acceptor hands out a connection once its first
    // frame came), then leaves the rest waiting.
    let mut join = FrameWriter::new(&clients[0], None);
    join.write(Kind::Join, &[&[7u8; 12]]).unwrap();
    join.flush().unwrap();
    let _first = accept().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut closed = vec![false; flood];
    while closed.iter().filter(|&&c| c).count() < flood - MAX_PENDING_HANDSHAKES - 1
        && std::time::Instant::now() < deadline
    {
        for (client, closed) in clients.iter_mut().zip(closed.iter_mut()) {
            if *closed {
                continue;
            }
            client
                .set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            let mut byte = [0u8; 1];
            *closed = matches!(client.read(&mut byte), Ok(0))
                || matches!(client.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        }
    }
    let closed_count = closed.iter().filter(|&&c| c).count();
    assert!(
        closed_count >= flood - MAX_PENDING_HANDSHAKES - 1,
        "{closed_count} of {flood} closed: more than the bound were kept"
    );
}
