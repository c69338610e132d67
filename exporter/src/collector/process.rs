//! Processes matching a name or command-line pattern (celery workers, kamailio, SRE's python
//! programs): how many run, the youngest one's age (a restart loop keeps it young), their
//! total resident memory, and the configured minimum as its own series for one generic rule.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};

use crate::blocking::{BlockingError, InFlight};
use crate::clock;
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{compile_regex, HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `process` collector, configured by the `processes:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "process",
    section: "processes",
    always_on: false,
    configure,
};

/// Every process target of a scrape reads one process table: a full `/proc` walk per
/// target would cost as much as the rest of the scrape together.
const TABLE_MAX_AGE: Duration = Duration::from_millis(1000);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    /// Regex on the process name (`comm`, at most 15 characters on Linux).
    process_name: Option<String>,
    /// Regex on the whole command line, arguments joined by spaces.
    cmdline: Option<String>,
    /// How many must run; exported as `clusterwatch_process_min`.
    min: Option<u32>,
}

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let table = Arc::new(Table::default());
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawProcess>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let pattern = match (&raw.process_name, &raw.cmdline) {
            (Some(p), None) => compile_regex(p, &item, "process_name", problems).map(Pattern::Name),
            (None, Some(p)) => compile_regex(p, &item, "cmdline", problems).map(Pattern::Cmdline),
            _ => {
                problems.push(
                    item.problem("", "set exactly one of `process_name` and `cmdline`")
                        .hint(
                            "e.g. `cmdline: \"celery.*worker\"` or `process_name: \"^kamailio$\"`",
                        ),
                );
                None
            }
        };
        let Some(pattern) = pattern else { continue };
        if problems.len() > before {
            continue;
        }
        out.push(Target::new(
            &KIND,
            id,
            ProcessCollector {
                pattern,
                min: raw.min.unwrap_or(1),
                table: Arc::clone(&table),
            },
        ));
    }
    out
}

/// What a process is matched on.
enum Pattern {
    Name(Regex),
    Cmdline(Regex),
}

/// One process, as much of it as matching and metrics need.
#[derive(Clone, Debug)]
struct Proc {
    name: String,
    cmdline: String,
    start_time: u64,
    rss: u64,
}

/// The process table, shared by every target and refreshed at most every [`TABLE_MAX_AGE`].
#[derive(Default)]
struct Table {
    cached: Mutex<Option<(Instant, Arc<Vec<Proc>>)>>,
    /// sysinfo's own table, and the most processes it has held.
    system: Arc<Mutex<Option<(System, usize)>>>,
    inflight: InFlight,
}

impl Table {
    async fn get(&self, deadline: tokio::time::Instant) -> Result<Arc<Vec<Proc>>, CollectError> {
        if let Some((at, procs)) = &*crate::sync::lock(&self.cached) {
            if at.elapsed() < TABLE_MAX_AGE {
                return Ok(Arc::clone(procs));
            }
        }
        let procs = loop {
            let system = Arc::clone(&self.system);
            match self
                .inflight
                .run("process-table", deadline, move || read_table(&system))
                .await
            {
                Ok(procs) => break procs,
                // Another target of this scrape is reading it right now: wait for its result.
                Err(BlockingError::Stuck) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CollectError::Timeout);
                    }
                    if let Some((at, procs)) = &*crate::sync::lock(&self.cached) {
                        if at.elapsed() < TABLE_MAX_AGE {
                            return Ok(Arc::clone(procs));
                        }
                    }
                    continue;
                }
                Err(BlockingError::Timeout) => return Err(CollectError::Timeout),
                Err(BlockingError::Failed) => {
                    return Err(CollectError::Io("reading the process table failed".into()))
                }
            }
        };
        let procs = Arc::new(procs);
        *crate::sync::lock(&self.cached) = Some((Instant::now(), Arc::clone(&procs)));
        Ok(procs)
    }
}

