//! The failover drill: kill a pair's primary by PID and watch the whole chain react — the
//! failover alert firing in Prometheus, the hook starting in clusterwatch's journal, the
//! former standby reported as the new primary — timing each step from the kill.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use super::{LabInfo, Member, PG_CLUSTER, PG_HOOK, REDIS_CLUSTER, REDIS_HOOK};
use crate::exposition::Exposition;
use crate::harness::http::{client, get_json};
use crate::harness::process::{pid_alive, signal_tree};

/// How often the drill looks at Prometheus, the journal and the exporter.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Which pair to fail over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// The PostgreSQL primary/standby pair.
    Pg,
    /// The Redis master/replica pair.
    Redis,
}

impl System {
    /// `pg` or `redis`, as on the command line.
    pub fn parse(name: &str) -> Result<System> {
        match name {
            "pg" | "postgres" | "postgresql" => Ok(System::Pg),
            "redis" => Ok(System::Redis),
            other => bail!("unknown drill `{other}`: use `pg` or `redis`"),
        }
    }

    /// The alert that must fire when the primary is gone.
    pub fn alert(self) -> &'static str {
        match self {
            System::Pg => "PostgresFailoverNeeded",
            System::Redis => "RedisFailoverNeeded",
        }
    }

    /// The recording rule whose range selector is the failover alert's window.
    fn window_rule(self) -> &'static str {
        match self {
            System::Pg => "cluster_instance:clusterwatch_pg_primary_alive:max2m",
            System::Redis => "cluster_instance:clusterwatch_redis_master_alive:max1m",
        }
    }

    /// The `cluster` label of the pair.
    pub fn cluster(self) -> &'static str {
        match self {
            System::Pg => PG_CLUSTER,
            System::Redis => REDIS_CLUSTER,
        }
    }

    /// The hook that promotes the standby.
    pub fn hook(self) -> &'static str {
        match self {
            System::Pg => PG_HOOK,
            System::Redis => REDIS_HOOK,
        }
    }

    /// The primary to kill and the standby that must take over.
    fn members(self, info: &LabInfo) -> (&Member, &Member) {
        match self {
            System::Pg => (&info.pg_primary, &info.pg_standby),
            System::Redis => (&info.redis_master, &info.redis_replica),
        }
    }

    /// Whether the exporter reports `target` as this system's primary.
    fn is_primary(self, metrics: &Exposition, target: &str) -> bool {
        let (name, role) = match self {
            System::Pg => ("clusterwatch_pg_role", "primary"),
            System::Redis => ("clusterwatch_redis_role", "master"),
        };
        metrics.value(name, &[("target", target), ("role", role)]) == Some(1.0)
    }
}

/// What the drill saw, each step timed from the kill.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The pair that was failed over.
    pub system: System,
    /// The killed primary's target name.
    pub killed: String,
    /// The standby expected to take over.
    pub candidate: String,
    /// The failover alert was firing in Prometheus.
    pub alert_firing: Option<Duration>,
    /// clusterwatch recorded the hook as started.
    pub hook_started: Option<Duration>,
    /// The hook finished (any exit code).
    pub hook_finished: Option<Duration>,
    /// The exporter reported the candidate as primary.
    pub new_primary: Option<Duration>,
    /// How many times the hook was started in all (one incident must be one run).
    pub hook_runs: u64,
    /// The timing goal: scrape interval + the alert's window + group_wait + 2 s.
    pub budget: Duration,
}

impl Timeline {
    /// Whether every step happened.
    pub fn complete(&self) -> bool {
        self.alert_firing.is_some() && self.hook_started.is_some() && self.new_primary.is_some()
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |step: Option<Duration>| match step {
            Some(elapsed) => format!("{:>7.1}s", elapsed.as_secs_f64()),
            None => "  never".to_owned(),
        };
        writeln!(f, "drill {:?}: killed {}", self.system, self.killed)?;
        writeln!(
            f,
            "  {}  {} firing",
            at(self.alert_firing),
            self.system.alert()
        )?;
        writeln!(
            f,
            "  {}  hook {} started",
            at(self.hook_started),
            self.system.hook()
        )?;
        writeln!(f, "  {}  hook finished", at(self.hook_finished))?;
        writeln!(
            f,
            "  {}  {} seen as primary",
            at(self.new_primary),
            self.candidate
        )?;
        write!(
            f,
            "  hook runs: {}; goal kill -> hook started <= {:.1}s (scrape interval + window + group_wait + 2s)",
            self.hook_runs,
            self.budget.as_secs_f64()
        )
    }
}

