//! The DMA mapping table as a persistent (immutable, structurally shared) treap keyed by
//! first IOVA.
//!
//! Why this shape: DMA threads read a published snapshot without locks, so a change must
//! build a new table; copying a sorted `Vec` made every DMA_MAP O(n) (65,536 maps took a
//! minute). A persistent tree copies only the path it changes: O(log n) nodes per insert or
//! remove, O(1) to snapshot (an `Arc` clone), and lookups walk from the root with no
//! allocation (unlike the range iterators of persistent B-tree crates, which allocate a
//! cursor stack). A treap keeps itself balanced with random priorities; they come from a
//! per-table secret seed, so a client choosing IOVAs cannot choose the tree's shape (the
//! expected depth is O(log n) whatever the keys).
//!
//! Invariants (kept by [`crate::DmaSpace`], checked by the callers here): regions are
//! disjoint and non-empty, and none ends past 2^64.

use std::hash::BuildHasher;
use std::sync::Arc;

use dmalog::IovaRange;

use crate::dma_space::DmaRegion;

type Link = Option<Arc<Node>>;

#[derive(Debug)]
struct Node {
    region: DmaRegion,
    priority: u64,
    left: Link,
    right: Link,
}

impl Node {
    /// A copy of this node with other children (the path copy of a persistent update).
    fn with_children(&self, left: Link, right: Link) -> Arc<Node> {
        Arc::new(Node {
            region: self.region.clone(),
            priority: self.priority,
            left,
            right,
        })
    }
}

/// One immutable snapshot of the mappings, sorted by IOVA. Cloning is O(1).
#[derive(Debug, Clone)]
pub struct DmaTable {
    root: Link,
    len: usize,
    seed: u64,
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Default for DmaTable {
    fn default() -> Self {
        Self::new()
    }
}

impl DmaTable {
    /// An empty table with a fresh random seed for its priorities.
    pub fn new() -> Self {
        DmaTable {
            root: None,
            len: 0,
            seed: std::collections::hash_map::RandomState::new().hash_one(0x646d_616c_6f67u64),
        }
    }

    /// An empty table with the same seed (UNMAP_ALL).
    pub fn cleared(&self) -> Self {
        DmaTable {
            root: None,
            len: 0,
            seed: self.seed,
        }
    }

    /// Mappings in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No mappings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region with the greatest first IOVA `<= iova`. No allocation, O(depth).
    fn floor(&self, iova: u64) -> Option<&DmaRegion> {
        let mut best = None;
        let mut link = &self.root;
        while let Some(node) = link {
            if node.region.iova <= iova {
                best = Some(&node.region);
                link = &node.right;
            } else {
                link = &node.left;
            }
        }
        best
    }

    /// The region holding `iova`, if any (the hot path's lookup: no allocation).
    pub fn containing(&self, iova: u64) -> Option<&DmaRegion> {
        self.floor(iova).filter(|r| iova - r.iova < r.size)
    }

    /// Whether some region shares a byte with `range`.
    pub fn overlaps(&self, range: IovaRange) -> bool {
        // The region starting last at or before our last byte is the only candidate:
        // regions are disjoint and sorted.
        self.floor(range.end() - 1)
            .is_some_and(|r| r.iova + (r.size - 1) >= range.iova())
    }

    /// The region starting exactly at `iova`.
    pub fn get(&self, iova: u64) -> Option<&DmaRegion> {
        self.floor(iova).filter(|r| r.iova == iova)
    }

    /// A new table with `region` added; the caller checked it overlaps nothing.
    pub fn inserted(&self, region: DmaRegion) -> DmaTable {
        debug_assert!(IovaRange::new(region.iova, region.size).is_ok_and(|r| !self.overlaps(r)));
        let node = Node {
            priority: mix(region.iova ^ self.seed),
            region,
            left: None,
            right: None,
        };
        DmaTable {
            root: Some(insert(&self.root, node)),
            len: self.len + 1,
            seed: self.seed,
        }
    }

    /// A new table without the region starting at `iova`, and that region.
    pub fn removed(&self, iova: u64) -> Option<(DmaTable, DmaRegion)> {
        let (root, region) = remove(&self.root, iova)?;
        Some((
            DmaTable {
                root,
                len: self.len - 1,
                seed: self.seed,
            },
            region,
        ))
    }

    /// The regions in IOVA order (allocates its walk stack: not for the hot path).
    pub fn iter(&self) -> Iter<'_> {
        let mut iter = Iter { stack: Vec::new() };
        iter.push_left(&self.root);
        iter
    }
}

/// In-order iterator over a [`DmaTable`].
#[derive(Debug)]
pub struct Iter<'a> {
    stack: Vec<&'a Node>,
}

impl<'a> Iter<'a> {
    fn push_left(&mut self, mut link: &'a Link) {
        while let Some(node) = link {
            self.stack.push(node);
            link = &node.left;
        }
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a DmaRegion;

    fn next(&mut self) -> Option<&'a DmaRegion> {
        let node = self.stack.pop()?;
        self.push_left(&node.right);
        Some(&node.region)
    }
}

