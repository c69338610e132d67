//! The rules pack as Prometheus and Alertmanager see it: `promtool` accepts every rules file
//! and passes every unit test, `amtool` accepts the example configuration and routes failover
//! alerts to the hook receiver, the pack is complete (labels, annotations, runbook pages,
//! README rows, a firing and a non-firing test case for every alert), and a real Prometheus
//! evaluates it without error over a real exporter watching a real primary and standby.
//!
//! The YAML is read by a small indentation scanner that understands the block style the pack
//! is written in; a rule written in flow style is reported as missing its fields, not skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::harness::process::{describe, find_program};
use clusterwatch_tests::harness::repo_root;
use clusterwatch_tests::harness::{
    wait_until, Alertmanager, Clusterwatch, PgCluster, Prometheus, PrometheusConfig, ScrapeJob,
};
use serde_json::Value;

const RUNBOOK_PREFIX: &str = "https://clusterwatch.invalid/runbooks/";
const SEVERITIES: &[&str] = &["critical", "warning", "info"];
const HOOK_RECEIVER: &str = "clusterwatch-hooks";
/// The hook receivers again, for refused failovers (`*FailoverNoCandidate`) to be journaled.
const REFUSAL_RECEIVER: &str = "clusterwatch-refusals";
const ALERTMANAGER_CONFIG: &str = "alertmanager/alertmanager.yml";

/// `promtool`, or a failure that says how to get it: CI installs it, so a missing tool is an
/// error, never a reason to skip.
fn promtool() -> PathBuf {
    find_program("CLUSTERWATCH_PROMTOOL", &["promtool"]).unwrap_or_else(|e| {
        panic!("promtool is missing: install the Debian package `prometheus` (apt-get install prometheus): {e:#}")
    })
}

/// `amtool`, or a failure that says how to get it.
fn amtool() -> PathBuf {
    find_program("CLUSTERWATCH_AMTOOL", &["amtool"]).unwrap_or_else(|e| {
        panic!("amtool is missing: install the Debian package `prometheus-alertmanager` (apt-get install prometheus-alertmanager): {e:#}")
    })
}

/// What a tool run printed.
struct Ran {
    ok: bool,
    stdout: String,
    /// The command line, stdout and stderr together, for failure messages (promtool reports
    /// test failures on stderr and its summary on stdout).
    report: String,
}

/// Runs `command` in the workspace root.
fn run(mut command: Command) -> Ran {
    let description = describe(&command);
    let output = command
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("could not run `{description}`: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = format!(
        "$ {description}\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ran {
        ok: output.status.success(),
        stdout,
        report,
    }
}

/// Files in `dir` (relative to the workspace root) whose name ends with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = repo_root().join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    out.sort();
    out
}

fn rules_files() -> Vec<PathBuf> {
    let found = files("rules", ".rules.yml");
    assert!(
        found.len() >= 3,
        "expected the exporter, host and postgres rules files in rules/, found {found:?}"
    );
    found
}

fn test_files() -> Vec<PathBuf> {
    let found = files("rules/tests", ".test.yml");
    assert!(!found.is_empty(), "no rules/tests/*.test.yml");
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn name_of(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Fails with every problem at once, so one run shows all that is missing.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---- a scanner for the block-style YAML of the pack -------------------------------------

/// One line of YAML: its indentation and its text without it; comments and blank lines are
/// dropped.
struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

fn lines(source: &str) -> Vec<Line<'_>> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let text = raw.trim_start();
            (!text.is_empty() && !text.starts_with('#')).then(|| Line {
                number: i + 1,
                indent: raw.len() - text.len(),
                text: text.trim_end(),
            })
        })
        .collect()
}

/// `key: value` → (`key`, `value`); `key:` → (`key`, ``). Values keep their quotes.
fn key_value(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = text.split_once(':')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (plain && (rest.is_empty() || rest.starts_with(' '))).then(|| (key, rest.trim()))
}

/// A sequence item (`- key: value` followed by its other keys) with its direct keys, and for
/// each key the mapping nested under it (for `labels:` and `annotations:`).
struct Item {
    line: usize,
    keys: BTreeMap<String, String>,
    children: BTreeMap<String, BTreeMap<String, String>>,
    /// For a key with an empty value: whether a sequence (`- ...`) is nested under it.
    has_sequence: BTreeSet<String>,
}

