//! User memory behind the pointers of kernel-dialect requests.
//!
//! A kernel-dialect START points to its ranges and a REPORT to its bitmap. The logging core
//! reaches them only through [`UserMemory`], so the same core serves a real ioctl seam (which
//! dereferences pointers of its own process) and tests (which use [`SegmentedUserMemory`]):
//! every byte a consumer puts in a request is checked by the kernel's rules.

use crate::error::{LogError, LogResult};

/// Access to the memory a kernel-dialect request points into.
pub trait UserMemory {
    /// The `len` writable bytes at user address `addr` (EFAULT if not all there).
    fn bytes_mut(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]>;

    /// Copies `out.len()` bytes from user address `addr` (EFAULT if not all readable).
    fn read(&mut self, addr: u64, out: &mut [u8]) -> LogResult<()> {
        out.copy_from_slice(self.bytes_mut(addr, out.len() as u64)?);
        Ok(())
    }
}

/// The `len` bytes at user address `addr` of `buffer`, which starts at user address `base`,
/// if they lie wholly inside it (no arithmetic wraps).
pub fn window_mut(buffer: &mut [u8], base: u64, addr: u64, len: u64) -> Option<&mut [u8]> {
    let offset = addr.checked_sub(base)?;
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= buffer.len() as u64)?;
    buffer.get_mut(offset as usize..end as usize)
}

/// User memory made of separately allocated segments at chosen addresses. An access must lie
/// inside one segment; anything else is EFAULT.
#[derive(Debug, Default, Clone)]
pub struct SegmentedUserMemory {
    segments: Vec<(u64, Vec<u8>)>,
}

impl SegmentedUserMemory {
    /// Empty memory: every access faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a segment holding `bytes` at `addr`, replacing any segment at the same address.
    pub fn insert(&mut self, addr: u64, bytes: Vec<u8>) {
        self.segments.retain(|(at, _)| *at != addr);
        self.segments.push((addr, bytes));
    }

    /// The segment at `addr`.
    pub fn segment(&self, addr: u64) -> Option<&[u8]> {
        self.segments
            .iter()
            .find(|(at, _)| *at == addr)
            .map(|(_, bytes)| bytes.as_slice())
    }
}

impl UserMemory for SegmentedUserMemory {
    fn bytes_mut(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]> {
        self.segments
            .iter_mut()
            .find_map(|(base, bytes)| window_mut(bytes, *base, addr, len))
            .ok_or(LogError::Fault { addr, len })
    }
}
