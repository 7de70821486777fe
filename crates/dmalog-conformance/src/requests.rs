//! DEVICE_FEATURE requests in both dialects, sent to a [`ConformanceTarget`], with the
//! checks every reply must pass (a START echoes its request, a REPORT reply is argsz bytes).

use dmalog::tracker::report_words;
use dmalog::uapi::{
    feature_request, KernelLoggingControl, KernelLoggingReport, LoggingRange, UapiStruct,
    UserLoggingControl, UserLoggingReport, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_SET,
};
use dmalog::user_memory::SegmentedUserMemory;

use crate::ConformanceTarget;

/// START, as a SET.
pub const START_SET: u32 = FEATURE_DMA_LOGGING_START | FEATURE_SET;
/// STOP, as a SET.
pub const STOP_SET: u32 = FEATURE_DMA_LOGGING_STOP | FEATURE_SET;
/// REPORT, as a GET.
pub const REPORT_GET: u32 = FEATURE_DMA_LOGGING_REPORT | FEATURE_GET;
const RANGES_ADDR: u64 = 0x7000_0000;
const BITMAP_ADDR: u64 = 0x9000_0000;

/// A request of the feature header alone (argsz 8, no payload).
pub fn header_only(flags: u32) -> Vec<u8> {
    feature_request(8, flags, &[])
}

/// A vfio-user REPORT request of `argsz` bytes (header, payload and the bitmap's room).
pub fn user_report_request(argsz: u32, iova: u64, length: u64, page_size: u64) -> Vec<u8> {
    let report = UserLoggingReport {
        iova,
        length,
        page_size,
    };
    feature_request(argsz, REPORT_GET, &report.encode())
}

/// vfio-user START; returns the chosen page size.
pub fn user_start(
    t: &mut dyn ConformanceTarget,
    page_size: u64,
    ranges: &[LoggingRange],
) -> Result<u64, i32> {
    let payload = UserLoggingControl::encode(page_size, ranges);
    let request = feature_request(8 + payload.len() as u32, START_SET, &payload);
    let reply = t.feature_vfio_user(&request)?;
    assert_eq!(reply.len(), request.len(), "START reply echoes the request");
    assert_eq!(
        reply[16..],
        request[16..],
        "START reply echoes the request after the page size"
    );
    Ok(u64::from_le_bytes(reply[8..16].try_into().unwrap()))
}

/// vfio-user STOP.
pub fn user_stop(t: &mut dyn ConformanceTarget) -> Result<(), i32> {
    t.feature_vfio_user(&header_only(STOP_SET)).map(|_| ())
}

/// vfio-user REPORT into fresh words.
pub fn user_report(
    t: &mut dyn ConformanceTarget,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<Vec<u64>, i32> {
    let words = report_words(length, page_size).map_err(|e| e.errno())?;
    let argsz = 8 + 24 + words * 8;
    let request = user_report_request(argsz as u32, iova, length, page_size);
    let reply = t.feature_vfio_user(&request)?;
    assert_eq!(reply.len() as u64, argsz, "REPORT reply is argsz bytes");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()) as u64,
        argsz
    );
    assert_eq!(
        reply[8..32],
        request[8..32],
        "REPORT reply repeats the request"
    );
    Ok(reply[32..]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect())
}

/// Kernel START; returns the chosen page size (None: no kernel dialect).
pub fn kernel_start(
    t: &mut dyn ConformanceTarget,
    page_size: u64,
    ranges: &[LoggingRange],
) -> Option<Result<u64, i32>> {
    let mut user = SegmentedUserMemory::new();
    user.insert(
        RANGES_ADDR,
        ranges.iter().flat_map(|r| r.encode()).collect(),
    );
    let control = KernelLoggingControl {
        page_size,
        num_ranges: ranges.len() as u32,
        __reserved: 0,
        ranges: RANGES_ADDR,
    };
    let mut request = feature_request(8 + 24, START_SET, &control.encode());
    let result = t.feature_kernel(&mut request, &mut user)?;
    Some(result.map(|()| u64::from_le_bytes(request[8..16].try_into().unwrap())))
}

/// Kernel REPORT into a bitmap preloaded with `preset` bytes; returns the bytes.
pub fn kernel_report(
    t: &mut dyn ConformanceTarget,
    iova: u64,
    length: u64,
    page_size: u64,
    preset: &[u8],
) -> Option<Result<Vec<u8>, i32>> {
    let mut user = SegmentedUserMemory::new();
    user.insert(BITMAP_ADDR, preset.to_vec());
    let report = KernelLoggingReport {
        iova,
        length,
        page_size,
        bitmap: BITMAP_ADDR,
    };
    let mut request = feature_request(8 + 32, REPORT_GET, &report.encode());
    let result = t.feature_kernel(&mut request, &mut user)?;
    Some(result.map(|()| user.segment(BITMAP_ADDR).unwrap_or_default().to_vec()))
}

/// The set bits of `words` (bit `k % 64` of word `k / 64` is page `k`), in order.
pub fn set_bits(words: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            out.push(i as u64 * 64 + w.trailing_zeros() as u64);
            w &= w - 1;
        }
    }
    out
}

/// The set bits of `bytes` (bit `k % 8` of byte `k / 8` is page `k`), in order.
pub fn byte_bits(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() as u64 * 8)
        .filter(|k| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1)
        .collect()
}

/// vfio-user REPORT, as the list of dirty pages (numbers from `iova`).
pub fn user_dirty(
    t: &mut dyn ConformanceTarget,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<Vec<u64>, i32> {
    user_report(t, iova, length, page_size).map(|words| set_bits(&words))
}
