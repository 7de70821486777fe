//! Bad input never panics: random DEVICE_FEATURE requests in both dialects, with headers
//! biased towards the logging features so that deep paths are reached.

use dmalog::uapi::*;
use dmalog::user_memory::SegmentedUserMemory;
use dmalog::{LoggingCore, SoftDriver};
use proptest::prelude::*;

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(FEATURE_DMA_LOGGING_START | FEATURE_SET),
        Just(FEATURE_DMA_LOGGING_STOP | FEATURE_SET),
        Just(FEATURE_DMA_LOGGING_REPORT | FEATURE_GET),
        Just(FEATURE_DMA_LOGGING_REPORT | FEATURE_GET | FEATURE_PROBE),
        any::<u32>(),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        // A START or REPORT with plausible fields and random sizes.
        (
            any::<u64>(),
            0u32..300,
            prop::collection::vec((0u64..(1 << 40), 0u64..(1 << 20)), 0..8)
        )
            .prop_map(|(page_shift, _, ranges)| {
                let ranges: Vec<LoggingRange> = ranges
                    .into_iter()
                    .map(|(iova, length)| LoggingRange {
                        iova: iova << 12,
                        length: length << 12,
                    })
                    .collect();
                UserLoggingControl::encode(1 << (page_shift % 40), &ranges)
            }),
        (0u64..(1 << 40), 0u64..(1 << 34), 0u32..40).prop_map(|(iova, length, shift)| {
            UserLoggingReport {
                iova,
                length,
                page_size: 1 << shift,
            }
            .encode()
            .to_vec()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn vfio_user_requests_never_panic(
        sequence in prop::collection::vec((flags(), payload(), prop_oneof![Just(None), any::<u32>().prop_map(Some)]), 1..12),
        max_xfer in prop_oneof![Just(1u64 << 20), 0u64..4096],
    ) {
        let driver = SoftDriver::new().with_max_log_bytes(64 << 20);
        let mut recorder = driver.recorder();
        let mut core = LoggingCore::new(driver);
        let mut reply = Vec::new();
        for (flags, payload, argsz) in sequence {
            let argsz = argsz.unwrap_or(8 + payload.len() as u32 + 4096);
            let request = feature_request(argsz, flags, &payload);
            match core.handle_vfio_user(&request, max_xfer, &mut reply) {
                Ok(()) => prop_assert!(reply.len() >= 8 && reply.len() as u64 <= max_xfer.max(request.len() as u64)),
                Err(err) => prop_assert!(err.errno() > 0),
            }
            recorder.record_write(1 << 30, 1 << 20);
            // Truncations of the same request: never a panic either.
            for cut in [0, 1, 7, 8, 9, request.len().saturating_sub(1)] {
                let _ = core.handle_vfio_user(&request[..cut.min(request.len())], max_xfer, &mut reply);
            }
        }
    }

    #[test]
    fn kernel_requests_never_panic(
        sequence in prop::collection::vec((flags(), payload(), any::<u32>()), 1..12),
        ranges_at in prop_oneof![Just(0x1000u64), any::<u64>()],
        bitmap_len in 0usize..64,
    ) {
        let mut core = LoggingCore::new(SoftDriver::new().with_max_log_bytes(64 << 20));
        let mut user = SegmentedUserMemory::new();
        user.insert(0x1000, vec![0u8; 64]);
        user.insert(0x8000, vec![0u8; bitmap_len]);
        for (flags, payload, argsz) in sequence {
            let mut request = feature_request(argsz, flags, &payload);
            // Point any pointer-shaped field at our segments sometimes.
            if request.len() >= 32 {
                request[24..32].copy_from_slice(&ranges_at.to_le_bytes());
            }
            if request.len() >= 40 {
                request[32..40].copy_from_slice(&0x8000u64.to_le_bytes());
            }
            let _ = core.handle_kernel(&mut request, &mut user);
        }
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), offset in any::<usize>()) {
        let _ = FeatureHeader::decode(&bytes);
        let _ = KernelLoggingControl::decode(&bytes);
        let _ = KernelLoggingReport::decode(&bytes);
        let _ = UserLoggingReport::decode(&bytes);
        let _ = MigDeviceStatePayload::decode(&bytes);
        if let Ok(control) = UserLoggingControl::decode(&bytes) {
            prop_assert_eq!(control.ranges().count(), control.num_ranges as usize);
        }
        let _ = LoggingRange::decode_at(&bytes, offset);
        let _ = read_u64(&bytes, offset);
    }
}

