//! The hook's whole environment, built in one place: the fixed PATH and `CW_*` facts about the
//! run, the hook's configured `env`, then alert labels as `CW_LABEL_*` within a byte budget.
//! It builds variables; starting the process is `runner`'s business.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::HookRule;
use super::payload::Alert;

/// The only PATH a hook gets.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Prefix of the variables carrying alert labels.
pub const LABEL_PREFIX: &str = "CW_LABEL_";

/// A label value longer than this is cut (one environment string has a kernel limit of
/// 128 KiB).
const MAX_LABEL_VALUE: usize = 8192;

/// Bytes all label variables may take together (`NAME=VALUE\0` each). The kernel refuses an
/// exec whose argv and environment pass ARG_MAX (2 MiB with the default 8 MiB stack); this
/// keeps a run far from it whatever an alert carries. Labels past it are dropped, in label
/// order, and counted.
pub const LABEL_BUDGET_BYTES: usize = 128 * 1024;

/// Which run a process belongs to, for its `CW_*` variables.
pub struct RunFacts<'a> {
    /// The hook.
    pub rule: &'a HookRule,
    /// The run's number.
    pub run: u64,
    /// 0 for the validation, 1 for the first attempt.
    pub attempt: u32,
    /// The alert it is for.
    pub alert: &'a Alert,
    /// The notification's payload file (absolute).
    pub payload_file: &'a Path,
    /// The lock's fencing token, for disruptive runs under `hooks.lock`.
    pub fencing_token: Option<u64>,
    /// For a hook with `steps:`: the step's name and index (0 for the first).
    pub step: Option<(&'a str, usize)>,
}

/// A hook's environment, and how many labels did not fit the budget.
pub struct HookEnv {
    /// Every variable, in order.
    pub vars: Vec<(String, String)>,
    /// Labels dropped for the budget.
    pub dropped_labels: usize,
}

/// The complete environment of one process of a run.
pub fn build(f: &RunFacts<'_>) -> HookEnv {
    let alert = f.alert;
    let mut vars = vec![
        ("PATH".to_owned(), HOOK_PATH.to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("CW_HOOK".to_owned(), f.rule.name.clone()),
        ("CW_RUN".to_owned(), f.run.to_string()),
        ("CW_ATTEMPT".to_owned(), f.attempt.to_string()),
        (
            "CW_ALERT_STATUS".to_owned(),
            alert.status.as_str().to_owned(),
        ),
        ("CW_ALERT_FINGERPRINT".to_owned(), alert.fingerprint.clone()),
        ("CW_ALERT_STARTS_AT".to_owned(), alert.starts_at.clone()),
        (
            "CW_PAYLOAD_FILE".to_owned(),
            f.payload_file.display().to_string(),
        ),
    ];
    if let Some(t) = f.fencing_token {
        vars.push(("CW_FENCING_TOKEN".to_owned(), t.to_string()));
    }
    if let Some((name, index)) = f.step {
        vars.push(("CW_STEP".to_owned(), name.to_owned()));
        vars.push(("CW_STEP_INDEX".to_owned(), index.to_string()));
    }
    vars.extend(f.rule.env.iter().cloned());
    let (labels, dropped_labels) = label_env(&alert.labels, LABEL_BUDGET_BYTES);
    vars.extend(labels);
    HookEnv {
        vars,
        dropped_labels,
    }
}

/// Alert labels as environment variables: `CW_LABEL_` + the name upper-cased with everything
/// outside `[A-Z0-9_]` turned into `_`. The prefix means no label can set PATH, LD_PRELOAD or
/// IFS; NUL bytes (which cannot be in an environment) are dropped and long values cut. Labels
/// past `budget` bytes are left out; returns them and how many were left out.
pub fn label_env(
    labels: &BTreeMap<String, String>,
    budget: usize,
) -> (Vec<(String, String)>, usize) {
    let mut out: Vec<(String, String)> = Vec::new();
    let (mut used, mut dropped) = (0usize, 0usize);
    for (k, v) in labels {
        let name: String = k
            .chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .collect();
        let name = format!("{LABEL_PREFIX}{name}");
        // Two labels that reduce to one name: the first (in label order) wins, predictably.
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let mut value: String = v.chars().filter(|c| *c != '\0').collect();
        if value.len() > MAX_LABEL_VALUE {
            let mut cut = MAX_LABEL_VALUE;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
        }
        let size = name.len() + value.len() + 2;
        if used + size > budget {
            dropped += 1;
            continue;
        }
        used += size;
        out.push((name, value));
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_cannot_escape_the_prefix() {
        let labels: BTreeMap<String, String> = [
            ("PATH", "/evil"),
            ("LD_PRELOAD", "x.so"),
            ("a-b.c", "v\0w"),
            ("A_B_C", "second"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (env, dropped) = label_env(&labels, LABEL_BUDGET_BYTES);
        assert!(env.iter().all(|(k, _)| k.starts_with(LABEL_PREFIX)));
        assert!(env.contains(&("CW_LABEL_PATH".into(), "/evil".into())));
        assert!(env.contains(&("CW_LABEL_A_B_C".into(), "second".into())));
        assert_eq!(env.len(), 3, "{env:?}");
        assert_eq!(dropped, 0);
    }

    #[test]
    fn labels_past_the_budget_are_dropped_and_counted() {
        // 500 labels of 8 KiB: 4 MiB, twice the kernel's limit for a whole exec.
        let labels: BTreeMap<String, String> = (0..500)
            .map(|i| (format!("l{i:03}"), "x".repeat(8192)))
            .collect();
        let (env, dropped) = label_env(&labels, LABEL_BUDGET_BYTES);
        let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        assert!(bytes <= LABEL_BUDGET_BYTES, "{bytes}");
        assert_eq!(env.len() + dropped, 500);
        assert!(env.len() >= 15 && dropped > 400, "{} kept", env.len());
        // Label order decides: the first ones are kept.
        assert_eq!(env[0].0, "CW_LABEL_L000");
    }
}
