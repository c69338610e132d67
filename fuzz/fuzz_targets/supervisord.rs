//! The supervisord XML-RPC response parser on arbitrary bytes: programs or an RPC error,
//! never a panic or unbounded recursion.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::supervisord(data);
});
