//! A hostile source (or a third party on the destination's port) against stream version 2:
//! run tables, zero runs, Sync and Join frames and several channels. Every number in a
//! frame gets its worst value; each test asserts the specific error, that nothing was
//! applied that should not be, and that the destination ends (a generous hang guard, never
//! a timed assertion on speed).

mod common;

use common::{accept_channel, destination_on_loopback, DestinationThread};

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmalog::uapi::DeviceState;
use dmalog_migrate::fuzzing::{raw_frame, LoadingDevice};
use dmalog_migrate::scenario::ServerSide;
use dmalog_migrate::stream::{
    hello_payload, pages_payload, FrameReader, FrameWriter, Kind, StreamError, RUN_ZERO,
};
use dmalog_migrate::{
    memfd_guest_untracked, migrate_destination, migrate_destination_channels, DestinationReport,
    GuestPages, Incoming, LoggedGuestMemory, MigrateError,
};

/// Two regions with a hole between them.
const LAYOUT: [(u64, u64); 2] = [(0, 1 << 20), (1 << 32, 1 << 20)];
const SESSION: u64 = 0x5e55_10f2;
/// Generous: only a hang guard (a test that hits it has failed anyway).
const HANG_GUARD: Duration = Duration::from_secs(8);
/// A destination timeout well inside the hang guard.
const SHORT_TIMEOUT: Duration = Duration::from_secs(1);

fn refused_why(result: &Result<DestinationReport, MigrateError>) -> &'static str {
    match result {
        Err(MigrateError::Stream(StreamError::Refused { why, .. })) => why,
        other => panic!("expected a refused frame, got {other:?}"),
    }
}

fn read_page(memory: &LoggedGuestMemory, gpa: u64) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    assert!(memory.read_at(gpa, &mut page));
    page
}

// ---------------------------------------------------------------------------------------
// One channel, in memory: the run table and zero runs.

/// The destination on `layout` fed a good Hello (one channel), then `stream`.
fn one_channel(
    layout: &[(u64, u64)],
    stream: &[u8],
) -> (Result<DestinationReport, MigrateError>, LoggedGuestMemory) {
    let memory = memfd_guest_untracked(layout).unwrap();
    let mut bytes = raw_frame(Kind::Hello as u8, &hello_payload(4096, SESSION, 1, layout));
    bytes.extend_from_slice(stream);
    let mut device = LoadingDevice::default();
    let mut replies = FrameWriter::new(Vec::new(), None);
    let result = migrate_destination(
        &memory,
        &mut device,
        &mut |_, _| Ok(()),
        &mut FrameReader::new(&bytes[..]),
        &mut replies,
    );
    assert_ne!(
        device.state,
        DeviceState::Running,
        "resumed on a bad stream"
    );
    (result, memory)
}

fn pages(runs: &[(u64, u32, u32)], data: &[u8]) -> Vec<u8> {
    raw_frame(Kind::Pages as u8, &pages_payload(runs, data))
}

/// Overlapping runs in one frame are applied in table order (the source may write any
/// bytes anyway: nothing outside guest memory, no panic); a run that spans two adjacent
/// regions is refused whole, as the sender never builds one (its runs stay in a region).
#[test]
fn overlapping_runs_apply_in_order_and_a_run_across_two_regions_is_refused() {
    let data = [vec![1u8; 2 * 4096], vec![2u8; 4096]].concat();
    let stream = [
        pages(&[(0, 2, 0), (4096, 1, 0), (0, 1, RUN_ZERO)], &data),
        raw_frame(Kind::Sync as u8, &0u32.to_le_bytes()),
    ]
    .concat();
    let (result, memory) = one_channel(&LAYOUT, &stream);
    // The stream ends before End: an error, after the frames were applied.
    assert!(
        matches!(
            result,
            Err(MigrateError::Stream(StreamError::PeerClosed { .. }))
        ),
        "{result:?}"
    );
    assert!(read_page(&memory, 0).iter().all(|&b| b == 0), "zeroed last");
    assert!(
        read_page(&memory, 4096).iter().all(|&b| b == 2),
        "second copy"
    );

    let adjacent = [(0u64, 64 << 10), (64 << 10, 64 << 10)];
    let across = (60 << 10, 2u32);
    for flags in [0, RUN_ZERO] {
        let bytes = if flags == 0 {
            vec![7u8; 8192]
        } else {
            Vec::new()
        };
        // A good run first: nothing of the frame is written.
        let data = [vec![9u8; 4096], bytes].concat();
        let (result, memory) = one_channel(
            &adjacent,
            &pages(&[(0, 1, 0), (across.0, across.1, flags)], &data),
        );
        assert_eq!(refused_why(&result), "pages outside guest memory");
        assert!(
            read_page(&memory, 0).iter().all(|&b| b == 0),
            "no partial write"
        );
    }
}

