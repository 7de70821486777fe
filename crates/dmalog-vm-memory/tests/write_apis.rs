//! Every vm-memory write API marks exactly the pages it touches: the same writes on a
//! `GuestMemoryMmap<AtomicBitmap>` (vm-memory's own bitmap, the model) and on a
//! `GuestMemoryMmap<DmalogBitmap>` of the same layout dirty the same GPA pages, and reads
//! dirty none.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dmalog::tracker::report_words;
use dmalog::{DirtyTracker, IovaRange};
use dmalog_vm_memory::{DirtyRegions, DmalogBitmap, VmMemoryTracker};
use proptest::prelude::*;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
    VolatileMemory, VolatileSlice,
};

const PAGE: u64 = 4096;
/// Two adjacent regions (writes cross between them), a hole, a third region.
const LAYOUT: [(u64, u64); 3] = [(0, 1 << 20), (1 << 20, 256 << 10), (4 << 20, 512 << 10)];
const SPAN: u64 = (4 << 20) + (512 << 10);

struct Pair {
    model: GuestMemoryMmap<AtomicBitmap>,
    ours: GuestMemoryMmap<DmalogBitmap>,
    tracker: VmMemoryTracker,
}

impl Pair {
    fn new() -> Pair {
        let ranges: Vec<(GuestAddress, usize)> = LAYOUT
            .iter()
            .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
            .collect();
        let model = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap();
        let regions = DirtyRegions::new(PAGE).unwrap();
        let with_files: Vec<_> = ranges.iter().map(|&(gpa, len)| (gpa, len, None)).collect();
        let ours = regions.guest_memory(&with_files).unwrap();
        let mut tracker = regions.tracker();
        tracker
            .start(&[IovaRange::new(0, SPAN).unwrap()], PAGE)
            .unwrap();
        Pair {
            model,
            ours,
            tracker,
        }
    }

    /// GPA pages vm-memory's bitmap holds, cleared.
    fn model_pages(&self) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        for region in self.model.iter() {
            let words = MmapRegion::bitmap(region).get_and_reset();
            for (w, word) in words.iter().enumerate() {
                for bit in 0..64 {
                    if word >> bit & 1 == 1 {
                        pages.insert(region.start_addr().0 / PAGE + (w * 64 + bit) as u64);
                    }
                }
            }
        }
        pages
    }

    /// GPA pages our tracker reports, cleared.
    fn our_pages(&mut self) -> BTreeSet<u64> {
        let mut words = vec![0u64; report_words(SPAN, PAGE).unwrap() as usize];
        self.tracker
            .report(IovaRange::new(0, SPAN).unwrap(), PAGE, &mut words)
            .unwrap();
        let mut pages = BTreeSet::new();
        for (w, word) in words.iter().enumerate() {
            for bit in 0..64 {
                if word >> bit & 1 == 1 {
                    pages.insert((w * 64 + bit) as u64);
                }
            }
        }
        pages
    }
}

/// One vm-memory write (or read) API.
#[derive(Debug, Clone, Copy)]
enum Api {
    WriteSlice,
    Write,
    WriteObj,
    Store,
    ReadVolatileFrom,
    ReadExactVolatileFrom,
    SliceCopyFrom,
    SliceWriteAtOffset,
    SliceStoreAtOffset,
    CopyToVolatileSlice,
    RefStore,
    ArrayRefCopyFrom,
    SlicesCopyFrom,
    Reads,
}

const APIS: [Api; 14] = [
    Api::WriteSlice,
    Api::Write,
    Api::WriteObj,
    Api::Store,
    Api::ReadVolatileFrom,
    Api::ReadExactVolatileFrom,
    Api::SliceCopyFrom,
    Api::SliceWriteAtOffset,
    Api::SliceStoreAtOffset,
    Api::CopyToVolatileSlice,
    Api::RefStore,
    Api::ArrayRefCopyFrom,
    Api::SlicesCopyFrom,
    Api::Reads,
];

