//! The client's guest memory: DMA_MAP / DMA_UNMAP, and the server's DMA_READ / DMA_WRITE
//! served from the mappings it lent.

use std::os::fd::BorrowedFd;

use dmalog::IovaRange;

use super::{Client, ClientError, ClientMapping};
use crate::transport::Message;
use crate::wire::*;

impl Client {
    /// DMA_MAP `range` from `fd` at byte `offset`. With `fd` the server maps the memory; the
    /// client keeps a duplicate to serve the server's DMA_READ/DMA_WRITE.
    pub fn dma_map(
        &mut self,
        range: IovaRange,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        writable: bool,
    ) -> Result<(), ClientError> {
        self.dma_map_as(range, fd, offset, writable, true)
    }

    /// DMA_MAP where the server gets no fd ("message-only": every device access to it is a
    /// DMA_READ/DMA_WRITE message the client serves from `fd`).
    pub fn dma_map_message_only(
        &mut self,
        range: IovaRange,
        fd: BorrowedFd<'_>,
        offset: u64,
        writable: bool,
    ) -> Result<(), ClientError> {
        self.dma_map_as(range, Some(fd), offset, writable, false)
    }

    fn dma_map_as(
        &mut self,
        range: IovaRange,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        writable: bool,
        send_fd: bool,
    ) -> Result<(), ClientError> {
        let (iova, size) = (range.iova(), range.len_bytes());
        let flags = DMA_FLAG_READ | if writable { DMA_FLAG_WRITE } else { 0 };
        let request = DmaMap {
            argsz: DmaMap::BYTES as u32,
            flags,
            offset,
            addr: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = if send_fd {
            fd.into_iter().collect()
        } else {
            Vec::new()
        };
        self.request(cmd::DMA_MAP, &request.encode(), &fds)?;
        let writes = dmalog::DirtyLog::new(iova, size, 4096)
            .map_err(|_| ClientError::Protocol("mapping too large to log"))?;
        let fd = fd.map(|fd| fd.try_clone_to_owned()).transpose()?;
        self.mappings.push(ClientMapping {
            iova,
            size,
            fd,
            offset,
            writes,
        });
        Ok(())
    }

    /// Answers one server command (DMA_READ/DMA_WRITE from the lent memory).
    pub(super) fn serve_server_command(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let result = self.serve_dma(header.cmd, payload);
        self.served_dma += 1;
        let sent = match result {
            Ok(reply) => self.transport.send(Header::reply_to(&header), &reply, &[]),
            Err(errno) => self
                .transport
                .send(Header::error_reply_to(&header, errno), &[], &[]),
        };
        sent.map_err(|err| self.send_failed(err))
    }

    fn serve_dma(&mut self, command: u16, payload: &[u8]) -> Result<Vec<u8>, i32> {
        let access = DmaAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        let count = usize::try_from(access.count).map_err(|_| libc::EINVAL)?;
        if count > self.max_data_xfer_size as usize {
            return Err(libc::E2BIG);
        }
        let end = access.addr.checked_add(access.count).ok_or(libc::EFAULT)?;
        let mapping = self
            .mappings
            .iter()
            .find(|m| access.addr >= m.iova && m.iova.checked_add(m.size).is_some_and(|e| end <= e))
            .ok_or(libc::EFAULT)?;
        let fd = mapping.fd.as_ref().ok_or(libc::EFAULT)?;
        let at = mapping
            .offset
            .checked_add(access.addr - mapping.iova)
            .ok_or(libc::EFAULT)?;
        match command {
            cmd::DMA_WRITE => {
                let data = &payload[DmaAccess::BYTES.min(payload.len())..];
                if data.len() != count {
                    return Err(libc::EINVAL);
                }
                let written = rustix::io::pwrite(fd, data, at).map_err(|e| e.raw_os_error())?;
                if written != count {
                    return Err(libc::EIO);
                }
                mapping.writes.record_write(access.addr, access.count);
                Ok(access.encode())
            }
            cmd::DMA_READ => {
                let mut reply = access.encode();
                reply.resize(DmaAccess::BYTES + count, 0);
                let read = rustix::io::pread(fd, &mut reply[DmaAccess::BYTES..], at)
                    .map_err(|e| e.raw_os_error())?;
                if read != count {
                    return Err(libc::EIO);
                }
                Ok(reply)
            }
            _ => Err(libc::ENOSYS),
        }
    }

    /// Serves the server's DMA requests until none arrives for `idle`; returns how many.
    /// (Requests that arrive while a command waits for its reply are served there too.)
    pub fn serve_requests(&mut self, idle: std::time::Duration) -> Result<u64, ClientError> {
        let before = self.served_dma;
        while wait_readable(self.transport.stream(), idle)? {
            let Message {
                header, payload, ..
            } = self.recv()?;
            if header.kind() != TYPE_COMMAND {
                return Err(ClientError::Protocol("a reply nobody asked for"));
            }
            self.serve_server_command(header, &payload)?;
        }
        Ok(self.served_dma - before)
    }

    /// Server DMA requests served so far.
    pub fn served_dma_requests(&self) -> u64 {
        self.served_dma
    }

    /// DMA_UNMAP of exactly `range` (as it was mapped).
    pub fn dma_unmap(&mut self, range: IovaRange) -> Result<(), ClientError> {
        let (iova, size) = (range.iova(), range.len_bytes());
        let request = DmaUnmap {
            argsz: DmaUnmap::BYTES as u32,
            flags: 0,
            addr: iova,
            size,
        };
        self.request(cmd::DMA_UNMAP, &request.encode(), &[])?;
        self.mappings
            .retain(|m| !(m.iova == iova && m.size == size));
        Ok(())
    }

    /// DMA_UNMAP of everything.
    pub fn dma_unmap_all(&mut self) -> Result<(), ClientError> {
        let request = DmaUnmap {
            argsz: DmaUnmap::BYTES as u32,
            flags: DMA_UNMAP_FLAG_ALL,
            addr: 0,
            size: 0,
        };
        self.request(cmd::DMA_UNMAP, &request.encode(), &[])?;
        self.mappings.clear();
        Ok(())
    }
}
