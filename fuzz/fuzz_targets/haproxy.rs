//! The HAProxy CSV statistics parser on arbitrary text: rows or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::haproxy(data);
});
