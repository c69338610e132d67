//! The crm_mon XML parser on arbitrary text: a cluster state or an error, never a panic
//! (crm_mon's output is read from a child process the exporter does not control).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clusterwatch::fuzzing::crm_mon(data);
});
