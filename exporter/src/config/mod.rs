//! Configuration in typed stages: YAML text → spanned node tree → each section parsed by its
//! owner into raw serde structs → validated into a checked [`Config`] (files read, DSNs parsed).
//! Every problem carries file, line and hint, and all problems are reported at once.

pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::collector::{Collector, CollectorKind, KINDS};
use source::{suggest, Node};
pub use source::{Located, Pos, Problem};

/// The configuration used when no `--config.file` is given: local filesystems with default
/// thresholds, host system statistics and clusterwatch's own process.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yml");

/// Name used in messages for the embedded default configuration.
pub const EMBEDDED_NAME: &str = "<embedded default>";

/// Default per-target deadline when `global.timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A checked configuration: every target built and ready to scrape.
pub struct Config {
    /// Where it came from (a path or [`EMBEDDED_NAME`]).
    pub origin: String,
    /// Settings that apply to every target.
    pub global: Global,
    /// Every configured target, in file order.
    pub targets: Vec<Arc<dyn Collector>>,
    /// Per target, a digest of the configuration it was built from (its list item, or its
    /// whole section, plus the content of every `*_file` named there): a reload keeps a
    /// running target whose digest did not change.
    pub fingerprints: Vec<Option<u64>>,
    /// The webhook receiver and hook runner, when a `hooks:` section is present.
    pub hooks: Option<crate::hooks::config::HooksConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("origin", &self.origin)
            .field("global", &self.global)
            .field("targets", &self.targets.len())
            .field("hooks", &self.hooks.as_ref().map(|h| h.rules.len()))
            .finish()
    }
}

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

/// Reads and checks a configuration file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path, "--config.file")?;
    // Absolute, so relative paths stay right whatever directory a hook or a reload runs in.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    parse(&text, &path.display().to_string(), &base)
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

/// The embedded default configuration, checked.
pub fn load_embedded() -> Result<Config, ConfigError> {
    parse(EMBEDDED_DEFAULT, EMBEDDED_NAME, Path::new("."))
}

/// The configuration `--config.file` names, or the embedded default without one: what
/// `serve` starts with and what every reload reads again.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    match file {
        Some(path) => load_file(path),
        None => load_embedded(),
    }
}

/// Checks configuration text. `file` is used in messages; `base_dir` resolves relative paths.
pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError {
        file: file.to_owned(),
        problems,
    };
    let doc = Node::parse_document(text).map_err(|p| fail(vec![p]))?;
    let Some(entries) = doc.as_map() else {
        return Err(fail(vec![Problem::new(
            "",
            doc.pos,
            "the configuration must be a mapping of sections",
        )
        .hint(
            "start with e.g. `global:` or `filesystems:` at the beginning of a line",
        )]));
    };

    let mut problems = Vec::new();
    let global = entries
        .iter()
        .find(|(k, _)| k.name == "global")
        .map(|(_, node)| parse_global(Located::new(node, "global"), &mut problems))
        .unwrap_or(Global {
            timeout: DEFAULT_TIMEOUT,
        });
    let ctx = SectionContext {
        global: &global,
        base_dir,
    };

    let mut targets: Vec<Arc<dyn Collector>> = Vec::new();
    let mut fingerprints: Vec<Option<u64>> = Vec::new();
    let mut hooks = None;
    let known: Vec<&str> = ["global", crate::hooks::config::SECTION]
        .into_iter()
        .chain(KINDS.iter().map(|k| k.section))
        .collect();
    let mut seen_sections = Vec::new();
    for (key, node) in entries {
        if seen_sections.contains(&key.name.as_str()) {
            problems.push(
                Problem::new(&key.name, key.pos, "section appears twice")
                    .hint("merge both into one section"),
            );
            continue;
        }
        seen_sections.push(key.name.as_str());
        if key.name == "global" {
            continue;
        }
        // Not a collector: the webhook receiver and hook runner.
        if key.name == crate::hooks::config::SECTION {
            hooks = crate::hooks::config::parse(
                Located::new(node, key.name.clone()),
                &ctx,
                &mut problems,
            );
            continue;
        }
        match KINDS.iter().find(|k| k.section == key.name) {
            Some(kind) => {
                let at = Located::new(node, key.name.clone());
                let built = (kind.configure)(at, &ctx, &mut problems);
                fingerprints.extend(
                    built
                        .iter()
                        .map(|t| Some(fingerprint(kind, t.target(), node, &ctx))),
                );
                targets.extend(built);
                check_unique_targets(kind, node, &key.name, &mut problems);
            }
            None => {
                let mut p = Problem::new(
                    &key.name,
                    key.pos,
                    format!("unknown section `{}`", key.name),
                );
                p = p.hint(
                    suggest(&key.name, &known)
                        .unwrap_or_else(|| format!("known sections: {}", known.join(", "))),
                );
                problems.push(p);
            }
        }
    }
    // Collectors that are always on (clusterwatch's own process) need no section.
    for kind in KINDS.iter().filter(|k| k.always_on) {
        if !seen_sections.contains(&kind.section) {
            let empty = Node {
                pos: Pos::default(),
                value: source::Value::Null,
            };
            let built = (kind.configure)(Located::new(&empty, kind.section), &ctx, &mut problems);
            fingerprints.extend(
                built
                    .iter()
                    .map(|t| Some(fingerprint(kind, t.target(), &empty, &ctx))),
            );
            targets.extend(built);
        }
    }

    if problems.is_empty() {
        Ok(Config {
            origin: file.to_owned(),
            global,
            targets,
            fingerprints,
            hooks,
        })
    } else {
        problems.sort_by_key(|p| (p.pos.line, p.pos.column));
        Err(fail(problems))
    }
}

