//! The `hooks:` configuration section: raw serde structs checked into a [`HooksConfig`]
//! (secret files read, regexes compiled, commands resolved). It runs and creates nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::source::{Node, Value};
use crate::config::{
    is_executable, read_secret_file, HumanDuration, Located, Problem, Secret, SectionContext,
};

/// The configuration section this module reads.
pub const SECTION: &str = "hooks";

/// Where the receiver listens when `listen` is not set: loopback, the port the Alertmanager
/// example points at.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";

const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Upper bounds `check-config` holds values to: past them `serve` could not honour a value (a
/// timer that overflows, a semaphore too large) or it makes no sense for a failover hook.
pub mod limits {
    use std::time::Duration;

    const HOUR: u64 = 3600;
    /// `max_body_bytes`.
    pub const MAX_BODY_BYTES: usize = 64 << 20;
    /// `max_concurrent_runs`.
    pub const MAX_CONCURRENT_RUNS: usize = 1024;
    /// `max_disruptive_per_hour`.
    pub const MAX_DISRUPTIVE_PER_HOUR: u32 = 1000;
    /// `kill_grace`.
    pub const KILL_GRACE: Duration = Duration::from_secs(600);
    /// `resume_max_age`.
    pub const RESUME_MAX_AGE: Duration = Duration::from_secs(24 * HOUR);
    /// A hook's `timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(24 * HOUR);
    /// A hook's `cooldown`.
    pub const COOLDOWN: Duration = Duration::from_secs(30 * 24 * HOUR);
    /// A hook's `retries`.
    pub const RETRIES: u32 = 10;
    /// A hook's `retry_backoff`.
    pub const RETRY_BACKOFF: Duration = Duration::from_secs(HOUR);
}

/// Default `resume_max_age`: a run accepted this recently and not started before a restart
/// is started after it.
pub const DEFAULT_RESUME_MAX_AGE: Duration = Duration::from_secs(600);

/// The checked `hooks:` section.
#[derive(Debug)]
pub struct HooksConfig {
    /// Where the webhook is served.
    pub listen: Listen,
    /// How Alertmanager must authenticate.
    pub auth: Auth,
    /// Directory holding the journal and the payload files.
    pub state_dir: PathBuf,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Disruptive runs allowed in any sliding hour, over all hooks.
    pub max_disruptive_per_hour: u32,
    /// While this file exists, nothing runs.
    pub kill_switch_file: Option<PathBuf>,
    /// Record decisions but run nothing, for every hook.
    pub dry_run: bool,
    /// Hook processes running at the same time, over all hooks.
    pub max_concurrent_runs: usize,
    /// Between SIGTERM and SIGKILL when a hook times out.
    pub kill_grace: Duration,
    /// A run accepted but not started before a restart is started after it if it was
    /// accepted less than this long ago; older ones are abandoned. Zero: never.
    pub resume_max_age: Duration,
    /// The hooks, in file order.
    pub rules: Vec<HookRule>,
    /// With several receivers: the etcd lock a disruptive run must take first.
    pub lock: Option<super::lock::LockConfig>,
    /// The storm breaker across replication groups (`hooks.storm`); off when unset.
    pub storm: Option<super::policy::Storm>,
    /// The leader lease this host keeps while its server is primary (`hooks.lease`).
    pub lease: Option<super::lease::LeaseConfig>,
    /// TLS for the webhook's own listener (`web_config_file`).
    pub web: Option<crate::web::Settings>,
}

/// Whether `new` can replace `old` in a running process: what was opened or bound at start
/// (listener, journal, lock, run slots) cannot change without a restart.
pub fn restart_needed(old: &HooksConfig, new: &HooksConfig) -> Result<(), String> {
    let fixed = [
        ("hooks.listen", old.listen != new.listen),
        ("hooks.state_dir", old.state_dir != new.state_dir),
        (
            "hooks.max_concurrent_runs",
            old.max_concurrent_runs != new.max_concurrent_runs,
        ),
        (
            "hooks.lease",
            old.lease.as_ref().map(super::lease::LeaseConfig::identity)
                != new.lease.as_ref().map(super::lease::LeaseConfig::identity),
        ),
        (
            "hooks.lock",
            old.lock.as_ref().map(super::lock::LockConfig::identity)
                != new.lock.as_ref().map(super::lock::LockConfig::identity),
        ),
        // The listener was started plain or with TLS; its file's content can change.
        (
            "hooks.web_config_file (added or removed)",
            old.web.is_some() != new.web.is_some(),
        ),
    ];
    let changed: Vec<&str> = fixed
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let changed = changed.join(", ");
    Err(format!(
        "{changed} cannot change while clusterwatch runs; restart it to apply (the running configuration is kept)"
    ))
}

/// Where the webhook listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// On the main listener, next to `/metrics`.
    Main,
    /// On its own address, so metrics can be open while the webhook is locked down.
    Own(SocketAddr),
}

/// The credentials Alertmanager must present.
#[derive(Debug)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic …` with this user and password.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
    },
}

