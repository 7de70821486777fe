//! The migration stream into a destination: the raw bytes as the stream, or (selector
//! bit set) the bytes as frame records with good checksums after a good Hello, so that
//! inputs reach the page and device-data handling (see `dmalog_migrate::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dmalog_migrate::fuzzing::fuzz_one(data);
});
