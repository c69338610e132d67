//! The configuration vocabulary every section parser uses: spanned nodes and problems with
//! positions, `global`, durations, secrets, target ids, regex and file helpers. It imports no
//! collector, hook or web module; putting the sections together is `crate::configuration`'s job.

pub mod source;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use source::{Located, Pos, Problem};

/// Default per-target deadline when `global.timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `global:` section.
#[derive(Clone, Debug)]
pub struct Global {
    /// Deadline for one target's collection unless the target sets its own.
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    timeout: Option<HumanDuration>,
}

impl Global {
    /// Checks the `global:` section.
    pub fn parse(at: Located, problems: &mut Vec<Problem>) -> Global {
        let raw = at.parse::<Option<RawGlobal>>(problems).flatten();
        let timeout = raw
            .and_then(|r| r.timeout)
            .map(|d| d.0)
            .unwrap_or(DEFAULT_TIMEOUT);
        check_timeout(timeout, &at, problems);
        Global { timeout }
    }
}

/// What a section's parser gets besides its own node.
pub struct SectionContext<'a> {
    /// Checked global settings.
    pub global: &'a Global,
    /// Directory of the configuration file, for relative paths (password files, …).
    pub base_dir: &'a Path,
}

impl SectionContext<'_> {
    /// Resolves a path from the configuration relative to the configuration file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file the problems are in.
    pub file: String,
    /// The problems, in document order.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// One line per problem: `FILE:LINE:COL: PATH: MESSAGE (hint: …)`.
    pub fn render(&self) -> String {
        self.problems
            .iter()
            .map(|p| p.render(&self.file))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Reads a YAML file as text; `given_by` (a flag or key) says where the path came from.
pub fn read_text(path: &Path, given_by: &str) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![
            Problem::new("", Pos::default(), format!("cannot read the file: {e}")).hint(format!(
                "check the path given to {given_by} and its permissions"
            )),
        ],
    })?;
    String::from_utf8(text).map_err(|e| ConfigError {
        file,
        problems: vec![Problem::new(
            "",
            Pos::default(),
            format!("not UTF-8 text: {e}"),
        )],
    })
}

/// A duration written the human way (`5s`, `1m30s`, `250ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// The longest duration any setting accepts (1 year): beyond it a deadline or an expiry
/// would overflow the clock, or never come.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// The longest per-target timeout: one collection is never worth more than an hour.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Checks a `timeout` field: more than zero and at most [`MAX_TIMEOUT`].
fn check_timeout(timeout: Duration, at: &Located, problems: &mut Vec<Problem>) {
    if timeout.is_zero() {
        problems.push(at.problem("timeout", "timeout must be greater than zero"));
    } else if timeout > MAX_TIMEOUT {
        problems.push(
            at.problem("timeout", "timeout must be at most 1h")
                .hint("it bounds one collection of one target, e.g. `5s`"),
        );
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration with a unit, like `5s`, `250ms` or `1m30s`",
            )
        })?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{s}`: {e} (write e.g. `5s`, `250ms`, `1m30s`)"
            ))
        })?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration `{s}` is too long: the limit is 1y"
            )));
        }
        Ok(HumanDuration(d))
    }
}

/// A secret (password, token): never printed. `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Reads a secret file (password, token). One trailing newline is removed, as editors add it.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(Secret::new(trimmed))
}

/// Reads the optional `password_file` of a list item (relative to the configuration file),
/// recording a problem at that field when it cannot be read.
pub fn read_password_file(
    path: Option<&Path>,
    ctx: &SectionContext,
    at: &Located,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    match read_secret_file(&ctx.resolve(path?)) {
        Ok(secret) => Some(secret),
        Err(e) => {
            problems.push(
                at.problem("password_file", e)
                    .hint("the file must be readable by the user clusterwatch runs as"),
            );
            None
        }
    }
}

/// Compiles a regular expression from the configuration, recording a problem at `field`.
pub fn compile_regex(
    pattern: &str,
    at: &Located,
    field: &str,
    problems: &mut Vec<Problem>,
) -> Option<regex::Regex> {
    regex::Regex::new(pattern)
        .map_err(|e| {
            // The regex crate's message draws a caret over several lines; its last line says why.
            let why = e.to_string().lines().last().unwrap_or("invalid").to_owned();
            problems.push(at.problem(field, format!("invalid regular expression: {why}")));
        })
        .ok()
}

/// The alert names the shipped rules pack (`rules/*.rules.yml`) defines, sorted; embedded at
/// build time (empty when the crate is built without the rules directory).
pub const SHIPPED_ALERTS: &[&str] = include!(concat!(env!("OUT_DIR"), "/shipped_alerts.rs"));

/// Whether `name` is an identifier as Prometheus label names and shell variables are
/// written: letters, digits and `_`, not starting with a digit.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `path` is a file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The executable a bare program name (no `/`) runs as, searched in the directories of
/// `path` (a `PATH` value) as the kernel's `execvp` would.
pub fn find_on_path(program: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| is_executable(p))
}

/// A target's identity: its `target` label, its `cluster` label and its own deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetId {
    /// The `target` label; never derived from a DSN.
    pub name: String,
    /// The replication group this target belongs to.
    pub cluster: Option<String>,
    /// Overrides `global.timeout` for this target.
    pub timeout: Option<Duration>,
}

impl TargetId {
    /// A target on this host with no cluster and the global deadline.
    pub fn local(name: impl Into<String>) -> Self {
        TargetId {
            name: name.into(),
            cluster: None,
            timeout: None,
        }
    }

    /// Checks the `name`, `cluster` and `timeout` fields of a list item. Sections repeat
    /// these fields in their raw structs (serde cannot flatten into a struct that denies
    /// unknown fields) and gather them here.
    pub fn check(
        name: String,
        cluster: Option<String>,
        timeout: Option<HumanDuration>,
        at: &Located,
        problems: &mut Vec<Problem>,
    ) -> TargetId {
        if name.trim().is_empty() {
            problems.push(at.problem("name", "name must not be empty"));
        }
        if cluster.as_deref().is_some_and(|cl| cl.trim().is_empty()) {
            problems.push(at.problem("cluster", "cluster must not be empty when given"));
        }
        if let Some(t) = timeout {
            check_timeout(t.0, at, problems);
        }
        TargetId {
            name,
            cluster,
            timeout: timeout.map(|t| t.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
    }
}
