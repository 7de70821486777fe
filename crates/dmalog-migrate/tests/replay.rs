//! The short, deterministic version of the fuzzing run (`fuzz/fuzz_targets/
//! migrate_stream.rs`): a seed corpus of migration streams (a whole good one, each of its
//! truncations and byte flips, seeded random frame records) through the destination;
//! nothing may panic or hang, the good stream is accepted and no damaged one is. The
//! corpus a 10-minute fuzzing run kept (`tests/corpus/migrate_stream.bin`: each input as
//! `len u32` and its bytes) is replayed too. `DMALOG_REPLAY_CASES` makes the random part
//! longer.

use dmalog_migrate::fuzzing::{
    channels_from, destination_channels, destination_stream, frames_from, fuzz_one, good_hello,
    raw_frame,
};
use dmalog_migrate::stream::{pages_payload, Kind, RUN_ZERO};

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A whole migration the fuzz destination accepts: pages in both regions (a data run and
/// a zero run in one frame), a round marker, device data, End, the source's Go and its
/// verdict; and the byte ranges of page data in it (which no checksum covers: stream.rs).
fn good_stream() -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
    let mut stream = good_hello();
    let mut data_ranges = Vec::new();
    for (gpa, npages) in [(0u64, 2u32), (1 << 20, 1)] {
        let pages = pages_payload(
            &[
                (gpa, npages, 0),
                (gpa + u64::from(npages) * 4096, 1, RUN_ZERO),
            ],
            &vec![0x5a; npages as usize * 4096],
        );
        let frame = raw_frame(Kind::Pages as u8, &pages);
        let data_start = stream.len() + frame.len() - npages as usize * 4096;
        data_ranges.push(data_start..stream.len() + frame.len());
        stream.extend_from_slice(&frame);
    }
    stream.extend_from_slice(&raw_frame(Kind::Sync as u8, &0u32.to_le_bytes()));
    stream.extend_from_slice(&raw_frame(Kind::DeviceData as u8, b"device state"));
    stream.extend_from_slice(&raw_frame(Kind::End as u8, &[]));
    stream.extend_from_slice(&raw_frame(Kind::Go as u8, &[]));
    stream.extend_from_slice(&raw_frame(Kind::Verified as u8, &[1]));
    (stream, data_ranges)
}

#[test]
fn the_good_stream_is_accepted_and_no_truncation_is() {
    let (good, _) = good_stream();
    assert!(destination_stream(&good));
    for len in 0..good.len() {
        assert!(!destination_stream(&good[..len]), "truncated at {len}");
    }
}

#[test]
fn byte_flips_of_the_good_stream_are_never_accepted_wrongly() {
    let (good, data_ranges) = good_stream();
    // Flip each byte of every header, run table and other payload (page data has no
    // checksum of its own: TCP's and TLS's protect it).
    let in_data = |at: usize| data_ranges.iter().any(|r| r.contains(&at));
    let mut flipped = 0;
    for at in (0..good.len()).filter(|&at| !in_data(at)) {
        let mut bad = good.clone();
        bad[at] ^= 0x41;
        assert!(!destination_stream(&bad), "flip at {at} accepted");
        flipped += 1;
    }
    assert!(flipped > 200, "{flipped} bytes flipped");
}

#[test]
fn hand_written_seeds() {
    for stream in [
        Vec::new(),
        vec![0xffu8; 64],
        raw_frame(0, &[]),
        raw_frame(200, &[1, 2, 3]),
        [good_hello(), raw_frame(Kind::Hello as u8, &[0; 8])].concat(),
        [good_hello(), raw_frame(Kind::Resumed as u8, &[0; 8])].concat(),
        [good_hello(), raw_frame(Kind::Abort as u8, b"\x1b[2J\n")].concat(),
        [good_hello(), raw_frame(Kind::End as u8, &[])].concat(),
    ] {
        assert!(!destination_stream(&stream));
    }
}

