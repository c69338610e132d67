//! What this node's clusterwatch sees now, one line per target: up or down with the reason,
//! the role where there is one, the value that matters and how long it has been so. A pure
//! summary of a scrape's series plus a small tracker of state changes; it scrapes nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::snapshot::SampleBuffer;

/// One series: name, labels, value. Built from a scrape buffer or from exposition text.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Metric name (counters with `_total`).
    pub name: String,
    /// Label pairs.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Series {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every series of a scrape buffer.
pub fn from_buffer(buffer: &SampleBuffer) -> Vec<Series> {
    buffer
        .families()
        .flat_map(|f| {
            f.samples.iter().map(|s| Series {
                name: f.name.clone(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                value: s.value,
            })
        })
        .collect()
}

/// One target as `clusterwatch status` and the landing page show it.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetStatus {
    /// The `collector` label.
    pub collector: String,
    /// The `target` label.
    pub target: String,
    /// The `cluster` label, when set.
    pub cluster: Option<String>,
    /// Whether its last collection succeeded.
    pub up: bool,
    /// Its `active_when` condition does not hold: not collected, pages nobody.
    pub inactive: bool,
    /// Why it is down: the error reason that grew last (or the most frequent one).
    pub reason: Option<String>,
    /// Collected fine, but what it checks fails: a program check's result, a probe's failure
    /// reason, too few processes.
    pub failing: Option<String>,
    /// Its role or state where the collector has one (`primary`, `master`, `production`, ...).
    pub role: Option<String>,
    /// The value that matters for this kind of target, in words.
    pub value: Option<String>,
    /// How long it has been up or down in this role, when a change was seen; `at_least` when
    /// it has been so since the first look.
    pub since: Option<Since>,
    /// Error counts by reason, for the tracker to tell which one grew.
    errors: Vec<(String, f64)>,
}

/// How long a target has been in its state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Since {
    /// Time in the state.
    pub duration: Duration,
    /// The state was already so when first seen: it may be older.
    pub at_least: bool,
}

/// Summarizes a scrape: one line per target (those with a `clusterwatch_target_up` series),
/// in exposition order. Pure: the same series give the same lines.
pub fn summarize(series: &[Series]) -> Vec<TargetStatus> {
    let mut out: Vec<TargetStatus> = Vec::new();
    for up in series.iter().filter(|s| s.name == "clusterwatch_target_up") {
        let (Some(collector), Some(target)) = (up.label("collector"), up.label("target")) else {
            continue;
        };
        let own = |s: &&Series| {
            s.label("target") == Some(target)
                && s.name
                    .strip_prefix("clusterwatch_")
                    .and_then(|n| n.strip_prefix(collector))
                    .is_some_and(|n| n.starts_with('_'))
        };
        let mine: Vec<&Series> = series.iter().filter(own).collect();
        let errors: Vec<(String, f64)> = series
            .iter()
            .filter(|s| {
                s.name == "clusterwatch_target_scrape_errors_total"
                    && s.label("collector") == Some(collector)
                    && s.label("target") == Some(target)
            })
            .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value)))
            .collect();
        let is_up = up.value == 1.0;
        let reason = (!is_up)
            .then(|| {
                errors
                    .iter()
                    .filter(|(_, n)| *n > 0.0)
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(r, _)| r.clone())
            })
            .flatten();
        out.push(TargetStatus {
            collector: collector.to_owned(),
            target: target.to_owned(),
            cluster: up.label("cluster").map(str::to_owned),
            up: is_up,
            inactive: false,
            reason,
            failing: if is_up {
                failing(collector, &mine)
            } else {
                None
            },
            role: if is_up { role(collector, &mine) } else { None },
            value: if is_up { value(collector, &mine) } else { None },
            since: None,
            errors,
        });
    }
    // Targets whose `active_when` does not hold wrote nothing but this; listed so an operator
    // sees them, e.g. the production-only checks on a standby.
    for active in series
        .iter()
        .filter(|s| s.name == "clusterwatch_target_active" && s.value == 0.0)
    {
        let (Some(collector), Some(target)) = (active.label("collector"), active.label("target"))
        else {
            continue;
        };
        out.push(TargetStatus {
            collector: collector.to_owned(),
            target: target.to_owned(),
            cluster: active.label("cluster").map(str::to_owned),
            up: false,
            inactive: true,
            reason: None,
            failing: None,
            role: None,
            value: Some("active_when does not hold".to_owned()),
            since: None,
            errors: Vec::new(),
        });
    }
    out
}