/// What a target was built from, as a digest: its item when the section is a list of named
/// items, otherwise the whole section; the global settings and the base directory; and the
/// content of every `*_file` it names, so a rotated password or certificate is picked up by a
/// reload even though the text of the configuration did not change.
fn fingerprint(kind: &CollectorKind, target: &str, section: &Node, ctx: &SectionContext) -> u64 {
    use std::hash::{Hash, Hasher};
    let item = match &section.value {
        source::Value::Seq(items) => items
            .iter()
            .find(|item| item_name(item) == Some(target))
            .unwrap_or(section),
        _ => section,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kind.name, target, ctx.global.timeout, ctx.base_dir).hash(&mut h);
    hash_node(item, ctx, &mut h);
    h.finish()
}

fn hash_node(node: &Node, ctx: &SectionContext, h: &mut impl std::hash::Hasher) {
    use source::Value;
    use std::hash::Hash;
    match &node.value {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (1u8, b).hash(h),
        Value::Int(i) => (2u8, i).hash(h),
        Value::UInt(u) => (3u8, u).hash(h),
        Value::Float(f) => (4u8, f.to_bits()).hash(h),
        Value::Str(s) => (5u8, s).hash(h),
        Value::Seq(items) => {
            (6u8, items.len()).hash(h);
            for item in items {
                hash_node(item, ctx, h);
            }
        }
        Value::Map(entries) => {
            (7u8, entries.len()).hash(h);
            for (key, value) in entries {
                key.name.hash(h);
                hash_node(value, ctx, h);
                if let (true, Value::Str(path)) = (key.name.ends_with("_file"), &value.value) {
                    // Unreadable now: the digest still differs from a readable file's.
                    std::fs::read(ctx.resolve(Path::new(path)))
                        .map_err(|e| e.kind())
                        .hash(h);
                }
            }
        }
    }
}

fn parse_global(at: Located, problems: &mut Vec<Problem>) -> Global {
    let raw = at.parse::<Option<RawGlobal>>(problems).flatten();
    let timeout = raw
        .and_then(|r| r.timeout)
        .map(|d| d.0)
        .unwrap_or(DEFAULT_TIMEOUT);
    if timeout.is_zero() {
        problems.push(at.problem("timeout", "timeout must be greater than zero"));
    }
    Global { timeout }
}