/// Which alert status starts a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum On {
    /// Only firing alerts (the default).
    Firing,
    /// Only resolved alerts.
    Resolved,
    /// Both.
    Both,
}

/// One label condition.
#[derive(Debug)]
pub enum Matcher {
    /// The label equals the value (a missing label is the empty string, as in Alertmanager).
    Eq(String, String),
    /// The whole label value matches the regular expression.
    Re(String, regex::Regex),
}

impl Matcher {
    /// Whether `labels` satisfy this condition.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Matcher::Eq(k, v) => labels.get(k).map(String::as_str).unwrap_or("") == v,
            Matcher::Re(k, re) => re.is_match(labels.get(k).map(String::as_str).unwrap_or("")),
        }
    }
}

/// One configured hook.
#[derive(Debug)]
pub struct HookRule {
    /// Its name: the `hook` label and the journal's key.
    pub name: String,
    /// Every condition must hold.
    pub matchers: Vec<Matcher>,
    /// Which alert status starts it.
    pub on: On,
    /// The program and its arguments, executed without a shell (empty when `steps` is set).
    pub command: Vec<String>,
    /// Ordered steps run instead of `command`, stopping at the first failure.
    pub steps: Vec<Step>,
    /// Runs first; the hook runs only if it exits 0.
    pub validate: Option<Vec<String>>,
    /// Deadline for one attempt (and for the validation).
    pub timeout: Duration,
    /// No new run of this hook sooner than this after the previous one was accepted.
    pub cooldown: Duration,
    /// Counts against the hourly budget and is never re-run after a crash.
    pub disruptive: bool,
    /// Record decisions but do not run.
    pub dry_run: bool,
    /// Extra attempts after exit code 1.
    pub retries: u32,
    /// Wait before the first retry; doubles each time, at most 5 minutes.
    pub retry_backoff: Duration,
    /// Non-disruptive hooks only: run again after a crash interrupted a run.
    pub rerun_after_crash: bool,
    /// Extra fixed environment variables.
    pub env: Vec<(String, String)>,
    /// Run only when the alert's `candidate` label is this (this host's target name).
    pub only_if_candidate: Option<String>,
    /// Disruptive runs first wait until no one holds the alert's group's leader lease
    /// (`hooks.lease`), and do not run if it is still held after `hooks.lease.wait`.
    pub wait_for_lease: bool,
}

impl HookRule {
    /// Whether this hook applies to an alert with `labels` and `firing` status.
    pub fn applies(&self, labels: &BTreeMap<String, String>, firing: bool) -> bool {
        let status_ok = match self.on {
            On::Firing => firing,
            On::Resolved => !firing,
            On::Both => true,
        };
        status_ok && self.matchers.iter().all(|m| m.matches(labels))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    listen: Option<String>,
    bearer_token_file: Option<PathBuf>,
    basic_auth: Option<RawBasicAuth>,
    state_dir: PathBuf,
    max_body_bytes: Option<usize>,
    max_disruptive_per_hour: Option<u32>,
    kill_switch_file: Option<PathBuf>,
    dry_run: Option<bool>,
    max_concurrent_runs: Option<usize>,
    kill_grace: Option<HumanDuration>,
    resume_max_age: Option<HumanDuration>,
    web_config_file: Option<PathBuf>,
    storm: Option<RawStorm>,
    // Checked by `lock::parse`, so problems name `lock.<field>`.
    #[allow(dead_code)]
    lock: Option<serde::de::IgnoredAny>,
    // Checked by `lease::parse`, so problems name `lease.<field>`.
    #[allow(dead_code)]
    lease: Option<serde::de::IgnoredAny>,
    // Parsed item by item below, so every bad hook is reported.
    #[allow(dead_code)]
    rules: serde::de::IgnoredAny,
}

// --- replication-group limits: `hooks.storm` ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorm {
    max_groups: usize,
    window: HumanDuration,
}

/// `hooks.storm`: at least one group, a window of at most an hour (the span the journal's
/// state keeps disruptive runs for).
fn check_storm(at: &Located, raw: &RawStorm, problems: &mut Vec<Problem>) -> super::policy::Storm {
    in_range(at, "storm.max_groups", raw.max_groups, 1, 1000, problems);
    let window = raw.window.0;
    if window.is_zero() || window > Duration::from_secs(3600) {
        problems.push(at.problem("storm.window", "must be more than 0s and at most 1h"));
    }
    super::policy::Storm {
        max_groups: raw.max_groups,
        window: window.as_secs_f64(),
    }
}

// --- end of replication-group limits ---

// --- ordered steps: a hook's `steps:` ---

/// One step of a hook with `steps:`.
#[derive(Debug)]
pub struct Step {
    /// Its name: `CW_STEP` and the journal's `step`.
    pub name: String,
    /// The program and its arguments, executed without a shell.
    pub command: Vec<String>,
    /// Deadline for this step (default: the hook's `timeout`).
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    command: Vec<String>,
    timeout: Option<HumanDuration>,
}

