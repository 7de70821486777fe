//! DMA_MAP and DMA_UNMAP: the client's memory, mapped from the fds it passes (or reached
//! by messages), and the logging core told of every mapping.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use dmalog::IovaRange;
use dmalog_device::{DmaBacking, DmaRegion, SharedMapping};
use tracing::debug;

use super::{Reply, Server};
use crate::wire::*;

impl Server {
    pub(super) fn dma_map(&mut self, payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let request = DmaMap::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < DmaMap::BYTES || fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        let range = IovaRange::new(request.addr, request.size).map_err(|_| libc::EINVAL)?;
        let backing = match fds.pop() {
            Some(fd) => {
                let len = usize::try_from(request.size).map_err(|_| libc::EINVAL)?;
                // Pages past the end of the file would SIGBUS on access: refuse them now.
                let file_size = rustix::fs::fstat(&fd)
                    .map_err(|e| e.raw_os_error())?
                    .st_size as u64;
                if request
                    .offset
                    .checked_add(request.size)
                    .is_none_or(|end| end > file_size)
                {
                    return Err(libc::EINVAL);
                }
                let writable = request.flags & DMA_FLAG_WRITE != 0;
                // SharedMapping reads the seals: a file sealed against shrinking is copied
                // directly, any other through the kernel (a shrink then faults, no SIGBUS).
                let mapping = SharedMapping::map(&fd, request.offset, len, writable)
                    .map_err(|err| err.raw_os_error().unwrap_or(libc::EINVAL))?;
                debug!(iova = request.addr, size = request.size, path = ?mapping.copy_path(), "DMA_MAP");
                DmaBacking::Mapped(Arc::new(mapping))
            }
            None => DmaBacking::MessageOnly,
        };
        let region = DmaRegion {
            iova: request.addr,
            size: request.size,
            readable: request.flags & DMA_FLAG_READ != 0,
            writable: request.flags & DMA_FLAG_WRITE != 0,
            backing,
        };
        // The log covers the range before any device thread can reach the mapping: a
        // write landing in between would be marked on a log without it.
        self.core.cover_before_map(range);
        self.space.map(region).map_err(|err| err.errno())?;
        self.core.dma_mapped(range);
        Reply::payload(Vec::new())
    }

    pub(super) fn dma_unmap(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = DmaUnmap::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < DmaUnmap::BYTES
            || request.flags & !(DMA_UNMAP_FLAG_ALL | DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0
        {
            return Err(libc::EINVAL);
        }
        if request.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(libc::ENOTSUP); // the legacy bitmap: use DMA logging REPORT
        }
        if request.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if request.addr != 0 || request.size != 0 {
                return Err(libc::EINVAL);
            }
            self.space.unmap_all();
            self.core.dma_unmapped_all();
        } else {
            self.space
                .unmap(request.addr, request.size)
                .map_err(|err| err.errno())?;
            if let Ok(range) = IovaRange::new(request.addr, request.size) {
                self.core.dma_unmapped(range);
            }
        }
        Reply::payload(request.encode())
    }
}