/// Every sequence item whose first key is `first_key` (e.g. `alert`, or `eval_time` /
/// `alertname` for `alert_rule_test` entries), wherever it is in the file.
fn items(source: &str, first_keys: &[&str]) -> Vec<Item> {
    let lines = lines(source);
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.text.strip_prefix("- ") else {
            continue;
        };
        let Some((key, value)) = key_value(rest) else {
            continue;
        };
        if !first_keys.contains(&key) {
            continue;
        }
        let key_indent = line.indent + 2;
        let mut item = Item {
            line: line.number,
            keys: BTreeMap::from([(key.to_owned(), value.to_owned())]),
            children: BTreeMap::new(),
            has_sequence: BTreeSet::new(),
        };
        let body: Vec<&Line> = lines[i + 1..]
            .iter()
            .take_while(|l| l.indent >= key_indent)
            .collect();
        for (j, l) in body.iter().enumerate() {
            if l.indent != key_indent {
                continue;
            }
            let Some((k, v)) = key_value(l.text) else {
                continue;
            };
            item.keys.insert(k.to_owned(), v.to_owned());
            let nested: Vec<&&Line> = body[j + 1..]
                .iter()
                .take_while(|n| n.indent > key_indent)
                .collect();
            if let Some(first) = nested.first() {
                if first.text.starts_with("- ") {
                    item.has_sequence.insert(k.to_owned());
                }
                let child_indent = first.indent;
                let map = nested
                    .iter()
                    .filter(|n| n.indent == child_indent)
                    .filter_map(|n| key_value(n.text))
                    .map(|(ck, cv)| (ck.to_owned(), cv.to_owned()))
                    .collect();
                item.children.insert(k.to_owned(), map);
            }
        }
        out.push(item);
    }
    out
}

