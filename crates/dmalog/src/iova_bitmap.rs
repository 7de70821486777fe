//! `IovaBitmap`: a report bitmap over `[iova, iova+length)` at a power-of-two page size,
//! written straight into a caller's byte buffer.
//!
//! The user-space twin of the kernel's `drivers/iommu/iommufd/iova_bitmap.c`: bit `k` is
//! page `[iova + k*page_size, iova + (k+1)*page_size)`, stored as bit `k % 8` of byte
//! `k / 8` (the same layout as little-endian u64 words: bit `k % 64` of word `k / 64`).
//! Exactly `ceil(bits / 8)` bytes are touched, at any buffer alignment. Bits are only ever
//! set (ORed), never cleared, and requests outside the range are ignored.
//!
//! The windowed form ([`for_each_window`]) produces a huge report in bounded chunks, like the
//! kernel's 2 MiB pinned window, including its "set ahead" fix (Linux 2780025e): a set
//! that runs past the end of the current window is remembered and applied at the start of
//! the next one instead of being lost.

use crate::error::{LogError, LogResult};
use crate::ranges::IovaRange;

/// A report bitmap over one IOVA range, writing into a borrowed buffer.
#[derive(Debug)]
pub struct IovaBitmap<'a> {
    iova: u64,
    length: u64,
    page_shift: u32,
    total_bits: u64,
    window_first_bit: u64,
    window_bits: u64,
    bytes: &'a mut [u8],
    /// Bits `[window_end, ahead_end_bit)` must be set at the start of the next window.
    ahead_end_bit: u64,
}

/// Bits in a report of `len_bytes` bytes at `page_size`: `ceil(length / page_size)`.
pub fn report_bits(len_bytes: u64, page_size: u64) -> LogResult<u64> {
    if page_size == 0 || !page_size.is_power_of_two() {
        return Err(LogError::Invalid("page size is not a power of two"));
    }
    if len_bytes == 0 {
        return Err(LogError::Invalid("len_bytes is zero"));
    }
    Ok(((len_bytes - 1) >> page_size.trailing_zeros()) + 1)
}

/// Bytes of a report bitmap of `len_bytes` bytes at `page_size`: `ceil(bits / 8)`.
pub fn report_bytes(len_bytes: u64, page_size: u64) -> LogResult<u64> {
    Ok(report_bits(len_bytes, page_size)?.div_ceil(8))
}

fn check_range(iova: u64, length: u64) -> LogResult<()> {
    iova.checked_add(length)
        .map(|_| ())
        .ok_or(LogError::Overflow {
            iova,
            len_bytes: length,
        })
}

impl<'a> IovaBitmap<'a> {
    /// A bitmap over `[iova, iova+len_bytes)` at `page_size` (a power of two, any size from
    /// 1 byte) writing into the first `ceil(bits/8)` bytes of `bytes`.
    ///
    /// Errors: page size not a power of two or zero length (`Invalid`), `iova + length`
    /// wrapping (`Overflow`), a buffer shorter than the bitmap (`Invalid`).
    pub fn new(iova: u64, len_bytes: u64, page_size: u64, bytes: &'a mut [u8]) -> LogResult<Self> {
        let total_bits = report_bits(len_bytes, page_size)?;
        check_range(iova, len_bytes)?;
        let need = total_bits.div_ceil(8);
        if (bytes.len() as u64) < need {
            return Err(LogError::Invalid(
                "bitmap buffer shorter than ceil(bits/8) bytes",
            ));
        }
        let bytes = &mut bytes[..need as usize];
        Ok(IovaBitmap {
            iova,
            length: len_bytes,
            page_shift: page_size.trailing_zeros(),
            total_bits,
            window_first_bit: 0,
            window_bits: total_bits,
            bytes,
            ahead_end_bit: 0,
        })
    }

    /// First IOVA of the whole report.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Bytes covered by the whole report.
    pub fn len_bytes(&self) -> u64 {
        self.length
    }

    /// Report page size in bytes.
    pub fn page_size(&self) -> u64 {
        1u64 << self.page_shift
    }

    /// log2 of the report page size.
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Bits of the whole report.
    pub fn total_bits(&self) -> u64 {
        self.total_bits
    }

