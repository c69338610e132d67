//! The SRE stats files (`counters.csv`, `samples.csv`): one target per file, parsed by a
//! background thread when the file changes, scrapes served from the last finished parse.
//! Parsing itself lives in `sre_csv`; this file owns watching, caching and the metrics.
//!
//! A watcher thread per file listens to file notifications on the parent directory (so a
//! writer that replaces the file by rename is seen), waits for the writer to go quiet, and
//! re-parses only when (device, inode, size, mtime) changed. Every scrape also compares that
//! identity and nudges the thread, which covers a watch that could not be set up.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::watch;

use crate::blocking::{BlockingError, InFlight};
use crate::clock;
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;
use crate::sre_csv::{self, Parsed, REJECT_REASONS};
use crate::sync::lock;

/// The `sre` collector, configured by the `sre_stats:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "sre",
    section: "sre_stats",
    always_on: false,
    configure,
};

/// How long the file must stay quiet after a change before it is parsed: a writer that
/// truncates and then writes is seen once, finished.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The longest a change waits for the file to go quiet.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How often the thread checks the file even without a notification.
const POLL: Duration = Duration::from_secs(10);
/// A file that keeps changing under the parser is re-read at most this many times in a row.
const MAX_ATTEMPTS: usize = 5;

/// What the values of a file are.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Per-minute event counts (`counters.csv`).
    Events,
    /// Per-minute averages (`samples.csv`).
    Averages,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    /// Shorthand for a `counters` file of kind `events`.
    counters: Option<PathBuf>,
    /// Shorthand for a `samples` file of kind `averages`.
    samples: Option<PathBuf>,
    /// Cluster label for the shorthand files.
    cluster: Option<String>,
    // Parsed item by item below, so each bad entry is reported on its own line.
    #[allow(dead_code)]
    files: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    path: PathBuf,
    kind: FileKind,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let Some(raw) = at.parse::<Option<RawSection>>(problems).flatten() else {
        return Vec::new();
    };
    let mut out: Vec<Arc<Target>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (name, path, kind) in [
        ("counters", &raw.counters, FileKind::Events),
        ("samples", &raw.samples, FileKind::Averages),
    ] {
        if let Some(path) = path {
            let id = TargetId::check(name.into(), raw.cluster.clone(), None, &at, problems);
            names.push(name.into());
            out.push(Target::new(
                &KIND,
                id,
                SreCollector::new(ctx.resolve(path), kind),
            ));
        }
    }
    if let Some(list) = at.field("files") {
        for (f, item) in list.parse_list::<RawFile>(problems) {
            let before = problems.len();
            let id = TargetId::check(f.name, f.cluster, f.timeout, &item, problems);
            if names.contains(&id.name) {
                problems.push(
                    item.problem("name", format!("duplicate sre target name `{}`", id.name))
                        .hint("`counters:` and `samples:` already use those names; pick another"),
                );
            }
            if problems.len() > before {
                continue;
            }
            names.push(id.name.clone());
            out.push(Target::new(
                &KIND,
                id,
                SreCollector::new(ctx.resolve(&f.path), f.kind),
            ));
        }
    }
    if out.is_empty() {
        problems.push(
            at.problem("", "no stats file configured")
                .hint("set `counters:`, `samples:` or a `files:` list"),
        );
    }
    out
}

/// (device, inode, size, mtime): what tells a new version of the file from the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

/// One finished parse, as scrapes see it.
#[derive(Debug, Default)]
struct Cached {
    /// The file's identity when it was parsed; `None` when it was missing.
    identity: Option<Identity>,
    parsed: Parsed,
    duration: Duration,
    /// Unix time the parse finished.
    finished: f64,
}

/// State shared by the collector (scrapes) and its watcher thread.
struct Shared {
    path: PathBuf,
    /// The last finished parse; `None` until the first one.
    latest: watch::Sender<Option<Arc<Cached>>>,
    parses: Mutex<u64>,
    read_errors: Mutex<u64>,
    /// Whether file notifications arrive; if not, scrapes check the file themselves.
    watching: AtomicBool,
}

/// One stats file.
pub struct SreCollector {
    kind: FileKind,
    shared: Arc<Shared>,
    /// Started on the first scrape: `check-config` never starts threads.
    nudge: OnceLock<mpsc::Sender<()>>,
    inflight: InFlight,
}

impl SreCollector {
    fn new(path: PathBuf, kind: FileKind) -> Self {
        SreCollector {
            kind,
            shared: Arc::new(Shared {
                path,
                latest: watch::Sender::new(None),
                parses: Mutex::new(0),
                read_errors: Mutex::new(0),
                watching: AtomicBool::new(false),
            }),
            nudge: OnceLock::new(),
            inflight: InFlight::new(),
        }
    }

