//! Memory shared with another process (guest memory mapped from a DMA_MAP fd): mmap,
//! munmap, and copies in and out through raw pointers, never through `&[u8]` (the other
//! process writes it concurrently, so no Rust reference may claim it is unchanging).
//! The only `unsafe` of the device crate lives here.

use std::os::fd::AsFd;
use std::ptr::NonNull;

/// A shared mapping of `len` bytes, unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; all access goes
// through the copy functions below, which take raw pointers and tolerate concurrent writers.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: `&SharedMapping` only allows copies through raw pointers.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, readable and (if `writable`) writable.
    pub fn map(fd: impl AsFd, offset: u64, len: usize, writable: bool) -> std::io::Result<Self> {
        Self::map_with(fd, offset, len, writable, false)
    }

    /// As [`SharedMapping::map`], faulting every page in now (guest memory that is about to
    /// be copied whole should not pay page faults on the way).
    pub fn map_populated(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        Self::map_with(fd, offset, len, writable, true)
    }

    fn map_with(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
        populate: bool,
    ) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if writable {
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
        } else {
            rustix::mm::ProtFlags::READ
        };
        let flags = if populate {
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::POPULATE
        } else {
            rustix::mm::MapFlags::SHARED
        };
        // SAFETY: a fresh mapping chosen by the kernel (null hint) overlaps no Rust object;
        // `len` is non-zero; the result is checked before use.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(SharedMapping { ptr, len, writable })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty (mapping zero bytes is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Copies `data` to `offset`. The caller has checked `offset + data.len() <= len()` and
    /// `writable()`; this checks again and refuses instead of writing out of bounds.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if !self.writable
            || offset
                .checked_add(data.len())
                .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: `offset + data.len() <= len` was checked, so the destination lies inside
        // the live mapping; `data` is a separate Rust buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        true
    }

    /// Copies `out.len()` bytes from `offset` into `out`; false when out of bounds.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: the source lies inside the live mapping (checked above) and `out` is a
        // separate Rust buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        true
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `map`, and no copy can
        // be running: they borrow `self`, which is being dropped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_stay_inside_the_mapping() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let map = SharedMapping::map(&fd, 4096, 4096, true).unwrap();
        assert!(map.write(4000, &[7u8; 96]));
        assert!(!map.write(4001, &[7u8; 96]), "one byte past the end");
        assert!(!map.write(usize::MAX, &[1]), "overflowing offset");
        let mut out = [0u8; 96];
        assert!(map.read(4000, &mut out));
        assert_eq!(out, [7u8; 96]);
        // Another mapping of the same fd sees the write (it is shared memory).
        let other = SharedMapping::map(&fd, 0, 8192, false).unwrap();
        let mut byte = [0u8; 1];
        assert!(other.read(4096 + 4000, &mut byte));
        assert_eq!(byte[0], 7);
        assert!(!other.write(0, &[1]), "read-only mapping");
    }
}
