//! The migration stream: framed, versioned, every frame's header checked and a corrupt or
//! truncated stream an error on the reading side, never silently accepted.
//!
//! Frame: `magic u32 "DMLS", version u16, kind u8, reserved u8, len u32, crc32c u32`, then
//! `len` payload bytes (little-endian throughout).
//!
//! # Version 2: pages straight from guest memory
//! A Pages frame carries many runs of pages: `nruns u32, reserved u32`, then `nruns` times
//! `gpa u64, npages u32, flags u32` (the run table), then the bytes of every run that is
//! not flagged [`RUN_ZERO`], in table order. A zero run has no bytes: the destination
//! zeroes those pages (as QEMU's zero pages). The source hands the kernel the page bytes
//! straight from guest memory (`writev`, no copy on the plaintext path), while vCPUs and
//! the device keep writing them: a checksum computed beside that copy could not match what
//! the kernel sends. So in a Pages frame the crc32c covers the run table only (every number
//! the destination acts on), and the page bytes rely on TCP's checksum or, across hosts,
//! TLS's authenticated encryption. A page torn by a concurrent write is dirty again and sent
//! again in a later round, so the destination ends with the page as it was at the stop.
//! In every other kind the crc32c covers the whole payload.
//!
//! Several channels (connections) may carry one migration: the Hello names a session and
//! the channel count, each further channel opens with a Join naming the session and its
//! index. Every channel ends each round with a Sync carrying the round number; the
//! destination applies no page of round k+1 before every channel's Sync of round k, so a
//! page sent again on another channel can never be overwritten by its older copy.
//!
//! The peer is not trusted: each kind has its own payload limit, checked before anything
//! is allocated, and a payload is buffered only as its bytes arrive (a header claiming
//! 4 GiB costs nothing until 4 GiB are sent). On a socket, every frame must be read or
//! written whole within a timeout, so a silent or stalled peer is an error, not a hang.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dmalog_device::IoPieceMut;

mod reader;
mod writer;

pub use reader::FrameReader;
pub use writer::{FrameWriter, COPY_CHUNK_BYTES};

/// "DMLS" as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DMLS");
/// Stream version (2: Pages frames of many runs, zero runs, channels; module docs).
pub const VERSION: u16 = 2;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Most data pages (not zero runs) one Pages frame may carry.
pub const MAX_PAGES_PER_FRAME: u64 = 1024;
/// Most zero pages one Pages frame may name (bounds the destination's work per frame).
pub const MAX_ZERO_PAGES_PER_FRAME: u64 = 1 << 16;
/// Most runs in one Pages frame.
pub const MAX_RUNS_PER_FRAME: usize = 512;
/// Run flag: the run's pages are all zero and carry no bytes.
pub const RUN_ZERO: u32 = 1;
/// Most guest memory regions a Hello frame may describe.
pub const MAX_REGIONS: usize = 1024;
/// Most channels (connections) one migration may use.
pub const MAX_CHANNELS: u32 = 16;
/// Bytes of a Pages frame before its run table: `nruns u32, reserved u32`.
pub const PAGES_HEAD_BYTES: usize = 8;
/// Bytes of one run in the table: `gpa u64, npages u32, flags u32`.
pub const RUN_BYTES: usize = 16;
/// Bytes of a Hello before its regions: `page_size u32, nregions u32, session u64,
/// nchannels u32, reserved u32`.
pub const HELLO_HEAD_BYTES: usize = 24;
/// Largest payload of any kind (a Pages frame of [`MAX_PAGES_PER_FRAME`] 4 KiB pages).
pub const MAX_PAYLOAD: usize =
    PAGES_HEAD_BYTES + MAX_RUNS_PER_FRAME * RUN_BYTES + (MAX_PAGES_PER_FRAME as usize) * 4096;
