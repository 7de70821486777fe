//! Hostile bytes fed to the destination: every number the source controls (frame length,
//! page count, guest address, page size, region count) is checked before it sizes an
//! allocation, indexes a buffer or addresses guest memory, and the refusal is a clear
//! error that the source is told about (an Abort frame).

mod common;

use std::io::Read;

use common::{hello, FakeDevice, LAYOUT};
use dmalog_migrate::stream::{
    FrameReader, FrameWriter, Kind, StreamError, FRAME_HEADER_BYTES, MAGIC, MAX_PAYLOAD, VERSION,
};
use dmalog_migrate::{migrate_destination, GuestMemory, MigrateError};

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

/// A frame with a correct checksum around any payload (even one over the kind's limit).
fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut f = header(kind as u8, payload.len() as u32, crc32c::crc32c(payload));
    f.extend_from_slice(payload);
    f
}

fn pages(gpa: u64, npages: u32, data: &[u8]) -> Vec<u8> {
    let mut p = gpa.to_le_bytes().to_vec();
    p.extend_from_slice(&npages.to_le_bytes());
    p.extend_from_slice(data);
    frame(Kind::Pages, &p)
}

struct Outcome {
    result: Result<dmalog_migrate::DestinationReport, MigrateError>,
    /// What the destination sent back.
    replies: Vec<u8>,
    memory: GuestMemory,
}

/// The destination fed `stream` (prefixed with a good Hello unless `with_hello` is false).
fn run(with_hello: bool, stream: &[u8]) -> Outcome {
    let memory = GuestMemory::new(&LAYOUT).unwrap();
    let mut bytes = if with_hello {
        frame(Kind::Hello, &hello(&LAYOUT))
    } else {
        Vec::new()
    };
    bytes.extend_from_slice(stream);
    let (mut device, _) = FakeDevice::new(Vec::new());
    let mut sink = FrameWriter::new(Vec::new(), None);
    let result = migrate_destination(
        &memory,
        &mut device,
        &mut |_, _| Ok(()),
        &mut FrameReader::new(&bytes[..]),
        &mut sink,
    );
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
    outcome.memory.read(0, &mut first);
    assert_eq!(first, [0u8; 8]);
}

#[test]
fn page_counts_must_match_the_data_and_be_bounded() {
    for (npages, data_len) in [(0u32, 0usize), (2, 4096), (u32::MAX, 4096), (1025, 0)] {
        let outcome = run(true, &pages(0, npages, &vec![1u8; data_len]));
        let why = refusal(&outcome);
        assert!(
            why.contains("page count") || why.contains("data length"),
            "{npages} pages, {data_len} bytes: {why}"
        );
    }
    // A Pages frame too short to hold its head is malformed.
    let outcome = run(true, &frame(Kind::Pages, &[0u8; 11]));
    assert!(matches!(
        outcome.result,
        Err(MigrateError::Stream(StreamError::Malformed(Kind::Pages)))
    ));
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
        assert_eq!(
            refusal(&outcome),
            "pages outside guest memory",
            "gpa {gpa:#x}"
        );
        let mut last = [0u8; 4096];
        outcome.memory.read(region0_end - 4096, &mut last);
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
    for payload in [huge_count, trailing, vec![0u8; 7]] {
        let outcome = run(false, &frame(Kind::Hello, &payload));
        assert!(
            matches!(
                outcome.result,
                Err(MigrateError::Stream(StreamError::Malformed(Kind::Hello)))
            ),
            "{:?}",
            outcome.result.err()
        );
    }
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
