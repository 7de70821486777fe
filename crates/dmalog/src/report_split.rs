//! Splitting one REPORT into several requests, each starting on a whole `u64` word of the
//! caller's bitmap, so every part writes straight into its own words of the one buffer.
//!
//! The consumers split for different reasons (the VFIO device to bound how long one ioctl
//! holds the device, the vfio-user client to fit `max_data_xfer_size`, the iommufd tracker
//! not at all), but the arithmetic is the same and lives here.

use crate::error::LogResult;
use crate::iova_bitmap::report_bits;
use crate::ranges::IovaRange;
use crate::tracker::words_as_bytes;

/// One part of a split report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportPart {
    /// The IOVA range this part reports (never empty).
    pub range: IovaRange,
    /// Index of the first word of the caller's bitmap this part fills.
    pub first_word: usize,
    /// Words of the caller's bitmap this part fills: `ceil(bits / 64)`.
    pub words: usize,
    /// Bytes a kernel-style report of this part writes: `ceil(bits / 8)`, at most
    /// `8 * words`.
    pub bitmap_bytes: usize,
}

impl ReportPart {
    /// This part's words of the whole report's bitmap (`bitmap` must hold the whole report:
    /// check it with [`crate::tracker::checked_report_words`] first, or this panics).
    pub fn words_of<'a>(&self, bitmap: &'a mut [u64]) -> &'a mut [u64] {
        &mut bitmap[self.first_word..self.first_word + self.words]
    }

    /// The first `bitmap_bytes` bytes of this part's words: exactly what a kernel report of
    /// the part may write (same precondition as [`ReportPart::words_of`]).
    pub fn bytes_of<'a>(&self, bitmap: &'a mut [u64]) -> &'a mut [u8] {
        let bitmap_bytes = self.bitmap_bytes;
        &mut words_as_bytes(self.words_of(bitmap))[..bitmap_bytes]
    }
}

/// The parts of a report of `range` at `page_size`, in IOVA order.
#[derive(Debug, Clone)]
pub struct ReportParts {
    range: IovaRange,
    page_size: u64,
    part_len_bytes: u64,
    done_bytes: u64,
}

/// Splits a report of `range` at `page_size` into parts of at most `max_part_len_bytes`
/// (`None`: one part). The limit is rounded down to a whole number of bitmap words (64
/// pages), and is at least one word, so each part starts on a word of the caller's bitmap;
/// the last part may be shorter. Fails as [`report_bits`] does for a page size that is not a
/// non-zero power of two.
pub fn report_parts(
    range: IovaRange,
    page_size: u64,
    max_part_len_bytes: Option<u64>,
) -> LogResult<ReportParts> {
    report_bits(range.length(), page_size)?;
    let part_len_bytes = match max_part_len_bytes {
        Some(max) if max < range.length() => {
            let word_len_bytes = page_size.saturating_mul(64);
            (max / word_len_bytes).max(1).saturating_mul(word_len_bytes)
        }
        _ => range.length(),
    };
    Ok(ReportParts {
        range,
        page_size,
        part_len_bytes,
        done_bytes: 0,
    })
}

impl Iterator for ReportParts {
    type Item = ReportPart;

    fn next(&mut self) -> Option<ReportPart> {
        let left_bytes = self.range.length() - self.done_bytes;
        if left_bytes == 0 {
            return None;
        }
        let len_bytes = self.part_len_bytes.min(left_bytes);
        // Inside the range (checked at its creation), and not empty.
        let range = IovaRange::new(self.range.iova() + self.done_bytes, len_bytes).ok()?;
        let page_shift = self.page_size.trailing_zeros();
        let bits = ((len_bytes - 1) >> page_shift) + 1;
        let part = ReportPart {
            range,
            first_word: ((self.done_bytes >> page_shift) / 64) as usize,
            words: bits.div_ceil(64) as usize,
            bitmap_bytes: bits.div_ceil(8) as usize,
        };
        self.done_bytes += len_bytes;
        Some(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iova_bitmap::report_bytes;
    use crate::tracker::report_words;

    const PAGE: u64 = 4096;

    fn parts(iova: u64, len: u64, max: Option<u64>) -> Vec<ReportPart> {
        report_parts(IovaRange::new(iova, len).unwrap(), PAGE, max)
            .unwrap()
            .collect()
    }

    #[test]
    fn parts_start_on_words_and_cover_the_range_exactly() {
        // 200 pages and a bit, at most 100 pages a part: rounded down to 64 pages.
        let (base, len) = (1 << 30, 200 * PAGE + 1);
        let got = parts(base, len, Some(100 * PAGE));
        let lens: Vec<u64> = got.iter().map(|p| p.range.length()).collect();
        assert_eq!(lens, [64 * PAGE, 64 * PAGE, 64 * PAGE, 8 * PAGE + 1]);
        let mut next_iova = base;
        for (i, part) in got.iter().enumerate() {
            assert_eq!(part.range.iova(), next_iova);
            assert_eq!(part.first_word, i);
            let part_len = part.range.length();
            assert_eq!(part.words as u64, report_words(part_len, PAGE).unwrap());
            assert_eq!(
                part.bitmap_bytes as u64,
                report_bytes(part_len, PAGE).unwrap()
            );
            next_iova += part_len;
        }
        assert_eq!(next_iova, base + len);
        // The last part: 9 pages (one partial) = 9 bits = 2 bytes of 1 word.
        assert_eq!((got[3].words, got[3].bitmap_bytes), (1, 2));
    }

    #[test]
    fn no_limit_or_a_large_one_is_one_part_and_a_tiny_one_is_one_word() {
        for max in [None, Some(300 * PAGE), Some(u64::MAX)] {
            assert_eq!(parts(0, 300 * PAGE, max).len(), 1, "{max:?}");
        }
        let tiny = parts(0, 130 * PAGE, Some(1));
        assert_eq!(tiny.len(), 3);
        assert!(tiny.iter().take(2).all(|p| p.range.length() == 64 * PAGE));
        // A page size so large that a word of it overflows: one part.
        let huge = report_parts(IovaRange::new(0, u64::MAX).unwrap(), 1 << 60, Some(1 << 61));
        assert_eq!(huge.unwrap().count(), 1);
    }

    #[test]
    fn a_bad_page_size_is_refused_and_parts_slice_the_callers_bitmap() {
        let range = IovaRange::new(0, 64 * PAGE).unwrap();
        assert!(report_parts(range, 0, None).is_err());
        assert!(report_parts(range, 3000, None).is_err());
        let mut bitmap = [0u64; 3];
        let part = parts(0, 130 * PAGE, Some(64 * PAGE))[2];
        assert_eq!((part.first_word, part.words, part.bitmap_bytes), (2, 1, 1));
        part.bytes_of(&mut bitmap)[0] = 0b11;
        assert_eq!(bitmap, [0, 0, 0b11]);
        assert_eq!(part.words_of(&mut bitmap).len(), 1);
    }
}