/// Kills the pair's primary (SIGKILL, the whole process tree) and watches until the
/// candidate is primary and the hook has finished, or `timeout` passes; returns what it saw
/// either way, so a failed drill still tells how far it got.
pub async fn drill(info: &LabInfo, system: System, timeout: Duration) -> Result<Timeline> {
    let client = client()?;
    let (primary, candidate) = system.members(info);
    let metrics = scrape(&client, info).await?;
    if !system.is_primary(&metrics, &primary.target)
        || system.is_primary(&metrics, &candidate.target)
    {
        bail!(
            "{} is not the only primary of {} any more (the lab already failed over?); \
             start a fresh lab to drill again",
            primary.target,
            system.cluster()
        );
    }
    let window = alert_window(info, &client, system).await?;
    let runs_before = journal_events(info, system.hook())?.started.len();

    let pid = primary_pid(primary)?;
    let killed_at = Instant::now();
    let killed_unix = unix_now();
    signal_tree(pid, Signal::SIGKILL)
        .with_context(|| format!("could not kill {} (pid {pid})", primary.target))?;

    let mut timeline = Timeline {
        system,
        killed: primary.target.clone(),
        candidate: candidate.target.clone(),
        alert_firing: None,
        hook_started: None,
        hook_finished: None,
        new_primary: None,
        hook_runs: 0,
        budget: info.scrape_interval + window + info.group_wait + Duration::from_secs(2),
    };
    let deadline = killed_at + timeout;
    while Instant::now() < deadline {
        let elapsed = killed_at.elapsed();
        if timeline.alert_firing.is_none() && alert_firing(info, &client, system).await? {
            timeline.alert_firing = Some(elapsed);
        }
        // The journal has the runner's own timestamps: exact, whatever the polling interval.
        let journal = journal_events(info, system.hook())?;
        let since_kill = |ts: f64| Duration::from_secs_f64((ts - killed_unix).max(0.0));
        let started = &journal.started[runs_before.min(journal.started.len())..];
        timeline.hook_runs = started.len() as u64;
        timeline.hook_started = started.first().map(|&ts| since_kill(ts));
        timeline.hook_finished = journal
            .finished
            .iter()
            .find(|&&ts| started.first().is_some_and(|&first| ts >= first))
            .map(|&ts| since_kill(ts));
        if timeline.new_primary.is_none() {
            if let Ok(metrics) = scrape(&client, info).await {
                if system.is_primary(&metrics, &candidate.target) {
                    timeline.new_primary = Some(elapsed);
                }
            }
        }
        if timeline.complete() && timeline.hook_finished.is_some() {
            break;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
    Ok(timeline)
}

/// The primary's PID: PostgreSQL's from `postmaster.pid`, Redis' as recorded at start.
fn primary_pid(member: &Member) -> Result<i32> {
    let pid = match (&member.pid_file, member.pid) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("{} is not running ({})", member.target, path.display()))?
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("no PID in {}", path.display()))?,
        (None, Some(pid)) => pid,
        (None, None) => bail!("no PID known for {}", member.target),
    };
    if !pid_alive(pid) {
        bail!("{} (pid {pid}) is not running", member.target);
    }
    Ok(pid)
}

async fn scrape(client: &reqwest::Client, info: &LabInfo) -> Result<Exposition> {
    let body = client
        .get(format!("{}/metrics", info.clusterwatch))
        .send()
        .await
        .context("scraping clusterwatch")?
        .error_for_status()?
        .text()
        .await?;
    Exposition::parse(&body)
}

/// When a hook's attempts started and finished, from the runner's journal (unix seconds).
#[derive(Debug, Default)]
struct JournalTimes {
    started: Vec<f64>,
    finished: Vec<f64>,
}

/// The journal is JSON lines in the hook state directory, one record per decision.
fn journal_events(info: &LabInfo, hook: &str) -> Result<JournalTimes> {
    let path = info.hook_state_dir.join("journal.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let mut times = JournalTimes::default();
    // A line being appended right now may be cut short: skip what does not parse.
    for record in text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
    {
        if record["hook"] != hook {
            continue;
        }
        let Some(ts) = record["ts"].as_f64() else {
            continue;
        };
        match record["event"].as_str() {
            Some("started") => times.started.push(ts),
            Some("finished") => times.finished.push(ts),
            _ => {}
        }
    }
    Ok(times)
}

/// The unix time now, in seconds, as the hook journal writes its `ts`.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

async fn alert_firing(info: &LabInfo, client: &reqwest::Client, system: System) -> Result<bool> {
    let alerts = get_json(client, &format!("{}/api/v1/alerts", info.prometheus)).await?;
    Ok(alerts["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|alert| {
            alert["labels"]["alertname"] == system.alert()
                && alert["labels"]["cluster"] == system.cluster()
                && alert["state"] == "firing"
        }))
}

/// How long the failover alert waits, as Prometheus loaded the rules: the window of its
/// observers' records (every scrape in it must have failed) plus the alert's own `for`, if any.
async fn alert_window(
    info: &LabInfo,
    client: &reqwest::Client,
    system: System,
) -> Result<Duration> {
    let rules = get_json(client, &format!("{}/api/v1/rules", info.prometheus)).await?;
    let all: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .collect();
    let alert_for = all
        .iter()
        .find(|rule| rule["name"] == system.alert())
        .and_then(|rule| rule["duration"].as_f64())
        .with_context(|| format!("Prometheus has not loaded the rule {}", system.alert()))?;
    let query = all
        .iter()
        .find(|rule| rule["name"] == system.window_rule())
        .and_then(|rule| rule["query"].as_str())
        .with_context(|| {
            format!(
                "Prometheus has not loaded the rule {}",
                system.window_rule()
            )
        })?;
    let window = query
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(range, _)| parse_range(range))
        .with_context(|| format!("no range selector in {}: {query}", system.window_rule()))?;
    Ok(window + Duration::from_secs_f64(alert_for))
}

/// A PromQL range such as `2m`, `90s` or `1m30s`.
fn parse_range(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        total += number.parse::<u64>().ok()? * unit;
        number.clear();
    }
    number.is_empty().then(|| Duration::from_secs(total))
}
