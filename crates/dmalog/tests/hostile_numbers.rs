//! Peer-controlled numbers that once reached unchecked arithmetic or allocation sizes:
//! each is now an error with the right errno (or a latched EIO), never a panic, an abort
//! or a silently lost page (SPEC 8).

use dmalog::uapi::{
    feature_request, KernelLoggingControl, UapiStruct, FEATURE_DMA_LOGGING_START, FEATURE_SET,
};
use dmalog::user_memory::SegmentedUserMemory;
use dmalog::{Dialect, IovaRange, LoggingCore, SoftDriver};

const PAGE: u64 = 4096;
const USER: Dialect = Dialect::VfioUser {
    max_data_xfer_size: u64::MAX,
};

/// The last bytes of the IOVA space: a mapping whose end cannot be rounded up to a page.
fn top_of_iova_space() -> IovaRange {
    IovaRange::new(u64::MAX - 100, 100).unwrap()
}

#[test]
fn kernel_start_does_not_allocate_for_num_ranges_before_reading_them() {
    // A core configured for the most ranges: num_ranges u32::MAX once sized a 64 GiB
    // vector up front (an abort); the ranges are not there, so it is EFAULT.
    let mut core = LoggingCore::new(SoftDriver::new()).with_max_ranges(u32::MAX);
    let control = KernelLoggingControl {
        page_size: PAGE,
        num_ranges: u32::MAX,
        __reserved: 0,
        ranges: 0x1000,
    };
    let mut request = feature_request(
        32,
        FEATURE_DMA_LOGGING_START | FEATURE_SET,
        &control.encode(),
    );
    let mut user = SegmentedUserMemory::new();
    user.insert(0x1000, vec![0u8; 64]); // two ranges' worth, then nothing
    let got = core.handle_kernel(&mut request, &mut user);
    assert_eq!(got.map_err(|e| e.errno()), Err(libc::EFAULT));
    assert_eq!(core.started_page_size(), None);
}

#[test]
fn soft_log_all_with_a_mapping_at_the_top_of_the_iova_space() {
    // At START: EOVERFLOW. Added after START: the log is latched into EIO, not silently
    // missing the mapping.
    let mut core = LoggingCore::new(SoftDriver::new());
    core.dma_mapped(top_of_iova_space());
    assert_eq!(
        core.start(USER, PAGE, &[]).map_err(|e| e.errno()),
        Err(libc::EOVERFLOW)
    );
    core.dma_unmapped(top_of_iova_space());
    core.start(USER, PAGE, &[]).unwrap();
    core.dma_mapped(top_of_iova_space());
    let mut bitmap = [0u8; 8];
    assert_eq!(
        core.report(USER, 0, PAGE, PAGE, &mut bitmap)
            .map_err(|e| e.errno()),
        Err(libc::EIO)
    );
}
