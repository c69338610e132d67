//! The Kamailio stats.get_statistics result reader on arbitrary JSON: statistics lines are
//! read or skipped, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::kamailio_stats(data);
});
