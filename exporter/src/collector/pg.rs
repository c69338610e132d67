//! PostgreSQL per node: role, timeline, WAL positions, streaming replication seen from both
//! sides, archiver health, WAL directory, slots, sizes, connections and repmgr's node table.
//! One kept connection per target; all queries of a scrape are pipelined on it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row, Statement};

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
    /// Sizes and when they were read.
    sizes: Option<(Instant, Sizes)>,
    /// Server time of the last message from upstream while the WAL receiver was alive, so
    /// the lag keeps growing after the link is gone.
    last_upstream_message: Option<f64>,
    /// When the WAL a standby has not replayed yet arrived, for its lag in seconds.
    replay: ReplayTracker,
    /// Query groups already reported as failing, so each is logged once, not per scrape.
    reported: HashMap<&'static str, String>,
    /// Role seen on the last scrape (`true` = standby); `None` until the first one.
    in_recovery: Option<bool>,
    /// System identifier and checkpoint timeline from the control file, and when read: the
    /// identifier never changes, so the file is read on the slow cadence, not every scrape.
    control: Option<(Instant, String, Option<i64>)>,
}

impl State {
    /// Whether a query group is worth running now. Skipping what cannot apply keeps the load
    /// on a production database down; a new connection (role unknown) runs everything.
    fn wants(&self, group: &str, slow_due: bool) -> bool {
        match group {
            "control" => slow_due || self.control.is_none(),
            "wal_receiver" => self.in_recovery != Some(false),
            _ => true,
        }
    }
}

#[derive(Clone, Default)]
struct Sizes {
    databases: Vec<(String, f64)>,
    tablespaces: Vec<(String, f64)>,
}

/// A connection and its prepared statements. A statement that could not be prepared (old
/// server, missing function) keeps its error so the group is reported and skipped.
struct Session {
    client: Client,
    statements: HashMap<&'static str, Result<Statement, String>>,
}

/// The node's status. Required: when it fails, the target is down. (repmgr's table is looked
/// up in the catalog, not with to_regclass, which errors without USAGE on the schema.)
const STATUS_SQL: &str = "SELECT current_setting('server_version_num')::int4, \
    current_setting('server_version'), \
    pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 END, \
    pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::float8, \
    pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::float8, \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END, \
    extract(epoch FROM now())::float8, \
    extract(epoch FROM pg_last_xact_replay_timestamp())::float8, \
    current_setting('max_connections')::int4, \
    current_setting('archive_mode'), \
    EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
            WHERE n.nspname = 'repmgr' AND c.relname = 'nodes')";

/// Optional query groups: a failure of one (privilege, version) is reported on
/// `clusterwatch_pg_query_success{query}` and the rest still work.
const GROUPS: &[(&str, &str)] = &[
    ("control", "SELECT system_identifier::text, (SELECT timeline_id FROM pg_control_checkpoint())::int8 FROM pg_control_system()"),
    (
        "replication",
        "SELECT coalesce(application_name, ''), coalesce(host(client_addr), ''), coalesce(state, ''), coalesce(sync_state, ''), \
         greatest(pg_wal_lsn_diff(c.cur, sent_lsn), 0)::float8, greatest(pg_wal_lsn_diff(c.cur, write_lsn), 0)::float8, \
         greatest(pg_wal_lsn_diff(c.cur, flush_lsn), 0)::float8, greatest(pg_wal_lsn_diff(c.cur, replay_lsn), 0)::float8, \
         extract(epoch FROM write_lag)::float8, extract(epoch FROM flush_lag)::float8, extract(epoch FROM replay_lag)::float8 \
         FROM pg_stat_replication, \
         (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS cur) c",
    ),
    (
        "wal_receiver",
        "SELECT status, received_tli::int8, extract(epoch FROM last_msg_receipt_time)::float8, coalesce(sender_host, ''), coalesce(sender_port, 0)::int4 \
         FROM pg_stat_wal_receiver",
    ),
    (
        "archiver",
        "SELECT archived_count::int8, failed_count::int8, extract(epoch FROM now() - last_archived_time)::float8, \
         extract(epoch FROM now() - last_failed_time)::float8 FROM pg_stat_archiver",
    ),
    (
        "archive_status",
        "SELECT count(*)::int8, coalesce(extract(epoch FROM now() - min(modification)), 0)::float8 \
         FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
    ),
    (
        "wal_dir",
        "SELECT (count(*) FILTER (WHERE name ~ '^[0-9A-F]{24}$'))::int8, coalesce(sum(size), 0)::float8 FROM pg_ls_waldir()",
    ),
    (
        "slots",
        "SELECT slot_name::text, slot_type, active, \
         coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::float8 \
         FROM pg_replication_slots",
    ),
    (
        "connections",
        "SELECT coalesce(datname::text, ''), coalesce(usename::text, ''), coalesce(state, 'unknown'), count(*)::int8, \
         coalesce(max(extract(epoch FROM now() - xact_start)) FILTER (WHERE state LIKE 'idle in transaction%'), 0)::float8 \
         FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2, 3",
    ),
];

