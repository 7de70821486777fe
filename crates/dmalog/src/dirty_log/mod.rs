//! The lock-free dirty log: one bit per page of an IOVA range, marked concurrently by any
//! number of DMA writers and read-and-cleared into an [`IovaBitmap`] at any page size.
//!
//! Layout: `words` holds a bit per page (64 pages per word); `summary` holds a bit per
//! word, set whenever that word may be non-zero, so a report walks only the summary plus the
//! words that hold dirty pages: a sparse report costs in proportion to its dirty words.
//!
//! # The no-lost-dirty-page protocol (SPEC 3.4)
//! Writer, per word touched: `W0` load the word (Acquire); if it already holds the bits,
//! go to `W2`. Otherwise `W1` fetch_or the bits (AcqRel). `W2`: load the summary word and,
//! only if the word's summary bit is clear, fetch_or it (Release).
//! Reader, per summary word: `R1` fetch_and the summary bits off (AcqRel), then for each
//! word that was flagged `R2` swap the word to 0 (AcqRel, even if it reads 0) - or, for a
//! word only partly inside the report, fetch_and its reported bits off and `R3` put the
//! summary bit back if bits remain.
//!
//! Why nothing is lost: take the last report `R` whose `R2` on the word comes before the
//! writer's `W0` / `W1` (in the word's modification order). Both read from `R2`'s release
//! sequence (every later write to the word is an RMW, until the next report's `R2`) and
//! acquire, so `R`'s `R1` happens-before the writer's summary load, which therefore reads
//! `R1`'s clear or a later value. If it reads the bit clear, the writer sets it (an RMW,
//! after `R1`), and the next report's `R1` finds it and its `R2` takes the word, after the
//! writer's bits are in it. If it reads the bit set, that set came after `R1` (from another
//! writer's `W2`, or an `R3`), and the next report to clear it is a report after `R`, whose
//! `R2` therefore comes after the writer's `W0` / `W1` and takes its bits (for `W0` they
//! were there already: set by an RMW after `R2`). Without the Acquire on `W0` / `W1` the
//! summary load could see a set bit from before `R1` and skip the repair of a word that
//! another writer has set but not yet flagged. `R2` is an RMW even on a clean flagged word
//! so that it heads a release sequence. The loom models in `tests/loom_dirty_log.rs` check
//! all of this (two writers on one page, with and without an earlier report).
//!
//! Data ordering: the page data must be in memory before the bit can be seen, or a report
//! could clear the bit before a consumer copies stale data. The RMW path orders the data
//! store before `W1` (Release), and `R2` acquires it. The no-RMW path (`W0`) orders
//! nothing by itself, nor does a plain-store clear of an all-ones word, so
//! [`DirtyLog::record_write`] issues one SeqCst fence between the data copy and the mark
//! (one fence per write, not per page: the hot-path entry point for DMA writes; on x86-64
//! the RMW path's locked instruction is that fence, see `fence_then_rmw`) and every
//! clearing report ends with one: a writer whose access to a word came before the report's
//! clear of it has its fence ordered before the report's, so its data is visible after the
//! report.

use crate::bits::or_groups;
use crate::error::{LogError, LogResult};
use crate::iova_bitmap::IovaBitmap;
use crate::sync::{fence, AtomicBool, AtomicU64, Ordering};

/// A concurrent dirty bitmap over one IOVA range at one page size.
pub struct DirtyLog {
    base_iova: u64,
    length: u64,
    page_shift: u32,
    npages: u64,
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
    /// Set while a report runs; a report that finds it clear may use plain stores.
    reporting: AtomicBool,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("base_iova", &format_args!("{:#x}", self.base_iova))
            .field("length", &format_args!("{:#x}", self.length))
            .field("page_size", &self.page_size())
            .finish()
    }
}

/// Log words per summary word: one summary bit per word. Under loom a summary word covers
/// only two words (128 pages), so tiny model logs reach group boundaries and the dense
/// interior-group path.
#[cfg(not(loom))]
const GROUP_WORDS: u64 = 64;
#[cfg(loom)]
const GROUP_WORDS: u64 = 2;
/// The summary bits of a whole group.
const GROUP_MASK: u64 = u64::MAX >> (64 - GROUP_WORDS);