/// The state-set value that is 1: `clusterwatch_<collector>_role{role}` or
/// `clusterwatch_<collector>_state{state}` (MongoDB member state, status file, program).
fn role(collector: &str, mine: &[&Series]) -> Option<String> {
    for (suffix, label) in [("role", "role"), ("state", "state")] {
        let name = format!("clusterwatch_{collector}_{suffix}");
        if let Some(s) = mine.iter().find(|s| s.name == name && s.value == 1.0) {
            return s.label(label).map(str::to_owned);
        }
    }
    None
}

/// What fails in a target that was collected fine, for the kinds that check something.
fn failing(collector: &str, mine: &[&Series]) -> Option<String> {
    let one = |name: &str, label: &str| {
        mine.iter()
            .find(|s| s.name == name && s.value == 1.0)
            .and_then(|s| s.label(label))
            .map(str::to_owned)
    };
    match collector {
        "program" => one("clusterwatch_program_result", "result").filter(|r| r != "ok"),
        "probe" if get(mine, "clusterwatch_probe_success") == Some(0.0) => Some(
            one("clusterwatch_probe_failure_reason", "reason").unwrap_or_else(|| "failed".into()),
        ),
        "process" => {
            let (count, min) = (
                get(mine, "clusterwatch_process_count")?,
                get(mine, "clusterwatch_process_min")?,
            );
            (count < min).then(|| "too few".to_owned())
        }
        _ => None,
    }
}

fn get(mine: &[&Series], name: &str) -> Option<f64> {
    mine.iter().find(|s| s.name == name).map(|s| s.value)
}

fn sum(mine: &[&Series], name: &str) -> Option<f64> {
    let values: Vec<f64> = mine
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn secs(v: f64) -> String {
    if v.is_finite() && v >= 0.0 {
        human(Duration::from_secs_f64(v.round()))
    } else {
        format!("{v}")
    }
}

/// A duration the way an operator says it: `3d 4h`, `12m 5s`, `40s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

/// The value that matters for a kind of target, read from its own series.
fn value(collector: &str, mine: &[&Series]) -> Option<String> {
    let n = |name: &str| get(mine, &format!("clusterwatch_{collector}_{name}"));
    match collector {
        "fs" => {
            let worst = mine
                .iter()
                .filter(|s| s.name == "clusterwatch_fs_used_ratio")
                .max_by(|a, b| a.value.total_cmp(&b.value))?;
            let failing = |reason: &str| {
                mine.iter()
                    .filter(|s| {
                        s.name == "clusterwatch_fs_stat_failure"
                            && s.value == 1.0
                            && s.label("reason") == Some(reason)
                    })
                    .count()
            };
            let mut v = format!(
                "fullest {} at {:.0}%",
                worst.label("mountpoint").unwrap_or("?"),
                worst.value * 100.0
            );
            let (missing, stuck) = (failing("not_found"), failing("timeout") + failing("error"));
            if missing > 0 {
                let _ = write!(v, ", {missing} configured path(s) not found");
            }
            if stuck > 0 {
                let _ = write!(v, ", {stuck} mount(s) failing");
            }
            Some(v)
        }
        "pg" => n("replay_lag_seconds")
            .map(|v| format!("replay lag {}", secs(v)))
            .or_else(|| n("walsenders").map(|v| format!("{v} WAL sender(s)"))),
        "redis" => match n("master_link_up") {
            Some(up) => Some(format!(
                "master link {}",
                if up == 1.0 { "up" } else { "down" }
            )),
            None => n("connected_replicas").map(|v| format!("{v} replica(s)")),
        },
        "mongo" => n("primary_present").map(|v| {
            if v == 1.0 {
                "sees a primary".to_owned()
            } else {
                "sees no primary".to_owned()
            }
        }),
        "probe" => {
            let failures = n("consecutive_failures")?;
            if failures > 0.0 {
                let why = mine
                    .iter()
                    .find(|s| s.name == "clusterwatch_probe_failure_reason" && s.value == 1.0)
                    .and_then(|s| s.label("reason"))
                    .unwrap_or("failed");
                Some(format!("{why}, {failures} failure(s) in a row"))
            } else {
                n("duration_seconds").map(|d| format!("ok in {:.0} ms", d * 1000.0))
            }
        }
        "program" => {
            let result = mine
                .iter()
                .find(|s| s.name == "clusterwatch_program_result" && s.value == 1.0)
                .and_then(|s| s.label("result"));
            let age = n("result_age_seconds").map(secs);
            match (result, n("value")) {
                (Some(r), Some(v)) => Some(format!("{r}, value {v}, {} ago", age?)),
                (Some(r), None) => Some(format!("{r}, {} ago", age?)),
                (None, _) => Some("first run pending".to_owned()),
            }
        }
        "log" => {
            let matches = sum(mine, "clusterwatch_log_matches_total")?;
            Some(format!("{matches} matching line(s) since start"))
        }
        "process" => Some(format!(
            "{} running (min {})",
            n("count")?,
            n("min").unwrap_or(1.0)
        )),
        "file" => {
            if n("present")? == 1.0 {
                n("modified_age_seconds").map(|a| format!("modified {} ago", secs(a)))
            } else {
                Some("missing".to_owned())
            }
        }
        "dir" => n("files").map(|f| format!("{f} file(s)")),
        "supervisord" => {
            let running = mine
                .iter()
                .filter(|s| {
                    s.name == "clusterwatch_supervisord_program_state"
                        && s.label("state") == Some("RUNNING")
                })
                .collect::<Vec<_>>();
            let up = running.iter().filter(|s| s.value == 1.0).count();
            Some(format!("{up}/{} program(s) running", running.len()))
        }
        "system" => n("load1").map(|l| format!("load {l:.2}")),
        "textfile" => {
            let bad = sum(mine, "clusterwatch_textfile_file_error")?;
            Some(format!("{bad} file(s) rejected"))
        }
        _ => None,
    }
}

/// What the tracker remembers of a target: the state it was in, since when, whether that
/// start was seen, and the error counts of the last look.
struct Seen {
    state: ((bool, bool), Option<String>, Option<String>),
    since: SystemTime,
    change_seen: bool,
    errors: Vec<(String, f64)>,
}

/// Remembers when each target entered its state, across scrapes.
#[derive(Default)]
pub struct Tracker {
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl Tracker {
    /// Fills `since` (and, for a down target, the reason whose count grew since the last
    /// look) from what earlier looks saw, and remembers this one.
    pub fn observe(&self, lines: &mut [TargetStatus], now: SystemTime) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|k, _| {
            lines
                .iter()
                .any(|l| (&l.collector, &l.target) == (&k.0, &k.1))
        });
        for line in lines.iter_mut() {
            let key = (line.collector.clone(), line.target.clone());
            let state = (
                (line.up, line.inactive),
                line.role.clone(),
                line.failing.clone(),
            );
            let entry = seen.entry(key).or_insert_with(|| Seen {
                state: state.clone(),
                since: now,
                change_seen: false,
                errors: line.errors.clone(),
            });
            if !line.up {
                let grew = line
                    .errors
                    .iter()
                    .filter(|(r, n)| entry.errors.iter().any(|(pr, pn)| pr == r && n > pn))
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                if let Some((r, _)) = grew {
                    line.reason = Some(r.clone());
                }
            }
            if entry.state != state {
                entry.state = state;
                entry.since = now;
                entry.change_seen = true;
            }
            entry.errors = line.errors.clone();
            line.since = Some(Since {
                duration: now.duration_since(entry.since).unwrap_or_default(),
                at_least: !entry.change_seen,
            });
        }
    }
}

