//! The migration stream: framed, versioned, every frame checked with crc32c. A corrupt or
//! truncated stream is an error on the reading side, never silently accepted.
//!
//! Frame: `magic u32 "DMLS", version u16, kind u8, reserved u8, len u32, crc32c u32`, then
//! `len` payload bytes (little-endian throughout).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// "DMLS" as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DMLS");
/// Stream version.
pub const VERSION: u16 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination: page size and the memory layout.
    Hello = 1,
    /// A run of pages: `gpa u64, npages u32`, then the bytes.
    Pages = 2,
    /// Device migration data.
    DeviceData = 3,
    /// The last pages and device data were sent; resume.
    End = 4,
    /// Destination to source: the device is RUNNING with all pages in place; carries the
    /// time spent hashing (ns) and the crc32c of each region taken before resuming.
    Resumed = 5,
    /// Unused in version 1.
    Verify = 6,
    /// Source to destination: 1 if the hashes match the source's at stop time.
    Verified = 7,
    /// Either way: the sender gives up (UTF-8 reason).
    Abort = 8,
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
            _ => return None,
        })
    }
}

/// A stream that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or ended in the middle of a frame.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
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
    /// A payload larger than allowed.
    #[error("migration stream: frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
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
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes frames, counting bytes, optionally capped at a bandwidth (a simple pacing model of
/// a real link).
pub struct FrameWriter<W> {
    inner: W,
    bytes: u64,
    rate_bytes_per_sec: Option<u64>,
    started: Instant,
}

impl<W: Write> FrameWriter<W> {
    /// A writer; `rate_bytes_per_sec` caps the average rate.
    pub fn new(inner: W, rate_bytes_per_sec: Option<u64>) -> Self {
        FrameWriter {
            inner,
            bytes: 0,
            rate_bytes_per_sec,
            started: Instant::now(),
        }
    }

    /// Bytes written so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes one frame of `kind` made of `parts` (concatenated).
    pub fn write(&mut self, kind: Kind, parts: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let crc = parts
            .iter()
            .fold(0u32, |crc, part| crc32c::crc32c_append(crc, part));
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[6] = kind as u8;
        header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        self.inner.write_all(&header)?;
        for part in parts {
            self.inner.write_all(part)?;
        }
        self.bytes += (FRAME_HEADER_BYTES + len) as u64;
        if let Some(rate) = self.rate_bytes_per_sec.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(())
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Reads and checks frames.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// A reader.
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The next frame.
    pub fn read(&mut self) -> Result<Frame, StreamError> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        self.inner.read_exact(&mut header)?;
        let magic = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let version = u16::from_le_bytes([header[4], header[5]]);
        if magic != MAGIC || version != VERSION {
            return Err(StreamError::BadHeader { magic, version });
        }
        let kind = Kind::from_u8(header[6]).ok_or(StreamError::UnknownKind(header[6]))?;
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default()) as usize;
        let expected = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
        if len > MAX_PAYLOAD {
            return Err(StreamError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        self.inner.read_exact(&mut payload)?;
        let actual = crc32c::crc32c(&payload);
        if actual != expected {
            return Err(StreamError::Checksum {
                kind,
                expected,
                actual,
            });
        }
        Ok(Frame { kind, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut out = FrameWriter::new(Vec::new(), None);
        out.write(Kind::Pages, &[&7u64.to_le_bytes(), &[1, 2, 3]])
            .unwrap();
        out.write(Kind::End, &[]).unwrap();
        let bytes = out.get_mut().clone();
        let mut reader = FrameReader::new(&bytes[..]);
        assert_eq!(
            reader.read().unwrap(),
            Frame {
                kind: Kind::Pages,
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
}
