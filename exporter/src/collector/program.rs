//! Program checks: a command run (argv, clean environment, process-group timeout) at most once
//! per its own interval, its exit code, duration and output judged as a state-set, a regular
//! expression or a number. Scrapes read the cached result; they never run a command twice at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::collector::file::{check_states, state_of};
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{
    compile_regex, find_on_path, is_executable, HumanDuration, Located, Problem, SectionContext,
    TargetId,
};
use crate::hooks::env::HOOK_PATH;
use crate::hooks::runner::{self, Exit, Spec};
use crate::snapshot::SampleBuffer;

/// The `program` collector, configured by the `programs:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "program",
    section: "programs",
    always_on: false,
    configure,
};

/// How often a check runs unless it sets `interval`.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// How long a run may take unless the check sets `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between SIGTERM and SIGKILL to the process group of a run past its timeout.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Checks running at the same time, across every program target: a slow `nodetool` must not
/// let a scrape storm fork dozens of JVMs.
pub const MAX_CONCURRENT: usize = 4;

/// Every value of the `result` label, in exposition order.
pub const RESULTS: &[&str] = &[
    "ok",
    "exit_nonzero",
    "timeout",
    "signal",
    "not_started",
    "output_mismatch",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    name: String,
    cluster: Option<String>,
    command: Vec<String>,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    states: Option<Vec<String>>,
    #[serde(rename = "match")]
    matches: Option<String>,
    value: Option<RawValue>,
}

/// `value: true` (the first number in the output) or `value: REGEX` (its first group).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    First(bool),
    Pattern(String),
}

/// The number anywhere in the output, for `value: true`.
const FIRST_NUMBER: &str = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?";

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawProgram>(problems) {
        let before = problems.len();
        // `timeout` is the command's; the scrape itself keeps the global deadline and reads
        // the cached result when a run takes longer.
        let id = TargetId::check(raw.name, raw.cluster, None, &item, problems);
        let interval = raw.interval.map_or(DEFAULT_INTERVAL, |d| d.0);
        let timeout = raw.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if interval.is_zero() {
            problems.push(item.problem("interval", "interval must be greater than zero"));
        }
        if timeout.is_zero() {
            problems.push(item.problem("timeout", "timeout must be greater than zero"));
        }
        for name in raw.env.keys() {
            if !crate::config::is_identifier(name) {
                problems.push(
                    item.problem("env", format!("`{name}` is not a variable name"))
                        .hint("letters, digits and `_`, not starting with a digit"),
                );
            }
        }
        let path = raw.env.get("PATH").map_or(HOOK_PATH, String::as_str);
        let argv = resolve_command(raw.command, path, &item, ctx, problems);
        let judge = judge(raw.states, raw.matches, raw.value, &item, problems);
        if problems.len() > before {
            continue;
        }
        let mut env: Vec<(String, String)> = raw.env.into_iter().collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), HOOK_PATH.into()));
        }
        let (tx, _) = watch::channel(None);
        let check = Arc::new(Check {
            name: id.name.clone(),
            argv,
            env,
            interval,
            timeout,
            judge,
            created: Instant::now(),
            last: tx,
            running: Mutex::new(false),
        });
        out.push(Target::new(&KIND, id, ProgramCollector { check }));
    }
    out
}

/// The program of `command`: a path with a `/` is taken relative to the configuration's
/// directory, a bare name is looked up on the PATH the check runs with — now, so a typo is
/// a `check-config` problem rather than a failing check at 3 a.m.
fn resolve_command(
    mut argv: Vec<String>,
    path: &str,
    at: &Located,
    ctx: &SectionContext,
    problems: &mut Vec<Problem>,
) -> Vec<String> {
    let Some(program) = argv.first_mut() else {
        problems.push(
            at.problem("command", "the command is empty")
                .hint("write the program and its arguments as a list: [nodetool, status]"),
        );
        return argv;
    };
    let found = if program.contains('/') {
        let p = ctx.resolve(Path::new(program.as_str()));
        if is_executable(&p) {
            Ok(p)
        } else {
            Err(at
                .problem(
                    "command",
                    format!("{} is not an executable file", p.display()),
                )
                .hint("check the path and its permissions (`chmod +x`)"))
        }
    } else {
        find_on_path(program, path).ok_or_else(|| {
            at.problem(
                "command",
                format!("`{program}` is not found on PATH ({path})"),
            )
            .hint("give the program's full path, or set `env: { PATH: ... }`")
        })
    };
    match found {
        Ok(p) => *program = p.display().to_string(),
        Err(problem) => problems.push(problem),
    }
    argv
}

