//! Hostile bytes fed to the destination: every number the source controls (frame length,
//! page count, guest address, page size, region count) is checked before it sizes an
//! allocation, indexes a buffer or addresses guest memory, and the refusal is a clear
//! error that the source is told about (an Abort frame).

mod common;

use std::io::Read;

use common::{hello, run_destination, LAYOUT};
use dmalog_migrate::stream::{
    pages_payload, FrameReader, FrameWriter, Kind, StreamError, FRAME_HEADER_BYTES, MAGIC,
    MAX_PAYLOAD, RUN_ZERO, VERSION,
};
use dmalog_migrate::{GuestPages, LoggedGuestMemory, MigrateError};

/// Bytes from a slice, recording the largest buffer the reader offers to fill: the
/// reader allocates its payload buffer before filling it, so this bounds the allocation.
struct Observed<'a> {
    bytes: &'a [u8],
    largest_buf: usize,
}

impl Read for Observed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.largest_buf = self.largest_buf.max(buf.len());
        self.bytes.read(buf)
    }
}

/// A raw frame header (no checks: the test is the hostile sender).
fn header(kind: u8, len_bytes: u32, crc: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_HEADER_BYTES);
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&[kind, 0]);
    h.extend_from_slice(&len_bytes.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// A frame with a correct checksum around any payload (even one over the kind's limit;
/// a Pages frame's checksum covers its run table, as far as the payload holds it).
fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    dmalog_migrate::fuzzing::raw_frame(kind as u8, payload)
}

/// A Pages frame of one data run.
fn pages(gpa: u64, npages: u32, data: &[u8]) -> Vec<u8> {
    frame(Kind::Pages, &pages_payload(&[(gpa, npages, 0)], data))
}

struct Outcome {
    result: Result<dmalog_migrate::DestinationReport, MigrateError>,
    /// What the destination sent back.
    replies: Vec<u8>,
    memory: LoggedGuestMemory,
}

/// The destination refused the stream: a `kind` frame was malformed.
fn assert_malformed(outcome: &Outcome, kind: Kind) {
    assert!(
        matches!(
            &outcome.result,
            Err(MigrateError::Stream(StreamError::Malformed(k))) if *k == kind
        ),
        "{:?}",
        outcome.result.as_ref().err()
    );
}

/// The destination fed `stream` (prefixed with a good Hello unless `with_hello` is false).
fn run(with_hello: bool, stream: &[u8]) -> Outcome {
    let mut bytes = if with_hello {
        frame(Kind::Hello, &hello(&LAYOUT))
    } else {
        Vec::new()
    };
    bytes.extend_from_slice(stream);
    let mut sink = FrameWriter::new(Vec::new(), None);
    let (result, memory, _) = run_destination(&mut FrameReader::new(&bytes[..]), &mut sink);
    Outcome {
        result,
        replies: std::mem::take(sink.get_mut()),
        memory,
    }
}

/// The kinds of the frames in `replies`.
fn reply_kinds(replies: &[u8]) -> Vec<(Kind, Vec<u8>)> {
    let mut reader = FrameReader::new(replies);
    std::iter::from_fn(|| reader.read().ok())
        .map(|f| (f.kind, f.payload))
        .collect()
}

fn refusal(outcome: &Outcome) -> &'static str {
    match &outcome.result {
        Err(MigrateError::Stream(StreamError::Refused { why, .. })) => why,
        other => panic!("expected a refused frame, got {other:?}"),
    }
}

#[test]
fn a_4_gib_frame_length_is_refused_before_any_allocation() {
    let outcome = run(true, &header(Kind::DeviceData as u8, u32::MAX, 0));
    assert!(
        matches!(
            outcome.result,
            Err(MigrateError::Stream(StreamError::TooLarge {
                kind: Kind::DeviceData,
                len_bytes: 0xffff_ffff,
                ..
            }))
        ),
        "{:?}",
        outcome.result.err()
    );
}

#[test]
fn a_large_claimed_length_allocates_only_what_arrives() {
    // The largest frame allowed is claimed, ten bytes follow, then the stream ends.
    let mut stream = header(Kind::Pages as u8, MAX_PAYLOAD as u32, 0);
    stream.extend_from_slice(&[0u8; 10]);
    let mut reader = FrameReader::new(Observed {
        bytes: &stream,
        largest_buf: 0,
    });
    let err = reader.read().unwrap_err();
    assert!(matches!(err, StreamError::Io(_)), "{err}");
    let Observed { largest_buf, .. } = reader.into_inner();
    assert!(
        largest_buf <= 128 << 10,
        "a buffer of {largest_buf} bytes for 10 received"
    );
    // And a device data claim over its own (smaller) limit is refused outright.
    let outcome = run(true, &header(Kind::DeviceData as u8, 60 << 20, 0));
    assert!(matches!(
        outcome.result,
        Err(MigrateError::Stream(StreamError::TooLarge { .. }))
    ));
}