/// Slow-cadence groups, run only when the cached sizes are older than `sizes_interval`.
const DATABASE_SIZES_SQL: &str =
    "SELECT datname::text, pg_database_size(oid)::float8 FROM pg_database WHERE datallowconn";
const TABLESPACE_SIZES_SQL: &str =
    "SELECT spcname::text, pg_tablespace_size(oid)::float8 FROM pg_tablespace";
/// Only where a repmgr schema exists.
const REPMGR_SQL: &str = "SELECT n.node_id::int8, n.node_name::text, n.type::text, n.active, coalesce(u.node_name::text, '') \
    FROM repmgr.nodes n LEFT JOIN repmgr.nodes u ON u.node_id = n.upstream_node_id";

/// Every state pg_stat_replication.state can take.
const REPLICATION_STATES: &[&str] = &["startup", "catchup", "streaming", "backup", "stopping"];
/// Every state pg_stat_replication.sync_state can take.
const SYNC_STATES: &[&str] = &["async", "potential", "sync", "quorum"];
/// Every status pg_stat_wal_receiver.status can take, plus `stopped` for no receiver at all.
const RECEIVER_STATUSES: &[&str] = &[
    "stopped",
    "starting",
    "streaming",
    "waiting",
    "restarting",
    "stopping",
];
/// repmgr node types.
const REPMGR_ROLES: &[&str] = &["primary", "standby", "witness", "bdr"];

fn classify(e: &tokio_postgres::Error) -> CollectError {
    let msg = describe(e);
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            CollectError::Auth(msg)
        }
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => CollectError::Permission(msg),
        Some(_) => CollectError::Query(msg),
        // A server asking for a password we were not given is an authentication problem.
        None if msg.contains("password missing") => CollectError::Auth(msg),
        None => CollectError::Connect(msg),
    }
}

/// A one-line description without the connection string (tokio-postgres never includes the
/// password, but we also avoid echoing anything from the DSN ourselves).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl PgCollector {
    async fn connect(&self, deadline: Instant) -> Result<Session, CollectError> {
        let mut cfg = self.pg_config.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        cfg.connect_timeout(remaining.max(Duration::from_millis(10)));
        let (client, connection) = cfg.connect(NoTls).await.map_err(|e| classify(&e))?;
        let target = self.id.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(collector = "pg", target = %target, error = %describe(&e), "connection closed");
            }
        });
        // Prepare everything in one pipelined round trip.
        let names = std::iter::once("status")
            .chain(GROUPS.iter().map(|(n, _)| *n))
            .chain(["database_sizes", "tablespace_sizes"]);
        let sqls = std::iter::once(STATUS_SQL)
            .chain(GROUPS.iter().map(|(_, s)| *s))
            .chain([DATABASE_SIZES_SQL, TABLESPACE_SIZES_SQL]);
        let prepared = futures::future::join_all(sqls.map(|sql| client.prepare(sql))).await;
        let mut statements = HashMap::new();
        for (name, result) in names.zip(prepared) {
            statements.insert(name, result.map_err(|e| describe(&e)));
        }
        match statements.get("status") {
            Some(Ok(_)) => Ok(Session { client, statements }),
            Some(Err(e)) => Err(CollectError::Query(format!(
                "status query cannot be prepared: {e}"
            ))),
            None => Err(CollectError::Query("status query missing".into())),
        }
    }
}

/// Runs a prepared group; `Err` carries a message for the once-per-change log.
async fn run_group(session: &Session, name: &'static str) -> Result<Vec<Row>, CollectError> {
    match session.statements.get(name) {
        Some(Ok(stmt)) => session
            .client
            .query(stmt, &[])
            .await
            .map_err(|e| classify(&e)),
        Some(Err(e)) => Err(CollectError::Query(format!("cannot prepare: {e}"))),
        None => Err(CollectError::Query("unknown query".into())),
    }
}

/// The parsed status row.
struct Status {
    version_num: i32,
    version: String,
    in_recovery: bool,
    current_lsn: Option<f64>,
    receive_lsn: Option<f64>,
    replay_lsn: Option<f64>,
    primary_timeline: Option<i64>,
    now: f64,
    last_replay: Option<f64>,
    max_connections: i32,
    archive_mode: String,
    has_repmgr: bool,
}