/// A hook runs either `command` or `steps` (uniquely named, each resolved like `command`);
/// a step's exit 1 is no retry, since steps before it have acted.
fn check_steps(
    raw: Option<Vec<RawStep>>,
    command_set: bool,
    retries: u32,
    timeout: Duration,
    at: &Located,
    ctx: &SectionContext,
    problems: &mut Vec<Problem>,
) -> Vec<Step> {
    let Some(raw) = raw else {
        if !command_set {
            problems.push(
                at.problem("command", "missing field `command`")
                    .hint("or `steps`"),
            );
        }
        return Vec::new();
    };
    if command_set {
        problems.push(at.problem("steps", "set either command or steps, not both"));
    }
    if raw.is_empty() {
        problems.push(at.problem("steps", "steps must not be empty"));
    }
    if retries > 0 {
        problems.push(
            at.problem("retries", "a hook with steps is not retried")
                .hint("a failed step may follow steps that acted; make each step retry itself"),
        );
    }
    let mut steps: Vec<Step> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let field = format!("steps[{i}]");
        let valid = !r.name.is_empty()
            && r.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid || steps.iter().any(|s| s.name == r.name) {
            problems.push(at.problem(
                &format!("{field}.name"),
                "step names are unique letters, digits, `-`, `_` and `.`",
            ));
        }
        let command = resolve_argv(r.command, at, &format!("{field}.command"), ctx, problems);
        let timeout = duration(
            at,
            &format!("{field}.timeout"),
            r.timeout,
            timeout,
            limits::TIMEOUT,
            problems,
        );
        if timeout.is_zero() {
            problems.push(at.problem(&format!("{field}.timeout"), "must be greater than zero"));
        }
        steps.push(Step {
            name: r.name,
            command,
            timeout,
        });
    }
    steps
}

// --- end of ordered steps ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasicAuth {
    username: String,
    password_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match")]
    match_eq: Option<BTreeMap<String, String>>,
    match_re: Option<BTreeMap<String, String>>,
    on: Option<On>,
    command: Option<Vec<String>>,
    steps: Option<Vec<RawStep>>,
    validate: Option<Vec<String>>,
    timeout: Option<HumanDuration>,
    cooldown: Option<HumanDuration>,
    disruptive: Option<bool>,
    dry_run: Option<bool>,
    retries: Option<u32>,
    retry_backoff: Option<HumanDuration>,
    rerun_after_crash: Option<bool>,
    env: Option<BTreeMap<String, String>>,
    only_if_candidate: Option<String>,
    wait_for_lease: Option<bool>,
}

