//! Windowed reports against one-shot reports (property tests).

use super::*;
use crate::iova_bitmap::{for_each_window, report_bytes};
use proptest::prelude::*;

proptest! {
    /// A report produced in small windows equals the one-shot report, for any grids
    /// (aligned or not) and page sizes, including log pages that straddle window edges.
    #[test]
    fn windowed_report_equals_one_shot(
        log_shift in 12u32..=21,
        report_shift in 10u32..=22,
        base_pages in 0u64..64,
        report_offset in 0u64..(1 << 22),
        report_len in 1u64..(64 << 20),
        window_bytes in 1usize..64,
        marks in prop::collection::vec((0u64..(64 << 20), 1u64..(1 << 20)), 1..30),
    ) {
        let page = 1u64 << log_shift;
        let base = base_pages * page;
        let make = || {
            let log = DirtyLog::new(base, 64 << 20, page).unwrap();
            for &(at, len) in &marks {
                log.mark(base + at, len);
            }
            log
        };
        let (iova, report_page) = (base + report_offset, 1u64 << report_shift);
        let bytes = report_bytes(report_len, report_page).unwrap() as usize;
        let mut whole = vec![0u8; bytes];
        let one_shot = make();
        let mut bitmap = IovaBitmap::new(iova, report_len, report_page, &mut whole).unwrap();
        one_shot.read_and_clear(iova, report_len, &mut bitmap);
        let windowed_log = make();
        let mut streamed = vec![0u8; bytes];
        let mut window = vec![0u8; window_bytes];
        for_each_window::<LogError>(
            iova,
            report_len,
            report_page,
            &mut window,
            |bm| {
                let window = bm.window_range();
                windowed_log.read_and_clear(window.iova(), window.len_bytes(), bm);
                Ok(())
            },
            |offset, chunk| {
                streamed[offset as usize..offset as usize + chunk.len()].copy_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        prop_assert_eq!(streamed, whole);
    }
}