fn parse_status(row: &Row) -> Result<Status, tokio_postgres::Error> {
    Ok(Status {
        version_num: row.try_get(0)?,
        version: row.try_get(1)?,
        in_recovery: row.try_get(2)?,
        current_lsn: row.try_get(3)?,
        receive_lsn: row.try_get(4)?,
        replay_lsn: row.try_get(5)?,
        primary_timeline: row.try_get(6)?,
        now: row.try_get(7)?,
        last_replay: row.try_get(8)?,
        max_connections: row.try_get(9)?,
        archive_mode: row.try_get(10)?,
        has_repmgr: row.try_get(11)?,
    })
}

const H_INFO: &str = "Always 1; labels carry the server version and the cluster's system identifier (equal on a primary and its standbys).";
const H_VERSION: &str = "Server version as a number (e.g. 150004).";
const H_ROLE: &str =
    "Role of the node: 1 for the current role (primary or standby), 0 for the other.";
const H_TIMELINE: &str = "Timeline ID the node is on; a promoted standby moves to a new one.";
const H_WAL_LSN: &str = "Current WAL write position of a primary, in bytes since 0/0.";
const H_RECEIVE_LSN: &str = "Last WAL position a standby received, in bytes since 0/0.";
const H_REPLAY_LSN: &str = "Last WAL position a standby replayed, in bytes since 0/0.";
const H_WALSENDERS: &str = "Number of WAL senders (connected standbys and base backups).";
const H_EXPECTED: &str = "Number of standbys this node should have, from the configuration.";
const H_REPL_STATE: &str =
    "State of the WAL sender to one standby (startup, catchup, streaming, backup, stopping).";
const H_SYNC_STATE: &str = "Synchronous state of one standby (async, potential, sync, quorum).";
const H_LAG_BYTES: &str = "How far one standby is behind this node's WAL position, by stage (sent, write, flush, replay), in bytes.";
const H_LAG_SECONDS: &str = "Time one standby took to write, flush and replay recent WAL (0 when it is caught up and idle), in seconds.";
const H_RECEIVER: &str = "Status of a standby's WAL receiver; `stopped` when none runs.";
const H_UPSTREAM: &str = "Always 1; labels name the upstream a standby streams from.";
const H_LAST_MSG: &str =
    "Seconds since a standby last heard from its upstream; keeps growing while the link is down.";
const H_REPLAY_LAG_BYTES: &str = "WAL received but not yet replayed by a standby, in bytes.";
const H_REPLAY_LAG_SECONDS: &str = "How far behind its upstream a standby's replay is, in seconds: 0 when all received WAL is replayed and the link is up; grows while the link is down.";
const H_ARCHIVED: &str = "WAL files archived successfully since statistics were reset.";
const H_ARCHIVE_FAILED: &str = "Failed attempts to archive a WAL file since statistics were reset.";
const H_ARCHIVED_AGE: &str = "Seconds since the last successful archive.";
const H_FAILED_AGE: &str = "Seconds since the last failed archive attempt.";
const H_READY: &str = "WAL segments waiting to be archived (.ready files).";
const H_READY_AGE: &str =
    "Age of the oldest WAL segment waiting to be archived, in seconds (0 when none).";
const H_ARCHIVE_MODE: &str = "1 if archive_mode is on or always.";
const H_WAL_DIR_BYTES: &str = "Size of the WAL directory (pg_wal), in bytes.";
const H_WAL_DIR_SEGMENTS: &str = "Number of WAL segment files in pg_wal.";
const H_SLOT_ACTIVE: &str = "1 if a replication slot has a consumer connected.";
const H_SLOT_RETAINED: &str = "WAL retained by a replication slot, in bytes.";
const H_DB_SIZE: &str = "Size of a database, in bytes (refreshed every sizes_interval).";
const H_TS_SIZE: &str = "Size of a tablespace, in bytes (refreshed every sizes_interval).";
const H_CONNECTIONS: &str =
    "Client connections by database, user and state (active, idle, idle in transaction, …).";
const H_MAX_CONNECTIONS: &str = "The max_connections setting.";
const H_IDLE_TX_AGE: &str = "Age of the oldest transaction held open by an idle-in-transaction session, in seconds (0 when none).";
const H_QUERY_OK: &str = "1 if the query group succeeded on the last scrape; 0 when it failed (missing privilege, unsupported version).";
const H_REPMGR_ROLE: &str = "Role of a node in repmgr's node table.";
const H_REPMGR_ACTIVE: &str = "1 if repmgr marks the node active.";
const H_REPMGR_UPSTREAM: &str = "Always 1; labels name a node's upstream in repmgr's node table.";