/// Zero runs cost the attacker 16 bytes each: their page count is bounded per frame
/// (summed over every run), each is checked against guest memory before any page of the
/// frame is touched, and the huge values are refused, not clamped.
#[test]
fn zero_runs_are_bounded_and_checked_before_anything_is_zeroed() {
    let region1 = LAYOUT[1].0;
    let written = pages(&[(0, 1, 0)], &[5u8; 4096]);
    for (runs, why) in [
        // In the hole between the regions.
        (
            vec![(0u64, 1u32, RUN_ZERO), (2 << 30, 1, RUN_ZERO)],
            "pages outside guest memory",
        ),
        // Past the end of region 1, and off the end of region 0 into the hole.
        (
            vec![(0, 1, RUN_ZERO), (region1 + (1 << 20), 1, RUN_ZERO)],
            "pages outside guest memory",
        ),
        (
            vec![(0, 1, RUN_ZERO), ((1 << 20) - 4096, 2, RUN_ZERO)],
            "pages outside guest memory",
        ),
        // The largest count: refused, and it would wrap at the top of the address space.
        (
            vec![(0, u32::MAX, RUN_ZERO)],
            "too many zero pages in one frame",
        ),
        (vec![(!0xfff, u32::MAX, RUN_ZERO)], "wraps"),
        // Many runs each under the limit, summed over it.
        (
            vec![(0, 129, RUN_ZERO); 512],
            "too many zero pages in one frame",
        ),
    ] {
        let (result, memory) = one_channel(&LAYOUT, &[written.clone(), pages(&runs, &[])].concat());
        let got = refused_why(&result);
        assert!(got.contains(why), "{:?}: {got}", runs[runs.len() - 1]);
        assert!(
            read_page(&memory, 0).iter().all(|&b| b == 5),
            "page 0 not zeroed"
        );
    }
}

/// A run table whose page count disagrees with the payload, either way, and a data run
/// hidden after zero runs that claim the bytes belong to nobody.
#[test]
fn the_run_table_must_account_for_every_payload_byte() {
    for (runs, data_len) in [
        (vec![(0u64, 1u32, 0u32), (8192, 1, RUN_ZERO)], 4096 + 1),
        (vec![(0, 1, 0), (8192, 2, 0)], 2 * 4096),
        (vec![(0, 1, RUN_ZERO), (8192, 1, RUN_ZERO)], 4096),
    ] {
        let (result, memory) = one_channel(&LAYOUT, &pages(&runs, &vec![3u8; data_len]));
        assert_eq!(
            refused_why(&result),
            "data length differs from the page count"
        );
        assert!(read_page(&memory, 0).iter().all(|&b| b == 0));
    }
}

// ---------------------------------------------------------------------------------------
// Several channels, over loopback TCP.

type Outcome = (
    Result<DestinationReport, MigrateError>,
    LoggedGuestMemory,
    DeviceState,
);

/// A destination on a fresh listener, on its own thread; every frame must arrive within
/// `timeout`. `accept` wraps the listener's accept (a test injects failures there).
fn destination(
    timeout: Duration,
    mut accept: impl FnMut(&TcpListener) -> std::io::Result<Incoming> + Send + 'static,
) -> (String, DestinationThread<LoadingDevice>) {
    destination_on_loopback(
        &LAYOUT,
        timeout,
        LoadingDevice::default(),
        move |listener| move || accept(&listener),
    )
}