    /// Starts the watcher on first use; afterwards wakes it only when notifications do not
    /// work (a scrape's nudge would otherwise stretch the debounce of every change).
    fn nudge(&self) {
        let mut started = false;
        let sender = self.nudge.get_or_init(|| {
            started = true;
            let (tx, rx) = mpsc::channel();
            spawn_watcher(Arc::downgrade(&self.shared), tx.clone(), rx);
            tx
        });
        if started || !self.shared.watching.load(Ordering::Relaxed) {
            let _ = sender.send(());
        }
    }
}

fn spawn_watcher(shared: Weak<Shared>, tx: mpsc::Sender<()>, rx: mpsc::Receiver<()>) {
    let Some(path) = shared.upgrade().map(|s| s.path.clone()) else {
        return;
    };
    let name = path.file_name().map(|n| n.to_owned());
    // Watching the directory, not the file: a rename-replace gives the path a new inode,
    // and a watch on the old inode would go silent.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                let _ = tx.send(());
            }
        }
    })
    .and_then(|mut w| {
        use notify::Watcher;
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let watcher = match watcher {
        Ok(w) => {
            if let Some(s) = shared.upgrade() {
                s.watching.store(true, Ordering::Relaxed);
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the stats file's directory; checking it at every scrape instead");
            None
        }
    };
    let spawned = std::thread::Builder::new()
        .name("sre-stats-watch".into())
        .spawn(move || {
            let _watcher = watcher;
            watch_loop(shared, rx);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the stats file watcher thread");
    }
}

fn watch_loop(shared: Weak<Shared>, rx: mpsc::Receiver<()>) {
    let mut last: Option<Option<Identity>> = None;
    // Logged when reading starts failing, not at every retry.
    let mut failing = false;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Quiet for DEBOUNCE, but never longer than MAX_DELAY: a file that never stops
        // changing (or scrapes nudging while it differs) must still get parsed.
        let settle_by = Instant::now() + MAX_DELAY;
        loop {
            let wait = DEBOUNCE.min(settle_by.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
            match rx.recv_timeout(wait) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // The collector is gone (configuration replaced): stop.
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = identity(&shared.path);
        if last == Some(now) {
            continue;
        }
        match parse_stable(&shared.path) {
            Ok(cached) => {
                if failing {
                    tracing::info!(path = %shared.path.display(), "the stats file is readable again");
                    failing = false;
                }
                last = Some(cached.identity);
                *lock(&shared.parses) += 1;
                shared.latest.send_replace(Some(Arc::new(cached)));
            }
            Err(e) => {
                *lock(&shared.read_errors) += 1;
                if !failing {
                    tracing::warn!(path = %shared.path.display(), error = %e, "cannot read the stats file");
                    failing = true;
                }
                // Not remembered as parsed: the next nudge or poll tries again.
                last = None;
            }
        }
    }
}

fn identity(path: &Path) -> Option<Identity> {
    std::fs::metadata(path).ok().map(|m| Identity::of(&m))
}

/// Parses the file, again if it changed while being read, so a result always comes from one
/// version of the file.
fn parse_stable(path: &Path) -> std::io::Result<Cached> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let started = Instant::now();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Cached {
                    finished: clock::unix_now().as_secs_f64(),
                    ..Cached::default()
                });
            }
            Err(e) => return Err(e),
        };
        let before = Identity::of(&file.metadata()?);
        let mut last = [0u8; 1];
        let ends_with_newline = before.size == 0
            || (file.read_at(&mut last, before.size - 1)? == 1 && matches!(last[0], b'\n' | b'\r'));
        let source = path.display().to_string();
        let parsed = sre_csv::parse(
            std::io::Read::take(&file, before.size),
            ends_with_newline,
            &source,
        );
        let after = identity(path);
        let settled = after == Some(before) && Identity::of(&file.metadata()?) == before;
        if settled || attempt >= MAX_ATTEMPTS {
            return Ok(Cached {
                identity: Some(before),
                parsed,
                duration: started.elapsed(),
                finished: clock::unix_now().as_secs_f64(),
            });
        }
    }
}