#[test]
fn each_kind_has_its_own_payload_limit() {
    for (kind, len) in [
        (Kind::End, 1),
        (Kind::Verified, 2),
        (Kind::Abort, 5000),
        (Kind::Hello, 20 << 10),
        (Kind::DeviceData, (1 << 20) + 1),
    ] {
        let outcome = run(kind != Kind::Hello, &frame(kind, &vec![b'x'; len]));
        match &outcome.result {
            Err(MigrateError::Stream(StreamError::TooLarge {
                kind: seen,
                len_bytes,
                ..
            })) => assert_eq!((*seen, *len_bytes), (kind, len as u64)),
            other => panic!("{kind:?} of {len} bytes: {other:?}"),
        }
    }
    // The writer refuses to build such frames too.
    let mut writer = FrameWriter::new(Vec::new(), None);
    assert!(writer.write(Kind::Abort, &[&[0u8; 5000]]).is_err());
    assert!(writer.get_mut().is_empty(), "nothing written");
}

#[test]
fn unaligned_pages_are_refused_and_memory_is_untouched() {
    let outcome = run(true, &pages(1, 1, &[9u8; 4096]));
    assert_eq!(refusal(&outcome), "guest address not page-aligned");
    let mut first = [0u8; 8];
    outcome.memory.read_at(0, &mut first);
    assert_eq!(first, [0u8; 8]);
}

#[test]
fn page_counts_must_match_the_data_and_be_bounded() {
    for (npages, data_len, why_expected) in [
        (0u32, 0usize, "a run of no pages"),
        (2, 4096, "data length"),
        (1, 8192, "data length"),
        (u32::MAX, 4096, "too many pages"),
        (1025, 0, "too many pages"),
    ] {
        let outcome = run(true, &pages(0, npages, &vec![1u8; data_len]));
        let why = refusal(&outcome);
        assert!(
            why.contains(why_expected),
            "{npages} pages, {data_len} bytes: {why}"
        );
    }
    // Zero runs: bounded per frame, no bytes after them, known flags only.
    for (runs, data_len, why_expected) in [
        (vec![(0u64, 1u32 << 17, RUN_ZERO)], 0usize, "zero pages"),
        (vec![(0, 1, RUN_ZERO)], 4096, "data length"),
        (vec![(0, 1, 2)], 4096, "flags"),
        (vec![(0, 1, 0); 513], 513 * 4096, "run count"),
        (Vec::new(), 0, "run count"),
    ] {
        let payload = pages_payload(&runs, &vec![1u8; data_len]);
        let outcome = run(true, &frame(Kind::Pages, &payload));
        let why = refusal(&outcome);
        assert!(why.contains(why_expected), "{runs:?}: {why}");
    }
    // A Pages frame too short to hold its head, or the table it claims, is malformed.
    for payload in [
        vec![0u8; 7],
        pages_payload(&[(0, 1, 0); 3], &[])[..40].to_vec(),
    ] {
        let outcome = run(true, &frame(Kind::Pages, &payload));
        assert_malformed(&outcome, Kind::Pages);
    }
}

#[test]
fn pages_outside_guest_memory_are_refused_without_a_partial_write() {
    let region0_end = LAYOUT[0].1;
    for (gpa, npages) in [
        (region0_end - 4096, 2),    // runs off the end of region 0 into the hole
        (2 << 30, 1),               // in the hole
        ((1 << 32) + (4 << 20), 1), // just past the last region
        (!0xfff_u64, 1),            // gpa + len overflows
    ] {
        let outcome = run(
            true,
            &pages(gpa, npages, &vec![7u8; npages as usize * 4096]),
        );
        let why = refusal(&outcome);
        assert!(
            why == "pages outside guest memory" || why.contains("wraps"),
            "gpa {gpa:#x}: {why}"
        );
        // The same with a good run first: refused whole, the good run not written either.
        let good_then_bad = pages_payload(
            &[(region0_end - 4096, 1, 0), (gpa, npages, RUN_ZERO)],
            &[7u8; 4096],
        );
        let outcome = run(true, &frame(Kind::Pages, &good_then_bad));
        let why = refusal(&outcome);
        assert!(
            why == "pages outside guest memory" || why.contains("wraps"),
            "gpa {gpa:#x}: {why}"
        );
        let mut last = [0u8; 4096];
        outcome.memory.read_at(region0_end - 4096, &mut last);
        assert!(last.iter().all(|&b| b == 0), "no partial write");
    }
}