/// Waits for the destination, failing the test (not hanging) past the hang guard.
fn outcome(thread: DestinationThread<LoadingDevice>) -> Outcome {
    let start = Instant::now();
    while !thread.is_finished() {
        assert!(start.elapsed() < HANG_GUARD, "the destination hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (result, memory, device) = thread.join().unwrap();
    (result, memory, device.state)
}

struct Peer(FrameWriter<TcpStream>);

impl Peer {
    fn connect(address: &str) -> Peer {
        let tcp = TcpStream::connect(address).unwrap();
        tcp.set_nodelay(true).unwrap();
        Peer(FrameWriter::new(tcp, None).with_timeout(HANG_GUARD))
    }
    fn main(address: &str, channels: u32) -> Peer {
        let mut peer = Peer::connect(address);
        peer.send(
            Kind::Hello,
            &hello_payload(4096, SESSION, channels, &LAYOUT),
        );
        peer
    }
    fn join(address: &str, session: u64, index: u32) -> Peer {
        let mut peer = Peer::connect(address);
        peer.send(
            Kind::Join,
            &[session.to_le_bytes().as_slice(), &index.to_le_bytes()].concat(),
        );
        peer
    }
    /// Best effort: the destination may have closed the connection already.
    fn try_send(&mut self, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
        self.0.write(kind, &[payload])?;
        self.0.flush()
    }
    fn send(&mut self, kind: Kind, payload: &[u8]) {
        self.try_send(kind, payload).unwrap();
    }
    fn page(&mut self, gpa: u64, fill: u8) {
        self.send(Kind::Pages, &pages_payload(&[(gpa, 1, 0)], &[fill; 4096]));
    }
    fn sync(&mut self, round: u32) {
        self.send(Kind::Sync, &round.to_le_bytes());
    }
    /// The frame the destination sends next on this connection.
    fn reply(&mut self) -> dmalog_migrate::stream::Frame {
        let tcp = self.0.get_mut().try_clone().unwrap();
        tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
        FrameReader::new(tcp).read().unwrap()
    }
    fn stream(&mut self) -> TcpStream {
        self.0.get_mut().try_clone().unwrap()
    }
}

/// A good two-channel ending: End on both, Ready, Go, Resumed, Verified.
fn finish(main: &mut Peer, other: &mut Peer) {
    other.send(Kind::End, &[]);
    main.send(Kind::End, &[]);
    assert_eq!(main.reply().kind, Kind::Ready);
    main.send(Kind::Go, &[]);
    assert_eq!(main.reply().kind, Kind::Resumed);
    main.send(Kind::Verified, &[1]);
}

/// A page on the second channel, a round, the ending: the destination `dst` applied it on
/// both channels and runs the device.
fn migrate_on_two_channels(
    dst: DestinationThread<LoadingDevice>,
    main: &mut Peer,
    second: &mut Peer,
) {
    second.page(0, 0x11);
    main.sync(0);
    second.sync(0);
    finish(main, second);
    let (result, memory, state) = outcome(dst);
    let report = result.unwrap();
    assert_eq!((report.channels, state), (2, DeviceState::Running));
    assert!(read_page(&memory, 0).iter().all(|&b| b == 0x11));
}

/// Connections that fail before they are channels (a TLS handshake without a valid
/// certificate, a port scanner) are refused one by one: however many come (more than the
/// old bound of 8 here), the migration waits for its real channel; it fails only when its
/// channels have not all joined by the deadline, saying so.
#[test]
fn connections_that_fail_their_handshake_do_not_end_the_migration() {
    let failures = Arc::new(AtomicU32::new(16));
    let left = Arc::clone(&failures);
    let (address, dst) = destination(HANG_GUARD, move |listener| {
        let incoming = accept_channel(listener)?;
        if left.load(Ordering::SeqCst) > 0 {
            left.fetch_sub(1, Ordering::SeqCst);
            // As the CLI's acceptor reports a failed handshake.
            return Err(std::io::Error::other(
                "TLS handshake: no client certificate",
            ));
        }
        Ok(incoming)
    });
    let mut main = Peer::main(&address, 2);
    let strangers: Vec<_> = (0..16)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    let mut second = Peer::join(&address, SESSION, 1);
    migrate_on_two_channels(dst, &mut main, &mut second);
    assert_eq!(failures.load(Ordering::SeqCst), 0, "all 16 were refused");
    drop(strangers);

    // Strangers only, through the CLI's acceptor: the channel never joins, and the wait
    // ends at the deadline with a clear error (the device never touched).
    let timeout = Duration::from_millis(300);
    let (address, dst) = destination_on_loopback(
        &LAYOUT,
        timeout,
        LoadingDevice::default(),
        move |listener| {
            dmalog_migrate::scenario::transport::acceptor(listener, &ServerSide::Plaintext, timeout)
        },
    );
    let _main = Peer::main(&address, 2);
    let strangers: Vec<_> = (0..16)
        .filter_map(|_| TcpStream::connect(&address).ok())
        .collect();
    let (result, _, state) = outcome(dst);
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("did not all join within 300 ms") || err.contains("waiting for channel 1"),
        "{err}"
    );
    assert_eq!(state, DeviceState::Running, "the device was never touched");
    drop(strangers);

    // No connection in time at all (the acceptor's own timeout): the wait ends at once.
    let (address, dst) = destination(HANG_GUARD, |_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no connection within 10 ms",
        ))
    });
    let _main = Peer::main(&address, 3);
    let err = outcome(dst).0.unwrap_err();
    assert!(err.to_string().contains("waiting for channel 1"), "{err}");
}

