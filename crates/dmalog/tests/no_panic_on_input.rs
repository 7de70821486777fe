//! Bad input never panics: random DEVICE_FEATURE requests in both dialects, with headers
//! biased towards the logging features so that deep paths are reached.

use dmalog::uapi::*;
use dmalog::user_memory::SegmentedUserMemory;
use dmalog::{LoggingCore, SoftDriver};
use dmalog_conformance::drivers::{peer_op, run_peer};
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn soft_never_panics_on_peer_mappings(ops in prop::collection::vec(peer_op(), 1..24)) {
        let driver = SoftDriver::new().with_max_log_bytes(16 << 20);
        let dma = driver.recorder();
        run_peer(LoggingCore::new(driver), dma, ops)?;
    }
}
