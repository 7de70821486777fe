//! IOVA ranges: the checked range type, START validation (SPEC 3.2) and the smallest-gap
//! merge that reduces a range list to a driver's maximum.

use std::collections::BTreeMap;

use crate::error::{LogError, LogResult};
use crate::uapi::LoggingRange;

/// A non-empty IOVA range `[iova, iova+length)` whose end does not wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IovaRange {
    iova: u64,
    length: u64,
}

impl IovaRange {
    /// A range, or an error for a zero length (`Invalid`) or an end past 2^64 (`Overflow`).
    pub fn new(iova: u64, len_bytes: u64) -> LogResult<Self> {
        if len_bytes == 0 {
            return Err(LogError::Invalid("zero-len_bytes range"));
        }
        iova.checked_add(len_bytes)
            .ok_or(LogError::Overflow { iova, len_bytes })?;
        Ok(IovaRange {
            iova,
            length: len_bytes,
        })
    }

    /// A range the caller has already checked (non-empty, no wrap): debug builds assert it.
    pub(crate) fn within_checked(iova: u64, length: u64) -> Self {
        debug_assert!(length > 0 && iova.checked_add(length).is_some());
        IovaRange { iova, length }
    }

    /// First IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.length
    }

    /// One past the last IOVA (never wraps).
    pub fn end(&self) -> u64 {
        self.iova + self.length
    }

    /// Whether the two ranges share at least one byte (adjacent ranges do not).
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.iova < other.end() && other.iova < self.end()
    }

    /// Whether `[iova, iova+len_bytes)` lies wholly inside this range.
    pub fn contains(&self, iova: u64, len_bytes: u64) -> bool {
        iova >= self.iova
            && iova
                .checked_add(len_bytes)
                .is_some_and(|end| end <= self.end())
    }
}

impl From<IovaRange> for LoggingRange {
    fn from(range: IovaRange) -> Self {
        LoggingRange {
            iova: range.iova,
            length: range.length,
        }
    }
}

/// The default maximum number of START ranges (the kernel's `PAGE_SIZE / 16` on 4 KiB
/// pages); a configured limit is never below it.
pub const DEFAULT_MAX_RANGES: u32 = 256;

/// Validates START ranges per SPEC 3.2 and returns them sorted by IOVA.
///
/// The checks run per range in request order, as the kernel's do, so the first bad range
/// decides the errno: `iova` or `length` not a multiple of `page_size` or zero length
/// (`Invalid`), `iova + length` wrapping (`Overflow`), overlap with an earlier range
/// (`Invalid`; adjacent is fine). `page_size` must be a non-zero power of two. The list
/// length is checked by the caller (it differs between dialects). O(n log n).
pub fn validate_ranges(
    ranges: impl IntoIterator<Item = LoggingRange>,
    page_size: u64,
) -> LogResult<Vec<IovaRange>> {
    if page_size == 0 || !page_size.is_power_of_two() {
        return Err(LogError::Invalid("page size is not a power of two"));
    }
    let mask = page_size - 1;
    // end -> start of every range accepted so far, to find overlaps in O(log n).
    let mut by_end: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for LoggingRange { iova, length } in ranges {
        if iova & mask != 0 || length & mask != 0 {
            return Err(LogError::Invalid("range not aligned to the page size"));
        }
        let range = IovaRange::new(iova, length)?;
        // The first accepted range ending after our start is the only candidate overlap.
        if let Some((_, &start)) = by_end.range(range.iova + 1..).next() {
            if start < range.end() {
                return Err(LogError::Invalid("ranges overlap"));
            }
        }
        by_end.insert(range.end(), range.iova);
        out.push(range);
    }
    out.sort_unstable();
    Ok(out)
}

/// Reduces sorted, non-overlapping ranges to at most `max_ranges` by repeatedly merging the
/// two neighbours with the smallest gap (ties: the lowest pair); `max_ranges == 1` gives
/// `[first.iova, last.end)`.
///
/// Merging two neighbours leaves every other gap unchanged, so the result equals removing
/// the `n - max` smallest gaps (ties by position): one sort, O(n log n), instead of the
/// kernel's repeated O(n) scans.
pub fn merge_ranges(sorted: &[IovaRange], max_ranges: usize) -> Vec<IovaRange> {
    let max_ranges = max_ranges.max(1);
    if sorted.len() <= max_ranges {
        return sorted.to_vec();
    }
    let mut gaps: Vec<(u64, usize)> = sorted
        .windows(2)
        .enumerate()
        .map(|(i, pair)| (pair[1].iova - pair[0].end(), i))
        .collect();
    gaps.sort_unstable();
    let mut closed = vec![false; sorted.len() - 1];
    for &(_, i) in &gaps[..sorted.len() - max_ranges] {
        closed[i] = true;
    }
    let mut out = Vec::with_capacity(max_ranges);
    let mut current = sorted[0];
    for (i, next) in sorted[1..].iter().enumerate() {
        if closed[i] {
            current = IovaRange {
                iova: current.iova,
                length: next.end() - current.iova,
            };
        } else {
            out.push(current);
            current = *next;
        }
    }
    out.push(current);
    out
}

