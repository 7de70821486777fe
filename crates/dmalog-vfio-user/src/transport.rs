//! Messages over a UNIX stream socket, with file descriptors passed as SCM_RIGHTS.
//!
//! A received message is read whole (`msg_size` bytes) even when it is refused, so the
//! stream stays in step: an oversized message is read and dropped, and the caller answers
//! it with an error.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::wire::{Header, HEADER_BYTES};

/// Most fds accepted with one message (more are closed on arrival).
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// `msg_size - 16` bytes.
    pub payload: Vec<u8>,
    /// The fds that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Why no (usable) message was received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection (at a message boundary or in the middle of one).
    #[error("connection closed")]
    Closed,
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The message was larger than allowed; its bytes were read and dropped.
    #[error("message of {} bytes exceeds the limit of {limit}", header.msg_size)]
    TooLarge {
        /// Its header (to answer it).
        header: Header,
        /// The limit.
        limit: usize,
    },
    /// The peer began a message and then sent nothing for longer than the socket's read
    /// timeout; the stream is out of step and must be dropped. (A read timeout before the
    /// first byte of a message is [`RecvError::Io`] with `WouldBlock`: the peer is idle.)
    #[error("the peer stopped in the middle of a message")]
    Stalled,
    /// `msg_size` smaller than the header.
    #[error("message size {} is smaller than the header", header.msg_size)]
    BadSize {
        /// Its header (to answer it).
        header: Header,
    },
}

/// One end of a vfio-user connection.
#[derive(Debug)]
pub struct Transport {
    stream: UnixStream,
    max_message_bytes: usize,
    /// A payload buffer handed back by [`Transport::recycle`], reused by the next
    /// [`Transport::recv`] so that large replies (REPORT bitmaps) are neither allocated
    /// nor zeroed again.
    spare_payload: Vec<u8>,
}

impl Transport {
    /// Wraps a connected stream; messages larger than `max_message_bytes` are refused.
    pub fn new(stream: UnixStream, max_message_bytes: usize) -> Self {
        Transport {
            stream,
            max_message_bytes,
            spare_payload: Vec::new(),
        }
    }

