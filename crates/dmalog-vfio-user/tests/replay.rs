//! The short, deterministic version of the fuzzing run: seeded random message streams
//! (valid headers with random payloads, fds absent) and hand-written seeds go through the
//! server's dispatcher; nothing may panic or hang, and every message with a whole header is
//! answered. `DMALOG_REPLAY_CASES` makes it longer.

use dmalog_vfio_user::fuzzing::FuzzTracker;
use dmalog_vfio_user::fuzzing::{
    client_against_script, decode_everything, dispatch_stream, dispatch_stream_to, with_version,
    FuzzDevice,
};
use dmalog_vfio_user::wire::{cmd, Header, HEADER_BYTES};

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A stream of `count` well-framed commands with random command numbers and payloads.
fn random_stream(seed: u64, count: usize) -> (Vec<u8>, usize) {
    let mut state = seed | 1;
    let mut out = Vec::new();
    for id in 0..count {
        let command = (next(&mut state) % 20) as u16;
        let len = (next(&mut state) % 80) as usize;
        let mut payload: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
        // Often make the first words plausible sizes (argsz) so handlers go deeper.
        if len >= 4 && next(&mut state) % 2 == 0 {
            payload[..4].copy_from_slice(&(len as u32).to_le_bytes());
        }
        if command == cmd::DEVICE_FEATURE && len >= 8 {
            let index = [6u32, 7, 8, 1, 2][(next(&mut state) % 5) as usize];
            let access = [1u32 << 16, 1 << 17, 1 << 18 | 1 << 17][(next(&mut state) % 3) as usize];
            payload[4..8].copy_from_slice(&(index | access).to_le_bytes());
        }
        let header = Header {
            msg_id: id as u16,
            cmd: command,
            msg_size: (HEADER_BYTES + len) as u32,
            flags: 0,
            error_no: 0,
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&payload);
    }
    (out, count)
}

#[test]
fn random_streams_are_all_answered() {
    let cases = std::env::var("DMALOG_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40u64);
    for seed in 0..cases {
        let (body, count) = random_stream(seed, 30);
        decode_everything(&body);
        let tracker = if seed % 2 == 0 {
            FuzzTracker::Soft
        } else {
            FuzzTracker::Mlx5(dmalog_models::Mlx5Caps::tiny())
        };
        let replies = dispatch_stream(&with_version(&body), tracker);
        assert_eq!(replies, count + 1, "seed {seed}: every command answered");
    }
}

#[test]
fn hand_written_seeds() {
    // Garbage, a truncated header, a header promising more than is sent, a huge msg_size.
    for stream in [
        vec![0xffu8; 40],
        vec![1, 0, 1, 0],
        Header {
            msg_id: 1,
            cmd: cmd::VERSION,
            msg_size: 1000,
            flags: 0,
            error_no: 0,
        }
        .encode()
        .to_vec(),
        Header {
            msg_id: 1,
            cmd: cmd::REGION_WRITE,
            msg_size: u32::MAX,
            flags: 0,
            error_no: 0,
        }
        .encode()
        .to_vec(),
    ] {
        decode_everything(&stream);
        dispatch_stream(&with_version(&stream), FuzzTracker::Soft);
        dispatch_stream(&stream, FuzzTracker::None);
    }
}

/// A REGION_WRITE of `value` to lvu-sample's BAR0 (its 8-byte `time_t` deadline).
fn bar0_write(msg_id: u16, value: i64) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u64.to_le_bytes()); // offset
    payload.extend_from_slice(&0u32.to_le_bytes()); // region
    payload.extend_from_slice(&8u32.to_le_bytes()); // count
    payload.extend_from_slice(&value.to_le_bytes());
    let header = Header {
        msg_id,
        cmd: cmd::REGION_WRITE,
        msg_size: (HEADER_BYTES + payload.len()) as u32,
        flags: 0,
        error_no: 0,
    };
    [header.encode().as_slice(), &payload].concat()
}

#[test]
fn lvu_sample_streams_are_all_answered() {
    // Extreme deadlines (the value that once overflowed an Instant), then random commands.
    let mut seeded = Vec::new();
    for (id, value) in [i64::MAX, i64::MIN, -1, 0, 1 << 62].into_iter().enumerate() {
        seeded.extend_from_slice(&bar0_write(id as u16, value));
    }
    let replies = dispatch_stream_to(
        &with_version(&seeded),
        FuzzTracker::Soft,
        FuzzDevice::LvuSample,
    );
    assert!(
        replies > 5,
        "VERSION and five BAR0 writes answered ({replies})"
    );
    let cases = std::env::var("DMALOG_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    for seed in 0..cases {
        let (body, count) = random_stream(seed ^ 0x1f5a, 30);
        let replies = dispatch_stream_to(
            &with_version(&body),
            FuzzTracker::Soft,
            FuzzDevice::LvuSample,
        );
        // The device may also send DMA messages of its own (counted too).
        assert!(
            replies > count,
            "seed {seed}: every command answered ({replies} of {count})"
        );
    }
}

/// A script for `client_against_script`: a transfer size, then `entries` random replies.
fn random_script(seed: u64, entries: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let xfer = match seed % 4 {
        0 => 1 << 20,
        1 => 1 << 32,
        2 => next(&mut state),
        _ => next(&mut state) % 200,
    };
    let mut out = xfer.to_le_bytes().to_vec();
    for _ in 0..entries {
        let mode = next(&mut state) as u8;
        let len = (next(&mut state) % 120) as u16;
        out.push(mode);
        out.extend_from_slice(&len.to_le_bytes());
        let mut payload: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
        // Often plausible numbers in the first words (sizes, addresses in the mappings).
        if len >= 16 && next(&mut state) % 2 == 0 {
            payload[..8].copy_from_slice(&(next(&mut state) % (3 << 20)).to_le_bytes());
            payload[8..16].copy_from_slice(&u64::from(len - 16).to_le_bytes());
        }
        out.extend_from_slice(&payload);
    }
    out
}

#[test]
fn a_client_survives_random_server_replies() {
    let cases = std::env::var("DMALOG_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40u64);
    let mut answered = 0;
    for seed in 0..cases {
        answered += client_against_script(&random_script(seed, 40));
    }
    // Errors end no call sequence early: each case gets through most of its calls.
    assert!(
        answered >= cases as usize * 15,
        "{answered} requests in {cases} cases"
    );
    // Hand-written: an empty script (the server hangs up after VERSION), a zero transfer
    // size, and a DMA_READ asking for 2^64 - 1 bytes.
    client_against_script(&[]);
    client_against_script(&0u64.to_le_bytes());
    let mut huge = (1u64 << 20).to_le_bytes().to_vec();
    huge.extend_from_slice(&[2, 16, 0]);
    huge.extend_from_slice(&0u64.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    client_against_script(&huge);
}