/// Parses and checks the `hooks:` section, recording problems with their lines.
pub fn parse(
    at: Located,
    ctx: &SectionContext,
    problems: &mut Vec<Problem>,
) -> Option<HooksConfig> {
    let raw = at.parse::<RawHooks>(problems)?;
    let before = problems.len();

    let listen = match raw.listen.as_deref() {
        Some("main") => Listen::Main,
        other => match other.unwrap_or(DEFAULT_LISTEN).parse::<SocketAddr>() {
            Ok(addr) => Listen::Own(addr),
            Err(_) => {
                problems.push(
                    at.problem("listen", "expected `HOST:PORT` or `main`")
                        .hint("e.g. `127.0.0.1:9470`; `main` serves the webhook next to /metrics"),
                );
                Listen::Main
            }
        },
    };

    let auth = match (&raw.bearer_token_file, &raw.basic_auth) {
        (Some(file), None) => read_secret_file(&ctx.resolve(file))
            .map(Auth::Bearer)
            .map_err(|e| problems.push(at.problem("bearer_token_file", e)))
            .ok(),
        (None, Some(basic)) => read_secret_file(&ctx.resolve(&basic.password_file))
            .map(|password| Auth::Basic {
                username: basic.username.clone(),
                password,
            })
            .map_err(|e| problems.push(at.problem("basic_auth.password_file", e)))
            .ok(),
        (Some(_), Some(_)) => {
            problems.push(at.problem(
                "basic_auth",
                "set either bearer_token_file or basic_auth, not both",
            ));
            None
        }
        (None, None) => {
            problems.push(
                at.problem("bearer_token_file", "the webhook needs credentials")
                    .hint("set bearer_token_file (the same secret as Alertmanager's credentials_file) or basic_auth"),
            );
            None
        }
    };

    let web = raw
        .web_config_file
        .as_deref()
        .and_then(|file| check_web_config(&at, listen, &ctx.resolve(file), problems));

    if let Some(n) = raw.max_body_bytes {
        in_range(
            &at,
            "max_body_bytes",
            n,
            1,
            limits::MAX_BODY_BYTES,
            problems,
        );
    }
    if let Some(n) = raw.max_concurrent_runs {
        in_range(
            &at,
            "max_concurrent_runs",
            n,
            1,
            limits::MAX_CONCURRENT_RUNS,
            problems,
        );
    }
    if let Some(n) = raw.max_disruptive_per_hour {
        in_range(
            &at,
            "max_disruptive_per_hour",
            n,
            0,
            limits::MAX_DISRUPTIVE_PER_HOUR,
            problems,
        );
    }
    let kill_grace = duration(
        &at,
        "kill_grace",
        raw.kill_grace,
        Duration::from_secs(5),
        limits::KILL_GRACE,
        problems,
    );
    let resume_max_age = duration(
        &at,
        "resume_max_age",
        raw.resume_max_age,
        DEFAULT_RESUME_MAX_AGE,
        limits::RESUME_MAX_AGE,
        problems,
    );

    let mut rules: Vec<HookRule> = Vec::new();
    // Kept apart until the end: a warning must not make the section count as failed.
    let mut warnings = Vec::new();
    match at.field("rules") {
        Some(list) => {
            let list_node = with_on_keys(list.node);
            let list = Located::new(&list_node, list.path.clone());
            for (r, item, bad) in list.parse_list_every::<RawRule>(problems) {
                // A hook with wrongly typed fields is still checked whole, so every problem of
                // it is reported at once; what the checks say of the stand-ins is dropped.
                warnings.extend(match_warnings(&r, &item));
                let before = problems.len();
                let rule = check_rule(r, &item, ctx, problems);
                if rule.as_ref().is_some_and(|r| r.wait_for_lease) && at.field("lease").is_none() {
                    problems.push(
                        item.problem("wait_for_lease", "there is no `hooks.lease` to wait for")
                            .hint("configure `hooks.lease` (and `hooks.lock`) on this host, or drop wait_for_lease"),
                    );
                }
                drop_problems_at(problems, before, &bad);
                if let Some(rule) = rule.filter(|_| bad.is_empty()) {
                    if rules.iter().any(|x| x.name == rule.name) {
                        problems.push(
                            item.problem("name", format!("duplicate hook name `{}`", rule.name)),
                        );
                    }
                    rules.push(rule);
                }
            }
        }
        None => problems.push(at.problem("rules", "missing field `rules`")),
    }

    let lock = at
        .field("lock")
        .and_then(|l| super::lock::parse(l, ctx, problems));
    let storm = raw.storm.as_ref().map(|s| check_storm(&at, s, problems));
    let lease = at.field("lease").and_then(|l| {
        let resolve = |argv, at: &Located, field: &str, problems: &mut Vec<Problem>| {
            resolve_argv(argv, at, field, ctx, problems)
        };
        super::lease::parse(l, resolve, problems)
    });
    if at.field("lease").is_some() && at.field("lock").is_none() {
        problems.push(
            at.problem("lease", "needs `hooks.lock`: the lease is kept in its etcd")
                .hint(
                    "add `lock: { etcd: { endpoints: [...] } }` with the same etcd on every host",
                ),
        );
    }

    let failed = problems.len() > before;
    problems.extend(warnings);
    if failed {
        return None;
    }
    Some(HooksConfig {
        listen,
        auth: auth?,
        state_dir: absolute(ctx, &raw.state_dir),
        max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        max_disruptive_per_hour: raw.max_disruptive_per_hour.unwrap_or(1),
        kill_switch_file: raw.kill_switch_file.map(|p| absolute(ctx, &p)),
        dry_run: raw.dry_run.unwrap_or(false),
        max_concurrent_runs: raw.max_concurrent_runs.unwrap_or(4),
        kill_grace,
        resume_max_age,
        rules,
        lock,
        storm,
        lease,
        web,
    })
}

/// The webhook's own listener's web configuration: TLS only, since Alertmanager sends one
/// `Authorization` header and it carries the webhook's own credentials.
fn check_web_config(
    at: &Located,
    listen: Listen,
    path: &Path,
    problems: &mut Vec<Problem>,
) -> Option<crate::web::Settings> {
    if listen == Listen::Main {
        problems.push(
            at.problem("web_config_file", "the webhook shares the main listener (`listen: main`)")
                .hint("the main listener's --web.config.file applies; remove web_config_file or give the webhook its own `listen: HOST:PORT`"),
        );
        return None;
    }
    match crate::web::Security::load(path) {
        Ok(settings) if !settings.users.is_empty() => {
            problems.push(
                at.problem(
                    "web_config_file",
                    format!("{}: basic_auth_users cannot protect the webhook", path.display()),
                )
                .hint("Alertmanager sends one Authorization header, which carries bearer_token_file or basic_auth; remove basic_auth_users from that file"),
            );
            None
        }
        Ok(settings) => Some(settings),
        Err(e) => {
            for p in &e.problems {
                problems.push(at.problem("web_config_file", p.render(&e.file)));
            }
            None
        }
    }
}