#[async_trait]
impl Collector for PgCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut state = self.state.lock().await;
        let session = match state.session.take() {
            Some(s) if !s.client.is_closed() => s,
            _ => self.connect(ctx.deadline).await?,
        };

        let sizes_due = state
            .sizes
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.sizes_interval);
        let control_due = state
            .control
            .as_ref()
            .is_none_or(|(at, _, _)| at.elapsed() >= self.sizes_interval);
        let wanted: Vec<&'static str> = GROUPS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| state.wants(name, control_due))
            .collect();
        // All groups go out together: tokio-postgres pipelines concurrent queries on one
        // connection, so a scrape costs about one round trip.
        let status_fut = run_group(&session, "status");
        let groups_fut =
            futures::future::join_all(wanted.iter().map(|name| run_group(&session, name)));
        let sizes_fut = async {
            if sizes_due {
                Some(futures::join!(
                    run_group(&session, "database_sizes"),
                    run_group(&session, "tablespace_sizes")
                ))
            } else {
                None
            }
        };
        let (status_rows, group_rows, sizes_rows) =
            futures::join!(status_fut, groups_fut, sizes_fut);

        let status_rows = status_rows?;
        let status = status_rows
            .first()
            .ok_or_else(|| CollectError::Protocol("status query returned no row".into()))
            .and_then(|r| parse_status(r).map_err(|e| CollectError::Protocol(describe(&e))))?;

        let repmgr_rows = if status.has_repmgr {
            Some(
                session
                    .client
                    .query(REPMGR_SQL, &[])
                    .await
                    .map_err(|e| classify(&e)),
            )
        } else {
            None
        };

        state.in_recovery = Some(status.in_recovery);
        let mut results: HashMap<&'static str, Result<Vec<Row>, CollectError>> =
            wanted.into_iter().zip(group_rows).collect();
        // A group skipped this time (cached, or not applicable to the role) is not failing;
        // keeping its series steady avoids gaps in `clusterwatch_pg_query_success`.
        for (name, _) in GROUPS {
            results.entry(name).or_insert_with(|| Ok(Vec::new()));
        }
        if let Some(Ok(rows)) = results.get("control") {
            if let Some(row) = rows.first() {
                let id: String = row.try_get(0).unwrap_or_default();
                let tli: Option<i64> = row.try_get(1).ok();
                state.control = Some((Instant::now(), id, tli));
            }
        }
        if let Some((db, ts)) = sizes_rows {
            match (db, ts) {
                (Ok(db), Ok(ts)) => {
                    let read = |rows: Vec<Row>| -> Vec<(String, f64)> {
                        rows.iter()
                            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                            .collect()
                    };
                    state.sizes = Some((
                        Instant::now(),
                        Sizes {
                            databases: read(db),
                            tablespaces: read(ts),
                        },
                    ));
                    results.insert("sizes", Ok(Vec::new()));
                }
                (Err(e), _) | (_, Err(e)) => {
                    results.insert("sizes", Err(e));
                }
            }
        } else {
            results.insert("sizes", Ok(Vec::new()));
        }
        if let Some(r) = repmgr_rows {
            results.insert("repmgr", r);
        }

        self.write_status(&status, &mut state, &results, out);
        if let Some((_, sizes)) = &state.sizes {
            for (db, size) in &sizes.databases {
                out.gauge(
                    "clusterwatch_pg_database_size_bytes",
                    H_DB_SIZE,
                    &[("database", db)],
                    *size,
                );
            }
            for (ts, size) in &sizes.tablespaces {
                out.gauge(
                    "clusterwatch_pg_tablespace_size_bytes",
                    H_TS_SIZE,
                    &[("tablespace", ts)],
                    *size,
                );
            }
        }
        self.write_groups(&results, out);
        self.report_group_failures(&mut state, &results, out);

        state.session = Some(session);
        Ok(())
    }
}