/// How the output of a run is judged.
#[derive(Debug, Default)]
struct Judge {
    /// Declared states; the first output line equal to one (trimmed, ASCII case ignored) is it.
    states: Vec<String>,
    /// The output must match this for the check to succeed.
    matches: Option<Regex>,
    /// The number the check reports: the first group of this pattern, or its whole match.
    value: Option<Regex>,
}

fn judge(
    states: Option<Vec<String>>,
    matches: Option<String>,
    value: Option<RawValue>,
    at: &Located,
    problems: &mut Vec<Problem>,
) -> Judge {
    let states = states.unwrap_or_default();
    check_states(&states, at, problems);
    let matches = matches.and_then(|p| compile_regex(&p, at, "match", problems));
    let value = match value {
        None | Some(RawValue::First(false)) => None,
        Some(RawValue::First(true)) => Some(Regex::new(FIRST_NUMBER).expect("pattern compiles")),
        Some(RawValue::Pattern(p)) => compile_regex(&p, at, "value", problems),
    };
    Judge {
        states,
        matches,
        value,
    }
}

/// What one run gave.
#[derive(Clone, Debug, PartialEq)]
struct RunResult {
    /// One of [`RESULTS`].
    result: &'static str,
    /// The exit code; `None` when the program did not exit by itself.
    exit_code: Option<i32>,
    duration: Duration,
    started_at: SystemTime,
    /// When it started, on the monotonic clock that decides the next run.
    started: Instant,
    state: Option<String>,
    matched: Option<bool>,
    value: Option<f64>,
}

impl Judge {
    /// Judges a finished run; the result is `ok` only when it exited 0 and the output says
    /// what the configuration asks for (a declared state, a match, a number).
    fn judge(
        &self,
        exit: &Exit,
        stdout: &str,
    ) -> (&'static str, Option<String>, Option<bool>, Option<f64>) {
        let state = (!self.states.is_empty())
            .then(|| {
                stdout
                    .lines()
                    .find_map(|line| state_of(line, &self.states))
                    .map(str::to_owned)
            })
            .flatten();
        let matched = self.matches.as_ref().map(|re| re.is_match(stdout));
        let value = self.value.as_ref().and_then(|re| {
            let caps = re.captures(stdout)?;
            let text = caps.get(1).or_else(|| caps.get(0))?.as_str();
            text.trim().parse::<f64>().ok()
        });
        let result = match exit {
            Exit::Code(0) => {
                let output_ok = (self.states.is_empty() || state.is_some())
                    && matched != Some(false)
                    && (self.value.is_none() || value.is_some());
                if output_ok {
                    "ok"
                } else {
                    "output_mismatch"
                }
            }
            Exit::Code(_) => "exit_nonzero",
            Exit::Signal(_) => "signal",
            Exit::Timeout => "timeout",
            Exit::SpawnFailed(_) => "not_started",
        };
        (result, state, matched, value)
    }
}

/// The slots shared by every program target of the process.
fn slots() -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(Semaphore::new(MAX_CONCURRENT)))
        .clone()
}

/// One configured program check.
pub struct ProgramCollector {
    check: Arc<Check>,
}

/// What a run needs and leaves behind, shared with the run's own task.
struct Check {
    /// The target name, for logs.
    name: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    interval: Duration,
    timeout: Duration,
    judge: Judge,
    /// When the target was built: the age of "no result yet".
    created: Instant,
    /// The last finished run; a new value wakes scrapes waiting for a run.
    last: watch::Sender<Option<Arc<RunResult>>>,
    /// Whether a run is in flight (started, or waiting for a slot).
    running: Mutex<bool>,
}

