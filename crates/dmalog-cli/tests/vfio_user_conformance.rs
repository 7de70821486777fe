//! The shared conformance suite over the wire: a client against `dmalog serve` (soft and
//! mlx5 trackers) in another process; the device's DMA writes are dma-engine FILL ops.

mod common;

use dmalog::IovaRange;
use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};

use common::{engine_op, guest_memory, ServerProcess};
use dmalog::user_memory::SegmentedUserMemory;
use dmalog_conformance::{ConformanceTarget, Variant, SUITE_SPAN};
use dmalog_vfio_user::Client;

/// Mappings are made on demand in 1 MiB chunks, so that "log all DMA-mapped space" sees
/// only what the suite maps.
const CHUNK: u64 = 1 << 20;

struct WireTarget {
    client: Client,
    memory: OwnedFd,
    mapped: BTreeSet<u64>,
    fixed_ranges: bool,
    _server: ServerProcess,
}

impl WireTarget {
    fn new(tracker: &str) -> Self {
        let server = ServerProcess::start(tracker);
        let client = server.connect();
        WireTarget {
            client,
            memory: guest_memory(SUITE_SPAN),
            mapped: BTreeSet::new(),
            fixed_ranges: tracker.starts_with("mlx5"),
            _server: server,
        }
    }

    fn ensure_mapped(&mut self, iova: u64, len: u64) {
        if len == 0 || iova >= SUITE_SPAN {
            return;
        }
        let end = (iova + len).min(SUITE_SPAN);
        for chunk in iova / CHUNK..end.div_ceil(CHUNK) {
            if self.mapped.insert(chunk) {
                self.client
                    .dma_map(
                        IovaRange::new(chunk * CHUNK, CHUNK).unwrap(),
                        Some(self.memory.as_fd()),
                        chunk * CHUNK,
                        true,
                    )
                    .unwrap();
            }
        }
    }
}

impl ConformanceTarget for WireTarget {
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32> {
        self.client.device_feature(request).map_err(|e| e.errno())
    }

    fn feature_kernel(
        &mut self,
        _: &mut [u8],
        _: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>> {
        None
    }

    fn dma_write(&mut self, iova: u64, len: u64) {
        self.ensure_mapped(iova, len);
        let len = len.min(SUITE_SPAN.saturating_sub(iova));
        if len > 0 {
            let status = engine_op(&mut self.client, 1, iova, 0, len, 0);
            assert_eq!(status, 0, "FILL at {iova:#x} +{len:#x}");
        }
    }

    fn dma_map(&mut self, iova: u64, len: u64) {
        self.ensure_mapped(iova, len);
    }

    fn max_data_xfer_size(&self) -> u64 {
        u64::from(self.client.max_data_xfer_size())
    }

    fn tracks_mappings_added_after_start(&self) -> bool {
        !self.fixed_ranges
    }
}

fn make(tracker: &'static str) -> impl FnMut(Variant) -> Box<dyn ConformanceTarget> {
    move |variant| match variant {
        Variant::Logging => Box::new(WireTarget::new(tracker)),
        Variant::NoLogging => Box::new(WireTarget::new("none")),
    }
}

mod soft {
    dmalog_conformance::conformance_tests!(super::make("soft"));
}

mod mlx5 {
    dmalog_conformance::conformance_tests!(super::make("mlx5:unlimited"));
}