    /// The IOVA range this bitmap (or its current window) can record.
    pub fn window_range(&self) -> IovaRange {
        let start = self.iova + (self.window_first_bit << self.page_shift);
        let end_bit = self.window_first_bit + self.window_bits;
        let end = if end_bit >= self.total_bits {
            self.iova + self.length
        } else {
            self.iova + (end_bit << self.page_shift)
        };
        // A window holds at least one bit of a range that does not wrap.
        IovaRange::within_checked(start, end - start)
    }

    /// Marks every report page that `[iova, iova+len_bytes)` touches (partial pages count).
    /// Parts outside the report are ignored; bits are only set.
    pub fn set(&mut self, iova: u64, len_bytes: u64) {
        if len_bytes == 0 {
            return;
        }
        let start = iova.max(self.iova);
        let end = iova.saturating_add(len_bytes).min(self.iova + self.length);
        if start >= end {
            return;
        }
        let first_bit = (start - self.iova) >> self.page_shift;
        let last_bit = (end - 1 - self.iova) >> self.page_shift;
        self.set_bits(first_bit, last_bit + 1);
    }

    /// Sets report bits `[first_bit, end_bit)` (indices of the whole report). Long runs are
    /// set a byte run (memset) at a time.
    pub fn set_bits(&mut self, first_bit: u64, end_bit: u64) {
        let end_bit = end_bit.min(self.total_bits);
        let window_end = self.window_first_bit + self.window_bits;
        if end_bit > window_end && first_bit < end_bit {
            // Set ahead: the part past this window is applied when the next one opens.
            self.ahead_end_bit = self.ahead_end_bit.max(end_bit);
        }
        let lo = first_bit.max(self.window_first_bit);
        let hi = end_bit.min(window_end);
        if lo >= hi {
            return;
        }
        self.set_window_bits(lo - self.window_first_bit, hi - self.window_first_bit);
    }

    /// Sets window-relative bits `[lo, hi)`, both inside the window.
    fn set_window_bits(&mut self, lo: u64, hi: u64) {
        let (first_byte, first_shift) = ((lo / 8) as usize, (lo % 8) as u32);
        let (last_byte, last_bits) = ((hi / 8) as usize, (hi % 8) as u32);
        if first_byte == last_byte {
            self.bytes[first_byte] |= (((1u16 << last_bits) - 1) as u8) & (0xffu8 << first_shift);
            return;
        }
        let mut full_from = first_byte;
        if first_shift != 0 {
            self.bytes[first_byte] |= 0xffu8 << first_shift;
            full_from += 1;
        }
        self.bytes[full_from..last_byte].fill(0xff);
        if last_bits != 0 {
            self.bytes[last_byte] |= ((1u16 << last_bits) - 1) as u8;
        }
    }

    // The dirty log's fast paths. Crate-private, and signed: a log's words and bits are
    // numbered from the report's first page, so a log that starts before the report has
    // negative ones (the parts outside are dropped). Other callers use `set` and `set_bits`.

    /// The bytes of report words `[word, word+count)` when they lie wholly inside the current
    /// window at a byte boundary (for callers that OR many whole words).
    #[inline]
    pub(crate) fn aligned_words_mut(&mut self, word: i128, count: usize) -> Option<&mut [u8]> {
        let rel_bit = 64 * word - self.window_first_bit as i128;
        if rel_bit < 0
            || rel_bit % 8 != 0
            || rel_bit + 64 * count as i128 > self.window_bits as i128
        {
            return None;
        }
        let byte = (rel_bit / 8) as usize;
        self.bytes.get_mut(byte..byte + 8 * count)
    }

    /// ORs `value` into report word `word` (bits `[64*word, 64*word+64)`; `word` may be
    /// negative or past the end: parts outside are dropped).
    #[inline]
    pub(crate) fn or_word(&mut self, word: i128, value: u64) {
        let rel_bit = 64 * word - self.window_first_bit as i128;
        if rel_bit >= 0 && rel_bit % 8 == 0 && rel_bit + 64 <= self.window_bits as i128 {
            let byte = (rel_bit / 8) as usize;
            if let Some(dst) = self.bytes.get_mut(byte..byte + 8) {
                let mut current = [0u8; 8];
                current.copy_from_slice(dst);
                dst.copy_from_slice(&(u64::from_le_bytes(current) | value).to_le_bytes());
                return;
            }
        }
        self.or_bits(64 * word, value);
    }

