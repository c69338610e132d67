//! The whole configuration file put together: `global` first, then each section handed to its
//! owner (a collector kind from `collector::registry::KINDS`, or the hook runner), giving a checked
//! [`Config`] or every problem at once. The vocabulary the sections share lives in `config`.

use std::path::Path;
use std::sync::Arc;

use crate::collector::registry::KINDS;
use crate::collector::{ActiveWhen, CollectorKind, Target};
use crate::config::source::{suggest, Node, Value};
use crate::config::{
    read_text, ConfigError, Global, Located, Pos, Problem, SectionContext, DEFAULT_TIMEOUT,
};

/// The configuration used when no `--config.file` is given: local filesystems with default
/// thresholds, host system statistics and clusterwatch's own process.
pub const EMBEDDED_DEFAULT: &str = include_str!("config/default.yml");

/// Name used in messages for the embedded default configuration.
pub const EMBEDDED_NAME: &str = "<embedded default>";

/// A checked configuration: every target built and ready to scrape.
pub struct Config {
    /// Where it came from (a path or [`EMBEDDED_NAME`]).
    pub origin: String,
    /// Settings that apply to every target.
    pub global: Global,
    /// Every configured target, in file order.
    pub targets: Vec<Arc<Target>>,
    /// Per target, a digest of the configuration it was built from (its list item, or its
    /// whole section, plus the content of every `*_file` named there): a reload keeps a
    /// running target whose digest did not change.
    pub fingerprints: Vec<Option<u64>>,
    /// The webhook receiver and hook runner, when a `hooks:` section is present.
    pub hooks: Option<crate::hooks::config::HooksConfig>,
    /// What is accepted but probably wrong, in document order (`check-config` prints them).
    pub warnings: Vec<Problem>,
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

/// The embedded default configuration, checked.
pub fn load_embedded() -> Result<Config, ConfigError> {
    parse(EMBEDDED_DEFAULT, EMBEDDED_NAME, Path::new("."))
}

/// The configuration `--config.file` names, or the embedded default without one: what
/// `serve` starts with and what every reload reads again.
/// Its warnings are logged (`check-config` prints them instead, through [`load_file`]).
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let cfg = match file {
        Some(path) => load_file(path),
        None => load_embedded(),
    }?;
    for w in &cfg.warnings {
        tracing::warn!(
            warning = w.render(&cfg.origin),
            "configuration accepted with a warning"
        );
    }
    Ok(cfg)
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
        .map(|(_, node)| Global::parse(Located::new(node, "global"), &mut problems))
        .unwrap_or(Global {
            timeout: DEFAULT_TIMEOUT,
        });
    let ctx = SectionContext {
        global: &global,
        base_dir,
    };

    let mut targets: Vec<Arc<Target>> = Vec::new();
    let mut fingerprints: Vec<Option<u64>> = Vec::new();
    let mut hooks = None;
    let known: Vec<&str> = ["global", crate::hooks::config::SECTION]
        .into_iter()
        .chain(KINDS.iter().map(|k| k.section))
        .collect();
    let mut seen_sections = Vec::new();
    let mut conditions = Vec::new();
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
                // `labels:` and `active_when:` belong to every target, whatever its
                // collector: taken out here so each collector's strict parsing never sees them.
                let (stripped, extras) = take_target_extras(node, &key.name, &mut problems);
                let at = Located::new(&stripped, key.name.clone());
                let built = (kind.configure)(at, &ctx, &mut problems);
                for t in &built {
                    let Some(e) = extras.for_target(t.target()) else {
                        continue;
                    };
                    t.set_labels(e.labels.clone());
                    if let Some((cond, path, pos)) = &e.active_when {
                        t.set_active_when(cond.clone());
                        conditions.push((path.clone(), *pos, Arc::clone(t)));
                    }
                }
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
                value: Value::Null,
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

    let written: Vec<&str> = entries
        .iter()
        .filter_map(|(_, node)| match &node.value {
            Value::Seq(items) => Some(items.iter().filter_map(item_name)),
            _ => None,
        })
        .flatten()
        .collect();
    check_conditions(&targets, &written, &conditions, &mut problems);
    if let Some(lease) = hooks.as_ref().and_then(|h| h.lease.as_ref()) {
        if let Err(found) = crate::hooks::lease::servers(lease, &targets) {
            problems.extend(found);
        }
    }