/// `count` zeroed atomics from `alloc_zeroed`: the OS hands out zero pages on first touch,
/// so a log over a large range costs memory only where it is marked or reported.
#[cfg(not(loom))]
fn zeroed_atomics(count: u64, what: &'static str) -> LogResult<Box<[AtomicU64]>> {
    let count = usize::try_from(count).map_err(|_| LogError::OutOfMemory(what))?;
    bytemuck::allocation::try_zeroed_slice_box(count).map_err(|()| LogError::OutOfMemory(what))
}

/// loom's atomics are not plain zeroable memory: one at a time (model logs are tiny).
#[cfg(loom)]
fn zeroed_atomics(count: u64, what: &'static str) -> LogResult<Box<[AtomicU64]>> {
    let count = usize::try_from(count).map_err(|_| LogError::OutOfMemory(what))?;
    let mut words = Vec::new();
    words
        .try_reserve_exact(count)
        .map_err(|_| LogError::OutOfMemory(what))?;
    words.extend((0..count).map(|_| AtomicU64::new(0)));
    Ok(words.into_boxed_slice())
}

/// Counts of the read-modify-writes `mark` issues and of the word RMWs a report issues
/// (unit tests only), to check that an already-dirty page costs none and that the sole
/// reporter clears all-ones words with plain stores.
#[cfg(all(test, not(loom)))]
mod rmw_count {
    use std::cell::Cell;
    thread_local! {
        pub static WORD: Cell<u64> = const { Cell::new(0) };
        pub static SUMMARY: Cell<u64> = const { Cell::new(0) };
        pub static REPORT_WORD: Cell<u64> = const { Cell::new(0) };
        pub static REPORT_SUMMARY: Cell<u64> = const { Cell::new(0) };
    }
}

#[inline(always)]
fn counted_word_rmw() {
    #[cfg(all(test, not(loom)))]
    rmw_count::WORD.with(|c| c.set(c.get() + 1));
}

#[inline(always)]
fn counted_report_word_rmw() {
    #[cfg(all(test, not(loom)))]
    rmw_count::REPORT_WORD.with(|c| c.set(c.get() + 1));
}

#[inline(always)]
fn counted_report_summary_rmw() {
    #[cfg(all(test, not(loom)))]
    rmw_count::REPORT_SUMMARY.with(|c| c.set(c.get() + 1));
}

#[inline(always)]
fn counted_summary_rmw() {
    #[cfg(all(test, not(loom)))]
    rmw_count::SUMMARY.with(|c| c.set(c.get() + 1));
}

/// The mask of bits `[lo, hi]` (inclusive) of a word.
#[inline]
fn bit_span(lo: u64, hi: u64) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// W1 of a write whose data must be ordered before its bit: a SeqCst fence, then the
/// `fetch_or`. On x86-64 (outside loom) the fence is left out: the `fetch_or` compiles to a
/// `lock or`, and a locked instruction is itself a full barrier (Intel SDM vol. 3A 10.2.2,
/// "reads or writes cannot be reordered with ... locked instructions"; AMD APM vol. 2
/// 7.4.2), so `lock or` alone orders the data stores before the bit and every later load
/// after it, exactly as the fence's own `lock or $0` on the stack followed by this one
/// would. The compiler keeps the data before it and later loads after it because the RMW
/// is AcqRel. Elsewhere (and in the loom models, which check this path) the fence stays:
/// the memory model does not make an RMW of the word order earlier stores before later
/// loads of other locations.
#[inline(always)]
fn fence_then_rmw(word: &AtomicU64, mask: u64) {
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    fence(Ordering::SeqCst);
    counted_word_rmw();
    word.fetch_or(mask, Ordering::AcqRel); // W1
}

