//! The MongoDB replSetGetStatus reader on a BSON document built from arbitrary bytes:
//! a status or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::mongo_status(data);
});
