//! Where a clearing walk puts the dirty words it takes: report bits in an [`IovaBitmap`]
//! (converting page sizes) or page IOVAs handed to a closure.

use super::{Conversion, DirtyLog, GROUP_MASK, GROUP_WORDS};
use crate::bits::{for_each_run, replicate_bits};
use crate::iova_bitmap::IovaBitmap;
use crate::sync::Ordering;

/// Receives the dirty words a clearing walk takes.
pub(super) trait WordSink {
    /// A whole interior group of [`GROUP_WORDS`] words (`flagged` says which may be dirty). A sink with a
    /// faster way to take them all returns true after taking them with
    /// [`DirtyLog::take_whole_word`]; false leaves them to [`WordSink::word`].
    fn interior_group(
        &mut self,
        log: &DirtyLog,
        group_first_word: u64,
        flagged: u64,
        exclusive: bool,
    ) -> bool {
        let _ = (log, group_first_word, flagged, exclusive);
        false
    }

    /// The dirty pages `value` of log word `word_index`, already cleared from the log.
    fn word(&mut self, log: &DirtyLog, word_index: u64, value: u64);
}

/// Reports into an [`IovaBitmap`], converting page sizes.
pub(super) struct BitmapSink<'b, 'a> {
    pub(super) emitter: Emitter,
    pub(super) bitmap: &'b mut IovaBitmap<'a>,
}

impl WordSink for BitmapSink<'_, '_> {
    // Inline as when it shared a module (and a codegen unit) with the walk that calls it.
    #[inline]
    fn interior_group(
        &mut self,
        log: &DirtyLog,
        group_first_word: u64,
        mut flagged: u64,
        exclusive: bool,
    ) -> bool {
        match self.emitter.conversion {
            // Dense fast path: 64 whole log words onto 64 whole report words inside the
            // bitmap: one bounds check for the group.
            Conversion::Words { word_shift } => {
                let Some(out) = self
                    .bitmap
                    .aligned_words_mut(group_first_word as i128 + word_shift, GROUP_WORDS as usize)
                else {
                    return false;
                };
                let group = group_first_word as usize..(group_first_word + GROUP_WORDS) as usize;
                let words = &log.words[group];
                let take = |slot: usize, out: &mut [u8]| {
                    if let Some(value) = DirtyLog::take_whole_word(&words[slot], exclusive) {
                        let dst = &mut out[8 * slot..8 * slot + 8];
                        let mut current = [0u8; 8];
                        current.copy_from_slice(dst);
                        dst.copy_from_slice(&(u64::from_le_bytes(current) | value).to_le_bytes());
                    }
                };
                if flagged == GROUP_MASK {
                    // A dense group. All dirty (the usual case) is taken in three straight
                    // passes, about three instructions a word: loads only to check, the
                    // plain-store clears of `take_whole_word` (every word was seen all ones,
                    // which no writer can change; a load moving ahead of the previous word's
                    // store is an order the per-word loop allows too), and a fill, since
                    // ORing all ones sets all ones.
                    if exclusive
                        && words
                            .iter()
                            .fold(u64::MAX, |all, word| all & word.load(Ordering::Acquire))
                            == u64::MAX
                    {
                        for word in words {
                            word.store(0, Ordering::Release);
                        }
                        out.fill(0xff);
                        return true;
                    }
                    // Otherwise a straight loop, no bit scan between words.
                    for slot in 0..GROUP_WORDS as usize {
                        take(slot, out);
                    }
                    return true;
                }
                while flagged != 0 {
                    let slot = flagged.trailing_zeros() as usize;
                    flagged &= flagged - 1;
                    take(slot, out);
                }
                true
            }
            Conversion::Group { k, shift } if k >= 6 => {
                while flagged != 0 {
                    let word_index = group_first_word + flagged.trailing_zeros() as u64;
                    flagged &= flagged - 1;
                    if let Some(value) =
                        DirtyLog::take_whole_word(&log.words[word_index as usize], exclusive)
                    {
                        self.emitter
                            .emit_coarse(k, shift, word_index, value, self.bitmap);
                    }
                }
                true
            }
            _ => false,
        }
    }

    #[inline]
    fn word(&mut self, log: &DirtyLog, word_index: u64, value: u64) {
        self.emitter.emit(log, word_index, value, self.bitmap);
    }
}