    problems.sort_by_key(|p| (p.pos.line, p.pos.column));
    if problems.iter().all(|p| p.warning) {
        Ok(Config {
            origin: file.to_owned(),
            global,
            targets,
            fingerprints,
            hooks,
            warnings: problems,
        })
    } else {
        Err(fail(problems))
    }
}

/// Label names a target's `labels:` may not use: the engine's and Prometheus' own.
pub const RESERVED_LABELS: &[&str] = &[
    "target",
    "cluster",
    "collector",
    "job",
    "instance",
    "reason",
];

/// What the assembler takes out of a target's item before its collector parses it.
#[derive(Default)]
struct Extras {
    labels: Vec<(String, String)>,
    /// The condition, with where it is written (for problems found once every target exists).
    active_when: Option<(ActiveWhen, String, Pos)>,
}

/// The extras of a section's targets: per item name for a list section, one set for a
/// section that is a single target.
enum SectionExtras {
    PerItem(Vec<(String, Extras)>),
    Whole(Extras),
}

impl SectionExtras {
    fn for_target(&self, target: &str) -> Option<&Extras> {
        match self {
            SectionExtras::PerItem(items) => items
                .iter()
                .find(|(name, _)| name == target)
                .map(|(_, e)| e),
            SectionExtras::Whole(e) => Some(e),
        }
    }
}

/// The section without any target's `labels:` and `active_when:` keys, and those, checked.
fn take_target_extras(
    section: &Node,
    name: &str,
    problems: &mut Vec<Problem>,
) -> (Node, SectionExtras) {
    let mut stripped = section.clone();
    let mut take = |item: &mut Node, path: &str| Extras {
        labels: take_labels(item, path, problems).unwrap_or_default(),
        active_when: take_active_when(item, path, problems),
    };
    match &mut stripped.value {
        Value::Seq(items) => {
            let mut per_item = Vec::new();
            for (i, item) in items.iter_mut().enumerate() {
                let extras = take(item, &format!("{name}[{i}]"));
                if let Some(target) = item_name(item) {
                    per_item.push((target.to_owned(), extras));
                }
            }
            (stripped, SectionExtras::PerItem(per_item))
        }
        _ => {
            let extras = take(&mut stripped, name);
            (stripped, SectionExtras::Whole(extras))
        }
    }
}