/// The reason in the Abort a destination sends on a connection it refuses.
fn refusal(peer: &mut Peer) -> String {
    let frame = peer.reply();
    assert_eq!(frame.kind, Kind::Abort);
    String::from_utf8(frame.payload).unwrap()
}

/// Joins with index 0, an index past the channel count, a malformed payload, a guessed
/// session, another kind first, and a second Join of a taken index: each refused with its
/// reason, and the migration goes on with its real channels.
#[test]
fn joins_that_are_not_this_migrations_channels_are_refused() {
    let (address, dst) = destination(HANG_GUARD, accept_channel);
    let mut main = Peer::main(&address, 3);
    for (session, index, why) in [
        (SESSION, 0u32, "a channel this migration does not have"),
        (SESSION, 3, "a channel this migration does not have"),
        (SESSION, u32::MAX, "a channel this migration does not have"),
        (SESSION ^ 1, 1, "another migration"),
    ] {
        let mut stranger = Peer::join(&address, session, index);
        let got = refusal(&mut stranger);
        assert!(got.contains(why), "{session:#x} {index}: {got}");
    }
    for (kind, payload, why) in [
        (Kind::Join, vec![0u8; 11], "malformed"),
        (
            Kind::Join,
            [SESSION.to_le_bytes().as_slice(), &[1, 0, 0, 0, 0]].concat(),
            "no valid frame",
        ),
        (
            Kind::Hello,
            hello_payload(4096, SESSION, 3, &LAYOUT),
            "did not open with a Join",
        ),
    ] {
        let mut stranger = Peer::connect(&address);
        // Raw: the writer refuses a Join over its limit.
        stranger
            .stream()
            .write_all(&raw_frame(kind as u8, &payload))
            .unwrap();
        let got = refusal(&mut stranger);
        assert!(got.contains(why), "{kind:?}: {got}");
    }
    let mut first = Peer::join(&address, SESSION, 1);
    let mut again = Peer::join(&address, SESSION, 1);
    assert!(refusal(&mut again).contains("already joined"));
    let mut second = Peer::join(&address, SESSION, 2);
    first.page(0, 1);
    second.page(4096, 2);
    for peer in [&mut main, &mut first, &mut second] {
        peer.sync(0);
    }
    first.send(Kind::End, &[]);
    finish(&mut main, &mut second);
    let (result, memory, _) = outcome(dst);
    assert_eq!(result.unwrap().channels, 3);
    assert!(read_page(&memory, 0).iter().all(|&b| b == 1));
    assert!(read_page(&memory, 4096).iter().all(|&b| b == 2));

    // Guessing the session costs a connection each and ends nothing: after 12 wrong
    // guesses (more than the old bound of 8) the real channel joins and the migration ends
    // well.
    let (address, dst) = destination(HANG_GUARD, accept_channel);
    let mut main = Peer::main(&address, 2);
    for guess in 1..=12 {
        let mut stranger = Peer::join(&address, SESSION ^ guess, 1);
        assert!(refusal(&mut stranger).contains("another migration"));
    }
    let mut second = Peer::join(&address, SESSION, 1);
    second.page(0, 3);
    main.sync(0);
    second.sync(0);
    finish(&mut main, &mut second);
    let (result, memory, _) = outcome(dst);
    assert_eq!(result.unwrap().channels, 2);
    assert!(read_page(&memory, 0).iter().all(|&b| b == 3));
}

