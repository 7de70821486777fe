//! The acceptor's first read of a connection, and the replay of that frame to the
//! migration that takes the connection.

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use super::Link;
use crate::stream::{Frame, FrameWriter, IoTimeouts, Transport};

/// A connection's first frame as the acceptor reads it: at most `left_bytes`, so that a
/// stranger's large frame holds no more than a Hello's worth of memory.
pub(super) struct FirstFrame<'a> {
    pub(super) link: &'a mut Link,
    pub(super) left_bytes: usize,
}

impl Read for FirstFrame<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left_bytes == 0 {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "a first frame larger than any Hello",
            ));
        }
        let n = buf.len().min(self.left_bytes);
        let got = self.link.read(&mut buf[..n])?;
        self.left_bytes -= got;
        Ok(got)
    }
}

impl IoTimeouts for FirstFrame<'_> {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.link.bound_reads(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.link.bound_writes(timeout)
    }
}

/// A connection's reader, its first frame (which the acceptor read) read again first.
pub struct Replayed {
    first: std::io::Cursor<Vec<u8>>,
    link: Link,
}

impl Replayed {
    pub(super) fn new(link: Link, first: &Frame) -> Self {
        let mut encoded = FrameWriter::new(Vec::new(), None);
        // Into memory, a frame read within its kind's limit: cannot fail.
        let _ = encoded.write(first.kind, &[&first.payload]);
        Replayed {
            first: std::io::Cursor::new(std::mem::take(encoded.get_mut())),
            link,
        }
    }

    fn replaying(&self) -> bool {
        self.first.position() < self.first.get_ref().len() as u64
    }
}

impl Read for Replayed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.replaying() {
            return self.first.read(buf);
        }
        self.link.read(buf)
    }
}

impl Write for Replayed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.link.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.link.flush()
    }
}

impl Transport for Replayed {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // The first frame's bytes are not on the socket any more.
        (!self.replaying())
            .then(|| self.link.vectored_fd())
            .flatten()
    }
    fn shut_down(&self) {
        self.link.shut_down()
    }
    fn read_into_piece(
        &self,
        piece: &dmalog_device::IoPieceMut<'_>,
    ) -> Option<std::io::Result<usize>> {
        (!self.replaying())
            .then(|| self.link.read_into_piece(piece))
            .flatten()
    }
}

impl IoTimeouts for Replayed {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.link.bound_reads(timeout)
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.link.bound_writes(timeout)
    }
}