/// Removes `active_when:` from one item and checks its form: `target`, optionally `metric`,
/// and at least one label the condition's sample must carry (or a `metric`).
fn take_active_when(
    item: &mut Node,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<(ActiveWhen, String, Pos)> {
    let Value::Map(entries) = &mut item.value else {
        return None;
    };
    let i = entries.iter().position(|(k, _)| k.name == "active_when")?;
    let (key, node) = entries.remove(i);
    let path = crate::config::source::join_path(path, "active_when");
    let example = "write e.g. `active_when: { target: redis-local, role: master }`";
    let Value::Map(map) = &node.value else {
        problems.push(Problem::new(&path, key.pos, "active_when must be a mapping").hint(example));
        return None;
    };
    let mut target = None;
    let mut metric = None;
    let mut labels = Vec::new();
    let mut ok = true;
    for (k, v) in map {
        let at = crate::config::source::join_path(&path, &k.name);
        let text = match &v.value {
            Value::Str(s) if !s.is_empty() => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            _ => {
                problems.push(
                    Problem::new(&at, v.pos, "expected a non-empty string")
                        .hint("quote it, e.g. `state: \"production\"`"),
                );
                ok = false;
                continue;
            }
        };
        match k.name.as_str() {
            "target" => target = Some(text),
            "metric" => metric = Some(text),
            name if crate::config::is_identifier(name) => labels.push((name.to_owned(), text)),
            name => {
                problems.push(Problem::new(
                    &at,
                    k.pos,
                    format!("`{name}` is not a valid label name"),
                ));
                ok = false;
            }
        }
    }
    let Some(target) = target else {
        problems.push(
            Problem::new(
                &path,
                node.pos,
                "active_when needs the `target` whose state it reads",
            )
            .hint(example),
        );
        return None;
    };
    if labels.is_empty() && metric.is_none() {
        problems.push(
            Problem::new(
                &path,
                node.pos,
                "active_when needs a label to look for (or a `metric`)",
            )
            .hint(example),
        );
        return None;
    }
    ok.then_some((
        ActiveWhen {
            target,
            metric,
            labels,
        },
        path,
        node.pos,
    ))
}

/// Every condition must name a target that exists and has no condition of its own (the
/// engine collects conditions' targets first, in one round).
/// `written` are the names of every list item, built or not: an item that failed its own
/// checks is reported there, not again as a missing condition target.
fn check_conditions(
    targets: &[Arc<Target>],
    written: &[&str],
    conditions: &[(String, Pos, Arc<Target>)],
    problems: &mut Vec<Problem>,
) {
    for (path, pos, conditional) in conditions {
        let Some(cond) = conditional.active_when() else {
            continue;
        };
        let named: Vec<&Arc<Target>> = targets
            .iter()
            .filter(|t| t.target() == cond.target)
            .collect();
        if named.is_empty() && !written.contains(&cond.target.as_str()) {
            let names: Vec<&str> = targets.iter().map(|t| t.target()).collect();
            let mut p = Problem::new(
                crate::config::source::join_path(path, "target"),
                *pos,
                format!("no target is named `{}`", cond.target),
            );
            if let Some(hint) = suggest(&cond.target, &names) {
                p = p.hint(hint);
            }
            problems.push(p);
        } else if named.iter().any(|t| t.active_when().is_some()) {
            problems.push(
                Problem::new(
                    crate::config::source::join_path(path, "target"),
                    *pos,
                    format!("target `{}` has an active_when of its own", cond.target),
                )
                .hint("a condition must read a target that is always collected"),
            );
        }
    }
}

/// Removes `labels:` from one item (a mapping) and checks it.
fn take_labels(
    item: &mut Node,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<Vec<(String, String)>> {
    let Value::Map(entries) = &mut item.value else {
        return None;
    };
    let i = entries.iter().position(|(k, _)| k.name == "labels")?;
    let (key, node) = entries.remove(i);
    let path = crate::config::source::join_path(path, "labels");
    let map = match &node.value {
        Value::Map(m) => m,
        Value::Null => return Some(Vec::new()),
        _ => {
            problems.push(
                Problem::new(
                    &path,
                    key.pos,
                    "labels must be a mapping of label names to values",
                )
                .hint("write e.g. `labels: { team: db, page: \"no\" }`"),
            );
            return None;
        }
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let at = crate::config::source::join_path(&path, &k.name);
        if let Some(why) = label_name_problem(&k.name) {
            problems.push(Problem::new(&at, k.pos, why).hint(
                "`target`, `cluster`, `collector`, `job`, `instance`, `reason` and names \
                 starting with `__` are set by clusterwatch or Prometheus",
            ));
            continue;
        }
        let value = match &v.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            _ => {
                problems.push(
                    Problem::new(&at, v.pos, "a label value must be a string")
                        .hint("quote it, e.g. `page: \"no\"`"),
                );
                continue;
            }
        };
        out.push((k.name.clone(), value));
    }
    Some(out)
}

/// Why `name` cannot be a target's label name, if it cannot.
fn label_name_problem(name: &str) -> Option<String> {
    if !crate::config::is_identifier(name) {
        Some(format!(
            "`{name}` is not a valid label name: letters, digits and `_`, not starting with a digit"
        ))
    } else if name.starts_with("__") || RESERVED_LABELS.contains(&name) {
        Some(format!("label `{name}` is reserved"))
    } else {
        None
    }
}

/// What a target was built from, as a digest: its item when the section is a list of named
/// items, otherwise the whole section; the global settings and the base directory; and the
/// content of every `*_file` it names, so a rotated password or certificate is picked up by a
/// reload even though the text of the configuration did not change. The files are read first;
/// hashing itself does no I/O.
fn fingerprint(kind: &CollectorKind, target: &str, section: &Node, ctx: &SectionContext) -> u64 {
    use std::hash::{Hash, Hasher};
    let item = match &section.value {
        Value::Seq(items) => items
            .iter()
            .find(|item| item_name(item) == Some(target))
            .unwrap_or(section),
        _ => section,
    };
    let files = read_named_files(item, ctx);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kind.name, target, ctx.global.timeout, ctx.base_dir).hash(&mut h);
    hash_node(item, &mut h);
    files.hash(&mut h);
    h.finish()
}