/// Largest Abort reason, bytes.
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest DeviceData payload (the engine sends 64 KiB chunks).
pub const MAX_DEVICE_CHUNK: usize = 1 << 20;
/// How long a peer may take, by default, to deliver or accept one frame.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How far a rate-capped writer may run ahead of its link (a socket buffer's worth of
/// time), and the most credit an idle link earns.
pub const LINK_BURST: Duration = Duration::from_millis(5);
/// Payload bytes buffered ahead of what has arrived.
const READ_CHUNK: usize = 64 << 10;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination: page size, session, channel count and the memory layout.
    Hello = 1,
    /// Runs of pages: the run table, then the bytes of the runs that are not zero.
    Pages = 2,
    /// Device migration data.
    DeviceData = 3,
    /// The last pages and device data were sent: load the device state, then Ready.
    End = 4,
    /// Destination to source, after Go: the device is RUNNING (the guest runs there).
    Resumed = 5,
    /// Unused in version 1.
    Verify = 6,
    /// Source to destination, after Resumed: 1 if the hashes match the source's at stop
    /// time.
    Verified = 7,
    /// Either way: the sender gives up (UTF-8 reason).
    Abort = 8,
    /// Source to destination, on every channel: the end of a round (`round u32`).
    Sync = 9,
    /// Source to destination: the first frame of a further channel (`session u64,
    /// index u32`).
    Join = 10,
    /// Destination to source, after End: all pages and the device state are in place,
    /// the device stopped; carries the time spent hashing (ns) and the crc32c of each
    /// region. The destination resumes only on Go, so that the guest never runs on both
    /// hosts.
    Ready = 11,
    /// Source to destination, after Ready: resume the guest; from here on it is the
    /// destination's.
    Go = 12,
    /// Source to destination, on the main channel, any time before End: answer at once
    /// with a Pong carrying the same payload (at most 8 bytes). The source times the
    /// round trip, a part of the downtime it predicts.
    Ping = 13,
    /// Destination to source: the answer to a Ping, its payload echoed.
    Pong = 14,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::DeviceData,
            4 => Kind::End,
            5 => Kind::Resumed,
            6 => Kind::Verify,
            7 => Kind::Verified,
            8 => Kind::Abort,
            9 => Kind::Sync,
            10 => Kind::Join,
            11 => Kind::Ready,
            12 => Kind::Go,
            13 => Kind::Ping,
            14 => Kind::Pong,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may have (both directions).
    pub fn max_payload(self) -> usize {
        match self {
            Kind::Hello => HELLO_HEAD_BYTES + 16 * MAX_REGIONS,
            Kind::Pages => MAX_PAYLOAD,
            Kind::DeviceData => MAX_DEVICE_CHUNK,
            Kind::End | Kind::Verify | Kind::Go | Kind::Resumed => 0,
            Kind::Ready => 8 + 4 * MAX_REGIONS,
            Kind::Verified => 1,
            Kind::Abort => MAX_REASON_BYTES,
            Kind::Sync => 4,
            Kind::Ping | Kind::Pong => 8,
            Kind::Join => 12,
        }
    }
}

/// How many leading bytes of a `kind` payload the frame's crc32c covers: a Pages frame's
/// head and run table, all of any other kind (module docs). `None`: a Pages payload too
/// short for the table it claims.
pub fn checked_bytes(kind: Kind, payload_head: &[u8], len_bytes: usize) -> Option<usize> {
    if kind != Kind::Pages {
        return Some(len_bytes);
    }
    let nruns = u32::from_le_bytes(payload_head.get(..4)?.try_into().ok()?) as usize;
    // nruns <= u32::MAX: no overflow in 64 bits.
    let table = PAGES_HEAD_BYTES + nruns.checked_mul(RUN_BYTES)?;
    (table <= len_bytes).then_some(table)
}

/// What the page sender needs of a transport besides `Write`.
pub trait Transport {
    /// The socket to hand page runs to straight from guest memory (`writev`) when the
    /// bytes go out as they are (plaintext); `None` when they must be copied into a buffer
    /// first (TLS encrypts them).
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Shuts the connection down both ways, so that a read blocked on it in another
    /// thread returns (a multi-channel destination whose other channel failed).
    fn shut_down(&self);
    /// Reads the next bytes of the stream straight into `piece` (at most its length; 0 at
    /// the end of the stream), for a transport whose bytes pass through user space anyway
    /// (TLS decrypts them into its own buffer): one copy, not two through another buffer.
    /// `None`: no such path (the frame reader goes through a buffer of its own).
    fn read_into_piece(&self, piece: &IoPieceMut<'_>) -> Option<std::io::Result<usize>> {
        let _ = piece;
        None
    }
}

impl Transport for std::net::TcpStream {
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for UnixStream {
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Bytes in memory (tests, fuzzing): read as a whole.
impl Transport for &[u8] {
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn shut_down(&self) {}
}

/// A buffer (tests): pages are copied into it.
impl Transport for Vec<u8> {
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn shut_down(&self) {}
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).vectored_fd()
    }
    fn shut_down(&self) {
        (**self).shut_down()
    }
    fn read_into_piece(&self, piece: &IoPieceMut<'_>) -> Option<std::io::Result<usize>> {
        (**self).read_into_piece(piece)
    }
}