/// The destination's listening from the start (as `migrate destination` runs it): a
/// stranger's garbage first, then a further channel whose Join comes before its main
/// connection's Hello (the source opens channels right after sending the Hello, and the
/// destination reads first frames side by side): the garbage is dropped, the Join is kept
/// for the main connection, and the migration completes on both channels.
#[test]
fn a_channel_that_joins_before_its_main_connection_is_kept_for_it() {
    use dmalog_migrate::scenario::transport::Listening;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let dst = std::thread::spawn(move || {
        let memory = memfd_guest_untracked(&LAYOUT).unwrap();
        let mut listening = Listening::start(listener, &ServerSide::Plaintext, HANG_GUARD).unwrap();
        let (reader, link) = listening.main_connection().unwrap();
        let mut device = LoadingDevice::default();
        let result = migrate_destination_channels(
            &memory,
            &mut device,
            &mut |_, _| Ok(()),
            &mut FrameReader::new(reader).with_timeout(HANG_GUARD),
            &mut FrameWriter::new(link, None).with_timeout(HANG_GUARD),
            listening.into_acceptor(),
        );
        (result, memory, device)
    });
    let mut garbage = TcpStream::connect(&address).unwrap();
    garbage
        .write_all(b"\x16\x03\x01 not a frame at all")
        .unwrap();
    let mut second = Peer::join(&address, SESSION, 1);
    let mut main = Peer::main(&address, 2);
    migrate_on_two_channels(dst, &mut main, &mut second);
}

/// The Hello's channel count at its extremes, and a Join where the Hello belongs.
#[test]
fn the_hello_channel_count_and_a_join_before_the_hello() {
    for channels in [0, 17, u32::MAX] {
        let memory = memfd_guest_untracked(&LAYOUT).unwrap();
        let hello = raw_frame(
            Kind::Hello as u8,
            &hello_payload(4096, SESSION, channels, &LAYOUT),
        );
        let mut device = LoadingDevice::default();
        let result = migrate_destination_channels(
            &memory,
            &mut device,
            &mut |_, _| Ok(()),
            &mut FrameReader::new(&hello[..]),
            &mut FrameWriter::new(Vec::new(), None),
            || panic!("no channel is accepted for a refused Hello"),
        );
        assert_eq!(
            refused_why(&result),
            "channel count out of range",
            "{channels}"
        );
        assert_eq!(device.state, DeviceState::Running, "untouched");
    }
    let (address, dst) = destination(HANG_GUARD, accept_channel);
    let _join = Peer::join(&address, SESSION, 1);
    let err = outcome(dst).0.unwrap_err();
    assert!(
        err.to_string().contains("expected Hello, got Join"),
        "{err}"
    );
}

/// A further channel that stalls (joined, then silent) while the main one waits at the
/// round marker, the main one stalling while a further one waits, and a further channel
/// silent after the main one's End: each fails within the timeout, not resumed.
#[test]
fn a_stalled_channel_fails_the_migration_within_the_timeout() {
    let timeout = Duration::from_millis(500);
    assert!(timeout < SHORT_TIMEOUT);
    for stalled in ["further", "main", "further after End"] {
        let (address, dst) = destination(timeout, accept_channel);
        let mut main = Peer::main(&address, 2);
        let mut second = Peer::join(&address, SESSION, 1);
        match stalled {
            "further" => main.sync(0),
            "main" => second.sync(0),
            _ => {
                main.sync(0);
                second.sync(0);
                main.send(Kind::End, &[]);
            }
        }
        let (result, _, state) = outcome(dst);
        assert!(
            matches!(result, Err(MigrateError::Stream(StreamError::TimedOut(_)))),
            "{stalled}: {result:?}"
        );
        assert_eq!(state, DeviceState::Resuming, "{stalled}: not resumed");
    }
}

/// A further channel that closes before its End, whatever the main channel is doing (an
/// idle main channel ends the migration within the timeout, with the further channel's
/// error: the one that explains it).
#[test]
fn a_channel_that_closes_early_fails_the_migration() {
    for main_waits_at_the_marker in [false, true] {
        let (address, dst) = destination(SHORT_TIMEOUT, accept_channel);
        let mut main = Peer::main(&address, 2);
        let mut second = Peer::join(&address, SESSION, 1);
        second.page(0, 9);
        if main_waits_at_the_marker {
            main.sync(0);
        }
        second.stream().shutdown(std::net::Shutdown::Both).unwrap();
        drop(second);
        let (result, _, state) = outcome(dst);
        assert!(
            matches!(
                result,
                Err(MigrateError::Stream(StreamError::PeerClosed {
                    peer: "source",
                    ..
                }))
            ),
            "{result:?}"
        );
        assert_eq!(state, DeviceState::Resuming);
    }
}

