//! PostgreSQL per node: role, timeline, WAL positions, streaming replication seen from both
//! sides, archiver health, WAL directory, slots, sizes, connections and repmgr's node table.
//! Here: the `postgres:` section, the kept connection and the cadence of slow groups; the SQL
//! is in `queries.rs`, the typed rows in `rows.rs`, the samples in `samples.rs`.

mod queries;
mod rows;
mod samples;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use self::queries::{Plan, Session};
use self::rows::Scrape;
use self::samples::Memory;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{
    read_password_file, HumanDuration, Located, Problem, SectionContext, TargetId,
};
use crate::snapshot::SampleBuffer;

/// The `pg` collector, configured by the `postgres:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "pg",
    section: "postgres",
    always_on: false,
    configure,
};

/// Database and tablespace sizes change slowly and cost most of a scrape (they stat every
/// file), so by default they are refreshed once a minute.
const DEFAULT_SIZES_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    dsn: String,
    password_file: Option<std::path::PathBuf>,
    expected_standbys: Option<u32>,
    sizes_interval: Option<HumanDuration>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawPostgres>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        // Never echo the DSN: it may hold a password.
        let mut pg_config = match tokio_postgres::Config::from_str(&raw.dsn) {
            Ok(c) => c,
            Err(_) => {
                problems.push(item.problem("dsn", "not a valid PostgreSQL connection string").hint(
                    "use a URL like postgresql://monitor@db1:5432/postgres or key=value pairs like `host=db1 user=monitor`",
                ));
                continue;
            }
        };
        if pg_config.get_hosts().is_empty() {
            problems.push(
                item.problem("dsn", "the connection string names no host")
                    .hint("add a host, e.g. postgresql://monitor@127.0.0.1:5432/postgres"),
            );
        }
        if let Some(secret) = read_password_file(raw.password_file.as_deref(), ctx, &item, problems)
        {
            pg_config.password(secret.expose());
        }
        if problems.len() > before {
            continue;
        }
        pg_config.application_name("clusterwatch");
        out.push(Target::new(
            &KIND,
            id.clone(),
            PgCollector {
                id,
                pg_config,
                expected_standbys: raw.expected_standbys,
                sizes_interval: raw
                    .sizes_interval
                    .map(|d| d.0)
                    .unwrap_or(DEFAULT_SIZES_INTERVAL),
                state: Mutex::new(State::default()),
            },
        ));
    }
    out
}

/// One PostgreSQL server.
pub struct PgCollector {
    id: TargetId,
    pg_config: tokio_postgres::Config,
    expected_standbys: Option<u32>,
    sizes_interval: Duration,
    state: Mutex<State>,
}

/// What survives between scrapes.
#[derive(Default)]
struct State {
    /// Taken out while a scrape uses it and put back only on success, so a scrape abandoned
    /// at its deadline (hung server) drops the connection and the next one reconnects.
    session: Option<Session>,
    /// When the sizes were last read.
    sizes_read: Option<Instant>,
    /// When the control row was last read: the system identifier never changes, so it is
    /// read on the slow cadence, not every scrape.
    control_read: Option<Instant>,
    /// Role seen on the last scrape (`true` = standby); `None` until the first one.
    in_recovery: Option<bool>,
    /// What the samples need from earlier scrapes.
    memory: Memory,
    /// Query groups already reported as failing, so each is logged once, not per scrape.
    reported: HashMap<&'static str, String>,
}

impl State {
    /// Which skippable groups are worth running now. Skipping what cannot apply keeps the
    /// load on a production database down; a new connection (role unknown) runs everything.
    fn plan(&self, slow_interval: Duration) -> Plan {
        let due = |read: Option<Instant>| read.is_none_or(|at| at.elapsed() >= slow_interval);
        Plan {
            control: due(self.control_read),
            wal_receiver: self.in_recovery != Some(false),
            sizes: due(self.sizes_read),
        }
    }
}

#[async_trait]
impl Collector for PgCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut state = self.state.lock().await;
        let session = match state.session.take() {
            Some(s) if !s.is_closed() => s,
            _ => Session::open(&self.pg_config, ctx.deadline, &self.id.name).await?,
        };
        let scrape = session.scrape(state.plan(self.sizes_interval)).await?;
        state.in_recovery = Some(scrape.status.in_recovery);
        let refreshed = samples::write(&scrape, &mut state.memory, self.expected_standbys, out);
        if refreshed.control {
            state.control_read = Some(Instant::now());
        }
        if refreshed.sizes {
            state.sizes_read = Some(Instant::now());
        }
        self.log_group_failures(&mut state.reported, &scrape);
        state.session = Some(session);
        Ok(())
    }
}

impl PgCollector {
    /// Logs a failing group once per change of its error, and its recovery.
    fn log_group_failures(&self, reported: &mut HashMap<&'static str, String>, scrape: &Scrape) {
        for (name, error) in scrape.outcomes() {
            let Some(e) = error else {
                if reported.remove(name).is_some() {
                    tracing::info!(collector = "pg", target = %self.id.name, query = name, "query works again");
                }
                continue;
            };
            if reported.get(name) != Some(&e.message) {
                let hint = if e.is_permission() {
                    "grant the monitoring role pg_monitor (GRANT pg_monitor TO monitor)"
                } else {
                    "this part of the metrics is skipped; the rest still works"
                };
                tracing::warn!(collector = "pg", target = %self.id.name, query = name, reason = e.reason.as_str(), error = %e.message, hint, "query failed");
                reported.insert(name, e.message.clone());
            }
        }
    }
}

/// Connects to `dsn` as a new collector would and returns every query group's typed rows as
/// pretty JSON: how the fixtures in `collector/testdata/pg/` are captured from real servers.
/// Not an API (hidden from the docs); the DSN is never echoed.
#[doc(hidden)]
pub async fn capture_rows(dsn: &str, timeout: Duration) -> Result<String, CollectError> {
    let mut config = tokio_postgres::Config::from_str(dsn)
        .map_err(|_| CollectError::Connect("not a valid PostgreSQL connection string".into()))?;
    config.application_name("clusterwatch");
    let session = Session::open(&config, Instant::now() + timeout, "capture").await?;
    let scrape = session.scrape(Plan::ALL).await?;
    serde_json::to_string_pretty(&scrape).map_err(|e| CollectError::Protocol(e.to_string()))
}
