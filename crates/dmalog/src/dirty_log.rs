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

use crate::bits::{for_each_run, or_groups, replicate_bits};
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

/// Receives the dirty words a clearing walk takes.
trait WordSink {
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
struct BitmapSink<'b, 'a> {
    emitter: Emitter,
    bitmap: &'b mut IovaBitmap<'a>,
}

impl WordSink for BitmapSink<'_, '_> {
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
struct PageSink<F> {
    page: F,
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
struct Emitter {
    conversion: Conversion,
    /// For report pages of 64 or more log pages: the report bit being collected, or
    /// [`NO_PENDING_BIT`].
    pending_bit: i64,
}

const NO_PENDING_BIT: i64 = i64::MIN;

impl Emitter {
    /// Sets the report bits of the dirty log pages `value` (log word `word_index`) holds.
    #[inline]
    fn emit(&mut self, log: &DirtyLog, word_index: u64, value: u64, bitmap: &mut IovaBitmap<'_>) {
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
    fn finish(&mut self, bitmap: &mut IovaBitmap<'_>) {
        if self.pending_bit != NO_PENDING_BIT {
            bitmap.or_bits(i128::from(self.pending_bit), 1);
            self.pending_bit = NO_PENDING_BIT;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn report(log: &DirtyLog, iova: u64, len: u64, page: u64) -> Vec<u64> {
        let bytes = crate::iova_bitmap::report_bytes(len, page).unwrap() as usize;
        let mut buf = vec![0u8; bytes];
        let mut bm = IovaBitmap::new(iova, len, page, &mut buf).unwrap();
        log.read_and_clear(iova, len, &mut bm);
        (0..bytes as u64 * 8)
            .filter(|k| buf[(k / 8) as usize] >> (k % 8) & 1 == 1)
            .collect()
    }

    #[test]
    fn mark_and_report_same_page_size() {
        let log = DirtyLog::new(0x100000, 1 << 30, 4096).unwrap();
        log.mark(0x100000, 1);
        log.mark(0x100000 + 70 * 4096 + 5, 4096);
        assert_eq!(report(&log, 0x100000, 1 << 20, 4096), vec![0, 70, 71]);
        assert!(
            report(&log, 0x100000, 1 << 20, 4096).is_empty(),
            "a report clears"
        );
    }

    #[test]
    fn unaligned_start_with_respect_to_words() {
        let log = DirtyLog::new(0, 1 << 24, 4096).unwrap();
        for page in [3u64, 64, 65, 130, 200] {
            log.mark(page * 4096, 4096);
        }
        // Report starting at page 3: bit k = page 3 + k.
        assert_eq!(
            report(&log, 3 * 4096, 1 << 20, 4096),
            vec![0, 61, 62, 127, 197]
        );
    }

    #[test]
    fn partial_word_report_keeps_the_rest_reachable() {
        let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
        log.mark(0, 64 * 4096);
        assert_eq!(report(&log, 4096, 4096, 4096), vec![0]);
        // The other 63 pages are still found through the summary.
        assert_eq!(report(&log, 0, 64 * 4096, 4096).len(), 63);
    }

    fn rmws() -> (u64, u64) {
        (
            rmw_count::WORD.with(|c| c.get()),
            rmw_count::SUMMARY.with(|c| c.get()),
        )
    }

    #[test]
    fn dense_group_of_full_and_partial_words_keeps_the_callers_bits() {
        // Group 1 (interior, every word flagged): even words all dirty, odd words one page
        // each. The caller's bitmap has bits of its own in both kinds of word and in clean
        // groups; the report only adds bits.
        let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
        let mut expected = Vec::new();
        for k in 0..64u64 {
            let first_page = 4096 + 64 * k;
            if k % 2 == 0 {
                log.mark(first_page * 4096, 64 * 4096);
                expected.extend(first_page..first_page + 64);
            } else {
                log.mark((first_page + k) * 4096, 1);
                expected.push(first_page + k);
            }
        }
        let callers = [5u64, 4096 + 64 + 3, 4096 + 2 * 64 + 7, 12000];
        expected.extend(callers);
        expected.sort_unstable();
        expected.dedup();
        let mut buf = vec![0u8; (64 << 20) / 4096 / 8];
        for page in callers {
            buf[(page / 8) as usize] |= 1 << (page % 8);
        }
        let mut bm = IovaBitmap::new(0, 64 << 20, 4096, &mut buf).unwrap();
        log.read_and_clear(0, 64 << 20, &mut bm);
        let got: Vec<u64> = (0..buf.len() as u64 * 8)
            .filter(|k| buf[(k / 8) as usize] >> (k % 8) & 1 == 1)
            .collect();
        assert_eq!(got, expected);
        assert!(report(&log, 0, 64 << 20, 4096).is_empty(), "cleared");
    }

    #[test]
    fn dense_groups_with_partial_and_full_words() {
        // Four groups of 64 words (16 MiB each at 4 KiB): group 1 has every word flagged
        // but only one page in each, group 2 is all dirty; both are interior to the report.
        let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
        let mut expected: Vec<u64> = (0..64).map(|k| 4096 + 64 * k + k).collect();
        for &page in &expected {
            log.mark(page * 4096, 1);
        }
        log.mark(32 << 20, 16 << 20);
        expected.extend(8192..12288);
        assert_eq!(report(&log, 0, 64 << 20, 4096), expected);
        assert!(report(&log, 0, 64 << 20, 4096).is_empty(), "cleared");
    }

    #[test]
    fn marking_dirty_pages_costs_no_rmw() {
        let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
        let (w0, s0) = rmws();
        log.mark(10 * 4096, 16 * 4096); // 16 fresh pages in one word
        assert_eq!(rmws(), (w0 + 1, s0 + 1), "one word RMW and one summary RMW");
        log.mark(10 * 4096, 16 * 4096);
        log.mark(12 * 4096, 1);
        assert_eq!(rmws(), (w0 + 1, s0 + 1), "already dirty: no RMW at all");
        log.mark(60 * 4096, 200 * 4096); // pages 60..260: words 0..=4
        assert_eq!(rmws().0, w0 + 1 + 5, "at most one RMW per 64-page word");
        let (w1, s1) = rmws();
        log.mark(60 * 4096, 200 * 4096);
        assert_eq!(rmws(), (w1, s1));
    }

    #[test]
    fn the_interior_scan_finds_a_page_in_every_group_position() {
        // 21 groups of 4096 pages: 19 interior ones, scanned eight summary words at a time
        // plus a remainder of three. One page in groups at chunk edges, and both edges.
        let log = DirtyLog::new(0, 21 * 4096 * 4096, 4096).unwrap();
        let groups = [0u64, 1, 2, 8, 9, 10, 16, 17, 18, 19, 20];
        let pages: Vec<u64> = groups.iter().map(|g| g * 4096 + 7 * g + 3).collect();
        for &page in &pages {
            log.mark(page * 4096, 1);
        }
        assert_eq!(report(&log, 0, 21 * 4096 * 4096, 4096), pages);
        for &page in &pages {
            log.mark(page * 4096, 1);
        }
        let mut drained = Vec::new();
        log.drain_pages(0, 21 * 4096 * 4096, |iova| drained.push(iova / 4096));
        assert_eq!(drained, pages);
        assert!(report(&log, 0, 21 * 4096 * 4096, 4096).is_empty());
    }

    #[test]
    fn a_fresh_page_in_a_flagged_word_costs_only_the_word_rmw() {
        let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
        for record in [false, true] {
            let mark = |iova: u64, len: u64| {
                if record {
                    log.record_write(iova, len);
                } else {
                    log.mark(iova, len);
                }
            };
            let base = if record { 1 << 20 } else { 0 };
            mark(base, 1); // word turns dirty: word and summary RMW
            let (w0, s0) = rmws();
            mark(base + 5 * 4096, 1); // same word, a fresh page
            assert_eq!(
                rmws(),
                (w0 + 1, s0),
                "record {record}: summary bit already set"
            );
            mark(base + 64 * 4096, 2 * 4096); // the next word: its own summary bit
            assert_eq!(rmws(), (w0 + 2, s0 + 1), "record {record}");
            mark(base + 5 * 4096, 70 * 4096); // pages 5..75: fresh pages in both words
            assert_eq!(rmws(), (w0 + 4, s0 + 1), "record {record}");
        }
        let mut pages = report(&log, 0, 2 << 20, 4096);
        pages.retain(|&p| p < 256);
        assert_eq!(pages, [0].into_iter().chain(5..75).collect::<Vec<_>>());
    }

    #[test]
    fn an_already_dirty_mark_repairs_a_missing_summary_bit() {
        // Another writer is between W1 and W2: its bit is in the word, the summary not set
        // yet. A mark of that page returns only once a report would find it.
        let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
        log.words[1].fetch_or(1 << 5, Ordering::Relaxed);
        let (_, summary_rmws) = rmws();
        log.mark((64 + 5) * 4096, 1);
        assert_eq!(rmws().1, summary_rmws + 1, "one summary RMW, no word RMW");
        assert_eq!(report(&log, 0, 1 << 20, 4096), vec![64 + 5]);
        // With the summary already set, an already-dirty mark issues no RMW at all.
        log.words[1].fetch_or(1 << 5, Ordering::Relaxed);
        log.summary[0].fetch_or(1 << 1, Ordering::Relaxed);
        let before = rmws();
        log.mark((64 + 5) * 4096, 1);
        assert_eq!(rmws(), before);
        assert_eq!(report(&log, 0, 1 << 20, 4096), vec![64 + 5]);
    }

    #[test]
    fn a_clean_group_costs_a_report_no_rmw() {
        let summary_rmws = || rmw_count::REPORT_SUMMARY.with(|c| c.get());
        let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
        let before = summary_rmws();
        assert!(report(&log, 0, 64 << 20, 4096).is_empty());
        assert_eq!(summary_rmws(), before, "a clean log: summary loads only");
        log.mark(20 << 20, 1);
        let word_rmws = rmw_count::REPORT_WORD.with(|c| c.get());
        assert_eq!(report(&log, 0, 64 << 20, 4096), vec![5120]);
        assert_eq!(
            summary_rmws(),
            before + 1,
            "one R1, for the dirty group only"
        );
        assert_eq!(
            rmw_count::REPORT_WORD.with(|c| c.get()),
            word_rmws + 1,
            "one R2, for the flagged word of the interior group only"
        );
    }

    #[test]
    fn edge_groups_take_only_the_reported_pages_of_their_edge_words() {
        // Three groups of 64 words (12288 pages). The report [1, 12287) starts inside word 0
        // (the first word of group 0) and ends inside word 191 (the last of group 2): those
        // groups are edges, not interior, and must leave pages 0 and 12287.
        let log = DirtyLog::new(0, 12288 * 4096, 4096).unwrap();
        for page in [0, 1, 4099, 12286, 12287] {
            log.mark(page * 4096, 1);
        }
        assert_eq!(report(&log, 4096, 12286 * 4096, 4096), vec![0, 4098, 12285]);
        assert_eq!(report(&log, 0, 12288 * 4096, 4096), vec![0, 12287]);
        // The same at word-aligned edges inside the edge groups (the Words conversion).
        for page in [0, 64, 4099, 12223, 12287] {
            log.mark(page * 4096, 1);
        }
        assert_eq!(
            report(&log, 64 * 4096, 12160 * 4096, 4096),
            vec![0, 4035, 12159]
        );
        assert_eq!(report(&log, 0, 12288 * 4096, 4096), vec![0, 12287]);
    }

    #[test]
    fn a_partial_report_that_empties_a_word_leaves_no_summary_bit() {
        let summary_rmws = || rmw_count::REPORT_SUMMARY.with(|c| c.get());
        let log = DirtyLog::new(0, 1 << 20, 4096).unwrap();
        log.mark(5 * 4096, 1);
        log.mark(7 * 4096, 1);
        // Page 7 remains: R3 keeps the word flagged.
        assert_eq!(report(&log, 5 * 4096, 4096, 4096), vec![0]);
        assert_eq!(report(&log, 0, 1 << 20, 4096), vec![7]);
        // Nothing remains: no summary bit, so the next report costs no RMW.
        log.mark(5 * 4096, 1);
        assert_eq!(report(&log, 5 * 4096, 4096, 4096), vec![0]);
        let before = summary_rmws();
        assert!(report(&log, 0, 1 << 20, 4096).is_empty());
        assert_eq!(summary_rmws(), before, "no summary bit left behind");
    }

    #[test]
    fn drain_pages_walks_interior_groups() {
        // Three groups of 64 words: pages in the edge groups and in the interior one.
        let log = DirtyLog::new(0x10_0000, 12288 * 4096, 4096).unwrap();
        let pages = [3u64, 4096, 6000, 8191, 12287];
        for page in pages {
            log.mark(0x10_0000 + page * 4096, 1);
        }
        let mut drained = Vec::new();
        log.drain_pages(0x10_0000, 12288 * 4096, |iova| drained.push(iova));
        let expected: Vec<u64> = pages.iter().map(|p| 0x10_0000 + p * 4096).collect();
        assert_eq!(drained, expected);
        log.drain_pages(0x10_0000, 12288 * 4096, |iova| {
            panic!("{iova:#x} drained twice")
        });
    }

    #[test]
    fn the_dense_path_keeps_the_callers_bits() {
        // REPORT only sets bits (SPEC 3.4): a caller's bit survives the dense path's copy.
        let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
        log.mark(16 << 20, 16 << 20); // group 1: dense, interior
        let len = 64u64 << 20;
        let mut buf = vec![0u8; crate::iova_bitmap::report_bytes(len, 4096).unwrap() as usize];
        buf[512] = 0xff; // pages 4096..4104, dirty in the log too
        buf[600] = 0x01; // page 4800, dirty in the log too
        buf[0] = 0x80; // page 7, clean in the log
        let mut bm = IovaBitmap::new(0, len, 4096, &mut buf).unwrap();
        log.read_and_clear(0, len, &mut bm);
        assert_eq!(buf[0], 0x80);
        assert!(buf[512..1024].iter().all(|&b| b == 0xff));
        assert!(buf[1..512].iter().chain(&buf[1024..]).all(|&b| b == 0));
    }

    #[test]
    fn the_sole_reporter_clears_all_ones_words_without_rmw() {
        let report_rmws = || rmw_count::REPORT_WORD.with(|c| c.get());
        let log = DirtyLog::new(0, 64 << 20, 4096).unwrap();
        for round in 0..2 {
            // Groups 1 and 2 dense: interior to the report (the dense path); group 0 has two
            // all-ones words at the report's first (partial) group.
            log.mark(16 << 20, 32 << 20);
            log.mark(0, 128 * 4096);
            let before = report_rmws();
            let pages = report(&log, 0, 64 << 20, 4096);
            assert_eq!(pages.len(), 128 + 8192, "round {round}");
            assert_eq!(report_rmws(), before, "round {round}: plain stores only");
        }
        // A partly dirty word needs the RMW (a writer may be setting its other bits).
        log.mark(5 << 20, 1);
        let before = report_rmws();
        assert_eq!(report(&log, 0, 64 << 20, 4096).len(), 1);
        assert_eq!(report_rmws(), before + 1);
    }

    #[test]
    fn conversions_both_ways() {
        let log = DirtyLog::new(0, 1 << 30, 4096).unwrap();
        log.mark(5 << 20, 1); // page in the third 2 MiB block
        log.mark((100 << 20) + 4096, 1); // in an interior group: the coarse group path
        assert_eq!(report(&log, 0, 1 << 30, 2 << 20), vec![2, 50]);
        assert!(report(&log, 0, 1 << 30, 2 << 20).is_empty(), "cleared");
        let coarse = DirtyLog::new(0, 1 << 30, 2 << 20).unwrap();
        coarse.mark(5 << 20, 1);
        let bits = report(&coarse, 0, 8 << 20, 4096);
        assert_eq!(bits, (1024..1536).collect::<Vec<_>>());
    }
}

#[cfg(all(test, not(loom)))]
mod window_tests {
    use super::*;
    use crate::iova_bitmap::{for_each_window, report_bytes};
    use proptest::prelude::*;

    proptest! {
        /// A report produced in small windows equals the one-shot report, for any grids
        /// (aligned or not) and page sizes, including log pages that straddle window edges.
        #[test]
        fn windowed_report_equals_one_shot(
            log_shift in 12u32..=21,
            report_shift in 10u32..=22,
            base_pages in 0u64..64,
            report_offset in 0u64..(1 << 22),
            report_len in 1u64..(64 << 20),
            window_bytes in 1usize..64,
            marks in prop::collection::vec((0u64..(64 << 20), 1u64..(1 << 20)), 1..30),
        ) {
            let page = 1u64 << log_shift;
            let base = base_pages * page;
            let make = || {
                let log = DirtyLog::new(base, 64 << 20, page).unwrap();
                for &(at, len) in &marks {
                    log.mark(base + at, len);
                }
                log
            };
            let (iova, report_page) = (base + report_offset, 1u64 << report_shift);
            let bytes = report_bytes(report_len, report_page).unwrap() as usize;
            let mut whole = vec![0u8; bytes];
            let one_shot = make();
            let mut bitmap = IovaBitmap::new(iova, report_len, report_page, &mut whole).unwrap();
            one_shot.read_and_clear(iova, report_len, &mut bitmap);
            let windowed_log = make();
            let mut streamed = vec![0u8; bytes];
            let mut window = vec![0u8; window_bytes];
            for_each_window::<LogError>(
                iova,
                report_len,
                report_page,
                &mut window,
                |bm| {
                    let window = bm.window_range();
                    windowed_log.read_and_clear(window.iova(), window.len_bytes(), bm);
                    Ok(())
                },
                |offset, chunk| {
                    streamed[offset as usize..offset as usize + chunk.len()].copy_from_slice(chunk);
                    Ok(())
                },
            )
            .unwrap();
            prop_assert_eq!(streamed, whole);
        }
    }
}