/// What in a hook's `match`/`match_re` is accepted but probably wrong: a regular expression
/// in an exact `match` (it can only match that literal text), and an `alertname` that no
/// alert of the shipped rules pack has.
fn match_warnings(r: &RawRule, at: &Located) -> Vec<Problem> {
    let mut out = Vec::new();
    for (k, v) in r.match_eq.iter().flatten() {
        const REGEX_MARKS: &[&str] = &[".*", ".+", "|", "^", "$", "[", "(", "\\"];
        if REGEX_MARKS.iter().any(|m| v.contains(m)) {
            out.push(
                at.problem(
                    &format!("match.{k}"),
                    format!("`{v}` looks like a regular expression, but `match` compares the whole value exactly"),
                )
                .hint(format!("use `match_re: {{ {k}: '{v}' }}`"))
                .warning(),
            );
        }
    }
    let shipped = crate::config::SHIPPED_ALERTS;
    if shipped.is_empty() {
        return out;
    }
    let eq = r
        .match_eq
        .iter()
        .flatten()
        .filter(|(k, _)| *k == "alertname");
    for (_, name) in eq.filter(|(_, v)| !shipped.contains(&v.as_str())) {
        let mut p = at
            .problem(
                "match.alertname",
                format!("no alert of the shipped rules is named `{name}`"),
            )
            .warning();
        p = p.hint(match crate::config::source::suggest(name, shipped) {
            Some(near) => format!("{near} (fine if the alert comes from your own rules)"),
            None => "fine if the alert comes from your own rules".into(),
        });
        out.push(p);
    }
    let re = r
        .match_re
        .iter()
        .flatten()
        .filter(|(k, _)| *k == "alertname");
    for (_, pattern) in re {
        let Ok(re) = regex::Regex::new(&format!("^(?:{pattern})$")) else {
            continue; // reported as an error by `check_rule`
        };
        if !shipped.iter().any(|a| re.is_match(a)) {
            out.push(
                at.problem(
                    "match_re.alertname",
                    format!("`{pattern}` matches no alert of the shipped rules"),
                )
                .hint("fine if the alert comes from your own rules")
                .warning(),
            );
        }
    }
    out
}

/// Drops the problems recorded since `before` about a field already reported as wrongly
/// typed (`bad`, from [`Located::parse_every`]).
fn drop_problems_at(problems: &mut Vec<Problem>, before: usize, bad: &[String]) {
    let mut i = before;
    while i < problems.len() {
        let p = &problems[i].path;
        let about_bad = bad.iter().any(|b| {
            p == b
                || p.strip_prefix(b.as_str())
                    .is_some_and(|r| r.starts_with(['.', '[']))
        });
        if about_bad {
            problems.remove(i);
        } else {
            i += 1;
        }
    }
}

/// YAML 1.1 reads a bare `on` key as the boolean `true`; give the hooks' `on:` its name back
/// so it parses and problems name it as written.
fn with_on_keys(list: &Node) -> Node {
    let mut list = list.clone();
    if let Value::Seq(items) = &mut list.value {
        for item in items {
            if let Value::Map(entries) = &mut item.value {
                for (key, _) in entries.iter_mut().filter(|(k, _)| k.name == "true") {
                    key.name = "on".to_owned();
                }
            }
        }
    }
    list
}

fn check_rule(
    r: RawRule,
    at: &Located,
    ctx: &SectionContext,
    problems: &mut Vec<Problem>,
) -> Option<HookRule> {
    let before = problems.len();
    if r.name.trim().is_empty()
        || !r
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.push(
            at.problem("name", "hook names are letters, digits, `-`, `_` and `.`")
                .hint("the name becomes the `hook` label"),
        );
    }
    let mut matchers = Vec::new();
    for (k, v) in r.match_eq.unwrap_or_default() {
        matchers.push(Matcher::Eq(k, v));
    }
    for (k, v) in r.match_re.unwrap_or_default() {
        // Anchored like Alertmanager's own matchers: the whole value must match.
        if let Some(re) =
            crate::config::compile_regex(&format!("^(?:{v})$"), at, "match_re", problems)
        {
            matchers.push(Matcher::Re(k, re));
        }
    }
    if matchers.is_empty() && problems.len() == before {
        problems.push(
            at.problem("match", "a hook needs at least one label condition")
                .hint("a hook without `match` or `match_re` would run for every alert"),
        );
    }
    let command_set = r.command.is_some();
    let command = r
        .command
        .map(|c| resolve_argv(c, at, "command", ctx, problems))
        .unwrap_or_default();
    let validate = r
        .validate
        .map(|v| resolve_argv(v, at, "validate", ctx, problems));
    let disruptive = r.disruptive.unwrap_or(false);
    let rerun_after_crash = r.rerun_after_crash.unwrap_or(false);
    if disruptive && rerun_after_crash {
        problems.push(
            at.problem(
                "rerun_after_crash",
                "a disruptive hook is never re-run after a crash",
            )
            .hint("remove rerun_after_crash or make the hook non-disruptive"),
        );
    }
    let [timeout, cooldown, retry_backoff] = [
        (
            "timeout",
            r.timeout,
            Duration::from_secs(60),
            limits::TIMEOUT,
        ),
        ("cooldown", r.cooldown, Duration::ZERO, limits::COOLDOWN),
        (
            "retry_backoff",
            r.retry_backoff,
            Duration::from_secs(10),
            limits::RETRY_BACKOFF,
        ),
    ]
    .map(|(field, value, default, max)| duration(at, field, value, default, max, problems));
    if timeout.is_zero() {
        problems.push(at.problem("timeout", "timeout must be greater than zero"));
    }
    let retries = r.retries.unwrap_or(0);
    in_range(at, "retries", retries, 0, limits::RETRIES, problems);
    let steps = check_steps(r.steps, command_set, retries, timeout, at, ctx, problems);
    if r.only_if_candidate
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        problems.push(at.problem("only_if_candidate", "must name a target"));
    }
    let mut env = Vec::new();
    for (k, v) in r.env.unwrap_or_default() {
        let ok = !k.is_empty()
            && !k.starts_with(char::is_numeric)
            && k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !ok || k.starts_with("CW_") {
            problems.push(
                at.problem("env", format!("bad environment variable name `{k}`"))
                    .hint("use [A-Z0-9_] names; the CW_ prefix is reserved for what clusterwatch sets"),
            );
        }
        env.push((k, v));
    }
    if problems.len() > before {
        return None;
    }
    Some(HookRule {
        name: r.name,
        matchers,
        on: r.on.unwrap_or(On::Firing),
        command,
        steps,
        validate,
        timeout,
        cooldown,
        disruptive,
        dry_run: r.dry_run.unwrap_or(false),
        retries,
        retry_backoff,
        rerun_after_crash,
        env,
        only_if_candidate: r.only_if_candidate,
        wait_for_lease: r.wait_for_lease.unwrap_or(false),
    })
}

