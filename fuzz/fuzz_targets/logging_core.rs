//! The logging core's DEVICE_FEATURE handler (vfio-user dialect) on arbitrary requests.
#![no_main]

use dmalog::{LoggingCore, SoftDriver};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut core = LoggingCore::new(SoftDriver::new().with_max_log_bytes(16 << 20));
    let mut reply = Vec::new();
    for request in data.split(|&b| b == 0xfe) {
        let _ = core.handle_vfio_user(request, 1 << 16, &mut reply);
    }
});
