//! Harnesses shared by the `cargo fuzz` target (`fuzz/fuzz_targets/migrate_stream.rs`) and
//! the deterministic replay in the default test run: arbitrary bytes as the migration
//! stream into a destination with a small guest memory and an in-memory device.

use dmalog::migration::migration_path;
use dmalog::uapi::DeviceState;
use dmalog::{LogError, MigrationDevice, PendingBytes, TrackerError};

use std::io::{Read, Write};

use crate::destination::{
    decode_hello, decode_pages, migrate_destination, migrate_destination_channels, Incoming,
};
use crate::guest::LoggedGuestMemory;
use crate::stream::{
    checked_bytes, hello_payload, pages_payload, FrameReader, FrameWriter, IoTimeouts, Kind,
    Transport, FRAME_HEADER_BYTES, MAGIC, RUN_ZERO, VERSION,
};

/// The fuzzed destination's guest memory: two small regions with a hole between them.
pub const FUZZ_LAYOUT: [(u64, u64); 2] = [(0, 64 << 10), (1 << 20, 32 << 10)];

/// Device data the fake device keeps at most (more is an error, as a real device's bound).
const MAX_LOADED_BYTES: usize = 1 << 20;

/// A destination device in memory that follows the migration state machine.
#[derive(Debug)]
pub struct LoadingDevice {
    /// Its state.
    pub state: DeviceState,
    /// Bytes loaded in RESUMING.
    pub loaded_bytes: usize,
}

impl Default for LoadingDevice {
    fn default() -> Self {
        LoadingDevice {
            state: DeviceState::Running,
            loaded_bytes: 0,
        }
    }
}

impl MigrationDevice for LoadingDevice {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        Ok(1)
    }
    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        Ok(self.state)
    }
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        migration_path(self.state, state)?;
        if state == DeviceState::Resuming {
            self.loaded_bytes = 0;
        }
        self.state = state;
        Ok(())
    }
    fn read_migration_data(&mut self, _buf: &mut [u8]) -> Result<usize, TrackerError> {
        Err(LogError::Invalid("a destination device saves nothing").into())
    }
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        if self.state != DeviceState::Resuming {
            return Err(LogError::Invalid("device data outside RESUMING").into());
        }
        if data.len() > MAX_LOADED_BYTES - self.loaded_bytes {
            return Err(LogError::Invalid("more device data than the device holds").into());
        }
        self.loaded_bytes += data.len();
        Ok(())
    }
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        Ok(None)
    }
}

thread_local! {
    // One guest memory per thread (a memfd and a mapping each): creating it per input
    // would dominate the fuzzing time. Its content carries over between inputs, which
    // changes no decision the destination makes.
    static MEMORY: LoggedGuestMemory =
        crate::guest::memfd_guest_untracked(&FUZZ_LAYOUT).expect("fuzz guest memory");
}

/// Feeds `stream_bytes` to a destination as the whole migration stream. It must neither
/// panic nor write outside guest memory, whatever the bytes; returns whether the stream
/// was accepted (only a well-formed migration is).
pub fn destination_stream(stream_bytes: &[u8]) -> bool {
    let _ = decode_hello(stream_bytes);
    let _ = decode_pages(stream_bytes);
    MEMORY.with(|memory| {
        let mut device = LoadingDevice::default();
        let mut replies = FrameWriter::new(Vec::new(), None);
        let result = migrate_destination(
            memory,
            &mut device,
            &mut |_, _| Ok(()),
            &mut FrameReader::new(stream_bytes),
            &mut replies,
        );
        // Whatever happened, what went back is well-formed frames.
        let replies = std::mem::take(replies.get_mut());
        let mut reader = FrameReader::new(&replies[..]);
        while let Ok(frame) = reader.read() {
            assert!(
                matches!(frame.kind, Kind::Abort | Kind::Ready | Kind::Resumed),
                "the destination sent a {:?}",
                frame.kind
            );
        }
        result.is_ok()
    })
}

/// One fuzz input, as the `migrate_stream` target runs it: the raw bytes as the stream, or
/// (first byte with bit 6 set) the rest as frame records ([`frames_from`]), or (bits 6
/// and 5 set) as records on several channels ([`channels_from`]). Returns whether the
/// destination accepted the migration.
pub fn fuzz_one(data: &[u8]) -> bool {
    match data.split_first() {
        Some((selector, rest)) if selector & 0x60 == 0x60 => {
            destination_channels(&channels_from(rest))
        }
        Some((selector, rest)) if selector & 0x40 != 0 => destination_stream(&frames_from(rest)),
        _ => destination_stream(data),
    }
}

/// A frame of any kind byte with a correct checksum around `payload` (for a Pages frame,
/// around its run table, as far as the payload holds it).
pub fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let checked = if kind == Kind::Pages as u8 {
        checked_bytes(Kind::Pages, payload, payload.len()).unwrap_or(payload.len())
    } else {
        payload.len()
    };
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&[kind, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&payload[..checked]).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The Hello the fuzzed destination accepts.
pub fn good_hello() -> Vec<u8> {
    raw_frame(
        Kind::Hello as u8,
        &hello_payload(4096, 0x5e55, 1, &FUZZ_LAYOUT),
    )
}