fn read_table(system: &Mutex<Option<(System, usize)>>) -> Vec<Proc> {
    let mut guard = crate::sync::lock(system);
    if guard.is_none() {
        *guard = System::new().ok().map(|s| (s, 0));
    }
    let Some((s, most)) = guard.as_mut() else {
        return Vec::new();
    };
    // Without tasks: sysinfo would otherwise list every thread of every process as one
    // more entry (only to be filtered out below), reading each one's files, and its table
    // keeps the capacity of the most threads it ever saw (0.4 MiB after a parallel build).
    s.refresh_processes_specifics(
        ProcessesToUpdate::All,
        true,
        ProcessRefreshKind::nothing()
            .without_tasks()
            .with_memory()
            .with_cmd(UpdateKind::OnlyIfNotSet),
    );
    let me = sysinfo::Pid::from_u32(std::process::id());
    let held = s.processes().len();
    *most = (*most).max(held);
    let stale = oversized(held, *most);
    let procs = s
        .processes()
        .iter()
        // Threads are listed like processes on Linux; a process is counted once.
        .filter(|(pid, p)| **pid != me && p.thread_kind().is_none())
        .map(|(_, p)| Proc {
            name: p.name().to_string_lossy().into_owned(),
            cmdline: p
                .cmd()
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            start_time: p.start_time(),
            rss: p.memory(),
        })
        .collect();
    if stale {
        // The next read starts a new table, sized for what runs then.
        *guard = None;
    }
    procs
}

/// Whether sysinfo's table is to be started afresh: a hash table keeps the capacity of the
/// most entries it ever held (a parallel build's processes: 0.2 MiB), and its entries keep
/// the command lines of processes long gone. Starting afresh costs one read of every
/// command line.
fn oversized(held: usize, most: usize) -> bool {
    held < most / 2
}

/// One configured process pattern.
pub struct ProcessCollector {
    pattern: Pattern,
    min: u32,
    table: Arc<Table>,
}

/// Count, youngest start time and total memory of the processes matching `pattern`.
fn summarize(procs: &[Proc], pattern: &Pattern) -> (u64, Option<u64>, u64) {
    let mut count = 0;
    let mut youngest: Option<u64> = None;
    let mut rss = 0;
    for p in procs {
        let hit = match pattern {
            Pattern::Name(re) => re.is_match(&p.name),
            Pattern::Cmdline(re) => re.is_match(&p.cmdline),
        };
        if hit {
            count += 1;
            rss += p.rss;
            youngest = Some(youngest.map_or(p.start_time, |y| y.max(p.start_time)));
        }
    }
    (count, youngest, rss)
}

#[async_trait]
impl Collector for ProcessCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let procs = self.table.get(ctx.deadline).await?;
        let (count, youngest, rss) = summarize(&procs, &self.pattern);
        out.gauge(
            "clusterwatch_process_count",
            "Processes matching the configured pattern.",
            &[],
            count as f64,
        );
        out.gauge(
            "clusterwatch_process_min",
            "How many matching processes must run (configured `min`, default 1).",
            &[],
            self.min as f64,
        );
        out.gauge(
            "clusterwatch_process_resident_memory_bytes",
            "Resident memory of the matching processes together, in bytes.",
            &[],
            rss as f64,
        );
        if let Some(start) = youngest {
            let now = clock::unix_now().as_secs();
            out.gauge(
                "clusterwatch_process_youngest_age_seconds",
                "Age of the most recently started matching process, in seconds (stays small in a restart loop).",
                &[],
                now.saturating_sub(start) as f64,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration as config;
    use std::path::Path;

    #[test]
    fn the_table_starts_afresh_once_half_the_most_processes_are_gone() {
        assert!(!oversized(400, 400));
        assert!(!oversized(200, 400));
        assert!(oversized(199, 400));
        assert!(!oversized(0, 1));
    }

    #[test]
    fn exactly_one_pattern() {
        let err = config::parse(
            "processes:\n  - { name: a }\n  - { name: b, cmdline: foo, process_name: bar }\n  - { name: c, cmdline: \"[\" }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert_eq!(err.matches("exactly one").count(), 2, "{err}");
        assert!(
            err.contains("c.yml:4:") && err.contains("invalid regular expression"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn counts_a_running_child_by_cmdline_and_name() {
        let mut child = std::process::Command::new("sleep")
            .arg("31.4159")
            .spawn()
            .unwrap();
        let table = Arc::new(Table::default());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let procs = table.get(deadline).await.unwrap();
        let by_cmd = summarize(
            &procs,
            &Pattern::Cmdline(Regex::new(r"^sleep 31\.4159$").unwrap()),
        );
        let by_name = summarize(
            &procs,
            &Pattern::Name(Regex::new("^no-such-process$").unwrap()),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(by_cmd.0, 1);
        assert!(by_cmd.2 > 0, "rss of sleep");
        let now = crate::clock::unix_now().as_secs();
        assert!(now - by_cmd.1.unwrap() < 60);
        assert_eq!(by_name, (0, None, 0));
    }
}