impl PgCollector {
    fn write_status(
        &self,
        s: &Status,
        state: &mut State,
        results: &HashMap<&'static str, Result<Vec<Row>, CollectError>>,
        out: &mut SampleBuffer,
    ) {
        let (system_identifier, checkpoint_timeline) = match &state.control {
            Some((_, id, tli)) => (id.clone(), *tli),
            None => (String::new(), None),
        };
        out.gauge(
            "clusterwatch_pg_info",
            H_INFO,
            &[
                ("server_version", &s.version),
                ("system_identifier", &system_identifier),
            ],
            1.0,
        );
        out.gauge(
            "clusterwatch_pg_server_version_num",
            H_VERSION,
            &[],
            f64::from(s.version_num),
        );
        let role = if s.in_recovery { "standby" } else { "primary" };
        out.state_set(
            "clusterwatch_pg_role",
            H_ROLE,
            &[],
            "role",
            &["primary", "standby"],
            Some(role),
        );
        out.gauge(
            "clusterwatch_pg_max_connections",
            H_MAX_CONNECTIONS,
            &[],
            f64::from(s.max_connections),
        );
        let archiving = matches!(s.archive_mode.as_str(), "on" | "always");
        out.gauge(
            "clusterwatch_pg_archiver_enabled",
            H_ARCHIVE_MODE,
            &[],
            if archiving { 1.0 } else { 0.0 },
        );
        if let Some(n) = self.expected_standbys {
            out.gauge(
                "clusterwatch_pg_expected_standbys",
                H_EXPECTED,
                &[],
                f64::from(n),
            );
        }

        let receiver = results
            .get("wal_receiver")
            .and_then(|r| r.as_ref().ok())
            .and_then(|rows| rows.first());
        let receiver_status: Option<String> = receiver.and_then(|r| r.try_get(0).ok());
        let received_tli: Option<i64> = receiver.and_then(|r| r.try_get(1).ok());
        let last_msg: Option<f64> = receiver
            .and_then(|r| r.try_get::<_, Option<f64>>(2).ok())
            .flatten();

        // A primary's timeline comes from its current WAL file name (exact right after a
        // promotion); a standby's from what it receives, else its last checkpoint.
        let timeline = s.primary_timeline.or(received_tli).or(checkpoint_timeline);
        if let Some(tl) = timeline {
            out.gauge("clusterwatch_pg_timeline_id", H_TIMELINE, &[], tl as f64);
        }

        if let Some(lsn) = s.current_lsn {
            out.gauge("clusterwatch_pg_wal_lsn_bytes", H_WAL_LSN, &[], lsn);
        }
        if !s.in_recovery {
            state.last_upstream_message = None;
            state.replay = ReplayTracker::default();
            return;
        }
        if let Some(lsn) = s.receive_lsn {
            out.gauge(
                "clusterwatch_pg_wal_receive_lsn_bytes",
                H_RECEIVE_LSN,
                &[],
                lsn,
            );
        }
        if let Some(lsn) = s.replay_lsn {
            out.gauge(
                "clusterwatch_pg_wal_replay_lsn_bytes",
                H_REPLAY_LSN,
                &[],
                lsn,
            );
        }
        // Only report the receiver when its query worked; otherwise we do not know.
        if results.get("wal_receiver").is_some_and(|r| r.is_ok()) {
            let current = receiver_status.as_deref().unwrap_or("stopped");
            out.state_set(
                "clusterwatch_pg_wal_receiver_status",
                H_RECEIVER,
                &[],
                "status",
                RECEIVER_STATUSES,
                Some(current),
            );
            if let Some(r) = receiver {
                let host: String = r.try_get(3).unwrap_or_default();
                let port: i32 = r.try_get(4).unwrap_or_default();
                out.gauge(
                    "clusterwatch_pg_upstream_info",
                    H_UPSTREAM,
                    &[
                        ("upstream_host", &host),
                        ("upstream_port", &port.to_string()),
                    ],
                    1.0,
                );
            }
            let streaming = current == "streaming";
            if streaming {
                if let Some(t) = last_msg {
                    state.last_upstream_message = Some(t);
                }
            }
            let heard = if streaming {
                last_msg
            } else {
                state.last_upstream_message
            };
            // Never heard from upstream since we started watching: the last replayed
            // transaction is the best lower bound there is.
            if let Some(t) = heard.or(s.last_replay) {
                out.gauge(
                    "clusterwatch_pg_wal_receiver_last_message_age_seconds",
                    H_LAST_MSG,
                    &[],
                    (s.now - t).max(0.0),
                );
            }
            let replay_gap = match (s.receive_lsn, s.replay_lsn) {
                (Some(rx), Some(rp)) => (rx - rp).max(0.0),
                _ => 0.0,
            };
            out.gauge(
                "clusterwatch_pg_replay_lag_bytes",
                H_REPLAY_LAG_BYTES,
                &[],
                replay_gap,
            );
            let behind = match (s.receive_lsn, s.replay_lsn) {
                (Some(rx), Some(rp)) => state.replay.observe(s.now, rx, rp),
                _ => 0.0,
            };
            let lag_seconds = if streaming {
                behind
            } else {
                // Link down: behind by at least the time since upstream last spoke.
                let silent = heard.or(s.last_replay).map(|t| s.now - t).unwrap_or(0.0);
                behind.max(silent).max(0.0)
            };
            out.gauge(
                "clusterwatch_pg_replay_lag_seconds",
                H_REPLAY_LAG_SECONDS,
                &[],
                lag_seconds,
            );
        }
    }