/// The tracker of this process, fed by every `/metrics` scrape and read by the landing page.
pub fn tracker() -> &'static Tracker {
    static TRACKER: OnceLock<Tracker> = OnceLock::new();
    TRACKER.get_or_init(Tracker::default)
}

/// Summarizes a finished scrape and records it in this process's tracker.
pub fn observe(buffer: &SampleBuffer) -> Vec<TargetStatus> {
    let mut lines = summarize(&from_buffer(buffer));
    tracker().observe(&mut lines, SystemTime::now());
    lines
}

fn state_word(l: &TargetStatus) -> String {
    if l.inactive {
        return "inactive".to_owned();
    }
    match (&l.up, &l.reason) {
        (true, _) => match &l.failing {
            Some(why) => format!("failing ({why})"),
            None => "up".to_owned(),
        },
        (false, Some(r)) => format!("down ({r})"),
        (false, None) => "down".to_owned(),
    }
}

fn since_word(s: Option<Since>) -> String {
    match s {
        Some(Since {
            duration,
            at_least: false,
        }) => human(duration),
        Some(Since {
            duration,
            at_least: true,
        }) => format!("≥ {}", human(duration)),
        None => "-".to_owned(),
    }
}

/// The header of the table, shared by the text and HTML forms.
const COLUMNS: [&str; 7] = [
    "collector",
    "target",
    "cluster",
    "state",
    "role",
    "value",
    "for",
];

