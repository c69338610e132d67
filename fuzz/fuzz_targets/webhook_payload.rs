//! The Alertmanager webhook payload decoder on arbitrary request bodies: a notification or
//! a refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::webhook_payload(data);
});