/// The index of the first non-zero summary word of `summary`. Out of line, so that the
/// scan of a sparse log's summary keeps its loop in registers whatever the caller inlines.
#[inline(never)]
fn first_flagged(summary: &[AtomicU64]) -> Option<usize> {
    let flagged_in = |words: &[AtomicU64]| {
        words
            .iter()
            .position(|word| word.load(Ordering::Relaxed) != 0)
    };
    // Eight words per test and branch: a clean stretch costs about two instructions a word.
    let mut chunks = summary.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        if chunk
            .iter()
            .fold(0, |any, word| any | word.load(Ordering::Relaxed))
            != 0
        {
            if let Some(offset) = flagged_in(chunk) {
                return Some(base + offset);
            }
        }
        base += 8;
    }
    flagged_in(chunks.remainder()).map(|offset| base + offset)
}

/// How dirty log pages become report bits; chosen once per report.
#[derive(Clone, Copy)]
enum Conversion {
    /// Same page size, and log words line up with report words: log word `w` is report
    /// word `w + word_shift`.
    Words { word_shift: i128 },
    /// Report pages are `2^k` log pages, aligned to them (k = 0: same size). `shift` is
    /// the report-relative index of log page 0 in log pages.
    Group { k: u32, shift: i128 },
    /// Log pages are `2^f` report pages, aligned to them. `shift` is the report bit of the
    /// start of log page 0.
    Replicate { f: u32, shift: i128 },
    /// Grids not aligned to each other: each run of dirty pages is set by address.
    ByAddress,
}