/// Structure-aware input: the fuzzer's bytes as a list of `kind u8, len u16, payload`
/// records, each made a frame with a good checksum (so that inputs get past the crc), after
/// the good Hello when the first byte is odd. A record of kind 0x80 + n is a Pages frame
/// of one run of n & 0x1f pages (a zero run when bit 5 of the kind is set) at a
/// page-aligned address in guest memory chosen by the payload's first byte; kind 0x7f is
/// a Pages frame of many runs (see `record_frame`).
pub fn frames_from(data: &[u8]) -> Vec<u8> {
    let Some((&first, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut stream = if first & 1 == 1 {
        good_hello()
    } else {
        Vec::new()
    };
    while let [kind, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        stream.extend_from_slice(&record_frame(*kind, payload));
        rest = next;
    }
    stream
}

/// A frame from one record (see [`frames_from`]). Kind 0x7f is a Pages frame of many runs:
/// each 3 payload bytes are a run's page (bit 7: in region 1), page count (bit 7: a zero
/// run) and data fill, so that tables with overlapping, adjacent and outside runs come easily.
fn record_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let gpa_of = |page: u8| {
        let page = u64::from(page);
        if page & 0x80 == 0 {
            (page & 0x1f) * 4096
        } else {
            FUZZ_LAYOUT[1].0 + (page & 0xf) * 4096
        }
    };
    if kind == 0x7f {
        let mut runs = Vec::new();
        let mut data = Vec::new();
        for run in payload.chunks_exact(3) {
            let (npages, zero) = (u32::from(run[1] & 0x7f), run[1] & 0x80 != 0);
            runs.push((gpa_of(run[0]), npages, if zero { RUN_ZERO } else { 0 }));
            if !zero {
                data.resize(data.len() + npages as usize * 4096, run[2]);
            }
        }
        return raw_frame(Kind::Pages as u8, &pages_payload(&runs, &data));
    }
    if kind < 0x80 {
        return raw_frame(kind, payload);
    }
    let npages = u32::from(kind & 0x1f);
    let zero = kind & 0x20 != 0;
    let page = payload.first().copied().unwrap_or(0);
    let gpa = if page & 0x80 == 0 {
        u64::from(page & 0xf) * 4096
    } else {
        FUZZ_LAYOUT[1].0 + u64::from(page & 0x7) * 4096
    };
    let data_len = if zero { 0 } else { npages as usize * 4096 };
    let fill = payload.get(1).copied().unwrap_or(0);
    let pages = pages_payload(
        &[(gpa, npages, if zero { RUN_ZERO } else { 0 })],
        &vec![fill; data_len],
    );
    raw_frame(Kind::Pages as u8, &pages)
}

/// The session of the fuzzed multi-channel migrations.
pub const FUZZ_SESSION: u64 = 0x5e55;

/// One channel's bytes in memory as a further connection: reads them, discards writes.
struct MemChannel(std::io::Cursor<Vec<u8>>);

impl Read for MemChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for MemChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl IoTimeouts for MemChannel {
    fn bound_reads(&self, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn bound_writes(&self, _: Option<std::time::Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport for MemChannel {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    // In memory, a read never blocks: nothing to wake.
    fn shut_down(&self) {}
}

/// Feeds `streams` to a multi-channel destination: the first as the main channel, each
/// further one as the next connection it accepts (then no more: the acceptor times out).
/// As [`destination_stream`], it must neither panic, hang nor write outside guest memory;
/// returns whether the migration was accepted.
pub fn destination_channels(streams: &[Vec<u8>]) -> bool {
    let Some((main, further)) = streams.split_first() else {
        return false;
    };
    let mut further = further.iter();
    MEMORY.with(|memory| {
        let mut device = LoadingDevice::default();
        let mut replies = FrameWriter::new(Vec::new(), None);
        migrate_destination_channels(
            memory,
            &mut device,
            &mut |_, _| Ok(()),
            &mut FrameReader::new(&main[..]),
            &mut replies,
            || match further.next() {
                Some(bytes) => Ok(Incoming {
                    reader: Box::new(MemChannel(std::io::Cursor::new(bytes.clone()))),
                    handle: Box::new(MemChannel(std::io::Cursor::new(Vec::new()))),
                }),
                None => Err(std::io::ErrorKind::TimedOut.into()),
            },
        )
        .is_ok()
    })
}

/// Structure-aware input for several channels: the first byte picks 2 to 4 channels, then
/// records `channel u8, kind u8, len u16, payload` (as [`frames_from`]'s, with a channel)
/// go onto that channel after its opening: the main channel's Hello of that many
/// channels, each further one's Join (index 1, 2, ...).
pub fn channels_from(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&first, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let channels = 2 + u32::from(first % 3);
    let mut streams: Vec<Vec<u8>> = (0..channels)
        .map(|index| match index {
            0 => raw_frame(
                Kind::Hello as u8,
                &hello_payload(4096, FUZZ_SESSION, channels, &FUZZ_LAYOUT),
            ),
            _ => raw_frame(
                Kind::Join as u8,
                &[FUZZ_SESSION.to_le_bytes().as_slice(), &index.to_le_bytes()].concat(),
            ),
        })
        .collect();
    while let [channel, kind, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        let at = usize::from(*channel) % streams.len();
        streams[at].extend_from_slice(&record_frame(*kind, payload));
        rest = next;
    }
    streams
}