    /// ORs the 64 bits of `value` into report bits `[bit, bit+64)`; `bit` may be negative
    /// and the run may hang over either end: the parts outside the report are dropped.
    #[inline]
    pub(crate) fn or_bits(&mut self, bit: i128, value: u64) {
        if value == 0 {
            return;
        }
        let mut value = value;
        let mut rel = bit - self.window_first_bit as i128;
        if rel < 0 {
            if rel <= -64 {
                return;
            }
            value >>= (-rel) as u32;
            rel = 0;
            if value == 0 {
                return;
            }
        }
        let window_bits = self.window_bits as i128;
        let avail = window_bits - rel;
        if avail < 64 {
            let beyond = if avail <= 0 {
                value
            } else {
                value >> avail as u32
            };
            if beyond != 0 {
                let window_end = self.window_first_bit + self.window_bits;
                let carry_start = if avail <= 0 { rel - window_bits } else { 0 } as u64;
                let top = window_end + carry_start + (64 - beyond.leading_zeros() as u64);
                if window_end < self.total_bits {
                    self.ahead_end_bit = self.ahead_end_bit.max(top.min(self.total_bits));
                }
            }
            if avail <= 0 {
                return;
            }
            value &= (1u64 << avail as u32) - 1;
            if value == 0 {
                return;
            }
        }
        let rel = rel as u64;
        let byte = (rel / 8) as usize;
        let shift = (rel % 8) as u32;
        if let Some(dst) = self.bytes.get_mut(byte..byte + 9) {
            let mut word = [0u8; 8];
            word.copy_from_slice(&dst[..8]);
            let merged = u64::from_le_bytes(word) | (value << shift);
            dst[..8].copy_from_slice(&merged.to_le_bytes());
            if shift != 0 {
                dst[8] |= (value >> (64 - shift)) as u8;
            }
            return;
        }
        // Near the end of the buffer: byte by byte, only the bytes that exist.
        let wide = (value as u128) << shift;
        for (i, dst) in self.bytes[byte..].iter_mut().enumerate().take(9) {
            *dst |= (wide >> (8 * i)) as u8;
        }
    }
}