impl DirtyLog {
    /// A clean log covering `[iova, iova+len_bytes)` rounded out to whole pages of
    /// `page_size` (a power of two).
    pub fn new(iova: u64, len_bytes: u64, page_size: u64) -> LogResult<Self> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(LogError::Invalid("page size is not a power of two"));
        }
        if len_bytes == 0 {
            return Err(LogError::Invalid("zero-len_bytes range"));
        }
        let end = iova
            .checked_add(len_bytes)
            .ok_or(LogError::Overflow { iova, len_bytes })?;
        let mask = page_size - 1;
        let base_iova = iova & !mask;
        let end = end
            .checked_add(mask)
            .ok_or(LogError::Overflow { iova, len_bytes })?
            & !mask;
        let page_shift = page_size.trailing_zeros();
        let npages = (end - base_iova) >> page_shift;
        let nwords = npages.div_ceil(64);
        Ok(DirtyLog {
            base_iova,
            length: end - base_iova,
            page_shift,
            npages,
            words: zeroed_atomics(nwords, "dirty log words")?,
            summary: zeroed_atomics(nwords.div_ceil(GROUP_WORDS), "dirty log summary")?,
            reporting: AtomicBool::new(false),
        })
    }

    /// First IOVA covered (aligned to the page size).
    pub fn base_iova(&self) -> u64 {
        self.base_iova
    }

    /// Bytes covered (a multiple of the page size).
    pub fn len_bytes(&self) -> u64 {
        self.length
    }

    /// Log page size in bytes.
    pub fn page_size(&self) -> u64 {
        1u64 << self.page_shift
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Bytes of memory the log itself uses (words plus summary).
    pub fn footprint_bytes(&self) -> u64 {
        ((self.words.len() + self.summary.len()) * 8) as u64
    }

    /// Pages `[first, last]` of the log that `[iova, iova+len)` touches, if any.
    #[inline]
    fn page_span(&self, iova: u64, len: u64) -> Option<(u64, u64)> {
        // Common case: wholly inside the log (no clipping).
        let offset = iova.wrapping_sub(self.base_iova);
        if offset < self.length && len.wrapping_sub(1) < self.length - offset {
            return Some((
                offset >> self.page_shift,
                (offset + len - 1) >> self.page_shift,
            ));
        }
        if len == 0 {
            return None;
        }
        let start = iova.max(self.base_iova);
        let end = iova.saturating_add(len).min(self.base_iova + self.length);
        if start >= end {
            return None;
        }
        Some((
            (start - self.base_iova) >> self.page_shift,
            (end - 1 - self.base_iova) >> self.page_shift,
        ))
    }

    /// Records a DMA write of `[iova, iova+len_bytes)` whose data is already in memory: the
    /// mark of [`DirtyLog::mark`], ordered after the data (so the data cannot be seen after
    /// the bit; see the module comment). The entry point for device write paths.
    ///
    /// Formally one SeqCst fence comes before the first word's mark. It is issued after
    /// the span and the word addresses are computed (a fence holds back every later load,
    /// the log's own fields too), and a word that a plain load shows is not yet dirty takes
    /// the RMW path through `fence_then_rmw`: on x86-64 its locked RMW is the fence.
    #[inline]
    pub fn record_write(&self, iova: u64, len_bytes: u64) {
        let Some((first, last)) = self.page_span(iova, len_bytes) else {
            // Nothing logged: nothing to order.
            return;
        };
        let (first_word, last_word) = (first / 64, last / 64);
        let mut fenced = false;
        if first_word == last_word {
            let mask = if first == last {
                1u64 << (first % 64)
            } else {
                bit_span(first % 64, last % 64)
            };
            self.record_word(first_word as usize, mask, &mut fenced);
            return;
        }
        self.record_word(first_word as usize, bit_span(first % 64, 63), &mut fenced);
        for word in first_word + 1..last_word {
            self.record_word(word as usize, u64::MAX, &mut fenced);
        }
        self.record_word(last_word as usize, bit_span(0, last % 64), &mut fenced);
    }

    /// One word of [`DirtyLog::record_write`]: `fenced` says whether the write's fence (or
    /// on x86-64 a locked RMW, which is one) has been issued.
    #[inline(always)]
    fn record_word(&self, word_index: usize, mask: u64, fenced: &mut bool) {
        let summary = &self.summary[word_index / GROUP_WORDS as usize];
        let summary_bit = 1u64 << (word_index as u64 % GROUP_WORDS);
        let word = &self.words[word_index];
        if !*fenced {
            *fenced = true;
            // A hint, not a decision: the RMW path is right whatever the word holds, and
            // the no-RMW path decides on its own load, after the fence.
            if word.load(Ordering::Relaxed) & mask != mask {
                fence_then_rmw(word, mask);
                Self::set_summary(summary, summary_bit);
                return;
            }
            fence(Ordering::SeqCst);
        }
        Self::mark_word_at(word, summary, summary_bit, mask);
    }

    /// Marks every page `[iova, iova+len_bytes)` touches as dirty; the parts outside the log are
    /// ignored. At most one atomic RMW per 64-page word (plus one on the summary the first
    /// time a word of its group turns dirty), and none when the word already holds the bits.
    /// Orders nothing before the mark: a DMA write uses [`DirtyLog::record_write`] (or
    /// issues a SeqCst fence first, as [`crate::WriteRecorder`] does).
    #[inline]
    pub fn mark(&self, iova: u64, len_bytes: u64) {
        let Some((first, last)) = self.page_span(iova, len_bytes) else {
            return;
        };
        let (first_word, last_word) = (first / 64, last / 64);
        if first_word == last_word {
            let mask = if first == last {
                1u64 << (first % 64)
            } else {
                bit_span(first % 64, last % 64)
            };
            self.mark_word(first_word as usize, mask);
            return;
        }
        self.mark_word(first_word as usize, bit_span(first % 64, 63));
        for word in first_word + 1..last_word {
            self.mark_word(word as usize, u64::MAX);
        }
        self.mark_word(last_word as usize, bit_span(0, last % 64));
    }

    #[inline]
    fn mark_word(&self, word_index: usize, mask: u64) {
        Self::mark_word_at(
            &self.words[word_index],
            &self.summary[word_index / GROUP_WORDS as usize],
            1u64 << (word_index as u64 % GROUP_WORDS),
            mask,
        );
    }

    #[inline(always)]
    fn mark_word_at(word: &AtomicU64, summary: &AtomicU64, summary_bit: u64, mask: u64) {
        // W0. Acquire: if the bits were set after a report cleared this word, the load reads
        // from that report's R2 release sequence, so the summary load below cannot see a
        // summary bit from before that report's R1 (a stale "set" would skip the repair).
        if word.load(Ordering::Acquire) & mask == mask {
            // Already dirty. The writer that set these bits may not have reached its
            // summary update yet; make sure the summary points here before returning.
            Self::set_summary(summary, summary_bit);
            return;
        }
        counted_word_rmw();
        word.fetch_or(mask, Ordering::AcqRel); // W1
        Self::set_summary(summary, summary_bit);
    }

    /// W2: sets the word's summary bit unless it is set already. Runs after the word's W0
    /// (Acquire) or W1 (AcqRel), either of which synchronises with the R2 of the report
    /// that last cleared the word, so a set bit seen here is not one that report's R1
    /// cleared: it is from a later W2 (or R3), and the report that clears it takes the word
    /// after this writer's bits were in it.
    #[inline(always)]
    fn set_summary(summary: &AtomicU64, summary_bit: u64) {
        if summary.load(Ordering::Relaxed) & summary_bit == 0 {
            counted_summary_rmw();
            summary.fetch_or(summary_bit, Ordering::Release);
        }
    }

    /// Whether any page of `[iova, iova+len_bytes)` is dirty (a read; clears nothing).
    pub fn is_dirty(&self, iova: u64, len_bytes: u64) -> bool {
        let Some((first, last)) = self.page_span(iova, len_bytes) else {
            return false;
        };
        (first / 64..=last / 64).any(|w| {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            self.words[w as usize].load(Ordering::Acquire) & bit_span(lo, hi) != 0
        })
    }

    fn conversion(&self, bitmap: &IovaBitmap<'_>) -> Conversion {
        let log_shift = self.page_shift;
        let report_shift = bitmap.page_shift();
        let delta = self.base_iova as i128 - bitmap.iova() as i128;
        if report_shift >= log_shift {
            if report_shift == log_shift && delta & ((64i128 << log_shift) - 1) == 0 {
                return Conversion::Words {
                    word_shift: delta >> (log_shift + 6),
                };
            }
            if delta & ((1i128 << log_shift) - 1) == 0 {
                return Conversion::Group {
                    k: report_shift - log_shift,
                    shift: delta >> log_shift,
                };
            }
        } else if delta & ((1i128 << report_shift) - 1) == 0 {
            return Conversion::Replicate {
                f: log_shift - report_shift,
                shift: delta >> report_shift,
            };
        }
        Conversion::ByAddress
    }

    /// A log word spanning two report bits of `2^k` log pages each: split at the boundary.
    fn emit_grouped_split(
        k: u32,
        shift: i128,
        word_index: u64,
        value: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) {
        let first = 64 * word_index as i128 + shift;
        let (word, offset) = (first >> 6, (first & 63) as u32);
        DirtyLog::emit_grouped(k, word, value << offset, bitmap);
        if offset != 0 {
            DirtyLog::emit_grouped(k, word + 1, value >> (64 - offset), bitmap);
        }
    }

    /// ORs the pages of one report-aligned group of 64 log pages (`value`, at report-
    /// relative log word `word`) into the bitmap, `2^k` log pages per report bit.
    #[inline]
    fn emit_grouped(k: u32, word: i128, value: u64, bitmap: &mut IovaBitmap<'_>) {
        if value == 0 {
            return;
        }
        match k {
            0 => bitmap.or_bits(word * 64, value),
            1..=5 => bitmap.or_bits(word * (64 >> k), or_groups(value, k)),
            _ => bitmap.or_bits((word * 64) >> k, 1),
        }
    }

    /// Takes every bit of a word (R2); `None` when it is clean.
    #[inline]
    fn take_whole_word(word: &AtomicU64, exclusive: bool) -> Option<u64> {
        // An all-ones word cannot change value under writers (a mark of it sets no new
        // bit), so the sole reporter may clear it with a plain store: no locked instruction
        // on dense reports. A writer whose stale load made it RMW the word between this load
        // and the store has its page reported now; the report's closing SeqCst fence makes
        // its data visible (see `clear_walk`).
        if exclusive && word.load(Ordering::Acquire) == u64::MAX {
            word.store(0, Ordering::Release);
            return Some(u64::MAX);
        }
        // Always an RMW, even on a clean word: a writer that sets bits after it reads from
        // its release sequence, so a later already-dirty mark of those bits (W0) sees this
        // report's R1 and repairs the summary instead of trusting a stale summary bit.
        counted_report_word_rmw();
        match word.swap(0, Ordering::AcqRel) {
            0 => None,
            value => Some(value),
        }
    }

    /// Reports and clears the dirty pages of `[iova, iova+len_bytes)` into `bitmap`, converting
    /// to its page size: a report page is set when any dirty log page overlaps it. Log pages
    /// overlapping the range are cleared; others are untouched. Bits are only ORed into the
    /// bitmap, never cleared. Cost: one summary load per 4096 log pages of the range plus
    /// one RMW per dirty word.
    pub fn read_and_clear(&self, iova: u64, len_bytes: u64, bitmap: &mut IovaBitmap<'_>) {
        let emitter = Emitter {
            conversion: self.conversion(bitmap),
            pending_bit: NO_PENDING_BIT,
        };
        let mut sink = BitmapSink { emitter, bitmap };
        self.clear_walk(iova, len_bytes, &mut sink);
        sink.emitter.finish(sink.bitmap);
    }

    /// Reports the dirty pages of `[iova, iova+len_bytes)` into `bitmap` like
    /// [`DirtyLog::read_and_clear`], but leaves the log as it is (the iommufd NO_CLEAR read).
    pub fn read(&self, iova: u64, len_bytes: u64, bitmap: &mut IovaBitmap<'_>) {
        let Some((first, last)) = self.page_span(iova, len_bytes) else {
            return;
        };
        let mut emitter = Emitter {
            conversion: self.conversion(bitmap),
            pending_bit: NO_PENDING_BIT,
        };
        for word_index in first / 64..=last / 64 {
            let summary = self.summary[(word_index / GROUP_WORDS) as usize].load(Ordering::Acquire);
            if summary & (1u64 << (word_index % GROUP_WORDS)) == 0 {
                continue;
            }
            let lo = if word_index == first / 64 {
                first % 64
            } else {
                0
            };
            let hi = if word_index == last / 64 {
                last % 64
            } else {
                63
            };
            let value = self.words[word_index as usize].load(Ordering::Acquire) & bit_span(lo, hi);
            if value != 0 {
                emitter.emit(self, word_index, value, bitmap);
            }
        }
        emitter.finish(bitmap);
    }

    /// Clears the dirty pages of `[iova, iova+len_bytes)` and calls `page(iova)` with the first
    /// IOVA of each, in increasing order: how a hardware tracker walks its log to send
    /// page addresses. `page` may block (a full receive ring): the walk simply waits.
    pub fn drain_pages(&self, iova: u64, len_bytes: u64, page: impl FnMut(u64)) {
        self.clear_walk(iova, len_bytes, &mut PageSink { page });
    }

    /// Takes a group wholly inside the report (its summary word read non-zero).
    #[inline]
    fn clear_interior_group(
        &self,
        summary_index: u64,
        summary: &AtomicU64,
        exclusive: bool,
        sink: &mut impl WordSink,
    ) {
        let group_first_word = summary_index * GROUP_WORDS;
        counted_report_summary_rmw();
        // R1 of the whole group: the same as a fetch_and of all its bits, one locked
        // exchange without a compare loop.
        let mut flagged = summary.swap(0, Ordering::AcqRel) & GROUP_MASK;
        if flagged == 0 || sink.interior_group(self, group_first_word, flagged, exclusive) {
            return;
        }
        while flagged != 0 {
            let word_index = group_first_word + flagged.trailing_zeros() as u64;
            flagged &= flagged - 1;
            if let Some(value) = Self::take_whole_word(&self.words[word_index as usize], exclusive)
            {
                sink.word(self, word_index, value);
            }
        }
    }

    /// Takes the words of the report's pages `[first, last]` in an edge group (the group of
    /// the first or the last page), partial words included.
    fn clear_edge_group(
        &self,
        summary_index: u64,
        first: u64,
        last: u64,
        exclusive: bool,
        sink: &mut impl WordSink,
    ) {
        let (first_word, last_word) = (first / 64, last / 64);
        let group_first_word = summary_index * GROUP_WORDS;
        let group_last_word = group_first_word + GROUP_WORDS - 1;
        let lo_word = first_word.max(group_first_word);
        let hi_word = last_word.min(group_last_word);
        let summary_mask = bit_span(lo_word % GROUP_WORDS, hi_word % GROUP_WORDS);
        let summary = &self.summary[summary_index as usize];
        if summary.load(Ordering::Relaxed) & summary_mask == 0 {
            return;
        }
        counted_report_summary_rmw();
        let mut flagged = summary.fetch_and(!summary_mask, Ordering::AcqRel) & summary_mask; // R1
        while flagged != 0 {
            let word_index = group_first_word + flagged.trailing_zeros() as u64;
            flagged &= flagged - 1;
            let lo = if word_index == first_word {
                first % 64
            } else {
                0
            };
            let hi = if word_index == last_word {
                last % 64
            } else {
                63
            };
            let page_mask = bit_span(lo, hi);
            let word = &self.words[word_index as usize];
            let value = if page_mask == u64::MAX {
                match Self::take_whole_word(word, exclusive) {
                    Some(value) => value,
                    None => continue,
                }
            } else {
                let old = word.fetch_and(!page_mask, Ordering::AcqRel); // R2, partial word
                if old & !page_mask != 0 {
                    summary.fetch_or(1u64 << (word_index % GROUP_WORDS), Ordering::Release);
                    // R3
                }
                old & page_mask
            };
            if value != 0 {
                sink.word(self, word_index, value);
            }
        }
    }

    /// The clearing walk shared by every kind of report: summary words, then the flagged
    /// words, whole or (at the range edges) partial, handed to `sink`.
    fn clear_walk(&self, iova: u64, len: u64, sink: &mut impl WordSink) {
        let Some((first, last)) = self.page_span(iova, len) else {
            return;
        };
        // Reports normally run one at a time (the logging core serialises them); if two
        // overlap, the second uses only read-modify-writes.
        let exclusive = !self.reporting.swap(true, Ordering::Acquire);
        let (first_group, last_group) = (first / 64 / GROUP_WORDS, last / 64 / GROUP_WORDS);
        self.clear_edge_group(first_group, first, last, exclusive, sink);
        if last_group > first_group {
            // Interior groups lie wholly inside the range: a tight scan of the summary (one
            // load per 4096 pages), whole words only.
            let (interior_first, interior_end) = (first_group + 1, last_group);
            let mut at = interior_first;
            while let Some(offset) =
                first_flagged(&self.summary[at as usize..interior_end as usize])
            {
                let summary_index = at + offset as u64;
                let summary = &self.summary[summary_index as usize];
                self.clear_interior_group(summary_index, summary, exclusive, sink);
                at = summary_index + 1;
            }
            self.clear_edge_group(last_group, first, last, exclusive, sink);
        }
        // Pairs with the fence in `record_write`: a writer whose load or RMW of a word came
        // before this walk's clear of it (so its page is reported now, perhaps without an
        // RMW synchronising with it: the W0 path, a plain-store clear) had its data in
        // memory before that fence, so the data is visible to whoever reads the page after
        // this report returns. One fence per report.
        fence(Ordering::SeqCst);
        if exclusive {
            self.reporting.store(false, Ordering::Release);
        }
    }
}

mod sink;
use sink::{BitmapSink, Emitter, PageSink, WordSink, NO_PENDING_BIT};

#[cfg(all(test, not(loom)))]
mod tests;
#[cfg(all(test, not(loom)))]
mod window_tests;