    fn write_groups(
        &self,
        results: &HashMap<&'static str, Result<Vec<Row>, CollectError>>,
        out: &mut SampleBuffer,
    ) {
        let rows = |name: &str| results.get(name).and_then(|r| r.as_ref().ok());

        if let Some(rows) = rows("replication") {
            out.gauge(
                "clusterwatch_pg_walsenders",
                H_WALSENDERS,
                &[],
                rows.len() as f64,
            );
            for row in dedupe_standbys(rows) {
                write_standby(row, out);
            }
        }
        if let Some(row) = rows("archiver").and_then(|r| r.first()) {
            let archived: i64 = row.try_get(0).unwrap_or(0);
            let failed: i64 = row.try_get(1).unwrap_or(0);
            out.counter(
                "clusterwatch_pg_archiver_archived_total",
                H_ARCHIVED,
                &[],
                archived as f64,
            );
            out.counter(
                "clusterwatch_pg_archiver_failed_total",
                H_ARCHIVE_FAILED,
                &[],
                failed as f64,
            );
            if let Ok(Some(age)) = row.try_get::<_, Option<f64>>(2) {
                out.gauge(
                    "clusterwatch_pg_archiver_last_archived_age_seconds",
                    H_ARCHIVED_AGE,
                    &[],
                    age.max(0.0),
                );
            }
            if let Ok(Some(age)) = row.try_get::<_, Option<f64>>(3) {
                out.gauge(
                    "clusterwatch_pg_archiver_last_failed_age_seconds",
                    H_FAILED_AGE,
                    &[],
                    age.max(0.0),
                );
            }
        }
        if let Some(row) = rows("archive_status").and_then(|r| r.first()) {
            let ready: i64 = row.try_get(0).unwrap_or(0);
            let age: f64 = row.try_get(1).unwrap_or(0.0);
            out.gauge(
                "clusterwatch_pg_archiver_ready_files",
                H_READY,
                &[],
                ready as f64,
            );
            out.gauge(
                "clusterwatch_pg_archiver_oldest_ready_age_seconds",
                H_READY_AGE,
                &[],
                age.max(0.0),
            );
        }
        if let Some(row) = rows("wal_dir").and_then(|r| r.first()) {
            let segments: i64 = row.try_get(0).unwrap_or(0);
            let bytes: f64 = row.try_get(1).unwrap_or(0.0);
            out.gauge(
                "clusterwatch_pg_wal_dir_segments",
                H_WAL_DIR_SEGMENTS,
                &[],
                segments as f64,
            );
            out.gauge("clusterwatch_pg_wal_dir_bytes", H_WAL_DIR_BYTES, &[], bytes);
        }
        if let Some(rows) = rows("slots") {
            for row in rows {
                let name: String = row.try_get(0).unwrap_or_default();
                let kind: String = row.try_get(1).unwrap_or_default();
                let active: bool = row.try_get(2).unwrap_or(false);
                let retained: f64 = row.try_get(3).unwrap_or(0.0);
                let labels = [("slot_name", name.as_str()), ("slot_type", kind.as_str())];
                out.gauge(
                    "clusterwatch_pg_slot_active",
                    H_SLOT_ACTIVE,
                    &labels,
                    if active { 1.0 } else { 0.0 },
                );
                out.gauge(
                    "clusterwatch_pg_slot_retained_bytes",
                    H_SLOT_RETAINED,
                    &labels,
                    retained.max(0.0),
                );
            }
        }
        if let Some(rows) = rows("connections") {
            let mut oldest_idle_tx: f64 = 0.0;
            out.declare(
                "clusterwatch_pg_connections",
                H_CONNECTIONS,
                crate::snapshot::Kind::Gauge,
            );
            for row in rows {
                let db: String = row.try_get(0).unwrap_or_default();
                let user: String = row.try_get(1).unwrap_or_default();
                let st: String = row.try_get(2).unwrap_or_default();
                let n: i64 = row.try_get(3).unwrap_or(0);
                let age: f64 = row.try_get(4).unwrap_or(0.0);
                oldest_idle_tx = oldest_idle_tx.max(age);
                out.gauge(
                    "clusterwatch_pg_connections",
                    H_CONNECTIONS,
                    &[("database", &db), ("user", &user), ("state", &st)],
                    n as f64,
                );
            }
            out.gauge(
                "clusterwatch_pg_oldest_idle_in_transaction_seconds",
                H_IDLE_TX_AGE,
                &[],
                oldest_idle_tx,
            );
        }
        if let Some(rows) = rows("repmgr") {
            for row in rows {
                let name: String = row.try_get(1).unwrap_or_default();
                let role: String = row.try_get(2).unwrap_or_default();
                let active: bool = row.try_get(3).unwrap_or(false);
                let upstream: String = row.try_get(4).unwrap_or_default();
                let labels = [("node_name", name.as_str())];
                out.state_set(
                    "clusterwatch_pg_repmgr_node_role",
                    H_REPMGR_ROLE,
                    &labels,
                    "role",
                    REPMGR_ROLES,
                    Some(role.as_str()),
                );
                out.gauge(
                    "clusterwatch_pg_repmgr_node_active",
                    H_REPMGR_ACTIVE,
                    &labels,
                    if active { 1.0 } else { 0.0 },
                );
                out.gauge(
                    "clusterwatch_pg_repmgr_node_upstream_info",
                    H_REPMGR_UPSTREAM,
                    &[("node_name", &name), ("upstream", &upstream)],
                    1.0,
                );
            }
        }
    }