/// Round markers on a further channel: one out of order, one after that channel's End
/// (the main one then waits for a marker that cannot come), and frames a further channel
/// never carries.
#[test]
fn round_markers_and_frames_out_of_place_on_a_further_channel() {
    let run = |script: &dyn Fn(&mut Peer, &mut Peer)| {
        let (address, dst) = destination(SHORT_TIMEOUT, accept_channel);
        let mut main = Peer::main(&address, 2);
        let mut second = Peer::join(&address, SESSION, 1);
        script(&mut main, &mut second);
        let (result, _, state) = outcome(dst);
        assert_eq!(state, DeviceState::Resuming);
        result
    };
    let result = run(&|main, second| {
        main.sync(0);
        second.sync(1);
    });
    assert_eq!(refused_why(&result), "round marker out of order");
    let result = run(&|main, second| {
        second.send(Kind::End, &[]);
        main.sync(0);
    });
    let why = refused_why(&result);
    assert!(
        why == "a round marker after a channel ended"
            || why == "a channel ended before every channel's round marker",
        "{why}"
    );
    for kind in [Kind::DeviceData, Kind::Join, Kind::Hello, Kind::Verified] {
        let result = run(&|_, second| {
            let _ = second.try_send(kind, &[]);
        });
        let err = result.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("unexpected {kind:?} frame on channel 1")),
            "{err}"
        );
    }
}

/// Once a further channel failed, the other channels apply nothing more: the main channel,
/// still sending pages (each well within the timeout), ends at its next frame with the
/// failed channel's reason instead of going on for as long as the source sends.
#[test]
fn a_failed_channel_stops_the_others_at_their_next_frame() {
    let (address, dst) = destination(HANG_GUARD, accept_channel);
    let mut main = Peer::main(&address, 2);
    let mut second = Peer::join(&address, SESSION, 1);
    // Unaligned: channel 1 fails.
    second.send(Kind::Pages, &pages_payload(&[(1, 1, 0)], &[0; 4096]));
    let start = Instant::now();
    let mut sent = 0u32;
    while !dst.is_finished() && start.elapsed() < HANG_GUARD / 2 {
        if main
            .try_send(Kind::Pages, &pages_payload(&[(8192, 1, 0)], &[0xee; 4096]))
            .is_err()
        {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        dst.is_finished() || main.try_send(Kind::End, &[]).is_err(),
        "the destination still applies the main channel's pages ({sent} sent) after channel 1 failed"
    );
    let (result, _, state) = outcome(dst);
    let err = result.unwrap_err();
    assert!(err.to_string().contains("page-aligned"), "{err}");
    assert_eq!(state, DeviceState::Resuming);
}

/// Delivers `frames` one after another, running `before(i)` before frame `i`'s first
/// byte goes out (the test acts between two frames the destination reads).
struct Scripted<'a> {
    frames: Vec<Vec<u8>>,
    next: usize,
    at: usize,
    before: &'a dyn Fn(usize),
}

/// Not a socket: page bytes are copied out of the frames.
impl dmalog_migrate::stream::Transport for Scripted<'_> {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    fn shut_down(&self) {}
}

impl std::io::Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(frame) = self.frames.get(self.next) else {
            return Ok(0);
        };
        if self.at == 0 {
            (self.before)(self.next);
        }
        let n = buf.len().min(frame.len() - self.at);
        buf[..n].copy_from_slice(&frame[self.at..self.at + n]);
        self.at += n;
        if self.at == frame.len() {
            (self.next, self.at) = (self.next + 1, 0);
        }
        Ok(n)
    }
}

