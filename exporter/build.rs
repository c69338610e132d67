//! Embeds the names of the alerts of the shipped rules pack (`rules/*.rules.yml`), so
//! `check-config` can say when a hook matches an alert that no shipped rule defines.

use std::path::Path;

fn main() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    println!("cargo:rerun-if-changed={}", rules.display());
    let mut names: Vec<String> = Vec::new();
    // Without the rules directory (a crate built on its own) the list is empty and the
    // check is skipped.
    if let Ok(dir) = std::fs::read_dir(&rules) {
        for entry in dir.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(".rules.yml") {
                continue;
            }
            println!("cargo:rerun-if-changed={}", path.display());
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let line = line.trim_start().trim_start_matches("- ").trim_start();
                if let Some(name) = line.strip_prefix("alert:") {
                    let name = name.trim().trim_matches(['"', '\'']);
                    if !name.is_empty() {
                        names.push(name.to_owned());
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("shipped_alerts.rs");
    let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    std::fs::write(out, format!("&[{}]", list.join(", "))).expect("OUT_DIR is writable");
}