    /// Exposes each group's success and logs a failing group once per change of error.
    fn report_group_failures(
        &self,
        state: &mut State,
        results: &HashMap<&'static str, Result<Vec<Row>, CollectError>>,
        out: &mut SampleBuffer,
    ) {
        let mut names: Vec<&&'static str> = results.keys().collect();
        names.sort();
        for name in names {
            let ok = results[*name].is_ok();
            out.gauge(
                "clusterwatch_pg_query_success",
                H_QUERY_OK,
                &[("query", name)],
                if ok { 1.0 } else { 0.0 },
            );
            match &results[*name] {
                Ok(_) => {
                    if state.reported.remove(*name).is_some() {
                        tracing::info!(collector = "pg", target = %self.id.name, query = *name, "query works again");
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if state.reported.get(*name) != Some(&msg) {
                        let hint = if matches!(e, CollectError::Permission(_)) {
                            "grant the monitoring role pg_monitor (GRANT pg_monitor TO monitor)"
                        } else {
                            "this part of the metrics is skipped; the rest still works"
                        };
                        tracing::warn!(collector = "pg", target = %self.id.name, query = *name, reason = e.reason(), error = %msg, hint, "query failed");
                        state.reported.insert(name, msg);
                    }
                }
            }
        }
    }
}

/// Estimates how long ago the oldest WAL a standby has received but not replayed arrived,
/// from the receive positions seen at earlier scrapes. The last replayed transaction's time
/// would be wrong both ways: an idle standby that just received a periodic record is not
/// "minutes behind", and a standby replaying steadily under load is not behind forever.
#[derive(Default)]
struct ReplayTracker {
    /// (server time, receive position) at scrapes where the standby was behind, oldest first.
    seen: std::collections::VecDeque<(f64, f64)>,
}

/// Bound on remembered positions: a day of 15 s scrapes; beyond that the oldest are kept
/// and later ones thinned, so the estimate can only err towards "longer".
const REPLAY_TRACKER_CAPACITY: usize = 6000;

impl ReplayTracker {
    /// Records a scrape and returns the lag in seconds (0 when all received WAL is replayed
    /// or the unreplayed WAL was first seen at this scrape).
    fn observe(&mut self, now: f64, received: f64, replayed: f64) -> f64 {
        while self.seen.front().is_some_and(|&(_, rx)| rx <= replayed) {
            self.seen.pop_front();
        }
        if received > replayed && self.seen.back().is_none_or(|&(_, rx)| received > rx) {
            if self.seen.len() >= REPLAY_TRACKER_CAPACITY {
                self.seen.remove(1);
            }
            self.seen.push_back((now, received));
        }
        self.seen.front().map_or(0.0, |&(t, _)| (now - t).max(0.0))
    }
}

/// pg_stat_replication can hold two rows for one standby name and address (a base backup
/// beside the stream, a reconnect racing the old sender); series must be unique, so keep the
/// row that matters most: streaming over catchup over the rest.
fn dedupe_standbys(rows: &[Row]) -> Vec<&Row> {
    fn rank(state: &str) -> u8 {
        match state {
            "streaming" => 0,
            "catchup" => 1,
            "startup" => 2,
            "stopping" => 3,
            _ => 4,
        }
    }
    let mut best: Vec<(String, String, u8, &Row)> = Vec::new();
    for row in rows {
        let app: String = row.try_get(0).unwrap_or_default();
        let addr: String = row.try_get(1).unwrap_or_default();
        let state: String = row.try_get(2).unwrap_or_default();
        let r = rank(&state);
        match best.iter_mut().find(|(a, b, _, _)| *a == app && *b == addr) {
            Some(entry) if r < entry.2 => *entry = (app, addr, r, row),
            Some(_) => {}
            None => best.push((app, addr, r, row)),
        }
    }
    best.into_iter().map(|(_, _, _, row)| row).collect()
}

fn write_standby(row: &Row, out: &mut SampleBuffer) {
    let app: String = row.try_get(0).unwrap_or_default();
    let addr: String = row.try_get(1).unwrap_or_default();
    let state: String = row.try_get(2).unwrap_or_default();
    let sync: String = row.try_get(3).unwrap_or_default();
    let labels = [
        ("application_name", app.as_str()),
        ("client_addr", addr.as_str()),
    ];
    out.state_set(
        "clusterwatch_pg_replication_state",
        H_REPL_STATE,
        &labels,
        "state",
        REPLICATION_STATES,
        Some(state.as_str()),
    );
    out.state_set(
        "clusterwatch_pg_replication_sync_state",
        H_SYNC_STATE,
        &labels,
        "sync_state",
        SYNC_STATES,
        Some(sync.as_str()),
    );
    let mut byte_lags = [0.0f64; 4];
    for (i, stage) in ["sent", "write", "flush", "replay"].iter().enumerate() {
        if let Ok(Some(v)) = row.try_get::<_, Option<f64>>(4 + i) {
            byte_lags[i] = v;
            out.gauge(
                "clusterwatch_pg_replication_lag_bytes",
                H_LAG_BYTES,
                &[labels[0], labels[1], ("stage", stage)],
                v,
            );
        }
    }
    for (i, stage) in ["write", "flush", "replay"].iter().enumerate() {
        let v: Option<f64> = row.try_get(8 + i).ok().flatten();
        // PostgreSQL clears these once a streaming standby has caught up and gone idle; a
        // periodic record may make the byte lag briefly non-zero before a new time is
        // measured. That is 0, not unknown.
        let v = match v {
            Some(v) => Some(v),
            None if state == "streaming" || byte_lags[i + 1] == 0.0 => Some(0.0),
            None => None,
        };
        if let Some(v) = v {
            out.gauge(
                "clusterwatch_pg_replication_lag_seconds",
                H_LAG_SECONDS,
                &[labels[0], labels[1], ("stage", stage)],
                v.max(0.0),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;
    use std::path::Path;

    #[test]
    fn dsn_is_never_echoed_and_password_file_is_checked() {
        let yaml = "postgres:\n  - name: a\n    dsn: 'postgresql://mon:s3cret@[bad'\n  - name: b\n    dsn: postgresql://mon@127.0.0.1/postgres\n    password_file: /nonexistent/pg.pass\n  - name: b\n    dsn: postgresql://mon@127.0.0.1/postgres\n";
        let err = parse(yaml, "c.yml", Path::new(".")).unwrap_err();
        let text = err.render();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("c.yml:3:5: postgres[0].dsn: not a valid PostgreSQL connection string"),
            "{text}"
        );
        assert!(text.contains("c.yml:6:5: postgres[1].password_file: cannot read secret file /nonexistent/pg.pass"), "{text}");
        assert!(
            text.contains("postgres[2].name: duplicate pg target name `b`"),
            "{text}"
        );
    }

    #[test]
    fn replay_lag_counts_from_when_unreplayed_wal_arrived() {
        let mut t = ReplayTracker::default();
        assert_eq!(t.observe(100.0, 500.0, 500.0), 0.0, "caught up");
        // A small record arrives on an idle standby: seen now, so no lag yet.
        assert_eq!(t.observe(115.0, 600.0, 500.0), 0.0);
        // Replayed by the next scrape.
        assert_eq!(t.observe(130.0, 600.0, 600.0), 0.0);
        // Replay stalls while WAL keeps arriving: lag grows from when it first fell behind.
        assert_eq!(t.observe(145.0, 700.0, 600.0), 0.0);
        assert_eq!(t.observe(160.0, 800.0, 600.0), 15.0);
        assert_eq!(t.observe(175.0, 900.0, 600.0), 30.0);
        // Replay moves on past what had arrived at 145: the oldest unreplayed came at 160.
        assert_eq!(t.observe(190.0, 900.0, 750.0), 30.0);
        assert_eq!(t.observe(205.0, 900.0, 900.0), 0.0);
    }

    #[test]
    fn valid_target_keeps_cluster_and_timeout() {
        let yaml = "postgres:\n  - { name: em1, cluster: sre-db, dsn: 'host=127.0.0.1 user=monitor', timeout: 2s, expected_standbys: 1 }\n";
        let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
        let pg = cfg.targets.iter().find(|t| t.name() == "pg").unwrap();
        assert_eq!(pg.target(), "em1");
        assert_eq!(pg.cluster(), Some("sre-db"));
        assert_eq!(pg.timeout(), Some(Duration::from_secs(2)));
    }
}