/// Splits by key into (< iova, >= iova), copying the path.
fn split(link: &Link, iova: u64) -> (Link, Link) {
    match link {
        None => (None, None),
        Some(node) if node.region.iova < iova => {
            let (left, right) = split(&node.right, iova);
            (Some(node.with_children(node.left.clone(), left)), right)
        }
        Some(node) => {
            let (left, right) = split(&node.left, iova);
            (left, Some(node.with_children(right, node.right.clone())))
        }
    }
}

/// Joins two trees, every key of `left` below every key of `right`.
fn merge(left: &Link, right: &Link) -> Link {
    match (left, right) {
        (None, other) | (other, None) => other.clone(),
        (Some(l), Some(r)) if l.priority > r.priority => {
            Some(l.with_children(l.left.clone(), merge(&l.right, right)))
        }
        (Some(_), Some(r)) => Some(r.with_children(merge(left, &r.left), r.right.clone())),
    }
}

fn insert(link: &Link, new: Node) -> Arc<Node> {
    match link {
        None => Arc::new(new),
        Some(node) if new.priority > node.priority => {
            let (left, right) = split(link, new.region.iova);
            Arc::new(Node { left, right, ..new })
        }
        Some(node) if new.region.iova < node.region.iova => {
            node.with_children(Some(insert(&node.left, new)), node.right.clone())
        }
        Some(node) => node.with_children(node.left.clone(), Some(insert(&node.right, new))),
    }
}

fn remove(link: &Link, iova: u64) -> Option<(Link, DmaRegion)> {
    let node = link.as_ref()?;
    if iova == node.region.iova {
        return Some((merge(&node.left, &node.right), node.region.clone()));
    }
    if iova < node.region.iova {
        let (left, region) = remove(&node.left, iova)?;
        Some((Some(node.with_children(left, node.right.clone())), region))
    } else {
        let (right, region) = remove(&node.right, iova)?;
        Some((Some(node.with_children(node.left.clone(), right)), region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma_space::DmaBacking;

    fn range(iova: u64, len_bytes: u64) -> IovaRange {
        IovaRange::new(iova, len_bytes).unwrap()
    }

    fn region(iova: u64, size: u64) -> DmaRegion {
        DmaRegion {
            iova,
            size,
            readable: true,
            writable: true,
            backing: DmaBacking::MessageOnly,
        }
    }

    fn depth(link: &Link) -> usize {
        link.as_ref()
            .map_or(0, |n| 1 + depth(&n.left).max(depth(&n.right)))
    }

    /// Random inserts and removes against a sorted Vec (a trivially correct model),
    /// checking every lookup kind and that old snapshots never change.
    #[test]
    fn matches_a_sorted_vec_and_snapshots_are_immutable() {
        let mut table = DmaTable::new();
        let mut model: Vec<(u64, u64)> = Vec::new();
        let mut rng = 7u64;
        let mut next = || {
            rng = mix(rng);
            rng
        };
        for step in 0..4000 {
            let slot = next() % 512;
            let (iova, size) = (slot * 0x1000, 0x1000 - (next() % 2) * 0x800);
            let before = table.clone();
            let before_model = model.clone();
            if let Some(at) = model.iter().position(|&(i, _)| i == iova) {
                let (after, removed) = table.removed(iova).unwrap();
                assert_eq!(removed.iova, iova);
                model.remove(at);
                table = after;
            } else {
                assert!(!table.overlaps(range(iova, size)), "step {step}");
                table = table.inserted(region(iova, size));
                model.push((iova, size));
                model.sort();
            }
            assert_eq!(table.len(), model.len());
            let listed: Vec<(u64, u64)> = table.iter().map(|r| (r.iova, r.size)).collect();
            assert_eq!(listed, model);
            let old: Vec<(u64, u64)> = before.iter().map(|r| (r.iova, r.size)).collect();
            assert_eq!(old, before_model, "a snapshot changed");
            let probe = next() % (513 * 0x1000);
            let expect = model
                .iter()
                .find(|&&(i, s)| probe >= i && probe - i < s)
                .copied();
            assert_eq!(table.containing(probe).map(|r| (r.iova, r.size)), expect);
        }
        assert!(table.removed(0x123).is_none());
        assert!(depth(&table.root) < 40, "depth {}", depth(&table.root));
    }

    #[test]
    fn sequential_keys_stay_shallow() {
        // Keys in order would make an unbalanced tree a list: priorities prevent it.
        let mut table = DmaTable::new();
        for i in 0..65_536u64 {
            table = table.inserted(region(i * 0x1000, 0x1000));
        }
        assert_eq!(table.len(), 65_536);
        assert!(depth(&table.root) < 64, "depth {}", depth(&table.root));
        assert!(table.overlaps(range(0x0fff_f000, 0x2000)));
        assert!(!table.overlaps(range(0x1000_0000, 0x1000)));
        assert_eq!(table.get(0x5000).map(|r| r.iova), Some(0x5000));
        assert!(table.get(0x5001).is_none());
        // Top of the IOVA space.
        let top = DmaTable::new().inserted(region(u64::MAX - 0x1000, 0x1000));
        assert!(top.overlaps(range(u64::MAX - 1, 1)));
        assert_eq!(
            top.containing(u64::MAX - 1).map(|r| r.iova),
            Some(u64::MAX - 0x1000)
        );
        assert!(top.containing(u64::MAX).is_none());
    }
}
