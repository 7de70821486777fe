//! The migration stream into a destination: the raw bytes as the stream, or (first byte
//! odd) the bytes as frame records with good checksums after a good Hello, so that inputs
//! reach the page and device-data handling.
#![no_main]

use dmalog_migrate::fuzzing::{destination_stream, frames_from};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((selector, rest)) if selector & 0x40 != 0 => {
            destination_stream(&frames_from(rest));
        }
        _ => {
            destination_stream(data);
        }
    }
});
