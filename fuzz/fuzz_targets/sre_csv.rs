//! The SRE stats CSV parser on arbitrary bytes: lines are used or rejected with a reason,
//! never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::sre_csv(data);
});
