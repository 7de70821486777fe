//! The shared conformance suite over guest memory logged by `DmalogBitmap`: the suite's
//! DMA writes are vm-memory writes into a `GuestMemoryMmap<DmalogBitmap>` of three regions
//! (boundaries not aligned to 64 KiB or 2 MiB, so tracker pages straddle regions), and its
//! features go to a logging core over `VmMemoryDriver`.

use std::sync::Arc;

use dmalog::conformance::{ConformanceTarget, CoreTarget, Variant, SUITE_SPAN};
use dmalog::user_memory::SegmentedUserMemory;
use dmalog::{IovaRange, LoggingCore};
use dmalog_vm_memory::{DirtyRegions, DmalogBitmap, VmMemoryDriver};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Region boundaries inside the suite's span.
const FIRST_END: u64 = (20 << 20) + 3 * 4096;
const SECOND_END: u64 = 34 << 20;

struct VmMemoryTarget {
    core: LoggingCore<VmMemoryDriver>,
    memory: GuestMemoryMmap<DmalogBitmap>,
    data: Vec<u8>,
    writes: u64,
}

impl ConformanceTarget for VmMemoryTarget {
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32> {
        let mut reply = Vec::new();
        self.core
            .handle_vfio_user(request, 1 << 20, &mut reply)
            .map_err(|e| e.errno())?;
        Ok(reply)
    }

    fn feature_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>> {
        Some(
            self.core
                .handle_kernel(request, user)
                .map_err(|e| e.errno()),
        )
    }

    /// A guest write through a different vm-memory API each time.
    fn dma_write(&mut self, iova: u64, len: u64) {
        let len = len as usize;
        if self.data.len() < len {
            self.data.resize(len, 0xa5);
        }
        let data = &self.data[..len];
        let addr = GuestAddress(iova);
        self.writes += 1;
        match self.writes % 3 {
            0 => self.memory.write_slice(data, addr).unwrap(),
            1 => {
                let mut src = data;
                self.memory
                    .read_exact_volatile_from(addr, &mut src, len)
                    .unwrap()
            }
            _ => {
                let mut at = 0;
                for slice in self.memory.get_slices(addr, len) {
                    let slice = slice.unwrap();
                    slice.copy_from(&data[at..at + slice.len()]);
                    at += slice.len();
                }
                assert_eq!(at, len);
            }
        }
    }

    fn dma_map(&mut self, iova: u64, len: u64) {
        if let Ok(range) = IovaRange::new(iova, len) {
            self.core.dma_mapped(range);
        }
    }

    fn max_data_xfer_size(&self) -> u64 {
        1 << 20
    }
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
            Box::new(VmMemoryTarget {
                core: LoggingCore::new(VmMemoryDriver::new(Arc::clone(&regions))),
                memory,
                data: Vec::new(),
                writes: 0,
            })
        }
        Variant::NoLogging => Box::new(CoreTarget::new(
            LoggingCore::<VmMemoryDriver>::unsupported(),
            None,
        )),
    }
}

dmalog::conformance_tests!(make);