#[async_trait]
impl Collector for SreCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut rx = self.shared.latest.subscribe();
        // Even a stat can hang (a log directory on a dead NFS mount): off the runtime.
        let path = self.shared.path.clone();
        let key = path.to_string_lossy().into_owned();
        let current = self
            .inflight
            .run(&key, ctx.deadline, move || identity(&path))
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("stat of the stats file failed".into()),
            })?;
        let cached_identity = rx.borrow().as_ref().map(|c| c.identity);
        if cached_identity != Some(current) {
            self.nudge();
        }
        // Only the very first scrape waits (for at most its deadline), so `once` shows the
        // file; afterwards a scrape serves the last parse and never waits for a new one.
        if rx.borrow().is_none() {
            let _ = tokio::time::timeout_at(ctx.deadline, rx.wait_for(Option::is_some)).await;
        }
        let latest = rx.borrow().clone();
        self.write(out, current, latest.as_deref());
        Ok(())
    }
}

const HELP_EVENTS: &str = "Events counted in the newest minute of the SRE counters file, per host and stat (an empty field counts as 0).";
const HELP_AVERAGE: &str = "Newest per-minute average of the SRE samples file, per host and stat (absent while the newest field is empty).";
const HELP_MINUTE: &str =
    "Unix time of the minute the newest value belongs to (the line's timestamp, floored to the minute).";

impl SreCollector {
    fn write(&self, out: &mut SampleBuffer, current: Option<Identity>, latest: Option<&Cached>) {
        out.gauge(
            "clusterwatch_sre_file_present",
            "Whether the stats file exists (1) or not (0).",
            &[],
            if current.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(id) = current {
            out.gauge(
                "clusterwatch_sre_file_modified_age_seconds",
                "Seconds since the stats file was last modified (the writer refreshes it every minute).",
                &[],
                (clock::unix_now().as_secs_f64() - id.mtime_ns as f64 / 1e9).max(0.0),
            );
            out.gauge(
                "clusterwatch_sre_file_size_bytes",
                "Size of the stats file, in bytes.",
                &[],
                id.size as f64,
            );
        }
        out.counter(
            "clusterwatch_sre_file_parses_total",
            "Parses of the stats file since clusterwatch started.",
            &[],
            *lock(&self.shared.parses) as f64,
        );
        out.counter(
            "clusterwatch_sre_file_read_errors_total",
            "Times the stats file existed but could not be read.",
            &[],
            *lock(&self.shared.read_errors) as f64,
        );
        if let Some(cached) = latest {
            write_parse(self.kind, cached, out);
        }
    }
}

/// The samples of one finished parse: line counts, timing and the newest value per stat.
fn write_parse(kind: FileKind, cached: &Cached, out: &mut SampleBuffer) {
    let p = &cached.parsed;
    out.gauge(
        "clusterwatch_sre_file_lines_parsed",
        "Lines used by the last parse of the stats file.",
        &[],
        p.accepted as f64,
    );
    for reason in REJECT_REASONS {
        out.gauge(
                "clusterwatch_sre_file_lines_rejected",
                "Lines the last parse of the stats file could not use, by reason (line numbers are logged at debug level).",
                &[("reason", reason.label())],
                p.rejected(*reason) as f64,
            );
    }
    out.gauge(
        "clusterwatch_sre_file_duplicate_lines",
        "Lines of the last parse that repeated an earlier (host, stat); the last one wins.",
        &[],
        p.duplicates as f64,
    );
    out.gauge(
        "clusterwatch_sre_file_parse_duration_seconds",
        "How long the last parse of the stats file took, in seconds.",
        &[],
        cached.duration.as_secs_f64(),
    );
    out.gauge(
        "clusterwatch_sre_file_last_parse_timestamp_seconds",
        "Unix time the last parse of the stats file finished.",
        &[],
        cached.finished,
    );
    let mut name = String::new();
    for s in p.stats.iter() {
        name.clear();
        s.stat.push_to(&mut name);
        let labels = [("host", s.host), ("stat", name.as_str())];
        match kind {
            FileKind::Events => {
                out.gauge(
                    "clusterwatch_sre_counter_events",
                    HELP_EVENTS,
                    &labels,
                    s.value.unwrap_or(0.0),
                );
            }
            FileKind::Averages => {
                let Some(v) = s.value else { continue };
                out.gauge("clusterwatch_sre_sample_average", HELP_AVERAGE, &labels, v);
            }
        }
        out.gauge(
            "clusterwatch_sre_stat_minute_timestamp_seconds",
            HELP_MINUTE,
            &labels,
            s.minute as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration as config;

    /// The `(target, cluster)` of every sre target, or the rendered problems.
    fn targets(yaml: &str) -> Result<Vec<(String, Option<String>)>, String> {
        config::parse(yaml, "c.yml", Path::new("/etc/clusterwatch"))
            .map(|c| {
                c.targets
                    .iter()
                    .filter(|t| t.name() == "sre")
                    .map(|t| (t.target().to_owned(), t.cluster().map(str::to_owned)))
                    .collect()
            })
            .map_err(|e| e.render())
    }

    #[test]
    fn shorthand_and_file_list() {
        let t = targets(
            "sre_stats:\n  counters: /var/log/sre/counters.csv\n  samples: samples.csv\n  files:\n    - { name: cp1-counters, path: /mnt/cp1/counters.csv, kind: events, cluster: sre }\n",
        )
        .unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(names, ["counters", "samples", "cp1-counters"]);
        assert_eq!(t[2].1.as_deref(), Some("sre"));
    }

    #[test]
    fn bad_kind_and_duplicate_name_reported_with_lines() {
        let err = targets(
            "sre_stats:\n  counters: /a.csv\n  files:\n    - { name: counters, path: /b.csv, kind: events }\n    - { name: x, path: /c.csv, kind: totals }\n",
        )
        .unwrap_err();
        assert!(err.contains("c.yml:4:"), "{err}");
        assert!(
            err.contains("duplicate sre target name `counters`"),
            "{err}"
        );
        assert!(err.contains("c.yml:5:"), "{err}");
        assert!(targets("sre_stats: {}\n")
            .unwrap_err()
            .contains("no stats file"));
    }

    async fn scrape(c: &SreCollector) -> SampleBuffer {
        let mut out = SampleBuffer::new();
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + Duration::from_secs(5),
        };
        c.collect(&ctx, &mut out).await.unwrap();
        out
    }

    fn value(b: &SampleBuffer, name: &str, stat: Option<&str>) -> Option<f64> {
        b.get(name)?
            .samples
            .iter()
            .find(|s| stat.is_none_or(|st| s.labels.iter().any(|(k, v)| k == "stat" && v == st)))
            .map(|s| s.value)
    }

    /// A directory that does not exist yet cannot be watched: scrapes then check the file
    /// themselves and still pick it up once it appears.
    #[tokio::test]
    async fn without_notifications_scrapes_notice_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("later");
        let path = sub.join("counters.csv");
        let c = SreCollector::new(path.clone(), FileKind::Events);
        let b = scrape(&c).await;
        assert_eq!(value(&b, "clusterwatch_sre_file_present", None), Some(0.0));
        assert!(!c.shared.watching.load(Ordering::Relaxed));

        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&path, "cp1,request.INVITE,t,1652193060,7\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let b = scrape(&c).await;
            seen = value(
                &b,
                "clusterwatch_sre_counter_events",
                Some("request.INVITE"),
            );
        }
        assert_eq!(seen, Some(7.0));
    }

