//! Several channels (connections) for one migration, over loopback TCP: a migration on
//! three channels verifies with vCPUs writing; a destination refuses a connection of
//! another session and, once its channels have joined, any further connection; and a page
//! sent again on another channel in a later round is never overwritten by its older copy
//! (the per-round Sync barrier).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use common::{
    accept_channel, config, destination_on_loopback, source_guest, start_vcpus, DestinationThread,
    FakeDevice, Vcpus, LAYOUT,
};
use dmalog_migrate::fuzzing::LoadingDevice;
use dmalog_migrate::stream::{hello_payload, pages_payload, FrameReader, FrameWriter, Kind};
use dmalog_migrate::{migrate_source_channels, GuestPages, SourceVm};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A destination on a fresh listener, on its own thread; the listener is dropped (no
/// longer listening) once every channel has joined.
fn destination<D: dmalog::MigrationDevice + Send + 'static>(
    device: D,
) -> (String, DestinationThread<D>) {
    destination_on_loopback(&LAYOUT, TIMEOUT, device, |listener| {
        move || accept_channel(&listener)
    })
}

fn connect(address: &str) -> FrameWriter<TcpStream> {
    let tcp = TcpStream::connect(address).unwrap();
    tcp.set_nodelay(true).unwrap();
    FrameWriter::new(tcp, None).with_timeout(TIMEOUT)
}

#[test]
fn a_migration_on_three_channels_verifies_with_vcpus_writing() {
    let (device, _) = FakeDevice::new(Vec::new());
    let (address, destination) = destination(device);
    let (memory, regions) = source_guest(&LAYOUT);
    // Data everywhere (zero pages would make every channel's share nearly free).
    for &(gpa, size) in &LAYOUT {
        let pattern: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        assert!(memory.write_at(gpa, &pattern));
    }
    let (mut device, _) = FakeDevice::new(vec![9u8; 3000]);
    let Vcpus {
        mut cpu,
        workload: vcpus,
        ..
    } = start_vcpus((&memory, &regions), (0, 4 << 20), 20 << 20, 5);
    let mut out = connect(&address);
    let mut replies = FrameReader::new(out.get_mut().try_clone().unwrap()).with_timeout(TIMEOUT);
    let mut connect_extra = |_| Ok(connect(&address));
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: Some(&vcpus),
    };
    let report = migrate_source_channels(
        &config(),
        vm,
        &mut out,
        3,
        &mut connect_extra,
        &mut replies,
        |_| {},
    )
    .unwrap();
    assert!(report.verified, "{report:?}");
    assert!(report.rounds.len() >= 2);
    let (dst, _, _) = destination.join().unwrap();
    let dst = dst.unwrap();
    assert!(dst.verified);
    assert_eq!(dst.channels, 3);
    let sent: u64 = report.rounds.iter().map(|r| r.pages_sent).sum();
    assert_eq!(dst.pages, sent, "every page sent on any channel arrived");
    // The bytes of every channel are counted.
    let guest_bytes = memory.total_bytes();
    assert!(
        report.bytes_sent > guest_bytes,
        "{} bytes",
        report.bytes_sent
    );
}

/// Reads the refusal a destination sends on a connection it does not take.
fn refusal(tcp: TcpStream) -> String {
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let frame = FrameReader::new(tcp).read().unwrap();
    assert_eq!(frame.kind, Kind::Abort);
    String::from_utf8(frame.payload).unwrap()
}

const SESSION: u64 = 0x1234_5678;

fn join(address: &str, session: u64, index: u32) -> FrameWriter<TcpStream> {
    let mut channel = connect(address);
    channel
        .write(Kind::Join, &[&session.to_le_bytes(), &index.to_le_bytes()])
        .unwrap();
    channel.flush().unwrap();
    channel
}

fn sync(channel: &mut FrameWriter<TcpStream>, round: u32) {
    channel.write(Kind::Sync, &[&round.to_le_bytes()]).unwrap();
    channel.flush().unwrap();
}

fn page(channel: &mut FrameWriter<TcpStream>, gpa: u64, fill: u8) {
    channel
        .write(
            Kind::Pages,
            &[&pages_payload(&[(gpa, 1, 0)], &[fill; 4096])],
        )
        .unwrap();
    channel.flush().unwrap();
}

/// Ends a hand-written two-channel migration: End on both, the Ready read, Go, the
/// Resumed read, Verified.
fn finish(main: &mut FrameWriter<TcpStream>, other: &mut FrameWriter<TcpStream>) {
    other.write(Kind::End, &[]).unwrap();
    other.flush().unwrap();
    main.write(Kind::End, &[]).unwrap();
    main.flush().unwrap();
    let mut replies = FrameReader::new(main.get_mut().try_clone().unwrap()).with_timeout(TIMEOUT);
    assert_eq!(replies.read().unwrap().kind, Kind::Ready);
    main.write(Kind::Go, &[]).unwrap();
    main.flush().unwrap();
    assert_eq!(replies.read().unwrap().kind, Kind::Resumed);
}

