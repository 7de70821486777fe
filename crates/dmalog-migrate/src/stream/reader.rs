//! [`FrameReader`]: frames in, each header and checksum checked, each payload bounded
//! before it is buffered and read whole within a timeout; page bytes read by the kernel
//! straight into guest memory.

use std::io::{ErrorKind, Read};
use std::time::Instant;

use dmalog_device::IoPieceMut;

use super::*;

/// Reads and checks frames.
pub struct FrameReader<R> {
    inner: R,
    timeout: Option<FrameTimeout<R>>,
    /// Page bytes of the last frame still unread ([`FrameReader::read_deferred`]) and the
    /// frame's deadline.
    pending: Option<(usize, Option<Instant>)>,
    /// Page bytes on their way into guest memory when the kernel cannot put them there.
    bounce: Vec<u8>,
}

fn check_crc(kind: Kind, checked: &[u8], expected: u32) -> Result<(), StreamError> {
    let actual = crc32c::crc32c(checked);
    if actual != expected {
        return Err(StreamError::Checksum {
            kind,
            expected,
            actual,
        });
    }
    Ok(())
}

impl<R: Read> FrameReader<R> {
    /// A reader.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            timeout: None,
            pending: None,
            bounce: Vec::new(),
        }
    }

    /// The per-frame time limit, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.as_ref().map(|t| t.timeout)
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next frame. Allocates no more than the bytes received (plus one chunk).
    pub fn read(&mut self) -> Result<Frame, StreamError> {
        let deadline = self.deadline();
        let (kind, len, expected) = self.read_header(deadline)?;
        let mut payload = Vec::new();
        self.read_payload(&mut payload, len, deadline)?;
        let checked = checked_bytes(kind, &payload, len).ok_or(StreamError::Malformed(kind))?;
        check_crc(kind, &payload[..checked], expected)?;
        Ok(Frame { kind, payload })
    }

    /// The deadline of a frame started now (a timeout too large to add to the clock is no
    /// limit).
    fn deadline(&self) -> Option<Instant> {
        self.timeout
            .as_ref()
            .and_then(|t| Instant::now().checked_add(t.timeout))
    }

    /// A frame header, checked: its kind, payload length and checksum.
    fn read_header(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<(Kind, usize, u32), StreamError> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        self.read_exact(&mut header, deadline)?;
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let magic = word(0);
        let version = u16::from_le_bytes([header[4], header[5]]);
        if magic != MAGIC || version != VERSION {
            return Err(StreamError::BadHeader { magic, version });
        }
        let kind = Kind::from_u8(header[6]).ok_or(StreamError::UnknownKind(header[6]))?;
        // Reserved for later versions: must be zero now, so that a later meaning is never
        // silently ignored.
        if header[7] != 0 {
            return Err(StreamError::Reserved(header[7]));
        }
        let len_bytes = word(8);
        let limit_bytes = kind.max_payload();
        if u64::from(len_bytes) > limit_bytes as u64 {
            return Err(StreamError::TooLarge {
                kind,
                len_bytes: u64::from(len_bytes),
                limit_bytes,
            });
        }
        Ok((kind, len_bytes as usize, word(12)))
    }

    /// Appends `len` bytes to `payload`, buffered only as they arrive.
    fn read_payload(
        &mut self,
        payload: &mut Vec<u8>,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<(), StreamError> {
        let end = payload.len() + len;
        while payload.len() < end {
            let at = payload.len();
            payload.resize(at + (end - at).min(READ_CHUNK), 0);
            self.read_exact(&mut payload[at..], deadline)?;
        }
        Ok(())
    }

    fn read_exact(
        &mut self,
        mut buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<(), StreamError> {
        let (Some(limit), Some(deadline)) = (&self.timeout, deadline) else {
            return self.inner.read_exact(buf).map_err(StreamError::Io);
        };
        while !buf.is_empty() {
            match limit.arm(&self.inner, deadline) {
                Err(err) if is_timeout(&err) => return Err(StreamError::TimedOut(limit.timeout)),
                other => other?,
            }
            match self.inner.read(buf) {
                Ok(0) => return Err(StreamError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => buf = &mut buf[n..],
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if is_timeout(&err) => return Err(StreamError::TimedOut(limit.timeout)),
                Err(err) => return Err(StreamError::Io(err)),
            }
        }
        Ok(())
    }
}

impl<R: Read + Transport> FrameReader<R> {
    /// As [`FrameReader::read`], except that a Pages frame comes with its head and run
    /// table only (checked against the checksum): the rest of it, the page bytes, must
    /// then be read with [`FrameReader::read_pages_data`] into guest memory before
    /// anything else. Returns the frame and how many page bytes remain (0 for every other
    /// frame).
    pub fn read_deferred(&mut self) -> Result<(Frame, usize), StreamError> {
        if self.pending.is_some() {
            return Err(StreamError::Io(std::io::Error::other(
                "the last frame's page data was not read",
            )));
        }
        let deadline = self.deadline();
        let (kind, len, expected) = self.read_header(deadline)?;
        let mut payload = Vec::new();
        if kind != Kind::Pages {
            self.read_payload(&mut payload, len, deadline)?;
            check_crc(kind, &payload, expected)?;
            return Ok((Frame { kind, payload }, 0));
        }
        // The head, then the table it announces (bounded by the frame's length).
        self.read_payload(&mut payload, len.min(PAGES_HEAD_BYTES), deadline)?;
        let table = checked_bytes(kind, &payload, len).ok_or(StreamError::Malformed(kind))?;
        let rest = table - payload.len();
        self.read_payload(&mut payload, rest, deadline)?;
        check_crc(kind, &payload, expected)?;
        let data_bytes = len - table;
        if data_bytes > 0 {
            self.pending = Some((data_bytes, deadline));
        }
        Ok((Frame { kind, payload }, data_bytes))
    }

    /// Reads the page bytes [`FrameReader::read_deferred`] left into `pieces` (exactly
    /// that many bytes in all) within the frame's deadline: on a plaintext socket straight
    /// from the kernel (`readv`); otherwise (TLS) from the transport's own buffer
    /// ([`Transport::read_into_piece`]), or through one reused buffer.
    pub fn read_pages_data(&mut self, pieces: &[IoPieceMut<'_>]) -> Result<(), StreamError> {
        let (left, deadline) = self.pending.take().unwrap_or((0, None));
        if pieces.iter().map(|p| p.len()).sum::<usize>() != left {
            return Err(StreamError::Io(std::io::Error::other(
                "page data pieces differ from the frame's page bytes",
            )));
        }
        if self.inner.vectored_fd().is_none() {
            return self.read_pages_copied(pieces, deadline);
        }
        let mut pieces: Vec<IoPieceMut<'_>> = pieces.to_vec();
        let mut first = 0;
        while first < pieces.len() {
            if let (Some(limit), Some(deadline)) = (&self.timeout, deadline) {
                match limit.arm(&self.inner, deadline) {
                    Err(err) if is_timeout(&err) => {
                        return Err(StreamError::TimedOut(limit.timeout))
                    }
                    other => other?,
                }
            }
            let fd = self
                .inner
                .vectored_fd()
                .ok_or_else(|| StreamError::Io(ErrorKind::Unsupported.into()))?;
            let n = match dmalog_device::read_pieces(fd, &pieces[first..]) {
                Ok(0) => return Err(StreamError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(err) if is_timeout(&err) => {
                    let timeout = self.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.timeout);
                    return Err(StreamError::TimedOut(timeout));
                }
                Err(err) => return Err(StreamError::Io(err)),
            };
            dmalog_device::io_piece::advance(&mut pieces, &mut first, n);
        }
        Ok(())
    }
}

impl<R: Read + Transport> FrameReader<R> {
    /// [`FrameReader::read_pages_data`] on a transport that has no socket to read into
    /// guest memory from.
    fn read_pages_copied(
        &mut self,
        pieces: &[IoPieceMut<'_>],
        deadline: Option<Instant>,
    ) -> Result<(), StreamError> {
        let fault = || StreamError::Io(std::io::Error::from_raw_os_error(libc::EFAULT));
        for piece in pieces {
            let mut done = 0;
            while done < piece.len() {
                let rest = piece.skip(done);
                if let (Some(limit), Some(deadline)) = (&self.timeout, deadline) {
                    match limit.arm(&self.inner, deadline) {
                        Err(err) if is_timeout(&err) => {
                            return Err(StreamError::TimedOut(limit.timeout))
                        }
                        other => other?,
                    }
                }
                match self.inner.read_into_piece(&rest) {
                    Some(Ok(0)) => return Err(StreamError::Io(ErrorKind::UnexpectedEof.into())),
                    Some(Ok(n)) => done += n,
                    Some(Err(err)) if err.kind() == ErrorKind::Interrupted => {}
                    Some(Err(err)) if is_timeout(&err) => {
                        let timeout = self.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.timeout);
                        return Err(StreamError::TimedOut(timeout));
                    }
                    Some(Err(err)) => return Err(StreamError::Io(err)),
                    None => {
                        let mut bounce = std::mem::take(&mut self.bounce);
                        bounce.resize(READ_CHUNK * 4, 0);
                        let n = rest.len().min(bounce.len());
                        let result = self.read_exact(&mut bounce[..n], deadline);
                        let copied =
                            result.and_then(|()| rest.copy_from(&bounce[..n]).map_err(|_| fault()));
                        self.bounce = bounce;
                        copied?;
                        done += n;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read + IoTimeouts> FrameReader<R> {
    /// Every frame must arrive whole within `timeout` of asking for it (a silent or
    /// trickling peer is an error, not a hang).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(FrameTimeout::new(timeout, R::bound_reads));
        self
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::guest::{memfd_guest_untracked, GuestPages};
    use crate::stream::{pages_payload, FrameWriter};

    /// A transport whose frames (headers, run tables) come through `Read` and whose page
    /// bytes only through [`Transport::read_into_piece`], a few bytes at a time.
    struct Decrypted {
        frames: std::io::Cursor<Vec<u8>>,
        pages: RefCell<std::io::Cursor<Vec<u8>>>,
    }

    impl Read for Decrypted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.frames.read(buf)
        }
    }

    impl Transport for Decrypted {
        fn vectored_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn shut_down(&self) {}
        fn read_into_piece(&self, piece: &IoPieceMut<'_>) -> Option<std::io::Result<usize>> {
            let mut bytes = [0u8; 1000];
            let n = self
                .pages
                .borrow_mut()
                .read(&mut bytes[..piece.len().min(1000)]);
            Some(n.inspect(|&n| piece.copy_from(&bytes[..n]).unwrap()))
        }
    }

    #[test]
    fn page_bytes_come_from_a_transport_that_reads_into_pieces() {
        let mut out = FrameWriter::new(Vec::new(), None);
        out.write(
            Kind::Pages,
            &[&pages_payload(&[(0, 2, 0), (8192 * 4, 1, 0)], &[])],
        )
        .unwrap();
        let table = out.get_mut().clone();
        // The header's length claims the page bytes too.
        let mut frames = table.clone();
        let len = u32::from_le_bytes(frames[8..12].try_into().unwrap()) + 3 * 4096;
        frames[8..12].copy_from_slice(&len.to_le_bytes());
        let pages: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        let mut input = FrameReader::new(Decrypted {
            frames: std::io::Cursor::new(frames),
            pages: RefCell::new(std::io::Cursor::new(pages.clone())),
        });
        let (frame, data_bytes) = input.read_deferred().unwrap();
        assert_eq!((frame.kind, data_bytes), (Kind::Pages, 3 * 4096));
        let memory = memfd_guest_untracked(&[(0, 64 * 4096)]).unwrap();
        let pieces = [
            memory.piece_mut(0, 2 * 4096).unwrap(),
            memory.piece_mut(8192 * 4, 4096).unwrap(),
        ];
        input.read_pages_data(&pieces).unwrap();
        let mut got = vec![0u8; 4096];
        for (gpa, at) in [(0, 0), (4096, 4096), (8192 * 4, 8192)] {
            assert!(memory.read_at(gpa, &mut got));
            assert!(got == pages[at..at + 4096], "page at {gpa:#x}");
        }
        assert!(
            input.bounce.is_empty(),
            "no copy through the reader's buffer"
        );
    }
}