/// A zero run costs the source 16 bytes for up to 256 MiB of the destination's work, so
/// the destination does that work once per page: a page it zeroed (or found zero) and
/// that no data run wrote since is not looked at again. Nothing else writes the
/// destination's guest memory before the device runs, so the test shows the skip by
/// writing a page behind the destination's back between two frames: the second zero run
/// leaves it; a data run in between makes the next zero run zero it again.
#[test]
fn a_zero_run_over_pages_already_zeroed_costs_no_scan() {
    let memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    let region_pages = LAYOUT[0].1 / 4096;
    let zero_all = pages(&[(0, region_pages as u32, RUN_ZERO)], &[]);
    let frames = vec![
        raw_frame(Kind::Hello as u8, &hello_payload(4096, SESSION, 1, &LAYOUT)),
        zero_all.clone(),
        // Page 1 written behind the destination's back here: skipped, left as it is.
        zero_all.clone(),
        // A data run on page 2, then a zero run: page 2 is zeroed again.
        pages(&[(2 * 4096, 1, 0)], &[0x22; 4096]),
        pages(&[(2 * 4096, 1, RUN_ZERO)], &[]),
        raw_frame(Kind::Sync as u8, &0u32.to_le_bytes()),
        raw_frame(Kind::End as u8, &[]),
        raw_frame(Kind::Go as u8, &[]),
        raw_frame(Kind::Verified as u8, &[1]),
    ];
    let behind = Arc::clone(&memory);
    let before = move |frame: usize| {
        if frame == 2 {
            assert!(behind.write_at(4096, &[0x11; 4096]));
        }
    };
    let mut device = LoadingDevice::default();
    let report = migrate_destination(
        &memory,
        &mut device,
        &mut |_, _| Ok(()),
        &mut FrameReader::new(Scripted {
            frames,
            next: 0,
            at: 0,
            before: &before,
        }),
        &mut FrameWriter::new(Vec::new(), None),
    )
    .unwrap();
    assert_eq!(
        report.zero_pages,
        2 * region_pages + 1,
        "every zero page is counted"
    );
    assert!(
        read_page(&memory, 4096).iter().all(|&b| b == 0x11),
        "not scanned again"
    );
    assert!(
        read_page(&memory, 2 * 4096).iter().all(|&b| b == 0),
        "zeroed after its data"
    );
}

/// The source against a hostile destination on two channels: it takes the Hello and the
/// Join, drains the main channel but never reads the further one (nor answers). The
/// source fails within its timeout, with its VM back: the device RUNNING, logging off.
#[test]
fn a_destination_that_never_reads_a_further_channel_fails_the_source_in_time() {
    use dmalog::{InProcessTracker, SoftDriver};
    use dmalog_migrate::{migrate_source_channels, SourceVm};
    let timeout = Duration::from_millis(500);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (main, _) = listener.accept().unwrap();
        let (_held, _) = listener.accept().unwrap();
        let mut input = FrameReader::new(main);
        while input.read().is_ok() {}
    });
    let memory = memfd_guest_untracked(&common::LAYOUT).unwrap();
    for &(gpa, size) in &common::LAYOUT {
        assert!(memory.write_at(gpa, &vec![0x5a; size as usize]));
    }
    let (mut device, _) = common::FakeDevice::new(vec![5u8; 3000]);
    let mut cpu = InProcessTracker::new(SoftDriver::new());
    let tcp = TcpStream::connect(&address).unwrap();
    let mut replies = FrameReader::new(tcp.try_clone().unwrap()).with_timeout(timeout);
    let mut out = FrameWriter::new(tcp, None).with_timeout(timeout);
    let mut connect =
        |_| Ok(FrameWriter::new(TcpStream::connect(&address)?, None).with_timeout(timeout));
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let start = Instant::now();
    let err = migrate_source_channels(
        &common::config(),
        vm,
        &mut out,
        2,
        &mut connect,
        &mut replies,
        |_| {},
    )
    .unwrap_err();
    assert!(start.elapsed() < HANG_GUARD, "the source hangs");
    assert!(
        matches!(&err, MigrateError::Stream(StreamError::TimedOut(_)))
            || err.to_string().contains("did not keep up"),
        "{err}"
    );
    assert_eq!(device.state, DeviceState::Running, "{err}");
    assert!(!device.logging, "device logging stopped");
}

/// A Ping on the main channel is answered at once with its payload (the source times its
/// link with it); one over the 8-byte limit is refused before its payload is read, and the
/// device was never resumed.
#[test]
fn pings_are_echoed_and_an_oversized_one_is_refused() {
    let (address, dst) = destination(HANG_GUARD, accept_channel);
    let mut main = Peer::main(&address, 1);
    for payload in [7u64.to_le_bytes().to_vec(), Vec::new()] {
        main.send(Kind::Ping, &payload);
        let pong = main.reply();
        assert_eq!((pong.kind, pong.payload), (Kind::Pong, payload));
    }
    main.stream()
        .write_all(&raw_frame(Kind::Ping as u8, &[0u8; 9]))
        .unwrap();
    let (result, _, state) = outcome(dst);
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Stream(StreamError::TooLarge {
                kind: Kind::Ping,
                len_bytes: 9,
                limit_bytes: 8
            })
        ),
        "{err}"
    );
    assert_ne!(state, DeviceState::Running);
}