/// An alerting rule as the pack writes it.
struct Alert {
    name: String,
    file: String,
    line: usize,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn unquote(value: &str) -> &str {
    value.trim_matches(|c| c == '"' || c == '\'')
}

fn alerts() -> Vec<Alert> {
    let mut out = Vec::new();
    for path in rules_files() {
        for item in items(&read(&path), &["alert", "record"]) {
            let Some(name) = item.keys.get("alert") else {
                continue;
            };
            out.push(Alert {
                name: unquote(name).to_owned(),
                file: name_of(&path),
                line: item.line,
                labels: item.children.get("labels").cloned().unwrap_or_default(),
                annotations: item
                    .children
                    .get("annotations")
                    .cloned()
                    .unwrap_or_default(),
            });
        }
    }
    assert!(
        !out.is_empty(),
        "no `- alert:` found in the rules files: the scanner or the files are broken"
    );
    out
}

// ---- the tools ---------------------------------------------------------------------------

#[test]
fn promtool_accepts_every_rules_file() {
    let promtool = promtool();
    let mut failures = Vec::new();
    for file in rules_files() {
        let mut command = Command::new(&promtool);
        command.args(["check", "rules"]).arg(&file);
        let ran = run(command);
        if !ran.ok {
            failures.push(ran.report);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn promtool_unit_tests_pass() {
    let promtool = promtool();
    let mut failures = Vec::new();
    for file in test_files() {
        let mut command = Command::new(&promtool);
        command.args(["test", "rules"]).arg(&file);
        let ran = run(command);
        if !ran.ok {
            failures.push(ran.report);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn amtool_accepts_the_example_configuration() {
    let mut command = Command::new(amtool());
    command.args(["check-config", "alertmanager/alertmanager.yml"]);
    let ran = run(command);
    assert!(ran.ok, "{}", ran.report);
}

/// The receivers `amtool config routes test` picks for `labels`, as it prints them
/// (comma-separated, in route order).
fn routed_to(amtool: &Path, labels: &[String]) -> Result<String, String> {
    let mut command = Command::new(amtool);
    command.args([
        "config",
        "routes",
        "test",
        &format!("--config.file={ALERTMANAGER_CONFIG}"),
    ]);
    command.args(labels);
    let ran = run(command);
    if !ran.ok {
        return Err(ran.report);
    }
    Ok(ran
        .stdout
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// An alert's own labels for `amtool config routes test`, with a cluster.
fn route_labels(alert: &Alert) -> Vec<String> {
    let mut labels = vec![
        format!("alertname={}", alert.name),
        "cluster=example".to_owned(),
    ];
    labels.extend(
        alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={}", unquote(v))),
    );
    labels
}

/// Every alert labelled `action: failover` reaches the hook receiver, with its own labels and
/// a cluster; an alert without the label never does. The refusal receiver gets the
/// `*FailoverNoCandidate` alerts and nothing else.
#[test]
fn failover_alerts_and_only_they_are_routed_to_the_hook_receiver() {
    let amtool = amtool();
    let mut problems = Vec::new();
    let mut failover_alerts = 0;
    for alert in alerts() {
        let receivers = match routed_to(&amtool, &route_labels(&alert)) {
            Ok(receivers) => receivers,
            Err(report) => {
                problems.push(report);
                continue;
            }
        };
        let receivers = receivers.as_str();
        let to_hooks = receivers.split(',').any(|r| r.trim() == HOOK_RECEIVER);
        let failover = alert.labels.get("action").map(|v| unquote(v)) == Some("failover");
        failover_alerts += usize::from(failover);
        if failover && !to_hooks {
            problems.push(format!(
                "{} carries action=failover but is routed to `{receivers}`",
                alert.name
            ));
        }
        if !failover && to_hooks {
            problems.push(format!(
                "{} has no action=failover but reaches {HOOK_RECEIVER}",
                alert.name
            ));
        }
        // Refused failovers reach the hook receivers to be journaled; nothing else does.
        let refusal = alert.name.ends_with("FailoverNoCandidate");
        let to_refusals = receivers.split(',').any(|r| r.trim() == REFUSAL_RECEIVER);
        if refusal != to_refusals {
            problems.push(format!(
                "{} is routed to `{receivers}`: {REFUSAL_RECEIVER} takes the *FailoverNoCandidate alerts, and only those",
                alert.name
            ));
        }
        if failover && !receivers.split(',').any(|r| r.trim() != HOOK_RECEIVER) {
            problems.push(format!(
                "{} reaches only the hook receiver: people must hear about a failover too",
                alert.name
            ));
        }
    }
    assert!(
        failover_alerts >= 1,
        "no alert carries action=failover (PostgresFailoverNeeded must)"
    );
    assert_no_problems("routing", &problems);
}

/// Hand-written cases of the example routing tree: the dead man's switch, the info route,
/// warnings and criticals to the on-call people, failover to the hook receiver and people, a
/// refused failover to the hook receiver's refusal route and people.
#[test]
fn amtool_routes_the_watchdog_info_and_paging_alerts() {
    let amtool = amtool();
    let cases: &[(&[&str], &str)] = &[
        (&["alertname=Watchdog", "severity=info"], "watchdog"),
        (
            &[
                "alertname=HookKillSwitchActive",
                "severity=info",
                "instance=em1:9469",
            ],
            "team-info",
        ),
        (
            &[
                "alertname=HostCpuHigh",
                "severity=warning",
                "instance=em1:9469",
            ],
            "oncall-email",
        ),
        (
            &["alertname=PostgresDown", "severity=critical", "cluster=db"],
            "oncall-email",
        ),
        (
            &[
                "alertname=PostgresNoPrimary",
                "severity=critical",
                "action=failover",
                "cluster=db",
            ],
            "clusterwatch-hooks,oncall-email",
        ),
        // A refused failover is journaled by the hook receivers and pages.
        (
            &[
                "alertname=PostgresFailoverNoCandidate",
                "severity=critical",
                "cluster=db",
            ],
            "clusterwatch-refusals,oncall-email",
        ),
        // A label set nobody foresaw still reaches people.
        (&["alertname=SomethingElse"], "oncall-email"),
    ];
    let mut problems = Vec::new();
    for (labels, expected) in cases {
        let labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        match routed_to(&amtool, &labels) {
            Ok(got) if got == *expected => {}
            Ok(got) => problems.push(format!(
                "{labels:?}: routed to `{got}`, expected `{expected}`"
            )),
            Err(report) => problems.push(report),
        }
    }
    assert_no_problems("routing cases", &problems);
}

/// Every alert of the pack with its own labels: the Watchdog reaches the watchdog receiver
/// and nothing else, no other alert reaches it; info alerts go to the info mailbox; warnings
/// and criticals reach the on-call people.
#[test]
fn every_alert_reaches_the_receiver_its_severity_calls_for() {
    let amtool = amtool();
    let mut problems = Vec::new();
    let mut watchdogs = 0;
    for alert in alerts() {
        let got = match routed_to(&amtool, &route_labels(&alert)) {
            Ok(got) => got,
            Err(report) => {
                problems.push(report);
                continue;
            }
        };
        let receivers: Vec<&str> = got.split(',').map(str::trim).collect();
        let severity = alert.labels.get("severity").map(|v| unquote(v));
        let expected: &[&str] = match (alert.name.as_str(), severity) {
            ("Watchdog", _) => &["watchdog"],
            (_, Some("info")) => &["team-info"],
            _ => &["oncall-email"],
        };
        watchdogs += usize::from(alert.name == "Watchdog");
        let people: Vec<&str> = receivers
            .iter()
            .copied()
            .filter(|r| *r != HOOK_RECEIVER && *r != REFUSAL_RECEIVER)
            .collect();
        if people != expected {
            problems.push(format!(
                "{} (severity {severity:?}) reaches `{got}`, expected {expected:?}",
                alert.name
            ));
        }
    }
    assert_eq!(
        watchdogs, 1,
        "the pack must define exactly one Watchdog alert"
    );
    assert_no_problems("routing by severity", &problems);
}

/// One postable alert, firing since a minute ago.
fn postable(labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    serde_json::json!({
        "labels": labels,
        "annotations": {"summary": "posted by the rules pack test"},
        "startsAt": humantime::format_rfc3339_seconds(std::time::SystemTime::now() - Duration::from_secs(60)).to_string(),
    })
}

/// A case of the inhibition test: (what it is, its labels, whether it must be muted).
type InhibitionCase = (&'static str, &'static [(&'static str, &'static str)], bool);

/// `k=v,...` of a JSON label object, sorted, to find an alert again whatever the key order.
fn label_key(labels: &Value) -> String {
    let sorted: BTreeMap<&str, &str> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default()))
        .collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The example's inhibitions in a real Alertmanager: every muted alert is muted by the alert
/// the README names, and its near miss (another cluster, another job, another node, another
/// mount, a failover alert, the Watchdog) is not. Receivers point at closed loopback ports.
#[tokio::test]
async fn example_inhibitions_mute_symptoms_and_nothing_else() -> Result<()> {
    let config = read(&repo_root().join(ALERTMANAGER_CONFIG))
        .replace("mail.example.org:587", "127.0.0.1:9")
        .replace(
            "https://heartbeat.example.org/ping/clusterwatch-alertmanager",
            "http://127.0.0.1:9/",
        )
        .replace("/etc/alertmanager/clusterwatch-hook.token", "/dev/null");
    assert!(
        !config.contains("example.org:") && !config.contains("heartbeat.example.org"),
        "the test must not let Alertmanager reach beyond loopback"
    );
    let am = Alertmanager::start(Some(&config)).await?;

    // (name, labels, muted). A node's services may be watched by another node's clusterwatch
    // (instance em2:9469 watching em1's uwsgi): the `nodename` label, not `instance`, says
    // which host they are on.
    let cases: &[InhibitionCase] = &[
        // Causes: they always speak.
        (
            "no primary",
            &[
                ("alertname", "PostgresNoPrimary"),
                ("severity", "critical"),
                ("action", "failover"),
                ("cluster", "db"),
            ],
            false,
        ),
        (
            "no master",
            &[
                ("alertname", "RedisNoMaster"),
                ("severity", "critical"),
                ("action", "failover"),
                ("cluster", "r9001"),
            ],
            false,
        ),
        (
            "quorum lost",
            &[
                ("alertname", "EtcdQuorumLost"),
                ("severity", "critical"),
                ("job", "cw"),
                ("target", "ce"),
            ],
            false,
        ),
        (
            "node down",
            &[
                ("alertname", "ClusterwatchExporterDown"),
                ("severity", "critical"),
                ("job", "cw"),
                ("instance", "em1:9469"),
                ("nodename", "em1"),
            ],
            false,
        ),
        (
            "disk full",
            &[
                ("alertname", "HostFilesystemFull"),
                ("severity", "critical"),
                ("instance", "em2:9469"),
                ("target", "local"),
                ("mountpoint", "/var"),
            ],
            false,
        ),
        (
            "watchdog",
            &[("alertname", "Watchdog"), ("severity", "info")],
            false,
        ),
        // Symptoms of the causes above.
        (
            "pg down in db",
            &[
                ("alertname", "PostgresDown"),
                ("severity", "critical"),
                ("job", "cw"),
                ("instance", "em2:9469"),
                ("target", "em1"),
                ("cluster", "db"),
            ],
            true,
        ),
        (
            "standby not streaming in db",
            &[
                ("alertname", "PostgresStandbyNotStreaming"),
                ("severity", "warning"),
                ("job", "cw"),
                ("instance", "em2:9469"),
                ("target", "em2"),
                ("cluster", "db"),
            ],
            true,
        ),
        (
            "replica link down in r9001",
            &[
                ("alertname", "RedisReplicaLinkDown"),
                ("severity", "warning"),
                ("job", "cw"),
                ("instance", "em2:9469"),
                ("target", "redis2"),
                ("cluster", "r9001"),
            ],
            true,
        ),
        (
            "etcd member down",
            &[
                ("alertname", "EtcdMemberDown"),
                ("severity", "warning"),
                ("job", "cw"),
                ("target", "ce"),
                ("endpoint", "http://m0:2379"),
            ],
            true,
        ),
        (
            "service on the down node",
            &[
                ("alertname", "ProcessMissing"),
                ("severity", "critical"),
                ("job", "cw"),
                ("instance", "em2:9469"),
                ("target", "uwsgi"),
                ("nodename", "em1"),
            ],
            true,
        ),
        (
            "disk warning of the full mount",
            &[
                ("alertname", "HostFilesystemAboveThreshold"),
                ("severity", "warning"),
                ("instance", "em2:9469"),
                ("target", "local"),
                ("mountpoint", "/var"),
            ],
            true,
        ),
        // Near misses.
        (
            "pg down in another cluster",
            &[
                ("alertname", "PostgresDown"),
                ("severity", "critical"),
                ("job", "cw"),
                ("instance", "em2:9469"),
                ("target", "other1"),
                ("cluster", "other"),
            ],
            false,
        ),
        (
            "etcd member down in another job",
            &[
                ("alertname", "EtcdMemberDown"),
                ("severity", "warning"),
                ("job", "cw-staging"),
                ("target", "ce"),
                ("endpoint", "http://m0:2379"),
            ],
            false,
        ),
        (
            "service on another node",
            &[
                ("alertname", "ProcessMissing"),
                ("severity", "critical"),
                ("job", "cw"),
                ("instance", "em1:9469"),
                ("target", "uwsgi"),
                ("nodename", "em2"),
            ],
            false,
        ),
        (
            "failover alert on the down node",
            &[
                ("alertname", "MongodbNoPrimary"),
                ("severity", "critical"),
                ("action", "failover"),
                ("cluster", "rs"),
                ("nodename", "em1"),
            ],
            false,
        ),
        (
            "disk warning of another mount",
            &[
                ("alertname", "HostFilesystemAboveThreshold"),
                ("severity", "warning"),
                ("instance", "em2:9469"),
                ("target", "local"),
                ("mountpoint", "/srv"),
            ],
            false,
        ),
    ];
    let posted: Vec<Value> = cases
        .iter()
        .map(|(_, labels, _)| postable(labels))
        .collect();
    am.post_alerts(&Value::Array(posted)).await?;

    // Alertmanager's inhibitor takes in posted alerts on its own goroutine: until it has seen
    // the sources, the API reports their targets as active. Wait (bounded) until every alert
    // is held and every expected inhibition is in force; what is still wrong after the
    // deadline is reported below, case by case.
    let mut statuses: BTreeMap<String, (bool, Value)> = BTreeMap::new();
    let settled = wait_until(
        WAIT,
        "Alertmanager to hold every posted alert with its inhibitions in force",
        async || {
            let held = am.alerts().await?;
            statuses.clear();
            for alert in held.as_array().into_iter().flatten() {
                let key = label_key(&alert["labels"]);
                let inhibited = alert["status"]["inhibitedBy"]
                    .as_array()
                    .is_some_and(|by| !by.is_empty());
                statuses.insert(key, (inhibited, alert["status"].clone()));
            }
            let muted_in_force = cases
                .iter()
                .filter(|(_, _, muted)| *muted)
                .all(|(_, l, _)| {
                    let key = label_key(&postable(l)["labels"]);
                    statuses.get(&key).is_some_and(|(inhibited, _)| *inhibited)
                });
            Ok(statuses.len() >= cases.len() && muted_in_force)
        },
    )
    .await;
    if let Err(e) = settled {
        eprintln!("{e:#}");
    }

    let mut problems = Vec::new();
    for (name, labels, muted) in cases {
        let key = label_key(&postable(labels)["labels"]);
        match statuses.get(&key) {
            None => problems.push(format!("{name}: not held by Alertmanager")),
            Some((inhibited, status)) if inhibited != muted => problems.push(format!(
                "{name}: expected {}, Alertmanager says {status}",
                if *muted { "inhibited" } else { "not inhibited" }
            )),
            Some(_) => {}
        }
    }
    assert_no_problems("inhibitions", &problems);
    Ok(())
}

// ---- completeness ------------------------------------------------------------------------

#[test]
fn every_alert_has_labels_annotations_and_a_runbook_page() {
    let runbooks = repo_root().join("rules/runbooks");
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for a in alerts() {
        let at = format!("{}:{} {}", a.file, a.line, a.name);
        if !seen.insert(a.name.clone()) {
            problems.push(format!("{at}: the name is used twice in the pack"));
        }
        let camel = a.name.starts_with(|c: char| c.is_ascii_uppercase())
            && a.name.chars().all(|c| c.is_ascii_alphanumeric());
        if !camel {
            problems.push(format!("{at}: not a CamelCase name"));
        }
        match a.labels.get("severity").map(|v| unquote(v)) {
            Some(s) if SEVERITIES.contains(&s) => {}
            Some(s) => problems.push(format!("{at}: severity `{s}` is not one of {SEVERITIES:?}")),
            None => problems.push(format!("{at}: no `severity` label")),
        }
        if let Some(action) = a.labels.get("action").map(|v| unquote(v)) {
            if action != "failover" {
                problems.push(format!("{at}: unknown action `{action}`"));
            }
        }
        for key in ["summary", "description", "runbook_url"] {
            if a.annotations.get(key).is_none_or(|v| v.is_empty()) {
                problems.push(format!("{at}: no `{key}` annotation"));
            }
        }
        if let Some(summary) = a.annotations.get("summary") {
            if summary.contains("{{") {
                problems.push(format!(
                    "{at}: the summary must be one fixed sentence, without templates"
                ));
            }
        }
        let expected_url = format!("{RUNBOOK_PREFIX}{}.md", a.name);
        if let Some(url) = a.annotations.get("runbook_url") {
            if unquote(url) != expected_url {
                problems.push(format!(
                    "{at}: runbook_url is `{url}`, expected `{expected_url}`"
                ));
            }
        }
        let page = runbooks.join(format!("{}.md", a.name));
        match std::fs::read_to_string(&page) {
            Ok(text) if text.starts_with(&format!("# {}\n", a.name)) => {}
            Ok(_) => problems.push(format!(
                "{at}: {} does not start with `# {}`",
                name_of(&page),
                a.name
            )),
            Err(_) => problems.push(format!("{at}: no runbook page {}", name_of(&page))),
        }
    }
    assert_no_problems("alert definitions", &problems);
}

#[test]
fn every_runbook_page_and_readme_row_belongs_to_an_alert() {
    let names: BTreeSet<String> = alerts().into_iter().map(|a| a.name).collect();
    let mut problems = Vec::new();
    for page in files("rules/runbooks", ".md") {
        let stem = page
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if !names.contains(stem) {
            problems.push(format!("{}: no alert of that name", name_of(&page)));
        }
    }
    let readme = read(&repo_root().join("rules/README.md"));
    for name in &names {
        let row = format!("| [{name}](runbooks/{name}.md) |");
        if !readme.lines().any(|l| l.starts_with(&row)) {
            problems.push(format!(
                "rules/README.md: no table row starting with `{row}`"
            ));
        }
    }
    assert_no_problems("runbooks and README", &problems);
}

/// Every alert has a test case that expects it to fire and one that expects it not to (an
/// explicit `exp_alerts: []`).
#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let mut firing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut quiet: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in test_files() {
        let file = name_of(&path);
        for item in items(&read(&path), &["eval_time", "alertname"]) {
            let Some(name) = item.keys.get("alertname").map(|n| unquote(n).to_owned()) else {
                continue;
            };
            let at = format!("{file}:{}", item.line);
            match item.keys.get("exp_alerts").map(String::as_str) {
                Some("[]") => quiet.entry(name).or_default().push(at),
                Some("") if item.has_sequence.contains("exp_alerts") => {
                    firing.entry(name).or_default().push(at)
                }
                // A missing exp_alerts also means "expect none", but say it explicitly.
                _ => {}
            }
        }
    }
    let mut problems = Vec::new();
    for a in alerts() {
        if !firing.contains_key(&a.name) {
            problems.push(format!("{}: no test case expects it to fire", a.name));
        }
        if !quiet.contains_key(&a.name) {
            problems.push(format!(
                "{}: no test case expects it not to fire (`exp_alerts: []`)",
                a.name
            ));
        }
    }
    let names: BTreeSet<String> = alerts().into_iter().map(|a| a.name).collect();
    let mut unknown: BTreeMap<&String, &String> = BTreeMap::new();
    for (name, places) in firing.iter().chain(quiet.iter()) {
        if !names.contains(name) {
            unknown.entry(name).or_insert(&places[0]);
        }
    }
    for (name, place) in unknown {
        problems.push(format!(
            "{place}: tests alert `{name}`, which no rules file defines"
        ));
    }
    assert_no_problems("test coverage", &problems);
}

/// The scanner itself, on the shapes the pack uses.
#[test]
fn scanner_reads_block_style_rules_and_tests() {
    let rules = "groups:\n  - name: g\n    rules:\n      - record: r:x:sum\n        expr: sum(x)\n      - alert: A\n        # why\n        expr: |\n          x > 1\n        for: 5m\n        labels:\n          severity: warning\n        annotations:\n          summary: S.\n          description: >-\n            text {{ $value }}\n          runbook_url: u\n      - alert: B\n        expr: y\n";
    let found = items(rules, &["alert", "record"]);
    assert_eq!(found.len(), 3);
    assert_eq!(found[1].keys["alert"], "A");
    assert_eq!(found[1].line, 6);
    assert_eq!(found[1].children["labels"]["severity"], "warning");
    assert_eq!(found[1].children["annotations"]["description"], ">-");
    assert_eq!(found[1].children["annotations"]["runbook_url"], "u");
    assert!(!found[2].children.contains_key("labels"));

    let tests = "tests:\n  - interval: 1m\n    alert_rule_test:\n      - eval_time: 5m\n        alertname: A\n        exp_alerts: []\n      - eval_time: 6m\n        alertname: A\n        exp_alerts:\n          - exp_labels:\n              severity: warning\n";
    let found = items(tests, &["eval_time", "alertname"]);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].keys["exp_alerts"], "[]");
    assert_eq!(found[1].keys["exp_alerts"], "");
    assert!(found[1].has_sequence.contains("exp_alerts"));
}

// ---- the pack on live servers ------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(90);

/// Alerts of the pack that do not depend on the machine the test runs on (host alerts may
/// legitimately be pending on a busy CI machine).
const MACHINE_INDEPENDENT_ALERTS: &str = "(Postgres|Clusterwatch).*";

/// Every rule's evaluation health as Prometheus reports it: (rule name, health, last error).
async fn rule_health(prom: &Prometheus) -> Result<Vec<(String, String, String)>> {
    let body = reqwest::get(prom.url("/api/v1/rules"))
        .await
        .context("GET /api/v1/rules")?
        .text()
        .await
        .context("reading /api/v1/rules")?;
    let json: Value = serde_json::from_str(&body).context("/api/v1/rules is not JSON")?;
    let mut out = Vec::new();
    for group in json["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let text = |key: &str| rule[key].as_str().unwrap_or_default().to_owned();
            out.push((text("name"), text("health"), text("lastError")));
        }
    }
    Ok(out)
}

/// `alertname{labels} state` for every pending or firing alert.
async fn active_alerts(prom: &Prometheus) -> Result<Vec<String>> {
    let alerts = prom.alerts().await?;
    Ok(alerts
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{} {}",
                a["labels"],
                a["state"].as_str().unwrap_or_default()
            )
        })
        .collect())
}

