//! Random writes and reports, both dialects, against a model: the set of dirty tracker pages.

use std::collections::BTreeSet;

use dmalog::uapi::LoggingRange;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::requests::{byte_bits, kernel_report, user_dirty, user_start, user_stop};
use crate::{MakeTarget, Variant, PAGE, RANGE_A, RANGE_B};

#[derive(Debug, Clone)]
enum Op {
    Write {
        iova: u64,
        len: u64,
    },
    Report {
        iova: u64,
        len: u64,
        page_shift: u32,
        kernel: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Addresses at byte, 1 KiB, 4 KiB, 64 KiB and 2 MiB granularity, so that every
    // conversion path (aligned grids and misaligned ones) is exercised.
    let aligned = |max: u64| {
        (
            0u64..max,
            prop::sample::select(vec![0u32, 10, 12, 12, 16, 21]),
        )
            .prop_map(move |(n, shift)| (n >> shift) << shift)
    };
    prop_oneof![
        3 => (aligned(48 << 20), prop_oneof![1u64..8192, 1u64..(3 << 20)]).prop_map(|(iova, len)| Op::Write { iova, len }),
        1 => (aligned(48 << 20), aligned(20 << 20), 10u32..23, any::<bool>())
            .prop_map(|(iova, len, page_shift, kernel)| Op::Report { iova, len: len.max(1), page_shift, kernel }),
    ]
}

/// The model: the set of dirty tracker pages, within the tracked ranges.
struct Model {
    page: u64,
    tracked: Vec<LoggingRange>,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn write(&mut self, iova: u64, len: u64) {
        for range in &self.tracked {
            let start = iova.max(range.iova);
            let end = (iova + len).min(range.iova + range.length);
            if start < end {
                for p in start / self.page..=(end - 1) / self.page {
                    self.dirty.insert(p);
                }
            }
        }
    }

    fn report(&mut self, iova: u64, len: u64, report_page: u64) -> BTreeSet<u64> {
        let mut bits = BTreeSet::new();
        let first = iova / self.page;
        let last = (iova + len - 1) / self.page;
        let hit: Vec<u64> = self.dirty.range(first..=last).copied().collect();
        for p in hit {
            self.dirty.remove(&p);
            let start = (p * self.page).max(iova);
            let end = ((p + 1) * self.page).min(iova + len);
            for k in (start - iova) / report_page..=(end - 1 - iova) / report_page {
                bits.insert(k);
            }
        }
        bits
    }
}

/// Random writes and reports (random ranges, page sizes 1 KiB to 4 MiB, both dialects)
/// against the model, for tracker page sizes of 4 KiB and 64 KiB. Set
/// `DMALOG_PROPTEST_CASES` for a longer run.
pub fn matches_model(make: MakeTarget<'_>) {
    let cases = std::env::var("DMALOG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop::sample::select(vec![PAGE, 64 << 10]),
        prop::collection::vec(op_strategy(), 1..40),
    );
    let make = std::cell::RefCell::new(make);
    let result = runner.run(&strategy, |(tracker_page, ops)| {
        let mut t = (make.borrow_mut())(Variant::Logging);
        let t = t.as_mut();
        let tracked = vec![RANGE_A, RANGE_B];
        let page = user_start(t, tracker_page, &tracked)
            .map_err(|e| TestCaseError::fail(format!("START {e}")))?;
        prop_assert_eq!(page, tracker_page);
        let mut model = Model {
            page,
            tracked,
            dirty: BTreeSet::new(),
        };
        for op in ops {
            match op {
                Op::Write { iova, len } => {
                    t.dma_write(iova, len);
                    model.write(iova, len);
                }
                Op::Report {
                    iova,
                    len,
                    page_shift,
                    kernel,
                } => {
                    let report_page = 1u64 << page_shift;
                    let expect = model.report(iova, len, report_page);
                    let bytes =
                        dmalog::iova_bitmap::report_bytes(len, report_page).unwrap() as usize;
                    let via_kernel = if kernel && report_page >= PAGE {
                        kernel_report(t, iova, len, report_page, &vec![0u8; bytes])
                    } else {
                        None
                    };
                    let got: BTreeSet<u64> = match via_kernel {
                        Some(result) => byte_bits(&result.unwrap()).into_iter().collect(),
                        None => user_dirty(t, iova, len, report_page)
                            .unwrap()
                            .into_iter()
                            .collect(),
                    };
                    prop_assert_eq!(
                        got,
                        expect,
                        "report iova {:#x} len {:#x} page {}",
                        iova,
                        len,
                        report_page
                    );
                }
            }
        }
        user_stop(t).unwrap();
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