    #[tokio::test]
    async fn missing_file_then_created_then_replaced_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counters.csv");
        let c = SreCollector::new(path.clone(), FileKind::Events);
        let b = scrape(&c).await;
        assert_eq!(value(&b, "clusterwatch_sre_file_present", None), Some(0.0));
        assert_eq!(value(&b, "clusterwatch_sre_counter_events", None), None);

        std::fs::write(&path, "cp1,request.INVITE,t,1652193060,12,11\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = None;
        while Instant::now() < deadline {
            let b = scrape(&c).await;
            seen = value(
                &b,
                "clusterwatch_sre_counter_events",
                Some("request.INVITE"),
            );
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, Some(12.0));

        let tmp = dir.path().join("counters.csv.tmp");
        std::fs::write(&tmp, "cp1,request.INVITE,t,1652193120,40,12\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let b = scrape(&c).await;
            seen = value(
                &b,
                "clusterwatch_sre_counter_events",
                Some("request.INVITE"),
            );
            if seen == Some(40.0) {
                assert_eq!(
                    value(&b, "clusterwatch_sre_stat_minute_timestamp_seconds", None),
                    Some(1652193120.0)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, Some(40.0));
    }

    #[test]
    fn golden_exposition_of_the_runbook_csv_examples() {
        for (name, kind) in [
            ("sre-counters-runbook", FileKind::Events),
            ("sre-samples-runbook", FileKind::Averages),
        ] {
            let text = crate::collector::golden::input(&format!("{name}.csv"));
            let cached = Cached {
                identity: None,
                parsed: sre_csv::parse(text.as_bytes(), true, name),
                duration: Duration::from_millis(2),
                finished: 1_652_193_125.0,
            };
            let mut out = SampleBuffer::new();
            write_parse(kind, &cached, &mut out);
            crate::collector::golden::assert_golden(name, out);
        }
    }
}
