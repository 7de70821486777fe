//! Guest memory workloads: vm-memory's `GuestMemoryMmap<AtomicBitmap>` against
//! `GuestMemoryMmap<DmalogBitmap>` (dmalog-vm-memory), the same writes and the same final
//! report on both, in the same process.

use std::hint::black_box;

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, IovaRange};
use dmalog_vm_memory::{DirtyRegions, LoggedGuestMemory, VmMemoryTracker};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
};

use crate::workloads::next_random;

const PAGE: u64 = 4096;

/// Both guest memories over the same layout, and our tracker started over all of it.
pub struct GuestPair {
    /// Bytes of guest memory.
    pub span: u64,
    /// vm-memory's own bitmap.
    pub vm_memory: GuestMemoryMmap<AtomicBitmap>,
    /// dmalog's bitmap.
    pub ours: LoggedGuestMemory,
    /// Our tracker, started over `[0, span)` at 4 KiB.
    pub tracker: VmMemoryTracker,
    /// The caller's reused report buffer.
    pub words: Vec<u64>,
}

impl GuestPair {
    /// `regions` regions of `span / regions` bytes each from GPA 0 (anonymous,
    /// `MAP_NORESERVE`: only written pages take memory).
    pub fn new(span: u64, regions: u64) -> Self {
        let region_bytes = span / regions;
        let ranges: Vec<(GuestAddress, usize, Option<vm_memory::FileOffset>)> = (0..regions)
            .map(|k| (GuestAddress(k * region_bytes), region_bytes as usize, None))
            .collect();
        let plain: Vec<(GuestAddress, usize)> = ranges.iter().map(|r| (r.0, r.1)).collect();
        let vm_memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&plain).expect("guest memory");
        let set = DirtyRegions::new(PAGE).expect("page size");
        let ours = set.guest_memory(&ranges).expect("logged guest memory");
        let mut tracker = set.tracker();
        tracker
            .start(&[IovaRange::new(0, span).expect("range")], PAGE)
            .expect("start");
        GuestPair {
            span,
            vm_memory,
            ours,
            tracker,
            words: vec![0u64; report_words(span, PAGE).expect("words") as usize],
        }
    }

    /// vm-memory's final report: `get_and_reset` of every region's bitmap.
    pub fn vm_memory_report(&self) {
        for region in self.vm_memory.iter() {
            black_box(MmapRegion::bitmap(region).get_and_reset());
        }
    }

    /// Our final report of the whole guest into the reused words.
    pub fn ours_report(&mut self) {
        self.tracker
            .report(
                IovaRange::new(0, self.span).expect("span checked in new"),
                PAGE,
                &mut self.words,
            )
            .expect("report");
    }

    /// Pages set in the report words.
    pub fn reported_pages(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Guest writes of `write_bytes` at random offsets (aligned to the write size, up to a
/// page) through `write_slice`, on both memories.
pub struct GuestWrites {
    /// Bytes per write.
    pub write_bytes: usize,
    /// The memories.
    pub pair: GuestPair,
    /// The same layout without a bitmap: the copy alone, the floor of any bitmap.
    pub plain: GuestMemoryMmap<()>,
    data: Vec<u8>,
    offsets: Vec<u64>,
    cursor: usize,
}

impl GuestWrites {
    /// The workload over a guest of `span` bytes in two regions, every page written once
    /// up front (so no write pays a page fault), both logs clean.
    pub fn new(write_bytes: usize, span: u64) -> Self {
        let pair = GuestPair::new(span, 2);
        let align = (write_bytes as u64).min(PAGE);
        let mut rng = 0x9e37_79b9u64;
        let offsets = (0..1 << 16)
            .map(|_| (next_random(&mut rng) % ((span - write_bytes as u64) / align)) * align)
            .collect();
        let plain = GuestMemoryMmap::<()>::from_ranges(
            &pair
                .vm_memory
                .iter()
                .map(|region| (region.start_addr(), region.len() as usize))
                .collect::<Vec<_>>(),
        )
        .expect("plain guest memory");
        let chunk = vec![0u8; 1 << 20];
        for at in (0..span).step_by(chunk.len()) {
            plain
                .write_slice(&chunk, GuestAddress(at))
                .expect("fault in");
            pair.vm_memory
                .write_slice(&chunk, GuestAddress(at))
                .expect("fault in");
            pair.ours
                .write_slice(&chunk, GuestAddress(at))
                .expect("fault in");
        }
        let mut w = GuestWrites {
            write_bytes,
            pair,
            plain,
            data: vec![0x5a; write_bytes],
            offsets,
            cursor: 0,
        };
        w.reset();
        w
    }

    /// Clears both logs (untimed, between batches: each batch starts from a clean log).
    pub fn reset(&mut self) {
        self.pair.vm_memory_report();
        self.pair.ours_report();
        self.pair.words.fill(0);
    }

    #[inline]
    fn next_offset(&mut self) -> GuestAddress {
        self.cursor = (self.cursor + 1) & (self.offsets.len() - 1);
        GuestAddress(self.offsets[self.cursor])
    }

    /// One write into `GuestMemoryMmap<AtomicBitmap>`.
    #[inline]
    pub fn vm_memory(&mut self) {
        let at = self.next_offset();
        self.pair
            .vm_memory
            .write_slice(&self.data, at)
            .expect("write");
    }

    /// One write into `GuestMemoryMmap<()>` (no bitmap).
    #[inline]
    pub fn plain(&mut self) {
        let at = self.next_offset();
        self.plain.write_slice(&self.data, at).expect("write");
    }

    /// One write into `GuestMemoryMmap<DmalogBitmap>`.
    #[inline]
    pub fn ours(&mut self) {
        let at = self.next_offset();
        self.pair.ours.write_slice(&self.data, at).expect("write");
    }
}

/// The final report of a guest of `span` bytes with `dirty_pages` random dirty pages.
pub struct GuestFinalReport {
    /// The memories.
    pub pair: GuestPair,
    pages: Vec<u64>,
}

impl GuestFinalReport {
    /// The workload (`regions` regions).
    pub fn new(span: u64, regions: u64, dirty_pages: usize) -> Self {
        let mut rng = 4242u64;
        let pages = (0..dirty_pages)
            .map(|_| next_random(&mut rng) % (span / PAGE))
            .collect();
        GuestFinalReport {
            pair: GuestPair::new(span, regions),
            pages,
        }
    }

    /// Dirties the pages on both memories with guest writes, and clears the report words
    /// the last report set (as a consumer does with the words it has consumed, and as the
    /// sparse report row does). Untimed.
    pub fn prepare(&mut self) {
        for &page in &self.pages {
            self.pair.words[(page / 64) as usize] = 0;
            let at = GuestAddress(page * PAGE);
            self.pair.vm_memory.write_obj(1u8, at).expect("write");
            self.pair.ours.write_obj(1u8, at).expect("write");
        }
    }

    /// vm-memory: `get_and_reset` of every region.
    pub fn vm_memory(&mut self) {
        self.pair.vm_memory_report();
    }

    /// dmalog: one sparse REPORT of the whole guest.
    pub fn ours(&mut self) {
        self.pair.ours_report();
    }
}

/// Paired batches of `ops` writes: ours against `baseline`, each batch after a reset.
fn guest_writes_paired(
    w: &mut GuestWrites,
    batches: usize,
    ops: u64,
    baseline: impl FnMut(&mut GuestWrites),
) -> crate::workloads::Paired {
    crate::workloads::paired_median_ns(batches, ops, w, |w| w.reset(), |w| w.ours(), baseline)
}

/// The guest-memory rows of the quick run: writes of 64 B, 4 KiB and 64 KiB through
/// `write_slice` (the copy and the mark), and the final report of a 64 GiB guest. Each
/// speedup is the median ratio of back-to-back pairs of batches (see
/// [`crate::workloads::paired_median_ns`]).
pub(crate) fn quick_rows(rows: &mut Vec<crate::Row>, progress: &mut dyn FnMut(&str)) {
    use crate::workloads::{paired_median_ns, Target};
    const GIB: u64 = 1 << 30;
    for (write_bytes, label, ops, batches, target) in [
        (64usize, "64 B", 1u64 << 12, 101, 1.0),
        (4096, "4 KiB", 1 << 10, 101, 1.0),
        (64 << 10, "64 KiB", 1 << 6, 61, 3.0),
    ] {
        progress(&format!(
            "guest writes of {label} into GuestMemoryMmap, both bitmaps"
        ));
        let mut w = GuestWrites::new(write_bytes, 256 << 20);
        let measurement = format!("guest write_slice {label}, random, 256 MiB, DmalogBitmap");
        let paired = guest_writes_paired(&mut w, batches, ops, |w| w.vm_memory());
        let baseline = "GuestMemoryMmap<AtomicBitmap>";
        rows.push(crate::Row::paired(
            &measurement,
            paired,
            baseline,
            Target::Faster(target),
        ));
        let paired = guest_writes_paired(&mut w, batches, ops, |w| w.plain());
        let baseline = "GuestMemoryMmap<()> (the copy alone)";
        rows.push(crate::Row::paired(
            &measurement,
            paired,
            baseline,
            Target::None,
        ));
    }

    progress("final report of a 64 GiB guest, 1000 dirty pages");
    let mut w = GuestFinalReport::new(64 * GIB, 8, 1000);
    // One report per batch (each needs its pages dirtied again): many pairs.
    let paired = paired_median_ns(
        41,
        1,
        &mut w,
        |w| w.prepare(),
        |w| w.ours(),
        |w| w.vm_memory(),
    );
    // The last timed batch may be vm-memory's: check ours on a fresh round.
    w.prepare();
    w.ours();
    let found = w.pair.reported_pages();
    assert!(found > 990, "the guest report found {found} pages");
    rows.push(crate::Row::paired(
        "guest final report 64 GiB (8 regions) @4 KiB, 1000 dirty",
        paired,
        "AtomicBitmap get_and_reset of every region",
        Target::Faster(100.0),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both memories are dirtied alike and both reports find every page.
    #[test]
    fn final_report_finds_the_same_pages() {
        let mut w = GuestFinalReport::new(1 << 30, 4, 100);
        w.prepare();
        let mut theirs = 0u64;
        for region in w.pair.vm_memory.iter() {
            theirs += MmapRegion::bitmap(region)
                .get_and_reset()
                .iter()
                .map(|word| u64::from(word.count_ones()))
                .sum::<u64>();
        }
        w.ours();
        assert_eq!(w.pair.reported_pages(), theirs);
        assert!(theirs >= 99, "{theirs} pages");
    }

    #[test]
    fn guest_writes_mark_on_both() {
        let mut w = GuestWrites::new(64 << 10, 64 << 20);
        for _ in 0..10 {
            w.ours();
            w.vm_memory();
        }
        w.pair.ours_report();
        let theirs: u64 = w
            .pair
            .vm_memory
            .iter()
            .map(|region| {
                MmapRegion::bitmap(region)
                    .get_and_reset()
                    .iter()
                    .map(|word| u64::from(word.count_ones()))
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(w.pair.reported_pages(), theirs);
        assert!(theirs >= 16 * 9, "{theirs} pages");
    }
}
