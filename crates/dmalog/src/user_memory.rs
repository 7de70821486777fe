//! User memory behind the pointers of kernel-dialect requests.
//!
//! A kernel-dialect START points to its ranges and a REPORT to its bitmap. The logging core
//! reaches them only through [`UserMemory`], so the same core serves a real ioctl seam (which
//! dereferences pointers of its own process) and tests (which use [`SegmentedUserMemory`]):
//! every byte a consumer puts in a request is checked by the kernel's rules.

use crate::error::{LogError, LogResult};

/// Access to the memory a kernel-dialect request points into.
pub trait UserMemory {
    /// Copies `out.len()` bytes from user address `addr` (EFAULT if not all readable).
    fn read(&mut self, addr: u64, out: &mut [u8]) -> LogResult<()>;

    /// The `len` writable bytes at user address `addr` (EFAULT if not all there).
    fn bytes_mut(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]>;
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

    fn locate(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]> {
        let fault = LogError::Fault { addr, len };
        for (base, bytes) in &mut self.segments {
            if addr >= *base {
                let offset = addr - *base;
                let end = offset.checked_add(len).ok_or(fault.clone())?;
                if end <= bytes.len() as u64 {
                    return Ok(&mut bytes[offset as usize..end as usize]);
                }
            }
        }
        Err(fault)
    }
}

impl UserMemory for SegmentedUserMemory {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> LogResult<()> {
        let src = self.locate(addr, out.len() as u64)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn bytes_mut(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]> {
        self.locate(addr, len)
    }
}
