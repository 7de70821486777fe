//! The marking workload: random page-aligned writes on every log.

use super::*;

/// Marking writes of `write_bytes` at random page-aligned offsets in 1 GiB, on every log.
pub struct MarkRandom {
    /// Bytes per write.
    pub write_bytes: u64,
    /// Ours.
    pub ours: DirtyLog,
    /// vm-memory.
    pub vm_memory: AtomicBitmap,
    /// libvfio-user-like.
    pub byte_atomic: ByteAtomicLog,
    /// Per-bit loop.
    pub naive: NaiveBitLog,
    offsets: Vec<u64>,
    cursor: usize,
}

impl MarkRandom {
    /// The workload for writes of `write_bytes`.
    pub fn new(write_bytes: u64) -> Self {
        let span = GIB;
        let mut rng = 0x1234_5678u64;
        let offsets = (0..1 << 16)
            .map(|_| (next_random(&mut rng) % ((span - write_bytes) / PAGE)) * PAGE)
            .collect();
        MarkRandom {
            write_bytes,
            ours: DirtyLog::new(0, span, PAGE).expect("1 GiB log"),
            vm_memory: AtomicBitmap::new(
                span as usize,
                NonZeroUsize::new(PAGE as usize).expect("page"),
            ),
            byte_atomic: ByteAtomicLog::new(span, PAGE),
            naive: NaiveBitLog::new(span, PAGE),
            offsets,
            cursor: 0,
        }
    }

    #[inline]
    fn next_offset(&mut self) -> u64 {
        self.cursor = (self.cursor + 1) & (self.offsets.len() - 1);
        self.offsets[self.cursor]
    }

    /// One mark on ours.
    #[inline]
    pub fn ours(&mut self) {
        let iova = self.next_offset();
        self.ours.mark(iova, self.write_bytes);
    }

    /// One DMA-write record on ours (fence plus mark).
    #[inline]
    pub fn ours_record_write(&mut self) {
        let iova = self.next_offset();
        self.ours.record_write(iova, self.write_bytes);
    }

    /// One mark on vm-memory.
    #[inline]
    pub fn vm_memory(&mut self) {
        let iova = self.next_offset();
        self.vm_memory
            .set_addr_range(iova as usize, self.write_bytes as usize);
    }

    /// One mark on the byte-atomic log.
    #[inline]
    pub fn byte_atomic(&mut self) {
        let iova = self.next_offset();
        self.byte_atomic.mark(iova, self.write_bytes);
    }

    /// One mark on the per-bit loop.
    #[inline]
    pub fn naive(&mut self) {
        let iova = self.next_offset();
        self.naive.mark(iova, self.write_bytes);
    }
}
