//! The server's dispatcher driving lvu-sample: arbitrary bytes after a valid VERSION reach
//! its BAR0 timer (peer-chosen `time_t`), BAR1, server-to-client DMA and migration data.
#![no_main]

use dmalog_vfio_user::fuzzing::{dispatch_stream_to, with_version, FuzzDevice};
use dmalog_vfio_user::fuzzing::FuzzTracker;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dispatch_stream_to(&with_version(data), FuzzTracker::Soft, FuzzDevice::LvuSample);
});
