//! The Redis INFO reply parser on arbitrary text: fields or a protocol error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::redis_info(data);
});