/// Hands each dirty page's IOVA to a closure.
pub(super) struct PageSink<F> {
    pub(super) page: F,
}

impl<F: FnMut(u64)> WordSink for PageSink<F> {
    fn word(&mut self, log: &DirtyLog, word_index: u64, mut value: u64) {
        let first_page = log.base_iova + ((64 * word_index) << log.page_shift);
        while value != 0 {
            let bit = u64::from(value.trailing_zeros());
            value &= value - 1;
            (self.page)(first_page + (bit << log.page_shift));
        }
    }
}

/// Turns dirty log words into report bits for one report.
pub(super) struct Emitter {
    pub(super) conversion: Conversion,
    /// For report pages of 64 or more log pages: the report bit being collected, or
    /// [`NO_PENDING_BIT`].
    pub(super) pending_bit: i64,
}

pub(super) const NO_PENDING_BIT: i64 = i64::MIN;

impl Emitter {
    /// Sets the report bits of the dirty log pages `value` (log word `word_index`) holds.
    #[inline]
    pub(super) fn emit(
        &mut self,
        log: &DirtyLog,
        word_index: u64,
        value: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) {
        match self.conversion {
            Conversion::Words { word_shift } => {
                bitmap.or_word(word_index as i128 + word_shift, value)
            }
            Conversion::Group { k, shift } if k >= 6 => {
                self.emit_coarse(k, shift, word_index, value, bitmap)
            }
            Conversion::Group { k, shift } => {
                let first = 64 * word_index as i128 + shift;
                // Arithmetic shift and mask: floor division by 64, also for negative values.
                let (word, offset) = (first >> 6, (first & 63) as u32);
                DirtyLog::emit_grouped(k, word, value << offset, bitmap);
                if offset != 0 {
                    DirtyLog::emit_grouped(k, word + 1, value >> (64 - offset), bitmap);
                }
            }
            Conversion::Replicate { f, shift } => {
                let first_bit = shift + ((64 * word_index as i128) << f);
                if f <= 5 {
                    let per_chunk = 64u32 >> f;
                    for chunk in 0..(1u32 << f) {
                        let bits =
                            (value >> (chunk * per_chunk)) & ((1u128 << per_chunk) - 1) as u64;
                        if bits != 0 {
                            bitmap.or_bits(first_bit + 64 * chunk as i128, replicate_bits(bits, f));
                        }
                    }
                } else {
                    for_each_run(value, |a, b| {
                        let lo = first_bit + ((a as i128) << f);
                        let hi = first_bit + ((b as i128) << f);
                        bitmap.set_bits(lo.max(0) as u64, hi.clamp(0, u64::MAX as i128) as u64);
                    });
                }
            }
            Conversion::ByAddress => {
                let page0 = log.base_iova + ((64 * word_index) << log.page_shift);
                for_each_run(value, |a, b| {
                    bitmap.set(
                        page0 + ((a as u64) << log.page_shift),
                        ((b - a) as u64) << log.page_shift,
                    );
                });
            }
        }
    }

    /// One dirty log word when a report page holds `2^k >= 64` log pages.
    #[inline]
    fn emit_coarse(
        &mut self,
        k: u32,
        shift: i128,
        word_index: u64,
        value: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) {
        // Several log words per report bit: set each bit once, when the words move
        // on to the next one (words arrive in increasing order). The report-relative
        // page index fits i64: |shift| < 2^52 (IOVA / 4 KiB), word_index < 2^58.
        let first_page = 64 * word_index as i64 + shift as i64;
        let bit = first_page >> k;
        if bit != (first_page + 63) >> k {
            // The word straddles two report bits (log base not aligned to 64 pages).
            DirtyLog::emit_grouped_split(k, shift, word_index, value, bitmap);
            return;
        }
        if self.pending_bit != bit {
            if self.pending_bit != NO_PENDING_BIT {
                bitmap.or_bits(i128::from(self.pending_bit), 1);
            }
            self.pending_bit = bit;
        }
    }

    /// Sets the report bit still being collected.
    pub(super) fn finish(&mut self, bitmap: &mut IovaBitmap<'_>) {
        if self.pending_bit != NO_PENDING_BIT {
            bitmap.or_bits(i128::from(self.pending_bit), 1);
            self.pending_bit = NO_PENDING_BIT;
        }
    }
}