/// Whether sorted, non-overlapping `ranges` together contain every byte of `range`
/// (adjacent ranges join). O(log n + the ranges it spans).
pub fn ranges_cover(ranges: &[IovaRange], range: IovaRange) -> bool {
    let first = ranges.partition_point(|r| r.end() <= range.iova);
    let mut covered_to = range.iova;
    for r in &ranges[first..] {
        if r.iova > covered_to {
            return false;
        }
        covered_to = covered_to.max(r.end());
        if covered_to >= range.end() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cover_of_sorted_ranges() {
        let ranges: Vec<IovaRange> = [(0, 10), (10, 5), (20, 5)]
            .iter()
            .map(|&(a, l)| IovaRange::new(a, l).unwrap())
            .collect();
        let covers = |a, l| ranges_cover(&ranges, IovaRange::new(a, l).unwrap());
        assert!(covers(0, 10));
        assert!(covers(5, 10), "across adjacent ranges");
        assert!(covers(20, 5));
        assert!(!covers(14, 2), "into the gap");
        assert!(!covers(18, 4), "from the gap");
        assert!(!covers(24, 2), "past the end");
        assert!(!covers(100, 1));
        assert!(!ranges_cover(&[], IovaRange::new(0, 1).unwrap()));
    }

    fn r(iova: u64, length: u64) -> LoggingRange {
        LoggingRange { iova, length }
    }

    #[test]
    fn validation_order_and_errnos() {
        let ps = 4096;
        assert!(
            validate_ranges([r(0, 4096), r(4096, 4096)], ps).is_ok(),
            "adjacent is fine"
        );
        assert_eq!(
            validate_ranges([r(0, 8192), r(4096, 4096)], ps)
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        assert_eq!(
            validate_ranges([r(1, 4096)], ps).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            validate_ranges([r(0, 0)], ps).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            validate_ranges([r(u64::MAX - 4095, 4096)], ps)
                .unwrap_err()
                .errno(),
            libc::EOVERFLOW
        );
        // First bad range decides: the overlap (2nd) comes before the overflow (3rd).
        let err =
            validate_ranges([r(0, 8192), r(0, 4096), r(u64::MAX - 4095, 8192)], ps).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert_eq!(
            validate_ranges([r(0, 4096)], 3).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            validate_ranges([r(0, 4096)], 0).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn merge_smallest_gaps_first_ties_lowest() {
        let ranges: Vec<IovaRange> = [(0, 10), (12, 1), (20, 5), (27, 3), (100, 1)]
            .iter()
            .map(|&(a, l)| IovaRange::new(a, l).unwrap())
            .collect();
        // gaps: 2, 7, 2, 70 -> two smallest (ties lowest): gap 0 and gap 2
        let merged = merge_ranges(&ranges, 3);
        let spans: Vec<(u64, u64)> = merged.iter().map(|m| (m.iova(), m.end())).collect();
        assert_eq!(spans, vec![(0, 13), (20, 30), (100, 101)]);
        let one = merge_ranges(&ranges, 1);
        assert_eq!((one[0].iova(), one[0].end()), (0, 101));
    }

    /// The kernel's O(n^2) algorithm, as a model.
    fn merge_model(mut ranges: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
        if max == 1 {
            return vec![(ranges[0].0, ranges.last().unwrap().1)];
        }
        while ranges.len() > max {
            let i = (1..ranges.len())
                .min_by_key(|&i| (ranges[i].0 - ranges[i - 1].1, i))
                .unwrap();
            ranges[i - 1].1 = ranges[i].1;
            ranges.remove(i);
        }
        ranges
    }

    proptest! {
        #[test]
        fn merge_matches_the_kernel_model(gaps in prop::collection::vec((0u64..50, 1u64..20), 1..60), max in 1usize..70) {
            let mut at = 0;
            let mut ranges = Vec::new();
            for (gap, len) in gaps {
                at += gap;
                ranges.push(IovaRange::new(at, len).unwrap());
                at += len;
            }
            let ours: Vec<(u64, u64)> = merge_ranges(&ranges, max).iter().map(|m| (m.iova(), m.end())).collect();
            let model = merge_model(ranges.iter().map(|m| (m.iova(), m.end())).collect(), max);
            prop_assert_eq!(ours, model);
        }
    }
}