impl Check {
    /// Starts a run in the background when none is in flight and the last one began an
    /// interval ago or more. The run is its own task: a scrape that stops waiting (its
    /// deadline passed) does not stop the run, which stores its result for the next scrape.
    fn start_if_due(self: &Arc<Self>) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if *running {
            return true;
        }
        let due = self
            .last
            .borrow()
            .as_ref()
            .is_none_or(|r| r.started.elapsed() >= self.interval);
        if !due {
            return false;
        }
        *running = true;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let result = me.run_once().await;
            *me.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
            me.last.send_replace(Some(Arc::new(result)));
        });
        true
    }

    async fn run_once(&self) -> RunResult {
        let _slot = slots().acquire_owned().await;
        let started = Instant::now();
        let started_at = SystemTime::now();
        let outcome = runner::run(Spec {
            argv: &self.argv,
            env: self.env.clone(),
            stdin: Arc::new(Vec::new()),
            timeout: self.timeout,
            grace: KILL_GRACE,
        })
        .await;
        let (result, state, matched, value) = self.judge.judge(&outcome.exit, &outcome.stdout_tail);
        let previous = self.last.borrow().as_ref().map(|r| r.result);
        if result != "ok" && previous != Some(result) {
            tracing::warn!(target = %self.name, result, exit = %outcome.exit, "program check failed");
        }
        // Output may hold what an operator would not put in a log line at info level.
        tracing::debug!(target = %self.name, result, exit = %outcome.exit, stderr = %outcome.stderr_tail.trim(), "program check ran");
        RunResult {
            result,
            exit_code: match outcome.exit {
                Exit::Code(c) => Some(c),
                _ => None,
            },
            duration: outcome.duration,
            started_at,
            started,
            state,
            matched,
            value,
        }
    }

    fn write(&self, last: Option<&RunResult>, running: bool, out: &mut SampleBuffer) {
        out.gauge(
            "clusterwatch_program_interval_seconds",
            "The configured interval between runs of the program check.",
            &[],
            self.interval.as_secs_f64(),
        );
        out.gauge(
            "clusterwatch_program_timeout_seconds",
            "The configured timeout of one run; past it the process group is killed.",
            &[],
            self.timeout.as_secs_f64(),
        );
        out.gauge(
            "clusterwatch_program_running",
            "1 while a run of the program check is in flight (started or waiting for a slot).",
            &[],
            if running { 1.0 } else { 0.0 },
        );
        let age = last.map_or(self.created.elapsed(), |r| r.started.elapsed());
        out.gauge(
            "clusterwatch_program_result_age_seconds",
            "Seconds since the run the exported result comes from started (since clusterwatch started, before a first result).",
            &[],
            age.as_secs_f64(),
        );
        let Some(r) = last else {
            return;
        };
        out.gauge(
            "clusterwatch_program_success",
            "1 when the last run exited 0 within its timeout and its output was as configured (a declared state, a match, a number).",
            &[],
            if r.result == "ok" { 1.0 } else { 0.0 },
        );
        out.state_set(
            "clusterwatch_program_result",
            "How the last run ended (ok, exit_nonzero, timeout, signal, not_started, output_mismatch).",
            &[],
            "result",
            RESULTS,
            Some(r.result),
        );
        out.gauge(
            "clusterwatch_program_exit_code",
            "Exit code of the last run; -1 when it did not exit by itself (timeout, signal, not started).",
            &[],
            r.exit_code.map_or(-1.0, f64::from),
        );
        out.gauge(
            "clusterwatch_program_duration_seconds",
            "How long the last run took.",
            &[],
            r.duration.as_secs_f64(),
        );
        out.gauge(
            "clusterwatch_program_last_run_timestamp_seconds",
            "Unix time the last run started.",
            &[],
            r.started_at
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        if !self.judge.states.is_empty() {
            let states: Vec<&str> = self.judge.states.iter().map(String::as_str).collect();
            out.state_set(
                "clusterwatch_program_state",
                "With `states:`: the state the last run's output named, as a state-set (all 0 when none).",
                &[],
                "state",
                &states,
                r.state.as_deref(),
            );
        }
        if let Some(m) = r.matched {
            out.gauge(
                "clusterwatch_program_output_matches",
                "With `match:`: 1 when the last run's output matched the regular expression.",
                &[],
                if m { 1.0 } else { 0.0 },
            );
        }
        if let Some(v) = r.value {
            out.gauge(
                "clusterwatch_program_value",
                "With `value:`: the number read from the last run's output (absent when none was found).",
                &[],
                v,
            );
        }
    }
}