/// A program path with a `/` is resolved against the configuration's directory and must be an
/// executable file now; a bare name is looked up on the fixed PATH hooks run with.
fn resolve_argv(
    mut argv: Vec<String>,
    at: &Located,
    field: &str,
    ctx: &SectionContext,
    problems: &mut Vec<Problem>,
) -> Vec<String> {
    let Some(program) = argv.first_mut() else {
        problems.push(
            at.problem(field, "the command is empty")
                .hint("write the program and its arguments as a list: [/path/to/script, arg]"),
        );
        return argv;
    };
    if program.contains('/') {
        let path = absolute(ctx, Path::new(program.as_str()));
        if !is_executable(&path) {
            problems.push(
                at.problem(
                    field,
                    format!("{} is not an executable file", path.display()),
                )
                .hint("check the path and `chmod +x` the script"),
            );
        }
        *program = path.display().to_string();
    } else if crate::config::find_on_path(program, super::env::HOOK_PATH).is_none() {
        // Hooks run with this PATH only, whatever clusterwatch's own environment.
        problems.push(
            at.problem(
                field,
                format!(
                    "`{program}` is not found on the hooks' PATH ({})",
                    super::env::HOOK_PATH
                ),
            )
            .hint("give the program's full path"),
        );
    }
    argv
}

/// A path from the configuration, relative to the configuration file's directory, made
/// absolute: hooks run in `/`, and `CW_PAYLOAD_FILE` must name the same file there.
fn absolute(ctx: &SectionContext, p: &Path) -> PathBuf {
    let p = ctx.resolve(p);
    std::path::absolute(&p).unwrap_or(p)
}

/// A count within `min..=max`, or a problem naming the limit.
fn in_range<T: PartialOrd + std::fmt::Display>(
    at: &Located,
    field: &str,
    value: T,
    min: T,
    max: T,
    problems: &mut Vec<Problem>,
) {
    if value < min || value > max {
        problems.push(at.problem(field, format!("{value} is out of range: {min} to {max}")));
    }
}

