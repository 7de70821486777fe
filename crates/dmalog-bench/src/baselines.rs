//! The baselines dmalog is measured against, written here so that every comparison runs in
//! the same process on the same data.
//!
//! - [`ByteAtomicLog`]: a per-page byte-atomic log like libvfio-user's `dirty_bitmap`
//!   (one bit per page in a byte array, marked with an atomic byte OR, reported by an atomic
//!   exchange per non-zero byte).
//! - [`NaiveBitLog`]: a per-bit loop: one `fetch_or` per page to mark, one test-and-clear per
//!   page to report.
//! - vm-memory's `AtomicBitmap` is used directly from the crate.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// libvfio-user-style byte-atomic dirty bitmap.
pub struct ByteAtomicLog {
    page_shift: u32,
    bytes: Vec<AtomicU8>,
}

impl ByteAtomicLog {
    /// A clean log of `length` bytes of IOVA from 0 at `page_size`.
    pub fn new(length: u64, page_size: u64) -> Self {
        let pages = length / page_size;
        ByteAtomicLog {
            page_shift: page_size.trailing_zeros(),
            bytes: (0..pages.div_ceil(8)).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Marks `[iova, iova+len)`: an atomic OR per byte of bits, masks for the first and
    /// last byte (as `_dma_mark_dirty` does).
    pub fn mark(&self, iova: u64, len: u64) {
        let first = iova >> self.page_shift;
        let last = (iova + len - 1) >> self.page_shift;
        let (first_byte, last_byte) = (first / 8, last / 8);
        for byte in first_byte..=last_byte {
            let lo = if byte == first_byte { first % 8 } else { 0 };
            let hi = if byte == last_byte { last % 8 } else { 7 };
            let mask = ((0xffu16 >> (7 - hi)) as u8) & (0xffu8 << lo);
            self.bytes[byte as usize].fetch_or(mask, Ordering::SeqCst);
        }
    }

    /// Reports and clears everything into `out` (same page size): per byte, skip zero, else
    /// atomic exchange with 0.
    pub fn get_and_clear(&self, out: &mut [u8]) {
        for (dst, byte) in out.iter_mut().zip(&self.bytes) {
            if byte.load(Ordering::Relaxed) != 0 {
                *dst |= byte.swap(0, Ordering::SeqCst);
            }
        }
    }
}

/// A naive per-bit log: `fetch_or` of one bit per page, test-and-clear of one bit per page.
pub struct NaiveBitLog {
    page_shift: u32,
    pages: u64,
    words: Vec<AtomicU64>,
}

impl NaiveBitLog {
    /// A clean log of `length` bytes of IOVA from 0 at `page_size`.
    pub fn new(length: u64, page_size: u64) -> Self {
        let pages = length / page_size;
        NaiveBitLog {
            page_shift: page_size.trailing_zeros(),
            pages,
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `[iova, iova+len)`, one page at a time.
    pub fn mark(&self, iova: u64, len: u64) {
        for page in iova >> self.page_shift..=(iova + len - 1) >> self.page_shift {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }

    /// Reports and clears everything into `out`, one bit at a time.
    pub fn get_and_clear(&self, out: &mut [u8]) {
        for page in 0..self.pages {
            let bit = 1u64 << (page % 64);
            let word = &self.words[(page / 64) as usize];
            if word.load(Ordering::Relaxed) & bit != 0 {
                word.fetch_and(!bit, Ordering::SeqCst);
                out[(page / 8) as usize] |= 1 << (page % 8);
            }
        }
    }
}