#[test]
fn a_two_channel_destination_refuses_other_sessions_and_a_third_connection() {
    let (address, destination) = destination(LoadingDevice::default());
    let mut main = connect(&address);
    main.write(Kind::Hello, &[&hello_payload(4096, SESSION, 2, &LAYOUT)])
        .unwrap();
    main.flush().unwrap();
    // Another migration's channel, then one that opens with something else: refused.
    let stranger = join(&address, SESSION + 1, 1);
    assert!(refusal(stranger.into_inner_for_test()).contains("another migration"));
    let mut rude = connect(&address);
    sync(&mut rude, 0);
    assert!(refusal(rude.into_inner_for_test()).contains("did not open with a Join"));
    // The real channel 1.
    let mut second = join(&address, SESSION, 1);
    page(&mut second, 0, 1);
    sync(&mut main, 0);
    sync(&mut second, 0);
    finish(&mut main, &mut second);
    // Every channel joined long ago: a third connection is refused by the kernel (the
    // destination no longer listens), while the migration is still open.
    let third = TcpStream::connect(&address);
    assert!(
        third
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{third:?}"
    );
    main.write(Kind::Verified, &[&[1]]).unwrap();
    main.flush().unwrap();
    let (report, memory, _) = destination.join().unwrap();
    let report = report.unwrap();
    assert!(report.verified);
    assert_eq!(report.channels, 2);
    let mut first = [0u8; 4];
    memory.read_at(0, &mut first);
    assert_eq!(first, [1; 4], "channel 1's page arrived");
}

/// Round 0 sends page P on channel 1, round 1 sends it again (newer bytes) on channel 0;
/// channel 1 is slow, so its old copy reaches the destination after the new one. The
/// destination holds round 1's pages until every channel's round-0 marker: P ends new.
#[test]
fn an_old_copy_on_a_slow_channel_never_overwrites_a_newer_one() {
    let (address, destination) = destination(LoadingDevice::default());
    let mut main = connect(&address);
    main.write(Kind::Hello, &[&hello_payload(4096, SESSION, 2, &LAYOUT)])
        .unwrap();
    main.flush().unwrap();
    let mut slow = join(&address, SESSION, 1);
    const P: u64 = 8 * 4096;
    // Channel 0: round 0 (nothing), round 1 (P, new).
    sync(&mut main, 0);
    page(&mut main, P, 0xbb);
    sync(&mut main, 1);
    // Give a destination without the barrier every chance to apply the new copy first.
    std::thread::sleep(Duration::from_millis(100));
    // Channel 1: round 0 (P, old), round 1 (nothing).
    page(&mut slow, P, 0xaa);
    sync(&mut slow, 0);
    sync(&mut slow, 1);
    finish(&mut main, &mut slow);
    main.write(Kind::Verified, &[&[1]]).unwrap();
    main.flush().unwrap();
    let (report, memory, _) = destination.join().unwrap();
    report.unwrap();
    let mut p = [0u8; 4096];
    memory.read_at(P, &mut p);
    assert!(
        p.iter().all(|&b| b == 0xbb),
        "page P is {:#x}, the old copy",
        p[0]
    );
}

/// A channel that fails (a malformed frame) ends the whole migration at once with its
/// error, even while the main channel waits at a round marker.
#[test]
fn a_failing_channel_fails_the_migration_with_its_reason() {
    let (address, destination) = destination(LoadingDevice::default());
    let mut main = connect(&address);
    main.write(Kind::Hello, &[&hello_payload(4096, SESSION, 2, &LAYOUT)])
        .unwrap();
    main.flush().unwrap();
    let mut second = join(&address, SESSION, 1);
    sync(&mut main, 0);
    // Unaligned: refused.
    second
        .write(Kind::Pages, &[&pages_payload(&[(1, 1, 0)], &[0; 4096])])
        .unwrap();
    second.flush().unwrap();
    let (report, _, _) = destination.join().unwrap();
    let err = report.unwrap_err();
    assert!(err.to_string().contains("page-aligned"), "{err}");
    // The source is told on the main channel.
    let mut reason = Vec::new();
    let _ = main.get_mut().read_to_end(&mut reason);
    assert!(String::from_utf8_lossy(&reason).contains("page-aligned"));
}

trait IntoInner {
    fn into_inner_for_test(self) -> TcpStream;
}

impl IntoInner for FrameWriter<TcpStream> {
    fn into_inner_for_test(mut self) -> TcpStream {
        self.get_mut().try_clone().unwrap()
    }
}