fn cells(l: &TargetStatus) -> [String; 7] {
    [
        l.collector.clone(),
        l.target.clone(),
        l.cluster.clone().unwrap_or_else(|| "-".into()),
        state_word(l),
        l.role.clone().unwrap_or_else(|| "-".into()),
        l.value.clone().unwrap_or_else(|| "-".into()),
        since_word(l.since),
    ]
}

/// The table as aligned plain text, then the hook runner's last decisions (if any).
pub fn render_text(lines: &[TargetStatus], decisions: Option<&[String]>) -> String {
    let rows: Vec<[String; 7]> = lines.iter().map(cells).collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let pad = w - c.chars().count();
                let _ = write!(l, "{c}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&COLUMNS.map(str::to_owned));
    for r in &rows {
        line(r);
    }
    if let Some(d) = decisions {
        out.push_str("\nhook runner, last decisions:\n");
        if d.is_empty() {
            out.push_str("  (none yet)\n");
        }
        for l in d {
            let _ = writeln!(out, "  {l}");
        }
    }
    out
}

/// `s` safe inside HTML text and attribute values.
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The table as plain HTML (no scripts, no styles beyond a class per state), then the hook
/// runner's last decisions (if any).
pub fn render_html(lines: &[TargetStatus], decisions: Option<&[String]>) -> String {
    let mut out = String::from("<table class=\"status\">\n<tr>");
    for c in COLUMNS {
        let _ = write!(out, "<th>{c}</th>");
    }
    out.push_str("</tr>\n");
    for l in lines {
        let class = match (l.inactive, l.up, &l.failing) {
            (true, _, _) => "inactive",
            (false, true, None) => "up",
            (false, true, Some(_)) => "failing",
            (false, false, _) => "down",
        };
        let _ = write!(out, "<tr class=\"{class}\">");
        for c in cells(l) {
            let _ = write!(out, "<td>{}</td>", escape_html(&c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    if let Some(d) = decisions {
        out.push_str("<h2>Hook runner, last decisions</h2>\n<pre>");
        if d.is_empty() {
            out.push_str("(none yet)");
        }
        for l in d {
            let _ = writeln!(out, "{}", escape_html(l));
        }
        out.push_str("</pre>\n");
    }
    out
}

/// How many journal records the status shows.
pub const DECISIONS: usize = 10;

/// The hook runner's last decisions from its journal in `state_dir`, one line each, oldest
/// first; a journal that cannot be read is one line saying so.
pub fn last_decisions(state_dir: &std::path::Path) -> Vec<String> {
    match crate::hooks::journal::read(state_dir) {
        Ok(records) => records
            .iter()
            .skip(records.len().saturating_sub(DECISIONS))
            .map(crate::hooks::journal::render)
            .collect(),
        Err(e) => vec![format!(
            "cannot read the journal in {}: {e}",
            state_dir.display()
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn scrape(redis_timeouts: f64, redis_connects: f64, pg_role: &str) -> Vec<Series> {
        let up = |c: &str, t: &str, v: f64| {
            s(
                "clusterwatch_target_up",
                &[("collector", c), ("target", t), ("cluster", "sre-db")],
                v,
            )
        };
        let err = |c: &str, t: &str, r: &str, v: f64| {
            s(
                "clusterwatch_target_scrape_errors_total",
                &[("collector", c), ("target", t), ("reason", r)],
                v,
            )
        };
        vec![
            up("pg", "em1", 1.0),
            up("redis", "redis1-9001", 0.0),
            up("fs", "local", 1.0),
            s(
                "clusterwatch_pg_role",
                &[("target", "em1"), ("role", "primary")],
                f64::from(pg_role == "primary"),
            ),
            s(
                "clusterwatch_pg_role",
                &[("target", "em1"), ("role", "standby")],
                f64::from(pg_role == "standby"),
            ),
            s(
                "clusterwatch_pg_replay_lag_seconds",
                &[("target", "em1")],
                3.0,
            ),
            // Another target's series never leak into em1's line.
            s(
                "clusterwatch_pg_role",
                &[("target", "em2"), ("role", "standby")],
                1.0,
            ),
            err("redis", "redis1-9001", "timeout", redis_timeouts),
            err("redis", "redis1-9001", "connect", redis_connects),
            s(
                "clusterwatch_fs_used_ratio",
                &[("target", "local"), ("mountpoint", "/")],
                0.42,
            ),
            s(
                "clusterwatch_fs_used_ratio",
                &[("target", "local"), ("mountpoint", "/var/log")],
                0.91,
            ),
            up("program", "sync", 1.0),
            s(
                "clusterwatch_program_result",
                &[("target", "sync"), ("result", "ok")],
                0.0,
            ),
            s(
                "clusterwatch_program_result",
                &[("target", "sync"), ("result", "timeout")],
                1.0,
            ),
            s(
                "clusterwatch_program_result_age_seconds",
                &[("target", "sync")],
                75.0,
            ),
        ]
    }

    #[test]
    fn one_line_per_target_with_role_value_and_reason() {
        let lines = summarize(&scrape(5.0, 1.0, "standby"));
        let text = render_text(&lines, None);
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[3].failing.as_deref(), Some("timeout"));
        assert_eq!(lines[3].value.as_deref(), Some("timeout, 1m 15s ago"));
        assert!(text.contains("failing (timeout)"), "{text}");
        assert_eq!(lines[0].role.as_deref(), Some("standby"));
        assert_eq!(lines[0].value.as_deref(), Some("replay lag 3s"));
        assert!(!lines[1].up);
        assert_eq!(
            lines[1].reason.as_deref(),
            Some("timeout"),
            "the most frequent"
        );
        assert_eq!(
            lines[1].value, None,
            "nothing is claimed of a target that is down"
        );
        assert_eq!(lines[2].value.as_deref(), Some("fullest /var/log at 91%"));
        let rows: Vec<&str> = text.lines().collect();
        assert!(
            rows[0].starts_with("collector  target       cluster"),
            "{text}"
        );
        assert!(rows[2].contains("down (timeout)"), "{text}");
    }

    #[test]
    fn a_target_whose_condition_does_not_hold_is_listed_inactive_not_down() {
        let mut series = scrape(0.0, 0.0, "standby");
        series.push(s(
            "clusterwatch_target_active",
            &[("collector", "probe"), ("target", "web-if-master")],
            0.0,
        ));
        series.push(s(
            "clusterwatch_target_active",
            &[("collector", "probe"), ("target", "active-one")],
            1.0,
        ));
        let lines = summarize(&series);
        let inactive: Vec<&TargetStatus> = lines.iter().filter(|l| l.inactive).collect();
        assert_eq!(inactive.len(), 1);
        assert_eq!(inactive[0].target, "web-if-master");
        let text = render_text(&lines, None);
        let row = text.lines().find(|l| l.contains("web-if-master")).unwrap();
        assert!(row.contains("inactive") && !row.contains("down"), "{text}");
        assert!(render_html(&lines, None).contains("<tr class=\"inactive\">"));
    }

    #[test]
    fn the_tracker_says_how_long_and_which_reason_grew() {
        let t = Tracker::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut first = summarize(&scrape(5.0, 1.0, "standby"));
        t.observe(&mut first, t0);
        assert_eq!(
            first[0].since,
            Some(Since {
                duration: Duration::ZERO,
                at_least: true
            })
        );
        // 90 s later em1 was promoted and redis now fails to connect.
        let mut later = summarize(&scrape(5.0, 2.0, "primary"));
        t.observe(&mut later, t0 + Duration::from_secs(90));
        assert_eq!(later[1].reason.as_deref(), Some("connect"));
        assert_eq!(
            later[1].since,
            Some(Since {
                duration: Duration::from_secs(90),
                at_least: true
            })
        );
        let mut then = summarize(&scrape(5.0, 2.0, "primary"));
        t.observe(&mut then, t0 + Duration::from_secs(150));
        assert_eq!(
            then[0].since,
            Some(Since {
                duration: Duration::from_secs(60),
                at_least: false
            })
        );
        let text = render_text(&then, Some(&[]));
        assert!(
            text.contains("primary") && text.contains(" 1m 0s"),
            "{text}"
        );
        assert!(text.contains("≥ 2m 30s"), "{text}");
        assert!(
            text.ends_with("hook runner, last decisions:\n  (none yet)\n"),
            "{text}"
        );
        let html = render_html(&then, None);
        assert!(html.contains("<tr class=\"down\"><td>redis</td>"), "{html}");
        assert!(!html.contains("<script"));
    }

    #[test]
    fn a_primary_shows_its_wal_senders() {
        let lines = summarize(&[
            s(
                "clusterwatch_target_up",
                &[("collector", "pg"), ("target", "em1")],
                1.0,
            ),
            s(
                "clusterwatch_pg_role",
                &[("target", "em1"), ("role", "primary")],
                1.0,
            ),
            s("clusterwatch_pg_walsenders", &[("target", "em1")], 2.0),
        ]);
        assert_eq!(lines[0].role.as_deref(), Some("primary"));
        assert_eq!(lines[0].value.as_deref(), Some("2 WAL sender(s)"));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3h 2m");
        assert_eq!(human(Duration::from_secs(2 * 86400 + 3600)), "2d 1h");
    }
}
