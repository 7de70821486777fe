//! [`FrameWriter`]: frames out, paced to a link's rate, every frame taken by the peer
//! within a timeout; page bytes handed to the kernel straight from guest memory.

use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use dmalog_device::IoPiece;

use super::*;

/// Bytes of a Pages frame copied out of guest memory per write on a transport that must
/// copy them (TLS encrypts them): a chunk, its encryption and the socket's copy of it stay
/// in the L2 cache, where a whole frame (4 MiB) copied first would not.
pub const COPY_CHUNK_BYTES: usize = 64 << 10;

/// Writes frames, counting bytes, optionally capped at a bandwidth (a simple pacing model of
/// a real link).
pub struct FrameWriter<W> {
    inner: W,
    bytes: u64,
    rate_bytes_per_sec: Option<u64>,
    /// When the capped link has sent every byte written so far.
    link_free: Option<Instant>,
    timeout: Option<FrameTimeout<W>>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer; `rate_bytes_per_sec` caps the average rate.
    pub fn new(inner: W, rate_bytes_per_sec: Option<u64>) -> Self {
        FrameWriter {
            inner,
            bytes: 0,
            rate_bytes_per_sec,
            link_free: None,
            timeout: None,
        }
    }

    /// Bytes written so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes one frame of `kind` made of `parts` (concatenated). A frame over its kind's
    /// limit is refused (EINVAL-like `InvalidInput`) before anything is written; with a
    /// timeout, a peer that does not take the whole frame in time is a `TimedOut` error.
    pub fn write(&mut self, kind: Kind, parts: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > kind.max_payload() {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a {kind:?} frame of {len} bytes exceeds the limit of {}",
                    kind.max_payload()
                ),
            ));
        }
        let mut head = [0u8; 4];
        let mut at = 0;
        for part in parts {
            let n = part.len().min(4 - at);
            head[at..at + n].copy_from_slice(&part[..n]);
            at += n;
        }
        // A Pages payload too short for its table (a test's hostile frame): all of it.
        let mut left = checked_bytes(kind, &head[..at], len).unwrap_or(len);
        let mut crc = 0u32;
        for part in parts {
            let n = part.len().min(left);
            crc = crc32c::crc32c_append(crc, &part[..n]);
            left -= n;
        }
        let header = frame_header(kind, len, crc);
        let deadline = self.deadline();
        self.write_all(&header, deadline)?;
        for part in parts {
            self.write_all(part, deadline)?;
        }
        self.frame_done(FRAME_HEADER_BYTES + len);
        Ok(())
    }

    /// The deadline of a frame started now (a timeout too large to add to the clock is no
    /// limit).
    fn deadline(&self) -> Option<Instant> {
        self.timeout
            .as_ref()
            .and_then(|t| Instant::now().checked_add(t.timeout))
    }

    /// Counts a frame written and paces to the rate cap: a link busy until `link_free`
    /// takes the frame after what it has, and time it stood idle earns at most
    /// [`LINK_BURST`] of credit (a real link does not save up bandwidth it did not use).
    fn frame_done(&mut self, frame_bytes: usize) {
        self.bytes += frame_bytes as u64;
        if let Some(rate) = self.rate_bytes_per_sec.filter(|&r| r > 0) {
            let now = Instant::now();
            let cost = Duration::from_secs_f64(frame_bytes as f64 / rate as f64);
            let earliest = now.checked_sub(LINK_BURST).unwrap_or(now);
            let start = self.link_free.map_or(earliest, |free| free.max(earliest));
            let free = start + cost;
            self.link_free = Some(free);
            if free > now + LINK_BURST {
                std::thread::sleep(free - now - LINK_BURST);
            }
        }
    }

    /// Counts `n_bytes` another channel of the same migration wrote, so that
    /// [`FrameWriter::bytes`] is the migration's total.
    pub fn add_channel_bytes(&mut self, n_bytes: u64) {
        self.bytes += n_bytes;
    }

    fn write_all(&mut self, mut bytes: &[u8], deadline: Option<Instant>) -> std::io::Result<()> {
        let (Some(limit), Some(deadline)) = (&self.timeout, deadline) else {
            return self.inner.write_all(bytes);
        };
        while !bytes.is_empty() {
            limit.arm(&self.inner, deadline)?;
            match self.inner.write(bytes) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if is_timeout(&err) => return Err(timed_out(limit.timeout)),
                Err(err) => return Err(err),
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

impl<W: Write + Transport> FrameWriter<W> {
    /// Writes one Pages frame: `table` is [`FRAME_HEADER_BYTES`] of room for the header,
    /// then the Pages head and run table; `data` are the page bytes of the non-zero runs,
    /// in order. On a plaintext socket the kernel copies `data` straight from guest memory
    /// (`writev`, several runs a call); otherwise they are copied into `scratch` (reused)
    /// [`COPY_CHUNK_BYTES`] at a time, each chunk written as soon as it is full.
    pub fn write_pages(
        &mut self,
        table: &mut [u8],
        data: &[IoPiece<'_>],
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let invalid = |why: &str| std::io::Error::new(ErrorKind::InvalidInput, why.to_owned());
        let payload = table
            .get(FRAME_HEADER_BYTES..)
            .ok_or_else(|| invalid("no room for the frame header"))?;
        let len = payload.len() + data.iter().map(|p| p.len()).sum::<usize>();
        if len > Kind::Pages.max_payload() {
            return Err(invalid("a Pages frame over the limit"));
        }
        let header = frame_header(Kind::Pages, len, crc32c::crc32c(payload));
        table[..FRAME_HEADER_BYTES].copy_from_slice(&header);
        let deadline = self.deadline();
        if self.inner.vectored_fd().is_some() {
            self.write_vectored_all(table, data, deadline)?;
        } else {
            self.write_copied(table, data, scratch, deadline)?;
        }
        self.frame_done(FRAME_HEADER_BYTES + len);
        Ok(())
    }

    /// The frame `table` then `data` through `scratch`, [`COPY_CHUNK_BYTES`] a write.
    fn write_copied(
        &mut self,
        table: &[u8],
        data: &[IoPiece<'_>],
        scratch: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> std::io::Result<()> {
        // Sized once (not zeroed per chunk); the run table fits in one chunk.
        scratch.resize(COPY_CHUNK_BYTES.max(table.len()), 0);
        scratch[..table.len()].copy_from_slice(table);
        let mut filled = table.len();
        for piece in data {
            let mut done = 0;
            while done < piece.len() {
                if filled >= COPY_CHUNK_BYTES {
                    self.write_all(&scratch[..filled], deadline)?;
                    filled = 0;
                }
                let n = (piece.len() - done).min(COPY_CHUNK_BYTES - filled);
                piece
                    .skip(done)
                    .take(n)
                    .copy_to(&mut scratch[filled..filled + n])
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
                filled += n;
                done += n;
            }
        }
        self.write_all(&scratch[..filled], deadline)
    }

    fn write_vectored_all(
        &mut self,
        table: &[u8],
        data: &[IoPiece<'_>],
        deadline: Option<Instant>,
    ) -> std::io::Result<()> {
        let mut pieces: Vec<IoPiece<'_>> = Vec::with_capacity(data.len() + 1);
        pieces.push(IoPiece::from_bytes(table));
        pieces.extend_from_slice(data);
        let mut first = 0;
        while first < pieces.len() {
            if let (Some(limit), Some(deadline)) = (&self.timeout, deadline) {
                limit.arm(&self.inner, deadline)?;
            }
            let fd = self
                .inner
                .vectored_fd()
                .ok_or_else(|| std::io::Error::from(ErrorKind::Unsupported))?;
            let n = match dmalog_device::write_pieces(fd, &pieces[first..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(err) if is_timeout(&err) => {
                    let timeout = self.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.timeout);
                    return Err(timed_out(timeout));
                }
                Err(err) => return Err(err),
            };
            dmalog_device::io_piece::advance(&mut pieces, &mut first, n);
        }
        Ok(())
    }
}

impl<W: Write + IoTimeouts> FrameWriter<W> {
    /// Every frame must be taken by the peer within `timeout` (a stalled reader is an
    /// error, not a hang).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(FrameTimeout::new(timeout, W::bound_writes));
        self
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::guest::{memfd_guest_untracked, GuestPages};

    /// A buffer that counts how often its write time limit is set.
    struct Counting {
        bytes: Vec<u8>,
        arms: Cell<u32>,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl IoTimeouts for Counting {
        fn bound_reads(&self, _: Option<Duration>) -> std::io::Result<()> {
            Ok(())
        }
        fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
            assert!(timeout.is_some_and(|t| t <= Duration::from_secs(30)));
            self.arms.set(self.arms.get() + 1);
            Ok(())
        }
    }

    impl Transport for Counting {
        fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
            None
        }
        fn shut_down(&self) {}
    }

    /// A Pages frame copied through in chunks (TLS) arms its time limit far less than once
    /// a chunk, and its bytes are the frame's.
    #[test]
    fn a_chunked_frame_is_written_whole_without_arming_per_chunk() {
        let memory = memfd_guest_untracked(&[(0, 1024 * 4096)]).unwrap();
        let pattern: Vec<u8> = (0..1024 * 4096).map(|i| (i % 253) as u8).collect();
        assert!(memory.write_at(0, &pattern));
        let counting = Counting {
            bytes: Vec::new(),
            arms: Cell::new(0),
        };
        let mut out = FrameWriter::new(counting, None).with_timeout(Duration::from_secs(30));
        let mut table = vec![0u8; FRAME_HEADER_BYTES];
        table.extend_from_slice(&pages_payload(&[(0, 1024, 0)], &[]));
        let pieces = [memory.piece(0, 1024 * 4096).unwrap()];
        out.write_pages(&mut table, &pieces, &mut Vec::new())
            .unwrap();
        let chunks = (table.len() + pattern.len()).div_ceil(COPY_CHUNK_BYTES) as u32;
        let inner = out.get_mut();
        assert!(
            inner.arms.get() < chunks,
            "{} arms for {chunks} chunks",
            inner.arms.get()
        );
        assert_eq!(inner.bytes.len(), table.len() + pattern.len());
        assert!(inner.bytes[table.len()..] == pattern[..]);
        let mut reader = FrameReader::new(&inner.bytes[..]);
        let (frame, data_bytes) = reader.read_deferred().unwrap();
        assert_eq!((frame.kind, data_bytes), (Kind::Pages, pattern.len()));
    }
}
