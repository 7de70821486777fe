//! The client against a scripted hostile server: arbitrary replies and server commands.
#![no_main]

use dmalog_vfio_user::fuzzing::client_against_script;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    client_against_script(data);
});