/// The content of every `*_file` named in `node`, in document order. An unreadable file is
/// its error kind, so the digest still differs from a readable file's.
fn read_named_files(node: &Node, ctx: &SectionContext) -> Vec<Result<Vec<u8>, std::io::ErrorKind>> {
    let mut paths = Vec::new();
    named_files(node, &mut paths);
    paths
        .into_iter()
        .map(|p| std::fs::read(ctx.resolve(Path::new(p))).map_err(|e| e.kind()))
        .collect()
}

/// The values of every `*_file` key in `node`, depth first.
fn named_files<'a>(node: &'a Node, out: &mut Vec<&'a str>) {
    match &node.value {
        Value::Seq(items) => items.iter().for_each(|item| named_files(item, out)),
        Value::Map(entries) => {
            for (key, value) in entries {
                if let (true, Value::Str(path)) = (key.name.ends_with("_file"), &value.value) {
                    out.push(path);
                }
                named_files(value, out);
            }
        }
        _ => {}
    }
}

/// Hashes the node tree: values and keys, never positions (moving an item is no change).
fn hash_node(node: &Node, h: &mut impl std::hash::Hasher) {
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
                hash_node(item, h);
            }
        }
        Value::Map(entries) => {
            (7u8, entries.len()).hash(h);
            for (key, value) in entries {
                key.name.hash(h);
                hash_node(value, h);
            }
        }
    }
}