/// One step of a peer driving DMA mappings and logging against a tracker.
#[derive(Debug, Clone)]
enum PeerOp {
    Map(u64, u64),
    Unmap(u64, u64),
    StartAll(u64),
    StartRanges(u64, Vec<(u64, u64)>),
    Write(u64, u64),
    Report(u64, u64, u64),
    Stop,
}

/// An address biased towards the edges of the IOVA space, where arithmetic wraps.
fn edge_address() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..(1 << 24),
        (0u64..(1 << 16)).prop_map(|back| u64::MAX - back),
        any::<u64>(),
    ]
}

fn peer_op() -> impl Strategy<Value = PeerOp> {
    let len = prop_oneof![1u64..(1 << 20), any::<u64>()];
    let page = (0u32..40).prop_map(|shift| 1u64 << shift);
    prop_oneof![
        3 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Map(a, l)),
        1 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Unmap(a, l)),
        1 => page.clone().prop_map(PeerOp::StartAll),
        1 => (page.clone(), prop::collection::vec((edge_address(), len.clone()), 0..4))
            .prop_map(|(p, r)| PeerOp::StartRanges(p, r)),
        2 => (edge_address(), len.clone()).prop_map(|(a, l)| PeerOp::Write(a, l)),
        2 => (edge_address(), len, page).prop_map(|(a, l, p)| PeerOp::Report(a, l, p)),
        1 => Just(PeerOp::Stop),
    ]
}

/// Runs `ops` against `core`: every error carries an errno, nothing panics.
fn run_peer<D: dmalog::LogDriver>(
    mut core: LoggingCore<D>,
    mut dma: dmalog::WriteRecorder,
    ops: Vec<PeerOp>,
) -> Result<(), TestCaseError> {
    let user = dmalog::Dialect::VfioUser {
        max_data_xfer_size: 1 << 16,
    };
    let mut bitmap = vec![0u8; 1 << 16];
    for op in ops {
        let result = match op {
            PeerOp::Map(iova, len) => {
                if let Ok(range) = dmalog::IovaRange::new(iova, len) {
                    core.dma_mapped(range);
                }
                Ok(())
            }
            PeerOp::Unmap(iova, len) => {
                if let Ok(range) = dmalog::IovaRange::new(iova, len) {
                    core.dma_unmapped(range);
                }
                Ok(())
            }
            PeerOp::StartAll(page) => core.start(user, page, &[]).map(|_| ()),
            PeerOp::StartRanges(page, ranges) => {
                let ranges: Vec<LoggingRange> = ranges
                    .into_iter()
                    .map(|(iova, length)| LoggingRange {
                        iova: iova & !(page - 1),
                        length: length & !(page - 1),
                    })
                    .collect();
                core.start(user, page, &ranges).map(|_| ())
            }
            PeerOp::Write(iova, len) => {
                dma.record_write(iova, len);
                Ok(())
            }
            PeerOp::Report(iova, len, page) => {
                let need = len.checked_div(page).unwrap_or(0).div_ceil(8) + 1;
                let bytes = need.min(bitmap.len() as u64) as usize;
                core.report(user, iova, len, page, &mut bitmap[..bytes])
            }
            PeerOp::Stop => core.stop(),
        };
        if let Err(err) = result {
            prop_assert!(err.errno() > 0);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn soft_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = SoftDriver::new().with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }

    #[test]
    fn pds_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = dmalog::pds::PdsDriver::new(2).with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }

    #[test]
    fn mlx5_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = dmalog::Mlx5Driver::new(dmalog::Mlx5Caps::tiny()).with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }
}