impl<T: IoTimeouts + ?Sized> IoTimeouts for Box<T> {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        (**self).bound_reads(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        (**self).bound_writes(timeout)
    }
}

/// A connection one channel of a migration runs on (what a multi-channel destination is
/// handed for each further channel).
pub trait Channel: Read + Write + IoTimeouts + Transport + Send {}
impl<T: Read + Write + IoTimeouts + Transport + Send> Channel for T {}

/// A stream that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or ended in the middle of a frame. (Not a `source`: the
    /// message already says it, and error chains would print it twice.)
    #[error("migration stream: {0}")]
    Io(std::io::Error),
    /// The peer closed the connection (or its host reset it) before the migration was
    /// over: it died, or was killed.
    #[error("migration stream: the {peer} closed the connection in the middle of the migration{}", closed_detail(.io))]
    PeerClosed {
        /// "source" or "destination".
        peer: &'static str,
        /// How the connection ended.
        io: std::io::Error,
    },
    /// The peer did not deliver a whole frame in time.
    #[error("migration stream: the peer sent no complete frame within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// Not a dmalog migration stream, or another version.
    #[error("migration stream: bad magic {magic:#x} or version {version}")]
    BadHeader {
        /// What came instead of the magic.
        magic: u32,
        /// The version field.
        version: u16,
    },
    /// A frame kind this version does not know.
    #[error("migration stream: unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved header byte is not zero.
    #[error("migration stream: reserved header byte is {0:#x}, not 0")]
    Reserved(u8),
    /// A payload larger than its kind allows.
    #[error("migration stream: a {kind:?} frame of {len_bytes} bytes exceeds the limit of {limit_bytes}")]
    TooLarge {
        /// The frame kind.
        kind: Kind,
        /// The length in the header.
        len_bytes: u64,
        /// The kind's limit.
        limit_bytes: usize,
    },
    /// The payload does not match its checksum.
    #[error(
        "migration stream: checksum mismatch in a {kind:?} frame ({expected:#x} != {actual:#x})"
    )]
    Checksum {
        /// The frame kind.
        kind: Kind,
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the bytes received.
        actual: u32,
    },
    /// A payload that does not decode.
    #[error("migration stream: malformed {0:?} frame")]
    Malformed(Kind),
    /// A payload that decodes but is refused, with why.
    #[error("migration stream: {kind:?} frame refused: {why}")]
    Refused {
        /// The frame kind.
        kind: Kind,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// What the socket said, unless only that the stream ended (said already; TLS's wording
/// for it carries a URL).
fn closed_detail(io: &std::io::Error) -> String {
    if io.kind() == ErrorKind::UnexpectedEof {
        String::new()
    } else {
        format!(" ({io})")
    }
}

impl From<std::io::Error> for StreamError {
    fn from(err: std::io::Error) -> Self {
        StreamError::Io(err)
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A transport whose blocking reads and writes can be bounded in time (a socket). The
/// frame reader and writer set the time left to the frame's deadline before each call.
pub trait IoTimeouts {
    /// Bounds each later blocking read (`None`: unbounded).
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// Bounds each later blocking write (`None`: unbounded).
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl IoTimeouts for std::net::TcpStream {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

impl IoTimeouts for UnixStream {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

/// Sets the time left before each blocking call on an `R` (a monomorphised
/// [`IoTimeouts`] method, so that reading and writing need no trait bound).
type SetTimeout<R> = fn(&R, Option<Duration>) -> std::io::Result<()>;

/// How long an armed time limit is reused for the same frame: arming is a system call
/// (`setsockopt`) per read or write, and a frame through TLS takes thousands of them. A
/// call within this long of the arming ends by the deadline plus this much at worst.
const REARM_AFTER: Duration = Duration::from_millis(1);

/// A per-frame time limit on a transport.
struct FrameTimeout<R> {
    timeout: Duration,
    set: SetTimeout<R>,
    /// The deadline the transport was last armed for, and when.
    armed: std::cell::Cell<Option<(Instant, Instant)>>,
}

impl<R> FrameTimeout<R> {
    fn new(timeout: Duration, set: SetTimeout<R>) -> Self {
        FrameTimeout {
            timeout,
            set,
            armed: std::cell::Cell::new(None),
        }
    }

    /// Arms the transport for the time left before `deadline` (unless it was armed for
    /// it within [`REARM_AFTER`]); a timed-out error if none is left.
    fn arm(&self, inner: &R, deadline: Instant) -> std::io::Result<()> {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(timed_out(self.timeout));
        }
        if let Some((armed_for, armed_at)) = self.armed.get() {
            if armed_for == deadline && now.saturating_duration_since(armed_at) < REARM_AFTER {
                return Ok(());
            }
        }
        // Forgotten first: should arming fail, the next call tries again.
        self.armed.set(None);
        (self.set)(inner, Some(left))?;
        self.armed.set(Some((deadline, now)));
        Ok(())
    }
}

fn timed_out(timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        ErrorKind::TimedOut,
        format!("the peer did not keep up within {} ms", timeout.as_millis()),
    )
}

/// Whether `err` is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expiring is EAGAIN).
fn is_timeout(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A Hello payload: `page_size`, the `session` id and `channels` count, then the regions
/// `(gpa, size)`.
pub fn hello_payload(
    page_size: u32,
    session: u64,
    channels: u32,
    regions: &[(u64, u64)],
) -> Vec<u8> {
    let mut hello = Vec::with_capacity(HELLO_HEAD_BYTES + 16 * regions.len());
    hello.extend_from_slice(&page_size.to_le_bytes());
    hello.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    hello.extend_from_slice(&session.to_le_bytes());
    hello.extend_from_slice(&channels.to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size) in regions {
        hello.extend_from_slice(&gpa.to_le_bytes());
        hello.extend_from_slice(&size.to_le_bytes());
    }
    hello
}

/// A Pages payload: the run table of `runs` (`gpa, npages, flags`), then `data` (the bytes
/// of the runs without [`RUN_ZERO`], in order). No checks: tests build hostile ones.
pub fn pages_payload(runs: &[(u64, u32, u32)], data: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(PAGES_HEAD_BYTES + RUN_BYTES * runs.len() + data.len());
    payload.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, npages, flags) in runs {
        payload.extend_from_slice(&gpa.to_le_bytes());
        payload.extend_from_slice(&npages.to_le_bytes());
        payload.extend_from_slice(&flags.to_le_bytes());
    }
    payload.extend_from_slice(data);
    payload
}

/// A frame header around `len` payload bytes with checksum `crc`.
pub fn frame_header(kind: Kind, len: usize, crc: u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6] = kind as u8;
    // Fits: every kind's limit is below 4 GiB.
    header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut out = FrameWriter::new(Vec::new(), None);
        out.write(Kind::DeviceData, &[&7u64.to_le_bytes(), &[1, 2, 3]])
            .unwrap();
        out.write(Kind::End, &[]).unwrap();
        let bytes = out.get_mut().clone();
        let mut reader = FrameReader::new(&bytes[..]);
        assert_eq!(
            reader.read().unwrap(),
            Frame {
                kind: Kind::DeviceData,
                payload: [7u64.to_le_bytes().as_slice(), &[1, 2, 3]].concat()
            }
        );
        assert_eq!(reader.read().unwrap().kind, Kind::End);
        assert!(
            matches!(reader.read(), Err(StreamError::Io(_))),
            "end of stream"
        );
        // Flip one payload byte: checksum error.
        let mut bad = bytes.clone();
        bad[FRAME_HEADER_BYTES + 2] ^= 1;
        assert!(matches!(
            FrameReader::new(&bad[..]).read(),
            Err(StreamError::Checksum { .. })
        ));
        // Truncated: an I/O error, not a frame.
        assert!(matches!(
            FrameReader::new(&bytes[..FRAME_HEADER_BYTES + 3]).read(),
            Err(StreamError::Io(_))
        ));
        // Not our stream.
        assert!(matches!(
            FrameReader::new(&[0u8; 32][..]).read(),
            Err(StreamError::BadHeader { .. })
        ));
    }

    /// A capped link that stood idle does not then send a burst of what it could have sent
    /// meanwhile (elapsed time is a lower bound here: sleeps never end early).
    #[test]
    fn an_idle_capped_link_earns_no_burst() {
        let mut out = FrameWriter::new(Vec::new(), Some(1_000_000));
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        for _ in 0..10 {
            out.write(Kind::DeviceData, &[&[0u8; 10_000 - FRAME_HEADER_BYTES]])
                .unwrap();
        }
        // 100 kB at 1 MB/s: 100 ms, less the burst allowed on both ends.
        assert!(started.elapsed() >= Duration::from_millis(100) - 2 * LINK_BURST);
    }

    #[test]
    fn a_timeout_beyond_the_clock_is_no_limit_and_no_panic() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut out = FrameWriter::new(a, None).with_timeout(Duration::MAX);
        out.write(Kind::End, &[]).unwrap();
        let mut input = FrameReader::new(b).with_timeout(Duration::MAX);
        assert_eq!(input.read().unwrap().kind, Kind::End);
    }
}