#[async_trait]
impl Collector for ProgramCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let check = &self.check;
        let mut rx = check.last.subscribe();
        if check.start_if_due() {
            // Wait for the run while the scrape can, leaving a margin so the target is not
            // reported down when a run outlasts the scrape: the previous result is served.
            let now = Instant::now();
            let margin = ((ctx.deadline.saturating_duration_since(now)) / 10)
                .min(Duration::from_millis(250));
            let _ = tokio::time::timeout_at(ctx.deadline - margin, rx.changed()).await;
        }
        let running = *check.running.lock().unwrap_or_else(|p| p.into_inner());
        let last = rx.borrow().clone();
        check.write(last.as_deref(), running, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(yaml: &str, dir: &Path) -> Vec<Arc<Target>> {
        crate::configuration::parse(yaml, "c.yml", dir)
            .unwrap_or_else(|e| panic!("{}", e.render()))
            .targets
            .into_iter()
            .filter(|t| t.name() == "program")
            .collect()
    }

    async fn scrape(t: &Target, within_ms: u64) -> SampleBuffer {
        let ctx = ScrapeContext {
            deadline: Instant::now() + Duration::from_millis(within_ms),
        };
        let mut out = SampleBuffer::new();
        t.collect(&ctx, &mut out).await.unwrap();
        out
    }

    fn one(b: &SampleBuffer, name: &str) -> Option<f64> {
        b.get(name).map(|f| f.samples[0].value)
    }

    fn set(b: &SampleBuffer, name: &str) -> Vec<String> {
        b.get(name)
            .map(|f| {
                f.samples
                    .iter()
                    .filter(|s| s.value == 1.0)
                    .map(|s| s.labels.last().unwrap().1.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn commands_are_resolved_on_path_when_the_configuration_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = targets(
            "programs:\n  - { name: a, command: [sh, -c, 'true'] }\n",
            dir.path(),
        );
        assert_eq!(t.len(), 1);
        let err = crate::configuration::parse(
            "programs:\n  - { name: a, command: [nodetool-nope, status] }\n  - { name: b, command: [./missing] }\n  - { name: c, command: [sh], env: { 1X: v }, states: [up, UP], match: '(' }\n  - { name: d, command: [], interval: 0s }\n",
            "c.yml",
            dir.path(),
        )
        .unwrap_err()
        .render();
        assert!(
            err.contains("c.yml:2:") && err.contains("`nodetool-nope` is not found on PATH"),
            "{err}"
        );
        assert!(
            err.contains("c.yml:3:") && err.contains("missing is not an executable file"),
            "{err}"
        );
        for want in [
            "`1X` is not a variable name",
            "state `UP` is listed twice",
            "invalid regular expression",
            "the command is empty",
            "interval must be greater than zero",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        // A PATH of the check's own is where a bare name is looked for.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = bin.join("rapidpro-status");
        std::fs::write(&script, "#!/bin/sh\necho running\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let yaml = format!(
            "programs:\n  - {{ name: a, command: [rapidpro-status], env: {{ PATH: '{}' }} }}\n",
            bin.display()
        );
        assert_eq!(targets(&yaml, dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn output_is_judged_as_states_a_match_and_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let t = targets(
            "programs:\n  - name: cluster-state\n    command: [sh, -c, 'echo header; echo \"  Production \"; echo \"version: 42.5 rows\"']\n    states: [standby, production]\n    match: 'version: [0-9]+'\n    value: 'version: ([0-9.]+)'\n  - name: psql\n    command: [sh, -c, 'echo 17']\n    value: true\n  - name: unknown-state\n    command: [sh, -c, 'echo maintenance']\n    states: [standby, production]\n",
            dir.path(),
        );
        let b = scrape(t[0].as_ref(), 5000).await;
        assert_eq!(one(&b, "clusterwatch_program_success"), Some(1.0));
        assert_eq!(set(&b, "clusterwatch_program_state"), ["production"]);
        assert_eq!(
            b.get("clusterwatch_program_state").unwrap().samples.len(),
            2
        );
        assert_eq!(one(&b, "clusterwatch_program_output_matches"), Some(1.0));
        assert_eq!(one(&b, "clusterwatch_program_value"), Some(42.5));
        assert_eq!(one(&b, "clusterwatch_program_exit_code"), Some(0.0));
        assert_eq!(set(&b, "clusterwatch_program_result"), ["ok"]);

        let b = scrape(t[1].as_ref(), 5000).await;
        assert_eq!(one(&b, "clusterwatch_program_value"), Some(17.0));

        let b = scrape(t[2].as_ref(), 5000).await;
        assert_eq!(one(&b, "clusterwatch_program_success"), Some(0.0));
        assert_eq!(set(&b, "clusterwatch_program_result"), ["output_mismatch"]);
        assert!(set(&b, "clusterwatch_program_state").is_empty());
    }

    #[tokio::test]
    async fn exit_codes_and_a_clean_environment() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            std::env::var_os("HOME").is_some(),
            "the test needs a HOME to leave out"
        );
        let t = targets(
            "programs:\n  - { name: fails, command: [sh, -c, 'echo oops >&2; exit 3'] }\n  - name: env\n    command: [sh, -c, 'test -z \"$HOME$USER\" && test \"$PGPASSFILE\" = /etc/pass && env']\n    env: { PGPASSFILE: /etc/pass }\n    match: '(?m)^PATH=/usr/local/sbin:'\n",
            dir.path(),
        );
        let b = scrape(t[0].as_ref(), 5000).await;
        assert_eq!(one(&b, "clusterwatch_program_success"), Some(0.0));
        assert_eq!(one(&b, "clusterwatch_program_exit_code"), Some(3.0));
        assert_eq!(set(&b, "clusterwatch_program_result"), ["exit_nonzero"]);

        let b = scrape(t[1].as_ref(), 5000).await;
        assert_eq!(set(&b, "clusterwatch_program_result"), ["ok"]);
    }

    #[tokio::test]
    async fn a_run_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let yaml = format!(
            "programs:\n  - {{ name: hang, timeout: 300ms, command: [sh, -c, 'sleep 60 & echo $! > {}; wait'] }}\n",
            pid_file.display()
        );
        let t = targets(&yaml, dir.path());
        let b = scrape(t[0].as_ref(), 5000).await;
        assert_eq!(set(&b, "clusterwatch_program_result"), ["timeout"]);
        assert_eq!(one(&b, "clusterwatch_program_exit_code"), Some(-1.0));
        let d = one(&b, "clusterwatch_program_duration_seconds").unwrap();
        assert!((0.3..3.0).contains(&d), "{d}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if let Err(stat) = crate::test_support::wait_gone(pid) {
            panic!("the child survived: {stat}");
        }
    }

    #[tokio::test]
    async fn the_result_is_cached_for_the_interval_and_a_slow_run_does_not_hold_the_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let yaml = format!(
            "programs:\n  - {{ name: counted, interval: 1h, command: [sh, -c, 'echo x >> {0}'] }}\n  - {{ name: slow, interval: 1h, command: [sh, -c, 'sleep 1; echo done'], match: done }}\n",
            runs.display()
        );
        let t = targets(&yaml, dir.path());
        for _ in 0..3 {
            let b = scrape(t[0].as_ref(), 5000).await;
            assert_eq!(one(&b, "clusterwatch_program_success"), Some(1.0));
        }
        assert_eq!(
            std::fs::read_to_string(&runs).unwrap(),
            "x\n",
            "one run in the interval"
        );
        let b = scrape(t[0].as_ref(), 5000).await;
        let age = one(&b, "clusterwatch_program_result_age_seconds").unwrap();
        assert!(age < 5.0, "{age}");
        assert_eq!(
            one(&b, "clusterwatch_program_interval_seconds"),
            Some(3600.0)
        );

        // A scrape shorter than the run: served without a result, the run goes on.
        let started = std::time::Instant::now();
        let b = scrape(t[1].as_ref(), 200).await;
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(one(&b, "clusterwatch_program_success"), None);
        assert_eq!(one(&b, "clusterwatch_program_running"), Some(1.0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let b = scrape(t[1].as_ref(), 200).await;
            if one(&b, "clusterwatch_program_success") == Some(1.0) {
                assert_eq!(one(&b, "clusterwatch_program_running"), Some(0.0));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the slow run never finished"
            );
        }
    }

    #[tokio::test]
    async fn runs_are_bounded_across_targets() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let items: String = (0..MAX_CONCURRENT + 3)
            .map(|i| {
                format!(
                    "  - {{ name: c{i}, command: [sh, -c, 'echo start >> {0}; sleep 0.3; echo end >> {0}'] }}\n",
                    log.display()
                )
            })
            .collect();
        let t = targets(&format!("programs:\n{items}"), dir.path());
        futures::future::join_all(t.iter().map(|t| scrape(t.as_ref(), 5000))).await;
        // Replaying the log: never more than MAX_CONCURRENT between a start and an end.
        let mut now = 0usize;
        let mut peak = 0usize;
        for line in std::fs::read_to_string(&log).unwrap().lines() {
            if line == "start" {
                now += 1;
            } else {
                now -= 1;
            }
            peak = peak.max(now);
        }
        // Other tests share the slots, so fewer may have run at once, never more.
        assert!((1..=MAX_CONCURRENT).contains(&peak), "{peak}");
        assert_eq!(now, 0, "every run finished");
    }
}
