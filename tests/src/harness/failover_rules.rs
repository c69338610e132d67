//! The shipped rule files with their decision windows shortened for tests (the tuning the
//! README describes), and readers for the alerts a real Prometheus evaluates from them.
//! It starts no server: tests hand the files to [`Prometheus`] and query it.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::prometheus::Prometheus;

/// One window to shorten: in rule file `file`, every `[from]` and `offset from` becomes `to`.
#[derive(Debug, Clone, Copy)]
pub struct ShortWindow<'a> {
    /// The rule file's name, e.g. `failover.rules.yml`.
    pub file: &'a str,
    /// The window as the file writes it, e.g. `1m`.
    pub from: &'a str,
    /// The window the test wants, e.g. `3s`.
    pub to: &'a str,
}

/// Copies the shipped rule files into `dir`, each [`ShortWindow`] applied, and returns the
/// copies. A window the file no longer writes (no `[from]` or no `offset from`) is an error,
/// so a test never silently runs with the shipped windows.
pub fn rules_with_short_windows(dir: &Path, windows: &[ShortWindow]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in crate::lab::rule_files()? {
        let mut text = std::fs::read_to_string(&path)?;
        let name = path.file_name().context("a rule file without a name")?;
        for window in windows.iter().filter(|w| name == w.file) {
            let (range, offset) = (
                format!("[{}]", window.from),
                format!("offset {}", window.from),
            );
            ensure!(
                text.contains(&range) && text.contains(&offset),
                "{} no longer writes a window as `{range}` and `{offset}`",
                window.file
            );
            text = text
                .replace(&range, &format!("[{}]", window.to))
                .replace(&offset, &format!("offset {}", window.to));
        }
        let copy = dir.join(name);
        std::fs::write(&copy, text)?;
        files.push(copy);
    }
    Ok(files)
}

/// The labels of the alerts named `name` in `state` (`pending`, `firing`) right now.
pub async fn active_alerts(prom: &Prometheus, name: &str, state: &str) -> Result<Vec<Value>> {
    Ok(prom
        .alerts()
        .await?
        .as_array()
        .into_iter()
        .flatten()
        .filter(|alert| alert["labels"]["alertname"] == name && alert["state"] == state)
        .map(|alert| alert["labels"].clone())
        .collect())
}

/// The `ALERTS` series (pending or firing) whose alert name matches the regex `names` over
/// the last `range` (a PromQL duration): empty if none was ever active in that time.
pub async fn alerts_ever(prom: &Prometheus, names: &str, range: &str) -> Result<Vec<Value>> {
    let result = prom
        .query(&format!(r#"ALERTS{{alertname=~"{names}"}}[{range}]"#))
        .await?;
    Ok(result["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|series| series["metric"].clone())
        .collect())
}
