//! The shared conformance suite over guest memory logged by `DmalogBitmap`: the suite's
//! DMA writes are vm-memory writes into a `GuestMemoryMmap<DmalogBitmap>` of three regions
//! (boundaries not aligned to 64 KiB or 2 MiB, so tracker pages straddle regions), and its
//! features go to a logging core over `VmMemoryDriver`.

use std::sync::Arc;

use dmalog::LoggingCore;
use dmalog_conformance::{ConformanceTarget, CoreTarget, DmaWriter, Variant, SUITE_SPAN};
use dmalog_vm_memory::{DirtyRegions, DmalogBitmap, VmMemoryDriver};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Region boundaries inside the suite's span.
const FIRST_END: u64 = (20 << 20) + 3 * 4096;
const SECOND_END: u64 = 34 << 20;

/// A guest write through a different vm-memory API each time (the data is in guest
/// memory, and logged by `DmalogBitmap`, when vm-memory returns).
fn guest_writer(memory: GuestMemoryMmap<DmalogBitmap>) -> DmaWriter {
    let mut data = Vec::new();
    let mut writes = 0u64;
    Box::new(move |iova, len| {
        let len = len as usize;
        if data.len() < len {
            data.resize(len, 0xa5);
        }
        let data = &data[..len];
        let addr = GuestAddress(iova);
        writes += 1;
        match writes % 3 {
            0 => memory.write_slice(data, addr).unwrap(),
            1 => {
                let mut src = data;
                memory
                    .read_exact_volatile_from(addr, &mut src, len)
                    .unwrap()
            }
            _ => {
                let mut at = 0;
                for slice in memory.get_slices(addr, len) {
                    let slice = slice.unwrap();
                    slice.copy_from(&data[at..at + slice.len()]);
                    at += slice.len();
                }
                assert_eq!(at, len);
            }
        }
    })
}

fn make(variant: Variant) -> Box<dyn ConformanceTarget> {
    match variant {
        Variant::Logging => {
            let regions = DirtyRegions::new(4096).unwrap();
            let memory = regions
                .guest_memory(&[
                    (GuestAddress(0), FIRST_END as usize, None),
                    (
                        GuestAddress(FIRST_END),
                        (SECOND_END - FIRST_END) as usize,
                        None,
                    ),
                    (
                        GuestAddress(SECOND_END),
                        (SUITE_SPAN - SECOND_END) as usize,
                        None,
                    ),
                ])
                .unwrap();
            assert_eq!(memory.num_regions(), 3);
            Box::new(CoreTarget::with_dma_writer(
                LoggingCore::new(VmMemoryDriver::new(Arc::clone(&regions))),
                Some(guest_writer(memory)),
            ))
        }
        Variant::NoLogging => Box::new(CoreTarget::new(
            LoggingCore::<VmMemoryDriver>::unsupported(),
            None,
        )),
    }
}

dmalog_conformance::conformance_tests!(make);
