//! Every vfio-user decoder on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dmalog_vfio_user::fuzzing::decode_everything(data);
});
