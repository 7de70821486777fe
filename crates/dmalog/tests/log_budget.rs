//! The one memory budget for tracker state (SPEC 8): every tracker charges what START
//! allocates; a budget of exactly that starts, one byte less is ENOMEM with nothing
//! half-started, and a smaller START then succeeds.

use dmalog::pds::PdsDriver;
use dmalog::uapi::LoggingRange;
use dmalog::{Dialect, LogDriver, LoggingCore, Mlx5Caps, Mlx5Driver, SoftDriver};

const PAGE: u64 = 4096;
const USER: Dialect = Dialect::VfioUser {
    max_data_xfer_size: u64::MAX,
};

/// Two ranges of `length` and `length / 2` bytes, far apart.
fn ranges(length: u64) -> [LoggingRange; 2] {
    [
        LoggingRange { iova: 0, length },
        LoggingRange {
            iova: 1 << 50,
            length: length / 2,
        },
    ]
}

/// The table for one tracker: `make` builds it with a budget, `used` reads its charge,
/// `floor_bytes` is what START over `pages` pages must at least charge.
fn budget_table<D: LogDriver>(
    name: &str,
    make: impl Fn(u64) -> D,
    used: impl Fn(&D) -> u64,
    floor_bytes: impl Fn(u64) -> u64,
) {
    let length = 4 << 30; // 1 Mi pages (128 KiB of bitmap) plus half of that
    let charge = {
        let mut core = LoggingCore::new(make(u64::MAX));
        core.start(USER, PAGE, &ranges(length)).unwrap();
        let charge = used(core.driver().unwrap());
        core.stop().unwrap();
        assert_eq!(used(core.driver().unwrap()), 0, "{name}: STOP frees");
        charge
    };
    let floor = floor_bytes((length + length / 2) / PAGE);
    assert!(
        charge >= floor,
        "{name}: charges {charge}, below its bitmaps ({floor})"
    );
    for (budget, expected) in [(charge, Ok(PAGE)), (charge - 1, Err(libc::ENOMEM))] {
        let mut core = LoggingCore::new(make(budget));
        let got = core
            .start(USER, PAGE, &ranges(length))
            .map_err(|e| e.errno());
        assert_eq!(got, expected, "{name} with a budget of {budget} bytes");
        if got.is_ok() {
            continue;
        }
        // Nothing half-started: logging is stopped, nothing charged.
        assert_eq!(core.started_page_size(), None, "{name}");
        assert_eq!(used(core.driver().unwrap()), 0, "{name}: nothing charged");
        let mut bitmap = [0u8; 8];
        assert_eq!(
            core.report(USER, 0, 64 * PAGE, PAGE, &mut bitmap)
                .map_err(|e| e.errno()),
            Err(libc::EINVAL),
            "{name}: not started"
        );
        // A smaller START then fits.
        assert_eq!(
            core.start(USER, PAGE, &ranges(length / 4))
                .map_err(|e| e.errno()),
            Ok(PAGE),
            "{name}: a smaller START after ENOMEM"
        );
    }
}

#[test]
fn soft_budget() {
    budget_table(
        "soft",
        |budget| SoftDriver::new().with_max_log_bytes(budget),
        SoftDriver::used_bytes,
        |pages| pages / 8,
    );
}

#[test]
fn pds_budget() {
    budget_table(
        "pds",
        |budget| PdsDriver::new(8).with_max_log_bytes(budget),
        PdsDriver::used_bytes,
        |pages| 2 * (pages / 8),
    );
}

#[test]
fn mlx5_budget() {
    let caps = Mlx5Caps::unlimited();
    budget_table(
        "mlx5",
        |budget| Mlx5Driver::new(caps).with_max_log_bytes(budget),
        Mlx5Driver::used_bytes,
        |pages| pages / 8 + caps.ring_bytes(),
    );
}

#[test]
fn a_huge_start_is_enomem_under_the_default_budget() {
    // 64 TiB at 4 KiB: 2 GiB of bitmap (pds: 4 GiB), above the default 1 GiB.
    let huge = [LoggingRange {
        iova: 0,
        length: 64 << 40,
    }];
    let enomem = Err(libc::ENOMEM);
    let mut soft = LoggingCore::new(SoftDriver::new());
    assert_eq!(soft.start(USER, PAGE, &huge).map_err(|e| e.errno()), enomem);
    let mut pds = LoggingCore::new(PdsDriver::new(8));
    assert_eq!(pds.start(USER, PAGE, &huge).map_err(|e| e.errno()), enomem);
    let mut mlx5 = LoggingCore::new(Mlx5Driver::new(Mlx5Caps::unlimited()));
    assert_eq!(mlx5.start(USER, PAGE, &huge).map_err(|e| e.errno()), enomem);
}

#[test]
fn soft_charges_ranges_added_after_start() {
    let mut core = LoggingCore::new(SoftDriver::new());
    core.start(USER, PAGE, &[]).unwrap();
    assert_eq!(core.driver().unwrap().used_bytes(), 0);
    core.dma_mapped(dmalog::IovaRange::new(0, 1 << 30).unwrap());
    assert!(
        core.driver().unwrap().used_bytes() >= (1 << 30) / PAGE / 8,
        "an added range is charged"
    );
    core.stop().unwrap();
    assert_eq!(core.driver().unwrap().used_bytes(), 0);
}