    /// Changes the size limit (after negotiation).
    pub fn set_max_message_bytes(&mut self, bytes: usize) {
        self.max_message_bytes = bytes;
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `header` (its `msg_size` set here) and `payload`, with `fds`. E2BIG (a
    /// message too large, or more than [`MAX_FDS_PER_MESSAGE`] fds) comes before any byte
    /// is sent.
    pub fn send(
        &mut self,
        mut header: Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        header.msg_size = u32::try_from(HEADER_BYTES + payload.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        let head = header.encode();
        let total = head.len() + payload.len();
        let mut sent = 0usize;
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty()
            && (fds.len() > MAX_FDS_PER_MESSAGE
                || !control.push(SendAncillaryMessage::ScmRights(fds)))
        {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        while sent < total {
            let (a, b) = if sent < head.len() {
                (&head[sent..], payload)
            } else {
                (&[][..], &payload[sent - head.len()..])
            };
            let iov = [IoSlice::new(a), IoSlice::new(b)];
            let n = if sent == 0 {
                sendmsg(self.stream.as_fd(), &iov, &mut control, SendFlags::NOSIGNAL)
            } else {
                sendmsg(
                    self.stream.as_fd(),
                    &iov,
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::NOSIGNAL,
                )
            }?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
            }
            sent += n;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes, collecting fds (at most [`MAX_FDS_PER_MESSAGE`]; more
    /// are closed at once); Ok(false) on EOF before any byte. `in_message`: bytes of this
    /// message were read before, so a timeout is [`RecvError::Stalled`].
    fn read_exact_with_fds(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        in_message: bool,
    ) -> Result<bool, RecvError> {
        let mut done = 0;
        while done < buf.len() {
            let mut space =
                [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf[done..])];
            let got = match recvmsg(
                self.stream.as_fd(),
                &mut iov,
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(got) => got,
                Err(rustix::io::Errno::AGAIN) if in_message || done > 0 => {
                    return Err(RecvError::Stalled)
                }
                Err(err) => return Err(std::io::Error::from(err).into()),
            };
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    // A peer sending fds with every byte must not fill our fd table: the
                    // extras close here as they drop.
                    let room = MAX_FDS_PER_MESSAGE.saturating_sub(fds.len());
                    fds.extend(received.take(room));
                }
            }
            if got.bytes == 0 {
                return if done == 0 {
                    Ok(false)
                } else {
                    Err(RecvError::Closed)
                };
            }
            done += got.bytes;
        }
        Ok(true)
    }

    /// Hands a received payload back for reuse by the next [`Transport::recv`] (the larger
    /// of it and the one already kept is kept).
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if payload.len() > self.spare_payload.len() {
            self.spare_payload = payload;
        }
    }

    /// Receives one whole message.
    pub fn recv(&mut self) -> Result<Message, RecvError> {
        let (header, fds) = self.recv_header()?;
        self.recv_payload(header, fds)
    }

    /// Receives one message. When `accept` takes its header and its payload is exactly
    /// `prefix.len() + direct.len()` bytes, the payload is read straight into `prefix` and
    /// then `direct` (a large reply lands in its final place, with no copy); otherwise the
    /// message is received whole as by [`Transport::recv`] and neither buffer is touched.
    pub fn recv_into(
        &mut self,
        prefix: &mut [u8],
        direct: &mut [u8],
        accept: impl FnOnce(&Header) -> bool,
    ) -> Result<Received, RecvError> {
        let (header, mut fds) = self.recv_header()?;
        let direct_len = prefix.len() + direct.len();
        if header.msg_size as usize == HEADER_BYTES + direct_len
            && header.msg_size as usize <= self.max_message_bytes
            && accept(&header)
        {
            for buf in [prefix, direct] {
                if !buf.is_empty() && !self.read_exact_with_fds(buf, &mut fds, true)? {
                    return Err(RecvError::Closed);
                }
            }
            return Ok(Received::Direct { header, fds });
        }
        self.recv_payload(header, fds).map(Received::Whole)
    }

    /// Reads the header of the next message (and the fds that come with it).
    fn recv_header(&mut self) -> Result<(Header, Vec<OwnedFd>), RecvError> {
        let mut fds = Vec::new();
        let mut head = [0u8; HEADER_BYTES];
        if !self.read_exact_with_fds(&mut head, &mut fds, false)? {
            return Err(RecvError::Closed);
        }
        let header = Header::decode(&head).map_err(|_| RecvError::Closed)?;
        Ok((header, fds))
    }

    /// Reads the payload of a message whose header was read.
    fn recv_payload(
        &mut self,
        header: Header,
        mut fds: Vec<OwnedFd>,
    ) -> Result<Message, RecvError> {
        let size = header.msg_size as usize;
        if size < HEADER_BYTES {
            return Err(RecvError::BadSize { header });
        }
        let payload_len = size - HEADER_BYTES;
        if size > self.max_message_bytes {
            // Read and drop it, so the next message starts where it should.
            let mut left = payload_len;
            let mut sink = vec![0u8; 64 << 10];
            while left > 0 {
                let n = left.min(sink.len());
                if !self.read_exact_with_fds(&mut sink[..n], &mut fds, true)? {
                    return Err(RecvError::Closed);
                }
                left -= n;
            }
            return Err(RecvError::TooLarge {
                header,
                limit: self.max_message_bytes,
            });
        }
        let mut payload = std::mem::take(&mut self.spare_payload);
        if payload.len() >= payload_len {
            // Every byte is overwritten by the read below (or the message is dropped).
            payload.truncate(payload_len);
        } else {
            payload.clear();
            payload.resize(payload_len, 0);
        }
        if payload_len > 0 && !self.read_exact_with_fds(&mut payload, &mut fds, true)? {
            return Err(RecvError::Closed);
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }
}

/// What [`Transport::recv_into`] received.
#[derive(Debug)]
pub enum Received {
    /// The awaited message, its payload in the caller's buffers.
    Direct {
        /// Its header.
        header: Header,
        /// The fds that came with it.
        fds: Vec<OwnedFd>,
    },
    /// Another message (or the awaited one in an unexpected size), whole.
    Whole(Message),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cmd;

    /// Sends `bytes` with `fds` attached, in one sendmsg.
    fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        let n = sendmsg(
            stream.as_fd(),
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn fds_sent_with_every_byte_are_capped_per_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = rustix::fs::memfd_create("fd", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let fds = vec![memfd.as_fd(); MAX_FDS_PER_MESSAGE];
        const PAYLOAD_BYTES: usize = 32;
        let header = Header {
            msg_id: 1,
            cmd: cmd::DMA_MAP,
            msg_size: (HEADER_BYTES + PAYLOAD_BYTES) as u32,
            flags: 0,
            error_no: 0,
        };
        send_with_fds(&a, &header.encode(), &fds);
        // Each byte its own sendmsg with 16 more fds: a reader loops once per byte.
        for _ in 0..PAYLOAD_BYTES {
            send_with_fds(&a, &[0], &fds);
        }
        let mut transport = Transport::new(b, 1 << 20);
        let message = transport.recv().unwrap();
        assert_eq!(message.payload.len(), PAYLOAD_BYTES);
        assert_eq!(message.fds.len(), MAX_FDS_PER_MESSAGE);
    }

    #[test]
    fn a_read_timeout_is_idle_between_messages_and_stalled_inside_one() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let mut transport = Transport::new(b, 1 << 20);
        match transport.recv() {
            Err(RecvError::Io(err)) => assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock),
            other => panic!("{other:?}"),
        }
        let header = Header {
            msg_id: 1,
            cmd: cmd::VERSION,
            msg_size: 40,
            flags: 0,
            error_no: 0,
        };
        use std::io::Write;
        (&a).write_all(&header.encode()[..10]).unwrap();
        assert!(matches!(transport.recv(), Err(RecvError::Stalled)));
    }
}