/// Produces the report over `[iova, iova+length)` at `page_size` in windows of at most
/// `buffer.len()` bitmap bytes, reusing `buffer` for each.
///
/// For each window `fill(&mut bitmap)` records the dirty pages (the bitmap's
/// [`IovaBitmap::window_range`] says which IOVA range to read), then `sink(byte_offset,
/// bytes)` receives that window's bytes at their offset in the whole bitmap. A set that runs
/// past a window's end is carried into the next window, so nothing is lost at window edges.
/// The buffer is zeroed before each window.
pub fn for_each_window<E: From<LogError>>(
    iova: u64,
    length: u64,
    page_size: u64,
    buffer: &mut [u8],
    mut fill: impl FnMut(&mut IovaBitmap<'_>) -> Result<(), E>,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let total_bits = report_bits(length, page_size)?;
    check_range(iova, length)?;
    if buffer.is_empty() {
        return Err(LogError::Invalid("window buffer is empty").into());
    }
    let window_bits_max = (buffer.len() as u64).saturating_mul(8);
    let mut first_bit = 0u64;
    let mut ahead_end_bit = 0u64;
    while first_bit < total_bits {
        let window_bits = window_bits_max.min(total_bits - first_bit);
        let window_bytes = window_bits.div_ceil(8) as usize;
        let bytes = &mut buffer[..window_bytes];
        bytes.fill(0);
        let mut bitmap = IovaBitmap {
            iova,
            length,
            page_shift: page_size.trailing_zeros(),
            total_bits,
            window_first_bit: first_bit,
            window_bits,
            bytes,
            ahead_end_bit: 0,
        };
        if ahead_end_bit > first_bit {
            bitmap.set_bits(first_bit, ahead_end_bit);
        }
        fill(&mut bitmap)?;
        ahead_end_bit = bitmap.ahead_end_bit;
        sink(first_bit / 8, &buffer[..window_bytes])?;
        first_bit += window_bits;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_of(bytes: &[u8]) -> Vec<u64> {
        (0..bytes.len() as u64 * 8)
            .filter(|k| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1)
            .collect()
    }

    #[test]
    fn partial_pages_count_and_outside_is_ignored() {
        let mut buf = [0u8; 2];
        let mut bm = IovaBitmap::new(0x10000, 16 * 4096, 4096, &mut buf).unwrap();
        bm.set(0x10001, 1);
        bm.set(0x10000 + 4095, 2);
        bm.set(0, 0x10000); // wholly below
        bm.set(0x10000 + 16 * 4096, 4096); // wholly above
        bm.set(0xffff, 2); // straddles the start: page 0
        assert_eq!(bits_of(&buf), vec![0, 1]);
    }

    #[test]
    fn only_ceil_bits_over_8_bytes_are_touched_at_any_alignment() {
        for nbits in [4u64, 8, 32, 64, 160, 32768, 65536] {
            for offset in [0usize, 1, 3, 7] {
                let need = nbits.div_ceil(8) as usize;
                let mut buf = vec![0xa5u8; offset + need + 16];
                let region = &mut buf[offset..offset + need];
                region.fill(0);
                let mut bm = IovaBitmap::new(0, nbits * 4096, 4096, region).unwrap();
                bm.set(0, nbits * 4096);
                bm.or_bits(nbits as i128 - 3, u64::MAX);
                assert!(buf[..offset].iter().all(|&b| b == 0xa5));
                assert!(
                    buf[offset + need..].iter().all(|&b| b == 0xa5),
                    "nbits {nbits} offset {offset}"
                );
                let set = bits_of(&buf[offset..offset + need]);
                assert_eq!(set.len() as u64, nbits);
            }
        }
    }

    #[test]
    fn or_bits_clips_both_ends_and_keeps_existing_bits() {
        let mut buf = [0x80u8, 0, 0];
        let mut bm = IovaBitmap::new(0, 20 * 4096, 4096, &mut buf).unwrap();
        bm.or_bits(-2, 0b1111); // bits -2..2 -> 0, 1
        bm.or_bits(18, u64::MAX); // bits 18, 19 only
        assert_eq!(bits_of(&buf), vec![0, 1, 7, 18, 19]);
    }

    #[test]
    fn errors_not_panics_on_bad_geometry() {
        let mut buf = [0u8; 8];
        assert!(IovaBitmap::new(0, 0, 4096, &mut buf).is_err());
        assert!(IovaBitmap::new(0, 4096, 3000, &mut buf).is_err());
        assert!(matches!(
            IovaBitmap::new(u64::MAX, 2, 1, &mut buf),
            Err(LogError::Overflow { .. })
        ));
        // A huge length with a small buffer is an error, not an out-of-bounds write.
        assert!(IovaBitmap::new(0, u64::MAX, 4096, &mut buf).is_err());
    }

    #[test]
    fn windows_carry_sets_across_edges() {
        // 1 GiB set at 4 KiB pages straddling a window edge: every bit is set (Linux 2780025e).
        let page = 4096u64;
        let total_pages = 4096u64;
        let mut whole = vec![0u8; (total_pages / 8) as usize];
        let mut window = vec![0u8; 64]; // 512 bits per window
        for_each_window::<LogError>(
            0,
            total_pages * page,
            page,
            &mut window,
            |bm| {
                let start = bm.window_range().iova();
                // A big set that begins inside this window only.
                if start == 500 * page {
                    // never: windows start at multiples of 512 pages
                    unreachable!();
                }
                if start == 512 * page {
                    bm.set(1000 * page, 1500 * page);
                }
                Ok(())
            },
            |offset, bytes| {
                whole[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
                Ok(())
            },
        )
        .unwrap();
        let set = bits_of(&whole);
        assert_eq!(set.first(), Some(&1000));
        assert_eq!(set.last(), Some(&2499));
        assert_eq!(set.len(), 1500);
    }
}