/// A duration (or its default) at most `max`, or a problem naming the limit.
fn duration(
    at: &Located,
    field: &str,
    value: Option<HumanDuration>,
    default: Duration,
    max: Duration,
    problems: &mut Vec<Problem>,
) -> Duration {
    let d = value.map(|d| d.0).unwrap_or(default);
    if d > max {
        problems.push(at.problem(
            field,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse as parse_config;

    fn write_token(dir: &Path) {
        std::fs::write(dir.join("t"), "tok\n").unwrap();
    }

    #[test]
    fn a_full_section_parses_with_bare_on_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let yaml = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - name: r\n      on: resolved\n      match_re: { cluster: 'db-.*' }\n      command: [/bin/true]\n";
        let cfg = parse_config(yaml, "c.yml", dir.path()).unwrap();
        let h = cfg.hooks.unwrap();
        assert_eq!(h.listen, Listen::Own(DEFAULT_LISTEN.parse().unwrap()));
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(canon(h.state_dir.parent().unwrap()), canon(dir.path()));
        assert_eq!(h.state_dir.file_name().unwrap(), "st");
        let r = &h.rules[0];
        assert_eq!(r.on, On::Resolved);
        let labels = |v: &str| BTreeMap::from([("cluster".to_owned(), v.to_owned())]);
        assert!(r.applies(&labels("db-1"), false));
        assert!(!r.applies(&labels("db-1"), true));
        // Anchored: a partial match is no match.
        assert!(!r.applies(&labels("x-db-1"), false));
        assert!(!format!("{:?}", h.auth).contains("tok"));
    }

    #[test]
    fn the_storm_breaker_parses_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let with = |storm: &str| {
            format!("hooks:\n  bearer_token_file: t\n  state_dir: st\n  storm: {storm}\n  rules:\n    - name: r\n      match: {{ a: b }}\n      command: [/bin/true]\n")
        };
        let cfg = parse_config(&with("{ max_groups: 3, window: 10m }"), "c.yml", dir.path());
        let storm = cfg.unwrap().hooks.unwrap().storm.unwrap();
        assert_eq!((storm.max_groups, storm.window), (3, 600.0));
        let text = parse_config(&with("{ max_groups: 0, window: 2h }"), "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(text.contains("hooks.storm.max_groups"), "{text}");
        assert!(
            text.contains("hooks.storm.window: must be more than 0s and at most 1h"),
            "{text}"
        );
    }

    #[test]
    fn steps_replace_command_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let with = |rule: &str| {
            format!("hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - name: r\n      match: {{ a: b }}\n{rule}")
        };
        let ok = with("      timeout: 9s\n      steps:\n        - { name: fence, command: [/bin/true] }\n        - { name: promote, command: [/bin/true], timeout: 2s }\n");
        let h = parse_config(&ok, "c.yml", dir.path())
            .unwrap()
            .hooks
            .unwrap();
        let steps = &h.rules[0].steps;
        assert_eq!(steps.len(), 2);
        assert_eq!(
            (steps[0].name.as_str(), steps[0].timeout),
            ("fence", Duration::from_secs(9))
        );
        assert_eq!(steps[1].timeout, Duration::from_secs(2));
        assert!(h.rules[0].command.is_empty());
        for (rule, expect) in [
            (
                "      command: [/bin/true]\n      steps: [{ name: a, command: [/bin/true] }]\n",
                "set either command or steps",
            ),
            ("      steps: []\n", "steps must not be empty"),
            (
                "      retries: 1\n      steps: [{ name: a, command: [/bin/true] }]\n",
                "a hook with steps is not retried",
            ),
            (
                "      steps: [{ name: a, command: [/bin/true] }, { name: a, command: [] }]\n",
                "steps[1].name",
            ),
            ("      disruptive: true\n", "missing field `command`"),
        ] {
            let text = parse_config(&with(rule), "c.yml", dir.path())
                .unwrap_err()
                .render();
            assert!(text.contains(expect), "{expect}: {text}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "hooks:\n  state_dir: st\n  rules:\n    - name: a\n      on: resolvd\n      command: [/bin/true]\n    - name: b\n      command: [./missing]\n      disruptive: true\n      rerun_after_crash: true\n";
        let err = parse_config(yaml, "c.yml", dir.path()).unwrap_err();
        let text = err.render();
        assert!(
            text.contains("c.yml:2:3: hooks.bearer_token_file: the webhook needs credentials"),
            "{text}"
        );
        assert!(
            text.contains("c.yml:5:7: hooks.rules[0].on: unknown variant `resolvd`"),
            "{text}"
        );
        assert!(text.contains("rules[1].command"), "{text}");
        assert!(
            text.contains("rules[1].match: a hook needs at least one label condition"),
            "{text}"
        );
        assert!(text.contains("rules[1].rerun_after_crash"), "{text}");
    }

    #[test]
    fn every_problem_of_one_hook_is_reported_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let yaml = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - name: 'bad name'\n      match: { alertname: PostgresNoPrimary }\n      command: /bin/true\n      retries: lots\n      env: { lower: x }\n";
        let err = parse_config(yaml, "c.yml", dir.path()).unwrap_err();
        let text = err.render();
        for expected in [
            "hooks.rules[0].name: hook names are letters",
            "hooks.rules[0].command: wrong type",
            "hooks.rules[0].retries: wrong type",
            "hooks.rules[0].env: bad environment variable name `lower`",
        ] {
            assert!(text.contains(expected), "{expected} missing in:\n{text}");
        }
        // Nothing is said of the stand-ins put in place of the wrongly typed fields.
        assert_eq!(err.problems.len(), 4, "{text}");
    }

    #[test]
    fn a_bare_command_must_be_on_the_hooks_path() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let hook = |cmd: &str| {
            format!("hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - {{ name: h, match: {{ alertname: PostgresNoPrimary }}, command: [{cmd}] }}\n")
        };
        assert!(parse_config(&hook("sh"), "c.yml", dir.path()).is_ok());
        let err = parse_config(&hook("no-such-program-here"), "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            err.contains(
                "hooks.rules[0].command: `no-such-program-here` is not found on the hooks' PATH"
            ),
            "{err}"
        );
    }

    #[test]
    fn regex_looking_match_and_unknown_alert_names_are_warnings() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let yaml = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - { name: a, match: { alertname: PostgresNoPrimary, cluster: 'db-.*' }, command: [/bin/true] }\n    - { name: b, match: { alertname: PostgresNoPrimry }, command: [/bin/true] }\n    - { name: c, match_re: { alertname: 'Postgres(NoPrimary|Down)' }, command: [/bin/true] }\n    - { name: d, match_re: { alertname: 'Nothing.*' }, command: [/bin/true] }\n";
        let cfg = parse_config(yaml, "c.yml", dir.path()).expect("warnings do not refuse");
        assert_eq!(cfg.hooks.unwrap().rules.len(), 4);
        let text: Vec<String> = cfg.warnings.iter().map(|w| w.render("c.yml")).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].contains(
                "warning: hooks.rules[0].match.cluster: `db-.*` looks like a regular expression"
            ),
            "{}",
            text[0]
        );
        assert!(
            text[0].contains("use `match_re: { cluster: 'db-.*' }`"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("no alert of the shipped rules is named `PostgresNoPrimry`"),
            "{}",
            text[1]
        );
        assert!(
            text[1].contains("did you mean `PostgresNoPrimary`?"),
            "{}",
            text[1]
        );
        assert!(
            text[2].contains("`Nothing.*` matches no alert of the shipped rules"),
            "{}",
            text[2]
        );

        // Beside a real error, warnings are printed too but never counted as what failed.
        let broken = format!("{yaml}    - {{ name: e, command: [/bin/true] }}\n");
        let err = parse_config(&broken, "c.yml", dir.path()).unwrap_err();
        assert_eq!(
            err.problems.iter().filter(|p| !p.warning).count(),
            1,
            "{}",
            err.render()
        );
    }

    #[test]
    fn web_config_file_is_for_the_own_listener_and_tls_only() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let hook = "  rules:\n    - name: r\n      match: { a: b }\n      command: [/bin/true]\n";
        let with = |listen: &str| {
            format!("hooks:\n  listen: {listen}\n  bearer_token_file: t\n  state_dir: st\n  web_config_file: web.yml\n{hook}")
        };
        std::fs::write(dir.path().join("web.yml"), "").unwrap();
        let cfg = parse_config(&with("127.0.0.1:0"), "c.yml", dir.path()).unwrap();
        assert!(cfg.hooks.unwrap().web.is_some());

        let text = parse_config(&with("main"), "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            text.contains("c.yml:5:3: hooks.web_config_file: the webhook shares the main listener"),
            "{text}"
        );
        assert!(text.contains("--web.config.file"), "{text}");

        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(
            dir.path().join("web.yml"),
            format!("basic_auth_users:\n  am: '{hash}'\n"),
        )
        .unwrap();
        let text = parse_config(&with("127.0.0.1:0"), "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            text.contains("basic_auth_users cannot protect the webhook"),
            "{text}"
        );

        std::fs::write(
            dir.path().join("web.yml"),
            "tls_server_config:\n  cert_fil: x\n",
        )
        .unwrap();
        let text = parse_config(&with("127.0.0.1:0"), "c.yml", dir.path())
            .unwrap_err()
            .render();
        let web = dir.path().join("web.yml");
        assert!(
            text.contains(&format!("c.yml:5:3: hooks.web_config_file: {}:2:3: tls_server_config.cert_fil: unknown field", web.display())),
            "{text}"
        );
    }

    #[test]
    fn values_serve_cannot_honour_are_refused_with_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let yaml = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  max_concurrent_runs: 18446744073709551615\n  kill_grace: 11m\n  rules:\n    - name: r\n      match: { a: b }\n      command: [/bin/true]\n      timeout: 25h\n      retries: 20\n      cooldown: 31days\n    - name: r2\n      match: { a: c }\n      command: [/bin/true]\n      retry_backoff: 500000000000y\n";
        let text = parse_config(yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        for want in [
            "hooks.max_concurrent_runs: 18446744073709551615 is out of range: 1 to 1024",
            "hooks.kill_grace: must be at most 10m",
            "hooks.rules[1].retry_backoff: duration `500000000000y` is too long: the limit is 1y",
            "hooks.rules[0].timeout: must be at most 1day",
            "hooks.rules[0].retries: 20 is out of range: 0 to 10",
            "hooks.rules[0].cooldown: must be at most 30days",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
    }

    #[test]
    fn relative_paths_become_absolute_against_the_configuration_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_token(dir.path());
        let script = dir.path().join("hook.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let yaml = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - name: r\n      match: { a: b }\n      command: [./hook.sh, x]\n      validate: [./hook.sh]\n";
        std::fs::write(dir.path().join("c.yml"), yaml).unwrap();
        // A relative --config.file: clusterwatch started in the configuration's directory.
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&dir.path().join("c.yml"), &cwd);
        let h = crate::configuration::load_file(&rel)
            .unwrap()
            .hooks
            .unwrap();
        assert!(h.state_dir.is_absolute(), "{}", h.state_dir.display());
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(canon(h.state_dir.parent().unwrap()), canon(dir.path()));
        assert_eq!(h.state_dir.file_name().unwrap(), "st");
        let cmd = Path::new(&h.rules[0].command[0]);
        assert!(cmd.is_absolute(), "{}", cmd.display());
        assert_eq!(
            std::fs::canonicalize(cmd).unwrap(),
            std::fs::canonicalize(&script).unwrap()
        );
        assert_eq!(h.rules[0].command[1], "x");
        assert_eq!(h.resume_max_age, DEFAULT_RESUME_MAX_AGE);
    }

    /// `to` relative to `from` (both absolute), with `..` as needed.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
        let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
        let mut out = PathBuf::new();
        for _ in common..from.len() {
            out.push("..");
        }
        for c in &to[common..] {
            out.push(c);
        }
        out
    }
}