/// Does `api` at `addr` for `len` bytes (`inner` is an offset inside a slice) on `mem`.
/// Errors (a range outside memory, a slice across regions) are ignored: both memories
/// have the same layout, so they fail alike.
fn apply<B>(mem: &GuestMemoryMmap<B>, api: Api, addr: u64, len: usize, inner: usize)
where
    B: Bitmap + 'static,
    for<'a> <B as vm_memory::bitmap::WithBitmapSlice<'a>>::S: BitmapSlice,
{
    let data = vec![0x5au8; len];
    let mut sink = vec![0u8; len];
    let at = GuestAddress(addr);
    match api {
        Api::WriteSlice => drop(mem.write_slice(&data, at)),
        Api::Write => drop(mem.write(&data, at)),
        Api::WriteObj => drop(mem.write_obj(0x1122_3344_5566_7788u64, at)),
        Api::Store => drop(mem.store(7u32, GuestAddress(addr & !3), Ordering::Relaxed)),
        Api::ReadVolatileFrom => drop(mem.read_volatile_from(at, &mut &data[..], len)),
        Api::ReadExactVolatileFrom => drop(mem.read_exact_volatile_from(at, &mut &data[..], len)),
        Api::SliceCopyFrom => {
            if let Ok(slice) = mem.get_slice(at, len) {
                slice.copy_from(&data);
            }
        }
        Api::SliceWriteAtOffset => {
            // A slice starting inside a region, written at an offset inside the slice.
            if let Ok(slice) = mem.get_slice(at, len + inner) {
                slice.write_slice(&data, inner).unwrap();
            }
        }
        Api::SliceStoreAtOffset => {
            if let Ok(slice) = mem.get_slice(at, inner + 8) {
                drop(slice.store(1u16, inner & !1, Ordering::Relaxed));
            }
        }
        Api::CopyToVolatileSlice => {
            if let Ok(dst) = mem.get_slice(at, len) {
                let mut local = data.clone();
                VolatileSlice::from(&mut local[..]).copy_to_volatile_slice(dst);
            }
        }
        Api::RefStore => {
            if let Ok(slice) = mem.get_slice(at, inner + 8) {
                if let Ok(r) = slice.get_ref::<u64>(inner) {
                    r.store(9);
                }
            }
        }
        Api::ArrayRefCopyFrom => {
            let words = len.div_ceil(2);
            if let Ok(slice) = mem.get_slice(at, inner + 2 * words) {
                if let Ok(array) = slice.get_array_ref::<u16>(inner, words) {
                    array.copy_from(&vec![3u16; words]);
                }
            }
        }
        Api::SlicesCopyFrom => {
            let mut done = 0;
            for slice in mem.get_slices(at, len) {
                let Ok(slice) = slice else { break };
                slice.copy_from(&data[done..done + slice.len()]);
                done += slice.len();
            }
        }
        Api::Reads => {
            // Reads of every kind mark nothing.
            drop(mem.read_slice(&mut sink, at));
            drop(mem.read_obj::<u64>(at));
            drop(mem.load::<u32>(GuestAddress(addr & !3), Ordering::Relaxed));
            drop(mem.write_volatile_to(at, &mut &mut sink[..], len));
            if let Ok(slice) = mem.get_slice(at, len) {
                slice.copy_to(&mut sink);
            }
        }
    }
}