/// Two targets of one collector with the same name would produce clashing series. Checked on
/// the YAML items themselves, so an item that failed for another reason is still counted.
fn check_unique_targets(
    kind: &CollectorKind,
    node: &Node,
    section: &str,
    problems: &mut Vec<Problem>,
) {
    let source::Value::Seq(items) = &node.value else {
        return;
    };
    let mut seen: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = Located::new(item, format!("{section}[{i}]"));
        let Some(name) = item_name(item) else {
            continue;
        };
        if seen.contains(&name) {
            problems.push(
                at.problem(
                    "name",
                    format!("duplicate {} target name `{name}`", kind.name),
                )
                .hint("every target needs its own `name`; it becomes the `target` label"),
            );
        }
        seen.push(name);
    }
}

/// The `name` of a list item, when it is a string: the `target` label it will have.
fn item_name(item: &Node) -> Option<&str> {
    let (_, value) = item.as_map()?.iter().find(|(key, _)| key.name == "name")?;
    match &value.value {
        source::Value::Str(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A duration written the human way (`5s`, `1m30s`, `250ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration with a unit, like `5s`, `250ms` or `1m30s`",
            )
        })?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{s}`: {e} (write e.g. `5s`, `250ms`, `1m30s`)"
                ))
            })
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
        if timeout.is_some_and(|t| t.0.is_zero()) {
            problems.push(at.problem("timeout", "timeout must be greater than zero"));
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
    fn embedded_default_is_valid() {
        let cfg = load_embedded().expect("embedded default must be valid");
        assert!(cfg.targets.iter().any(|t| t.name() == "fs"));
        assert!(cfg.targets.iter().any(|t| t.name() == "system"));
    }

    #[test]
    fn unknown_section_gets_a_suggestion() {
        let err = parse(
            "filesystem:\n  default_threshold: 0.8\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let line = err.render();
        assert!(
            line.starts_with("c.yml:1:1: filesystem: unknown section"),
            "{line}"
        );
        assert!(line.contains("did you mean `filesystems`?"), "{line}");
    }

    #[test]
    fn bad_duration_and_unknown_key_both_reported() {
        let err = parse(
            "global:\n  timeout: 5 parsecs\nfilesystems:\n  default_treshold: 0.8\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{}", err.render());
        assert_eq!(err.problems[0].pos.line, 2);
        assert!(err.problems[0].message.contains("invalid duration"));
        assert_eq!(err.problems[1].pos.line, 4);
        assert_eq!(
            err.problems[1].hint.as_deref(),
            Some("did you mean `default_threshold`?")
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
    }

    #[test]
    fn fingerprints_change_only_for_the_edited_target_or_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "one\n").unwrap();
        let text = |timeout: &str| {
            format!(
                "redis:\n  - {{ name: a, address: redis://127.0.0.1:1, password_file: pw }}\n  - {{ name: b, address: redis://127.0.0.1:2, timeout: {timeout} }}\n"
            )
        };
        let prints = |t: &str| {
            let cfg = parse(t, "test.yml", dir.path()).unwrap();
            let names: Vec<String> = cfg.targets.iter().map(|t| t.target().to_owned()).collect();
            names.into_iter().zip(cfg.fingerprints).collect::<Vec<_>>()
        };
        let first = prints(&text("2s"));
        assert_eq!(first, prints(&text("2s")), "same text, same digests");
        let edited = prints(&text("3s"));
        let find = |v: &[(String, Option<u64>)], n: &str| v.iter().find(|(t, _)| t == n).unwrap().1;
        assert_eq!(find(&first, "a"), find(&edited, "a"), "`a` was not edited");
        assert_ne!(find(&first, "b"), find(&edited, "b"));
        std::fs::write(dir.path().join("pw"), "two\n").unwrap();
        assert_ne!(
            find(&first, "a"),
            find(&prints(&text("2s")), "a"),
            "password rotated"
        );
        assert!(first.iter().all(|(_, fp)| fp.is_some()));
    }
}