fn has_alert(alerts: &[String], name: &str, labels: &[(&str, &str)]) -> bool {
    alerts.iter().any(|a| {
        a.contains(&format!("\"alertname\":\"{name}\""))
            && labels
                .iter()
                .all(|(k, v)| a.contains(&format!("\"{k}\":\"{v}\"")))
    })
}

/// The pack over a real primary and streaming standby, scraped and evaluated every second:
/// every rule evaluates without error on the exporter's real label sets, the recording rules
/// see the pair as it is, the idle healthy pair raises no PostgreSQL or clusterwatch alert,
/// not even a pending one; stopping the primary makes PostgresNoPrimary pending (a page, no
/// longer labelled for failover), and starting it again clears it long before `for`.
#[tokio::test]
async fn live_pair_evaluates_every_rule_and_sees_the_primary_go_and_return() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    let config = format!(
        "global:\n  timeout: 3s\npostgres:\n  - {{ name: primary, cluster: db, dsn: '{}', expected_standbys: 1 }}\n  - {{ name: standby, cluster: db, dsn: '{}', expected_standbys: 1 }}\n",
        pair.primary.monitor_dsn(),
        pair.standby.monitor_dsn(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let prom = Prometheus::start(&PrometheusConfig {
        jobs: vec![ScrapeJob::new("clusterwatch", &[&cw.addr()])],
        rule_files: rules_files(),
        ..PrometheusConfig::default()
    })
    .await?;
    prom.wait_for_target_up("clusterwatch", WAIT).await?;

    let healthy = async || -> Result<bool> {
        let q = |promql: &'static str| prom.query_f64(promql);
        Ok(
            q(r#"cluster:clusterwatch_pg_primaries:count{cluster="db"}"#).await? == Some(1.0)
                && q(r#"cluster:clusterwatch_pg_nodes_up:count{cluster="db"}"#).await? == Some(2.0)
                && q(r#"cluster:clusterwatch_pg_standbys_streaming:count{cluster="db"}"#).await?
                    == Some(1.0)
                && q(r#"target:clusterwatch_pg_standbys_streaming:count{target="primary"}"#)
                    .await?
                    == Some(1.0),
        )
    };
    wait_until(
        WAIT,
        "the recording rules to see one primary, two nodes up and one streaming standby",
        healthy,
    )
    .await?;

    wait_until(
        WAIT,
        "every rule to be evaluated without error",
        async || {
            let rules = rule_health(&prom).await?;
            let errors: Vec<String> = rules
                .iter()
                .filter(|(_, health, _)| health == "err")
                .map(|(name, _, error)| format!("{name}: {error}"))
                .collect();
            if !errors.is_empty() {
                bail!("rules failing: {}", errors.join("; "));
            }
            Ok(!rules.is_empty() && rules.iter().all(|(_, health, _)| health == "ok"))
        },
    )
    .await?;

    // Fifteen seconds of evaluations of the healthy, idle pair without a single pending
    // alert (ALERTS keeps the history, so no sleep is needed to look back).
    wait_until(
        WAIT,
        "15 s of evaluations of the idle pair without a PostgreSQL or clusterwatch alert",
        async || {
            let recent = prom
                .query(&format!(
                    "group by (alertname, alertstate, target) (last_over_time(ALERTS{{alertname=~\"{MACHINE_INDEPENDENT_ALERTS}\"}}[15s]))"
                ))
                .await?;
            if recent["result"].as_array().is_some_and(|r| !r.is_empty()) {
                bail!("alerts in the last 15 s: {}", recent["result"]);
            }
            let evaluations = prom
                .query_f64(r#"count_over_time(cluster:clusterwatch_pg_primaries:count{cluster="db"}[15s])"#)
                .await?;
            Ok(evaluations.is_some_and(|n| n >= 12.0))
        },
    )
    .await?;

    pair.primary.stop().await?;
    wait_until(WAIT, "PostgresNoPrimary to be pending", async || {
        let alerts = active_alerts(&prom).await?;
        let seen = has_alert(&alerts, "PostgresNoPrimary", &[("cluster", "db")])
            && !has_alert(&alerts, "PostgresNoPrimary", &[("action", "failover")]);
        if !seen {
            bail!("active alerts: {alerts:?}");
        }
        Ok(true)
    })
    .await?;

    pair.primary.start().await?;
    wait_until(WAIT, "the primary and its standby to be back", healthy).await?;
    wait_until(WAIT, "PostgresNoPrimary to clear", async || {
        let alerts = active_alerts(&prom).await?;
        Ok(!has_alert(&alerts, "PostgresNoPrimary", &[]))
    })
    .await?;
    let fired = prom
        .query(r#"ALERTS{alertname="PostgresNoPrimary", alertstate="firing"}[10m]"#)
        .await?;
    assert_eq!(
        fired["result"].as_array().map(Vec::len),
        Some(0),
        "a restart shorter than `for` must not fire PostgresNoPrimary: {fired}"
    );
    Ok(())
}