#[test]
fn the_hello_is_decoded_exactly() {
    let mut other_page = hello(&LAYOUT);
    other_page[..4].copy_from_slice(&65536u32.to_le_bytes());
    let outcome = run(false, &frame(Kind::Hello, &other_page));
    assert!(
        matches!(&outcome.result, Err(MigrateError::Peer(why)) if why.contains("page size")),
        "{:?}",
        outcome.result.err()
    );
    let mut huge_count = hello(&LAYOUT);
    huge_count[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut trailing = hello(&LAYOUT);
    trailing.push(0);
    for payload in [huge_count, trailing, vec![0u8; 7], vec![0u8; 23]] {
        let outcome = run(false, &frame(Kind::Hello, &payload));
        assert_malformed(&outcome, Kind::Hello);
    }
    // The channel count is 1 to 16, the reserved word zero; one channel only here.
    for (at, value, why) in [
        (16, 0u32, "channel count"),
        (16, 17, "channel count"),
        (20, 1, "reserved"),
    ] {
        let mut bad = hello(&LAYOUT);
        bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let outcome = run(false, &frame(Kind::Hello, &bad));
        assert!(refusal(&outcome).contains(why), "{at}: {value}");
    }
    let mut two = hello(&LAYOUT);
    two[16..20].copy_from_slice(&2u32.to_le_bytes());
    let outcome = run(false, &frame(Kind::Hello, &two));
    assert!(
        matches!(&outcome.result, Err(MigrateError::Peer(why)) if why.contains("one channel")),
        "{:?}",
        outcome.result.err()
    );
    // Anything before the Hello is out of turn.
    let outcome = run(false, &frame(Kind::DeviceData, &[1, 2, 3]));
    assert!(matches!(outcome.result, Err(MigrateError::Peer(_))));
}

#[test]
fn the_source_is_told_why_a_frame_was_refused() {
    let outcome = run(true, &pages(1, 1, &[9u8; 4096]));
    assert!(outcome.result.is_err());
    let replies = reply_kinds(&outcome.replies);
    assert_eq!(replies.len(), 1, "one Abort");
    assert_eq!(replies[0].0, Kind::Abort);
    let reason = String::from_utf8(replies[0].1.clone()).unwrap();
    assert!(reason.contains("page-aligned"), "{reason}");
}

#[test]
fn a_nonzero_reserved_header_byte_is_refused() {
    let mut end = frame(Kind::End, &[]);
    end[7] = 1;
    let outcome = run(true, &end);
    assert!(
        matches!(
            outcome.result,
            Err(MigrateError::Stream(StreamError::Reserved(1)))
        ),
        "{:?}",
        outcome.result.err()
    );
}

#[test]
fn round_markers_come_in_order_and_well_formed() {
    let two_rounds = [
        frame(Kind::Sync, &0u32.to_le_bytes()),
        frame(Kind::Sync, &2u32.to_le_bytes()),
    ]
    .concat();
    let outcome = run(true, &two_rounds);
    assert_eq!(refusal(&outcome), "round marker out of order");
    let outcome = run(true, &frame(Kind::Sync, &[0u8; 3]));
    assert_malformed(&outcome, Kind::Sync);
    // A Join belongs on a further channel only.
    let outcome = run(true, &frame(Kind::Join, &[0u8; 12]));
    assert!(matches!(outcome.result, Err(MigrateError::Peer(_))));
}

/// A page sent with data in one round and as a zero run in a later one ends zero.
#[test]
fn a_zero_run_zeroes_pages_written_earlier() {
    let stream = [
        pages(4096, 2, &[7u8; 8192]),
        frame(Kind::Sync, &0u32.to_le_bytes()),
        frame(Kind::Pages, &pages_payload(&[(4096, 1, RUN_ZERO)], &[])),
    ]
    .concat();
    let outcome = run(true, &stream);
    // The stream ends before End: an error, but the frames before it were applied.
    assert!(outcome.result.is_err());
    let mut page = [1u8; 4096];
    outcome.memory.read_at(4096, &mut page);
    assert!(page.iter().all(|&b| b == 0), "zeroed");
    outcome.memory.read_at(8192, &mut page);
    assert!(page.iter().all(|&b| b == 7), "the next page kept");
}

/// On a socket the destination reads page bytes straight into guest memory once the run
/// table is checked: the same refusals hold there, before any page is written.
#[test]
fn on_a_socket_bad_runs_are_refused_before_any_page_is_written() {
    let region0_end = LAYOUT[0].1;
    for (runs, data_len, why) in [
        (vec![(region0_end - 4096, 2u32, 0u32)], 8192usize, "outside"),
        (vec![(0, 1, 0), (1, 1, 0)], 8192, "page-aligned"),
        (vec![(0, 2, 0)], 4096, "data length"),
        (vec![(0, 1, 0), (4096, 1, RUN_ZERO)], 8192, "data length"),
    ] {
        let stream = [
            frame(Kind::Hello, &hello(&LAYOUT)),
            frame(Kind::Pages, &pages_payload(&runs, &vec![7u8; data_len])),
        ]
        .concat();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = theirs.write_all(&stream);
            theirs
        });
        let (result, memory, _) = run_destination(
            &mut FrameReader::new(ours),
            &mut FrameWriter::new(Vec::new(), None),
        );
        drop(writer.join().unwrap());
        let err = result.unwrap_err().to_string();
        assert!(err.contains(why), "{runs:?}: {err}");
        let mut page = [0u8; 4096];
        memory.read_at(0, &mut page);
        assert!(page.iter().all(|&b| b == 0), "{runs:?}: nothing written");
        memory.read_at(region0_end - 4096, &mut page);
        assert!(page.iter().all(|&b| b == 0), "{runs:?}: nothing written");
    }
}
