//! The configuration loader on arbitrary text: every input is either a configuration or a
//! list of located problems, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(err) = clusterwatch::configuration::parse(text, "fuzz.yml", std::path::Path::new("/nonexistent")) {
            let _ = err.render();
        }
    }
});
