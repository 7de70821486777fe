//! An immutable index of disjoint logs by IOVA: a B-tree whose nodes are shared between
//! versions. Adding a log copies only the path from the root to its leaf (O(log n) nodes
//! of at most [`FANOUT`] entries) and leaves the old version intact for the writers still
//! marking it; finding the logs a write touches is one descent, O(log n), without locks.

use std::sync::Arc;

use crate::dirty_log::DirtyLog;

/// Most entries of a leaf and most children of an inner node.
const FANOUT: usize = 16;

/// A log with its IOVA span inline, so that a search touches no log.
#[derive(Clone)]
struct Entry {
    base_iova: u64,
    end_iova: u64,
    log: Arc<DirtyLog>,
}

#[derive(Clone)]
enum Node {
    /// Logs sorted by IOVA (only an empty index has an empty leaf).
    Leaf(Arc<[Entry]>),
    /// Children sorted by IOVA, each with the lowest base IOVA under it.
    Inner(Arc<[(u64, Node)]>),
}

impl Node {
    fn min_iova(&self) -> u64 {
        match self {
            Node::Leaf(entries) => entries.first().map_or(0, |e| e.base_iova),
            Node::Inner(children) => children.first().map_or(0, |c| c.0),
        }
    }

    /// Calls `f` on the logs overlapping `[iova, end)` in IOVA order; true when the walk
    /// is over (a log holds all of it, or the next log starts at or past `end`).
    fn visit(&self, iova: u64, end: u64, f: &mut impl FnMut(&DirtyLog)) -> bool {
        match self {
            Node::Leaf(entries) => {
                let first = entries.partition_point(|e| e.end_iova <= iova);
                for entry in &entries[first..] {
                    if entry.base_iova >= end {
                        return true;
                    }
                    f(&entry.log);
                    if entry.base_iova <= iova && end <= entry.end_iova {
                        return true; // the logs are disjoint: no other has any of it
                    }
                }
                false
            }
            Node::Inner(children) => {
                // Only the last child starting at or before `iova` can hold a log that
                // starts before `iova` and reaches it.
                let first = children.partition_point(|c| c.0 <= iova).saturating_sub(1);
                for (min_iova, child) in &children[first..] {
                    if *min_iova >= end {
                        return true;
                    }
                    if child.visit(iova, end, f) {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// This node with `entry` added (a new path; untouched subtrees shared), and the right
    /// half when it split.
    fn with(&self, entry: Entry) -> (Node, Option<Node>) {
        match self {
            Node::Leaf(entries) => {
                let at = entries.partition_point(|e| e.base_iova < entry.base_iova);
                let mut out = Vec::with_capacity(entries.len() + 1);
                out.extend_from_slice(&entries[..at]);
                out.push(entry);
                out.extend_from_slice(&entries[at..]);
                if out.len() > FANOUT {
                    let right = out.split_off(out.len() / 2);
                    (Node::Leaf(out.into()), Some(Node::Leaf(right.into())))
                } else {
                    (Node::Leaf(out.into()), None)
                }
            }
            Node::Inner(children) => {
                let at = children
                    .partition_point(|c| c.0 <= entry.base_iova)
                    .saturating_sub(1);
                let (child, split) = children[at].1.with(entry);
                let mut out = Vec::with_capacity(children.len() + 1);
                out.extend_from_slice(&children[..at]);
                out.push((child.min_iova(), child));
                if let Some(right) = split {
                    out.push((right.min_iova(), right));
                }
                out.extend_from_slice(&children[at + 1..]);
                if out.len() > FANOUT {
                    let right = out.split_off(out.len() / 2);
                    (Node::Inner(out.into()), Some(Node::Inner(right.into())))
                } else {
                    (Node::Inner(out.into()), None)
                }
            }
        }
    }

    fn depth(&self) -> usize {
        match self {
            Node::Leaf(_) => 1,
            Node::Inner(children) => 1 + children.first().map_or(0, |c| c.1.depth()),
        }
    }
}

/// Disjoint logs by IOVA; cloning shares every node.
#[derive(Clone)]
pub(crate) struct LogIndex {
    root: Node,
    len: usize,
}

impl LogIndex {
    /// An index of `logs`, sorted by IOVA and disjoint. O(n).
    pub(crate) fn from_sorted(logs: impl IntoIterator<Item = Arc<DirtyLog>>) -> LogIndex {
        let entries: Vec<Entry> = logs
            .into_iter()
            .map(|log| Entry {
                base_iova: log.base_iova(),
                end_iova: log.base_iova() + log.len_bytes(),
                log,
            })
            .collect();
        let len = entries.len();
        let mut level: Vec<Node> = entries
            .chunks(FANOUT)
            .map(|chunk| Node::Leaf(chunk.into()))
            .collect();
        while level.len() > 1 {
            level = level
                .chunks(FANOUT)
                .map(|chunk| {
                    let children: Vec<(u64, Node)> =
                        chunk.iter().map(|n| (n.min_iova(), n.clone())).collect();
                    Node::Inner(children.into())
                })
                .collect();
        }
        LogIndex {
            root: level.pop().unwrap_or(Node::Leaf(Arc::new([]))),
            len,
        }
    }

    /// This index plus `log`, which overlaps none of its logs. O(log n); `self` is kept.
    pub(crate) fn with(&self, log: Arc<DirtyLog>) -> LogIndex {
        let entry = Entry {
            base_iova: log.base_iova(),
            end_iova: log.base_iova() + log.len_bytes(),
            log,
        };
        let root = match self.root.with(entry) {
            (root, None) => root,
            (left, Some(right)) => Node::Inner(Arc::new([
                (left.min_iova(), left),
                (right.min_iova(), right),
            ])),
        };
        LogIndex {
            root,
            len: self.len + 1,
        }
    }

    /// Logs in the index.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Levels from the root to the leaves.
    pub(crate) fn depth(&self) -> usize {
        self.root.depth()
    }

    /// Calls `f` on every log overlapping `[iova, iova+len)`, in IOVA order.
    #[inline]
    pub(crate) fn for_each_overlapping(&self, iova: u64, len: u64, mut f: impl FnMut(&DirtyLog)) {
        self.root.visit(iova, iova.saturating_add(len), &mut f);
    }

    /// Every log's `[base, end)`, in order (for tests).
    #[cfg(test)]
    fn spans(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.for_each_overlapping(0, u64::MAX, |log| {
            out.push((log.base_iova(), log.base_iova() + log.len_bytes()))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(page: u64) -> Arc<DirtyLog> {
        Arc::new(DirtyLog::new(page * 4096, 4096, 4096).unwrap())
    }

    #[test]
    fn any_insertion_order_gives_sorted_spans_and_a_shallow_tree() {
        // A scrambled order (a multiplicative permutation of 0..4096).
        let order: Vec<u64> = (0..4096u64).map(|k| (k * 2897) % 4096).collect();
        let mut index = LogIndex::from_sorted([]);
        let first = index.clone();
        for &page in &order {
            index = index.with(log(2 * page));
        }
        assert_eq!(index.len(), 4096);
        assert_eq!(first.len(), 0, "the old version is untouched");
        assert!(index.depth() <= 5, "depth {}", index.depth());
        let spans = index.spans();
        assert_eq!(spans.len(), 4096);
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "sorted, disjoint"
        );
        // Lookups: a write in a log, one in a gap, one across two logs.
        let mut hits = Vec::new();
        index.for_each_overlapping(2 * 77 * 4096 + 5, 1, |l| hits.push(l.base_iova()));
        assert_eq!(hits, vec![2 * 77 * 4096]);
        hits.clear();
        index.for_each_overlapping(3 * 4096, 4096, |l| hits.push(l.base_iova()));
        assert!(hits.is_empty());
        index.for_each_overlapping(4096 - 1, 2 * 4096 + 2, |l| hits.push(l.base_iova()));
        assert_eq!(hits, vec![0, 2 * 4096]);
        // Bulk-built: the same answers.
        let bulk = LogIndex::from_sorted((0..4096).map(|p| log(2 * p)));
        assert_eq!(bulk.spans(), spans);
    }

    proptest::proptest! {
        /// Logs inserted in any order (some bulk-built first), then any query: exactly the
        /// overlapping logs, in order, as a linear scan finds them.
        #[test]
        fn queries_match_a_linear_scan(
            slots in proptest::collection::btree_set(0u64..2000, 0..600),
            bulk_first in 0usize..300,
            seed in proptest::num::u64::ANY,
            queries in proptest::collection::vec((0u64..(2100 * 4096), 0u64..(40 * 4096)), 1..40),
        ) {
            // Slot k is a log over pages [2k, 2k + 1 + k % 2): one or two pages, gaps between.
            let span = |k: u64| (2 * k * 4096, (2 * k + 1 + k % 2) * 4096);
            let make = |k: u64| {
                let (a, b) = span(k);
                Arc::new(DirtyLog::new(a, b - a, 4096).unwrap())
            };
            let slots: Vec<u64> = slots.into_iter().collect();
            let bulk = bulk_first.min(slots.len());
            // Every other slot of the first `bulk` bulk-built, in order; the rest shuffled.
            let (mut sorted, mut rest) = (Vec::new(), Vec::new());
            for (i, &k) in slots.iter().enumerate() {
                if i < bulk && i % 2 == 0 {
                    sorted.push(k);
                } else {
                    rest.push(k);
                }
            }
            let mut x = seed | 1;
            for i in (1..rest.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                rest.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut index = LogIndex::from_sorted(sorted.into_iter().map(make));
            for &k in &rest {
                index = index.with(make(k));
            }
            proptest::prop_assert_eq!(index.len(), slots.len());
            for (iova, len) in queries {
                let end = iova.saturating_add(len);
                let expected: Vec<u64> = slots
                    .iter()
                    .map(|&k| span(k))
                    .filter(|&(a, b)| a < end && iova < b)
                    .map(|(a, _)| a)
                    .collect();
                let mut got = Vec::new();
                index.for_each_overlapping(iova, len, |l| got.push(l.base_iova()));
                if len == 0 {
                    // A zero-length query may report the log holding `iova` or nothing.
                    proptest::prop_assert!(got.len() <= 1);
                    continue;
                }
                proptest::prop_assert_eq!(got, expected, "query {:#x}+{:#x}", iova, len);
            }
        }
    }
}
