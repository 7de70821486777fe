//! The feature header rows of SPEC 3.1, in both dialects, and a device without logging.

use dmalog::uapi::{
    feature_request, UserLoggingControl, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_PROBE, FEATURE_SET,
};
use dmalog::user_memory::SegmentedUserMemory;

use crate::requests::{header_only, REPORT_GET, START_SET, STOP_SET};
use crate::{MakeTarget, Variant, EINVAL, PAGE, RANGE_A};

/// SPEC 3.1: the feature header rows, in both dialects.
pub fn header_errnos(make: MakeTarget<'_>) {
    let mut t = make(Variant::Logging);
    let t = t.as_mut();
    let start_payload = UserLoggingControl::encode(PAGE, &[RANGE_A]);
    // (name, request, expected errno or 0)
    let user_rows: Vec<(&str, Vec<u8>, i32)> = vec![
        ("shorter than the header", vec![0u8; 7], EINVAL),
        ("argsz below 8", feature_request(4, STOP_SET, &[]), EINVAL),
        (
            "argsz below the echo",
            feature_request(8, START_SET, &start_payload),
            EINVAL,
        ),
        (
            "reserved flag bit 19",
            header_only(STOP_SET | 1 << 19),
            EINVAL,
        ),
        (
            "reserved flag bit 31",
            header_only(STOP_SET | 1 << 31),
            EINVAL,
        ),
        (
            "GET|SET without PROBE",
            header_only(STOP_SET | FEATURE_GET),
            EINVAL,
        ),
        (
            "unknown feature",
            header_only(0x1234 | FEATURE_GET),
            libc::ENOTTY,
        ),
        (
            "START with GET",
            feature_request(
                8 + 16,
                FEATURE_DMA_LOGGING_START | FEATURE_GET,
                &start_payload[..16],
            ),
            EINVAL,
        ),
        (
            "REPORT with SET",
            feature_request(8 + 24, FEATURE_DMA_LOGGING_REPORT | FEATURE_SET, &[0u8; 24]),
            EINVAL,
        ),
        (
            "PROBE START",
            header_only(FEATURE_DMA_LOGGING_START | FEATURE_PROBE),
            0,
        ),
        ("PROBE START|SET", header_only(START_SET | FEATURE_PROBE), 0),
        (
            "PROBE START|GET",
            header_only(FEATURE_DMA_LOGGING_START | FEATURE_GET | FEATURE_PROBE),
            EINVAL,
        ),
        (
            "PROBE REPORT|GET",
            header_only(REPORT_GET | FEATURE_PROBE),
            0,
        ),
        (
            "PROBE REPORT|SET",
            header_only(FEATURE_DMA_LOGGING_REPORT | FEATURE_SET | FEATURE_PROBE),
            EINVAL,
        ),
        ("PROBE STOP|SET", header_only(STOP_SET | FEATURE_PROBE), 0),
        (
            "PROBE GET|SET on START",
            header_only(START_SET | FEATURE_GET | FEATURE_PROBE),
            EINVAL,
        ),
        (
            "neither GET nor SET",
            header_only(FEATURE_DMA_LOGGING_STOP),
            EINVAL,
        ),
        (
            "START payload 15 bytes",
            feature_request(8 + 15, START_SET, &start_payload[..15]),
            EINVAL,
        ),
        (
            "START payload short of its ranges",
            feature_request(8 + 31, START_SET, &start_payload[..31]),
            EINVAL,
        ),
        (
            "REPORT payload 23 bytes",
            feature_request(8 + 32 + 8, REPORT_GET, &[0u8; 23]),
            EINVAL,
        ),
        ("STOP with no payload", header_only(STOP_SET), 0),
    ];
    for (name, request, expected) in &user_rows {
        let got = t.feature_vfio_user(request);
        match (expected, &got) {
            (0, Ok(reply)) => {
                assert_eq!(reply, request, "vfio-user {name}: reply echoes the request")
            }
            (0, Err(errno)) => panic!("vfio-user {name}: expected success, got errno {errno}"),
            (e, Err(errno)) => assert_eq!(errno, e, "vfio-user {name}"),
            (e, Ok(_)) => panic!("vfio-user {name}: expected errno {e}, got success"),
        }
    }
    // Kernel dialect rows (argsz is the ioctl's, payload minimums 24/32/0).
    let kernel_rows: Vec<(&str, Vec<u8>, i32)> = vec![
        ("argsz below 8", feature_request(7, STOP_SET, &[]), EINVAL),
        ("reserved flag", header_only(STOP_SET | 1 << 20), EINVAL),
        ("GET|SET", header_only(STOP_SET | FEATURE_GET), EINVAL),
        (
            "unknown feature",
            header_only(0x99 | FEATURE_GET),
            libc::ENOTTY,
        ),
        (
            "START argsz 8+23",
            feature_request(8 + 23, START_SET, &[0u8; 23]),
            EINVAL,
        ),
        (
            "REPORT argsz 8+31",
            feature_request(8 + 31, REPORT_GET, &[0u8; 31]),
            EINVAL,
        ),
        ("STOP argsz 8", header_only(STOP_SET), 0),
        ("PROBE START|SET", header_only(START_SET | FEATURE_PROBE), 0),
        (
            "PROBE REPORT|SET",
            header_only(FEATURE_DMA_LOGGING_REPORT | FEATURE_SET | FEATURE_PROBE),
            EINVAL,
        ),
        (
            "neither GET nor SET",
            header_only(FEATURE_DMA_LOGGING_REPORT),
            EINVAL,
        ),
    ];
    let mut user = SegmentedUserMemory::new();
    for (name, request, expected) in &kernel_rows {
        let mut request = request.clone();
        let Some(got) = t.feature_kernel(&mut request, &mut user) else {
            break;
        };
        assert_eq!(got.err().unwrap_or(0), *expected, "kernel {name}");
    }
    // A device without logging: ENOTTY for all three, PROBE included.
    let mut none = make(Variant::NoLogging);
    for flags in [
        START_SET,
        STOP_SET,
        REPORT_GET,
        START_SET | FEATURE_PROBE,
        REPORT_GET | FEATURE_PROBE,
    ] {
        let request = feature_request(64, flags, &[0u8; 40]);
        assert_eq!(
            none.feature_vfio_user(&request),
            Err(libc::ENOTTY),
            "no logging, flags {flags:#x}"
        );
        let mut request = request.clone();
        if let Some(got) = none.feature_kernel(&mut request, &mut SegmentedUserMemory::new()) {
            assert_eq!(
                got,
                Err(libc::ENOTTY),
                "kernel, no logging, flags {flags:#x}"
            );
        }
    }
}
