//! The server's dispatcher over a socket pair: arbitrary bytes after a valid VERSION.
#![no_main]

use dmalog_vfio_user::fuzzing::{dispatch_stream, with_version};
use dmalog_vfio_user::fuzzing::FuzzTracker;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dispatch_stream(&with_version(data), FuzzTracker::Soft);
});