fn op() -> impl Strategy<Value = (usize, u64, usize, usize)> {
    (
        0..APIS.len(),
        // Any byte of the span (the hole included), or a page start; lengths across page
        // and region edges, and whole pages give or take a byte (writes ending on the
        // last byte of a page or the first of the next).
        (0..SPAN, prop::sample::select(vec![0u32, 12]))
            .prop_map(|(at, shift)| at >> shift << shift),
        prop_oneof![
            1usize..64,
            1usize..8192,
            1usize..(300 << 10),
            (1usize..80, 0usize..3).prop_map(|(pages, delta)| (pages * PAGE as usize + delta)
                .saturating_sub(1)
                .max(1)),
        ],
        0usize..10_000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// After every write, the pages our tracker reports are exactly those vm-memory's
    /// `AtomicBitmap` marks, and `dirty_at` agrees before the report.
    #[test]
    fn every_write_api_marks_what_atomic_bitmap_marks(ops in prop::collection::vec(op(), 1..24)) {
        let mut pair = Pair::new();
        for (api, addr, len, inner) in ops {
            let api = APIS[api];
            apply(&pair.model, api, addr, len, inner);
            apply(&pair.ours, api, addr, len, inner);
            for (model, ours) in pair.model.iter().zip(pair.ours.iter()) {
                let offset = (addr.wrapping_sub(ours.start_addr().0) as usize) % ours.len() as usize;
                prop_assert_eq!(
                    MmapRegion::bitmap(model).dirty_at(offset),
                    MmapRegion::bitmap(ours).dirty_at(offset),
                    "dirty_at {:#x} of the region at {:#x}", offset, ours.start_addr().0
                );
            }
            let expect = pair.model_pages();
            prop_assert_eq!(pair.our_pages(), expect, "after {:?} at {:#x} len {}", api, addr, len);
        }
    }
}

#[test]
fn each_api_marks_something_and_reads_mark_nothing() {
    // Guards the property test against an API silently doing nothing in both memories.
    for api in APIS {
        let mut pair = Pair::new();
        apply(&pair.ours, api, (4 << 20) + PAGE - 100, 200, 16);
        let pages = pair.our_pages();
        match api {
            Api::Reads => assert!(pages.is_empty(), "{api:?} marked {pages:?}"),
            _ => assert!(!pages.is_empty(), "{api:?} marked nothing"),
        }
    }
}

#[test]
fn slices_at_offsets_mark_region_pages() {
    let regions = DirtyRegions::new(PAGE).unwrap();
    let gpa = 16 << 20;
    let memory = regions
        .guest_memory(&[(GuestAddress(gpa), 1 << 20, None)])
        .unwrap();
    let region = memory.iter().next().unwrap();
    // Slice of a slice: base offsets add up (3 pages + 1 page + 5 bytes into the region).
    let bitmap = MmapRegion::bitmap(region);
    let slice = bitmap.slice_at(3 * PAGE as usize).slice_at(PAGE as usize);
    slice.mark_dirty(5, 1);
    assert!(bitmap.dirty_at(4 * PAGE as usize));
    assert!(!bitmap.dirty_at(3 * PAGE as usize));
    assert!(slice.dirty_at(0));
    // The same through guest memory: a VolatileSlice at a region offset, written inside.
    let vslice = memory
        .get_slice(GuestAddress(gpa + 10 * PAGE), 4 * PAGE as usize)
        .unwrap();
    vslice
        .offset(2 * PAGE as usize)
        .unwrap()
        .write_obj(1u8, 0)
        .unwrap();
    let mut tracker = regions.tracker();
    tracker
        .start(&[IovaRange::new(gpa, 1 << 20).unwrap()], PAGE)
        .unwrap();
    memory
        .get_slice(GuestAddress(gpa + 10 * PAGE), 4 * PAGE as usize)
        .unwrap()
        .offset(2 * PAGE as usize)
        .unwrap()
        .write_obj(1u8, 0)
        .unwrap();
    slice.mark_dirty(5, 1);
    let mut words = [0u64; 4];
    tracker
        .report(IovaRange::new(gpa, 256 * PAGE).unwrap(), PAGE, &mut words)
        .unwrap();
    assert_eq!(words, [1 << 4 | 1 << 12, 0, 0, 0]);
    let _: &Arc<DirtyRegions> = &regions;
}
