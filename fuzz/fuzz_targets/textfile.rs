//! The textfile collector's exposition-format parser on arbitrary text: samples or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::textfile(data);
});