#[test]
fn seeded_random_frame_records() {
    let cases = std::env::var("DMALOG_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    for seed in 0..cases {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let len = (next(&mut state) % 200) as usize;
        let data: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
        destination_stream(&data);
        destination_stream(&frames_from(&data));
        // Records that are mostly page runs and device data, as a real stream.
        let mut records = vec![1u8];
        for _ in 0..(next(&mut state) % 12) {
            let kind = match next(&mut state) % 4 {
                0 => 0x80 | (next(&mut state) % 64) as u8,
                1 => Kind::DeviceData as u8,
                2 => (next(&mut state) % 10) as u8,
                _ => 0x81,
            };
            let payload_len = (next(&mut state) % 24) as u16;
            records.push(kind);
            records.extend_from_slice(&payload_len.to_le_bytes());
            records.extend((0..payload_len).map(|_| next(&mut state) as u8));
        }
        destination_stream(&frames_from(&records));
    }
}

#[test]
fn the_fuzzing_corpus_replays() {
    let corpus = include_bytes!("corpus/migrate_stream.bin");
    let mut rest = &corpus[..];
    let mut inputs = 0;
    while let [a, b, c, d, tail @ ..] = rest {
        let len = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
        let (input, next) = tail.split_at(len.min(tail.len()));
        fuzz_one(input);
        inputs += 1;
        rest = next;
    }
    assert!(inputs > 100, "{inputs} inputs in the corpus");
}

/// A whole migration on three channels the fuzz destination accepts: a many-run Pages
/// frame (overlapping, zero and data runs) on every channel, the round marker on each,
/// device data, End on each, Go and the verdict.
fn good_channels() -> Vec<Vec<u8>> {
    let mut records = vec![1u8];
    for channel in 0..3u8 {
        // Runs: 2 data pages at page 4*channel, a zero run over the second, 1 in region 1.
        let runs = [
            4 * channel,
            2,
            0x40 + channel,
            4 * channel + 1,
            0x81,
            0,
            0x80 | channel,
            1,
            7,
        ];
        records.extend_from_slice(&[channel, 0x7f, runs.len() as u8, 0]);
        records.extend_from_slice(&runs);
        records.extend_from_slice(&[channel, Kind::Sync as u8, 4, 0, 0, 0, 0, 0]);
    }
    records.extend_from_slice(&[0, Kind::DeviceData as u8, 3, 0, 1, 2, 3]);
    for channel in [1u8, 2, 0] {
        records.extend_from_slice(&[channel, Kind::End as u8, 0, 0]);
    }
    records.extend_from_slice(&[0, Kind::Go as u8, 0, 0]);
    records.extend_from_slice(&[0, Kind::Verified as u8, 1, 0, 1]);
    channels_from(&records)
}

#[test]
fn a_good_multi_channel_migration_is_accepted_and_no_truncation_of_a_channel_is() {
    let good = good_channels();
    assert_eq!(good.len(), 3);
    assert!(destination_channels(&good));
    for channel in 0..good.len() {
        // Every 61st length (headers, run tables, page data alike) and the whole tail.
        let full = good[channel].len();
        for len in (0..full).filter(|&len| len % 61 == 0 || len + 64 > full) {
            let mut cut = good.clone();
            cut[channel].truncate(len);
            assert!(
                !destination_channels(&cut),
                "channel {channel} cut at {len}"
            );
        }
    }
    // A channel missing altogether, or one more than the Hello names.
    assert!(!destination_channels(&good[..2]));
    let mut extra = good.clone();
    extra.push(good[1].clone());
    assert!(
        destination_channels(&extra),
        "a connection after every channel joined is never accepted"
    );
}

#[test]
fn seeded_random_multi_channel_records() {
    let cases = std::env::var("DMALOG_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200u64);
    for seed in 0..cases {
        let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        let mut records = vec![next(&mut state) as u8];
        for _ in 0..(next(&mut state) % 16) {
            let kind = match next(&mut state) % 5 {
                0 => 0x80 | (next(&mut state) % 64) as u8,
                1 => 0x7f,
                2 => Kind::Sync as u8,
                3 => Kind::End as u8,
                _ => (next(&mut state) % 11) as u8,
            };
            let payload_len = (next(&mut state) % 16) as u16;
            records.push(next(&mut state) as u8);
            records.push(kind);
            records.extend_from_slice(&payload_len.to_le_bytes());
            records.extend((0..payload_len).map(|_| {
                // Sync payloads: small round numbers, so that markers line up now and then.
                if kind == Kind::Sync as u8 {
                    (next(&mut state) % 2) as u8
                } else {
                    next(&mut state) as u8
                }
            }));
        }
        destination_channels(&channels_from(&records));
    }
}