/// Two targets of one collector with the same name would produce clashing series. Checked on
/// the YAML items themselves, so an item that failed for another reason is still counted.
fn check_unique_targets(
    kind: &CollectorKind,
    node: &Node,
    section: &str,
    problems: &mut Vec<Problem>,
) {
    let Value::Seq(items) = &node.value else {
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
        Value::Str(s) => Some(s.as_str()),
        _ => None,
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
    fn labels_are_taken_from_every_item_and_checked() {
        let cfg = parse(
            "probes:\n  - { name: net, tcp: { address: '127.0.0.1:1' }, labels: { page: 'no', tier: 2 } }\n  - { name: sms, tcp: { address: '127.0.0.1:2' } }\nsystem:\n  labels: { role: host }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap();
        let labels = |n: &str| -> Vec<(String, String)> {
            let t = cfg
                .targets
                .iter()
                .find(|t| t.target() == n || t.name() == n)
                .unwrap();
            t.labels()
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(labels("net"), vec![pair("page", "no"), pair("tier", "2")]);
        assert!(labels("sms").is_empty());
        assert_eq!(labels("system"), vec![pair("role", "host")]);

        let err = parse(
            "probes:\n  - { name: a, tcp: { address: '127.0.0.1:1' }, labels: { job: x, __meta: y, 1st: z, ok: true } }\n  - { name: b, tcp: { adress: '127.0.0.1:1' }, labels: { instance: i } }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        let text = err.render();
        for expected in [
            "probes[0].labels.job: label `job` is reserved",
            "probes[0].labels.__meta: label `__meta` is reserved",
            "probes[0].labels.1st: `1st` is not a valid label name",
            "probes[0].labels.ok: a label value must be a string",
            "probes[1].labels.instance: label `instance` is reserved",
            "probes[1].tcp",
        ] {
            assert!(text.contains(expected), "{expected} missing in:\n{text}");
        }
        assert_eq!(err.problems.len(), 6, "{text}");
    }

    #[test]
    fn active_when_names_an_unconditional_target_and_something_to_look_for() {
        let cfg = parse(
            "redis:\n  - { name: cache, address: 'redis://127.0.0.1:1' }\nprobes:\n  - { name: web, tcp: { address: '127.0.0.1:1' }, active_when: { target: cache, role: master } }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap();
        let web = cfg.targets.iter().find(|t| t.target() == "web").unwrap();
        assert_eq!(
            web.active_when(),
            Some(&ActiveWhen {
                target: "cache".into(),
                metric: None,
                labels: vec![("role".into(), "master".into())],
            })
        );

        let err = parse(
            "redis:\n  - { name: cache, address: 'redis://127.0.0.1:1' }\nprobes:\n  - { name: a, tcp: { address: '127.0.0.1:1' }, active_when: { target: cahce, role: master } }\n  - { name: b, tcp: { address: '127.0.0.1:1' }, active_when: { target: a, role: master } }\n  - { name: c, tcp: { address: '127.0.0.1:1' }, active_when: { role: master } }\n  - { name: d, tcp: { address: '127.0.0.1:1' }, active_when: { target: cache } }\n  - { name: e, tcp: { address: '127.0.0.1:1' }, active_when: primary }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        let text = err.render();
        for expected in [
            "probes[0].active_when.target: no target is named `cahce` (hint: did you mean `cache`?)",
            "probes[1].active_when.target: target `a` has an active_when of its own",
            "probes[2].active_when: active_when needs the `target`",
            "probes[3].active_when: active_when needs a label to look for",
            "probes[4].active_when: active_when must be a mapping",
        ] {
            assert!(text.contains(expected), "{expected} missing in:\n{text}");
        }
        assert_eq!(err.problems.len(), 5, "{text}");

        // A condition target whose own item is wrong is reported once, at that item.
        let err = parse(
            "redis:\n  - { name: cache, adress: 'redis://127.0.0.1:1' }\nprobes:\n  - { name: a, tcp: { address: '127.0.0.1:1' }, active_when: { target: cache, role: master } }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{}", err.render());
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

    #[test]
    fn a_timeout_of_500000000000y_is_a_config_error_not_a_panic_at_scrape() {
        let err = parse(
            "global:\n  timeout: 500000000000y\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert!(err.starts_with("c.yml:2:"), "{err}");
        assert!(err.contains("too long: the limit is 1y"), "{err}");

        let err = parse(
            "global:\n  timeout: 2h\nredis:\n  - { name: a, address: 'redis://127.0.0.1:1', timeout: 61m }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{}", err.render());
        assert!(err
            .problems
            .iter()
            .all(|p| p.message == "timeout must be at most 1h"));
        assert!(parse("global:\n  timeout: 1h\n", "c.yml", Path::new(".")).is_ok());
    }

    #[test]
    fn a_status_file_read_cap_beyond_16_mib_is_refused_with_the_limit() {
        let err = parse(
            "files:\n  - { name: s, path: /tmp/s, max_bytes: 18446744073709551615 }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert!(err.contains("max_bytes must be at most 16777216"), "{err}");
    }

    #[test]
    fn credentials_in_a_probe_url_are_refused_and_never_printed() {
        let err = parse(
            "probes:\n  - { name: web, http: { url: 'http://monitor:hunter2@127.0.0.1:8080/' } }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert!(
            err.contains("probes[0].http.url: credentials in the URL"),
            "{err}"
        );
        assert!(
            err.contains("Authorization"),
            "the hint says what to do: {err}"
        );
        assert!(
            !err.contains("hunter2") && !err.contains("monitor"),
            "{err}"
        );
    }

    /// A server that accepts connections and never answers: each network collector must end
    /// at the scrape deadline with reason `timeout`, not wait for its client's own timeouts
    /// (the configured timeout here is 30s; mongo's driver sizes its own from it).
    #[tokio::test]
    async fn network_collectors_end_at_the_scrape_deadline_against_a_silent_server() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        // Accepted connections are kept open and never written to.
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                open.push(conn);
            }
        });
        let yaml = format!(
            "global:\n  timeout: 30s\n\
             haproxy:\n  - {{ name: h, url: 'http://{addr}/stats' }}\n\
             kamailio:\n  - {{ name: k, url: 'http://{addr}/RPC' }}\n\
             mongodb:\n  - {{ name: m, uri: 'mongodb://{addr}/?directConnection=true' }}\n\
             redis:\n  - {{ name: r, address: 'redis://{addr}' }}\n\
             supervisord:\n  - {{ name: s, url: 'http://{addr}/RPC2' }}\n"
        );
        let cfg = parse(&yaml, "c.yml", Path::new(".")).unwrap();
        let network: Vec<_> = cfg
            .targets
            .iter()
            .filter(|t| t.name() != "exporter")
            .collect();
        assert_eq!(network.len(), 5);
        for t in network {
            let started = tokio::time::Instant::now();
            let ctx = crate::collector::ScrapeContext {
                deadline: started + std::time::Duration::from_millis(300),
            };
            let mut out = crate::snapshot::SampleBuffer::new();
            let err = t.collect(&ctx, &mut out).await.unwrap_err();
            assert_eq!(err.reason(), "timeout", "{}: {err}", t.name());
            assert!(
                started.elapsed() < std::time::Duration::from_secs(3),
                "{} took {:?}",
                t.name(),
                started.elapsed()
            );
        }
        held.abort();
    }
}
