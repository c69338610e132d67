//! The SQL of every query group and the session that runs them: one connection, every
//! statement prepared in one round trip, all groups of a scrape pipelined, rows typed.
//! What the rows mean (metrics, lags, state kept between scrapes) is not decided here.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use super::rows::{FromRow, Group, GroupError, RepmgrNodeRow, Scrape, SizeRow, Sizes, StatusRow};
use crate::collector::CollectError;

/// The node's status. Required: when it fails, the target is down. (repmgr's table is looked
/// up in the catalog, not with to_regclass, which errors without USAGE on the schema.)
const STATUS_SQL: &str = "SELECT current_setting('server_version_num')::int4 AS version_num, \
    current_setting('server_version') AS version, \
    pg_is_in_recovery() AS in_recovery, \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 END AS current_lsn, \
    pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::float8 AS receive_lsn, \
    pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::float8 AS replay_lsn, \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END AS primary_timeline, \
    extract(epoch FROM now())::float8 AS server_time, \
    extract(epoch FROM pg_last_xact_replay_timestamp())::float8 AS last_replay_time, \
    current_setting('max_connections')::int4 AS max_connections, \
    current_setting('archive_mode') AS archive_mode, \
    EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
            WHERE n.nspname = 'repmgr' AND c.relname = 'nodes') AS has_repmgr";

const CONTROL_SQL: &str = "SELECT system_identifier::text AS system_identifier, \
    (SELECT timeline_id FROM pg_control_checkpoint())::int8 AS timeline_id FROM pg_control_system()";

const REPLICATION_SQL: &str = "SELECT coalesce(application_name, '') AS application_name, \
    coalesce(host(client_addr), '') AS client_addr, coalesce(state, '') AS state, coalesce(sync_state, '') AS sync_state, \
    greatest(pg_wal_lsn_diff(c.cur, sent_lsn), 0)::float8 AS sent_lag_bytes, \
    greatest(pg_wal_lsn_diff(c.cur, write_lsn), 0)::float8 AS write_lag_bytes, \
    greatest(pg_wal_lsn_diff(c.cur, flush_lsn), 0)::float8 AS flush_lag_bytes, \
    greatest(pg_wal_lsn_diff(c.cur, replay_lsn), 0)::float8 AS replay_lag_bytes, \
    extract(epoch FROM write_lag)::float8 AS write_lag_seconds, extract(epoch FROM flush_lag)::float8 AS flush_lag_seconds, \
    extract(epoch FROM replay_lag)::float8 AS replay_lag_seconds \
    FROM pg_stat_replication, \
    (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS cur) c";

const WAL_RECEIVER_SQL: &str = "SELECT status, received_tli::int8 AS received_tli, \
    extract(epoch FROM last_msg_receipt_time)::float8 AS last_msg_receipt_time, \
    coalesce(sender_host, '') AS sender_host, coalesce(sender_port, 0)::int4 AS sender_port \
    FROM pg_stat_wal_receiver";

const ARCHIVER_SQL: &str =
    "SELECT archived_count::int8 AS archived_count, failed_count::int8 AS failed_count, \
    extract(epoch FROM now() - last_archived_time)::float8 AS last_archived_age, \
    extract(epoch FROM now() - last_failed_time)::float8 AS last_failed_age FROM pg_stat_archiver";

const ARCHIVE_STATUS_SQL: &str = "SELECT count(*)::int8 AS ready_count, \
    coalesce(extract(epoch FROM now() - min(modification)), 0)::float8 AS oldest_ready_age \
    FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'";

const WAL_DIR_SQL: &str =
    "SELECT (count(*) FILTER (WHERE name ~ '^[0-9A-F]{24}$'))::int8 AS segments, \
    coalesce(sum(size), 0)::float8 AS bytes FROM pg_ls_waldir()";

const SLOTS_SQL: &str = "SELECT slot_name::text AS slot_name, slot_type, active, \
    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::float8 AS retained_bytes \
    FROM pg_replication_slots";

const CONNECTIONS_SQL: &str = "SELECT coalesce(datname::text, '') AS database, coalesce(usename::text, '') AS user_name, \
    coalesce(state, 'unknown') AS state, count(*)::int8 AS connections, \
    coalesce(max(extract(epoch FROM now() - xact_start)) FILTER (WHERE state LIKE 'idle in transaction%'), 0)::float8 AS oldest_idle_in_transaction_age \
    FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2, 3";

/// Slow-cadence groups, run only when the cached sizes are older than `sizes_interval`.
const DATABASE_SIZES_SQL: &str =
    "SELECT datname::text AS name, pg_database_size(oid)::float8 AS bytes FROM pg_database WHERE datallowconn";
const TABLESPACE_SIZES_SQL: &str =
    "SELECT spcname::text AS name, pg_tablespace_size(oid)::float8 AS bytes FROM pg_tablespace";

/// Only where a repmgr schema exists; not prepared ahead, since most servers have none.
const REPMGR_SQL: &str = "SELECT n.node_id::int8 AS node_id, n.node_name::text AS node_name, \
    n.type::text AS node_type, n.active, coalesce(u.node_name::text, '') AS upstream_node_name \
    FROM repmgr.nodes n LEFT JOIN repmgr.nodes u ON u.node_id = n.upstream_node_id";

/// Each group's SQL by its field name in [`Scrape`], so tests can check that every field of
/// its row type is a column the SQL names.
#[cfg(test)]
pub(super) const SQL_BY_GROUP: &[(&str, &str)] = &[
    ("status", STATUS_SQL),
    ("control", CONTROL_SQL),
    ("replication", REPLICATION_SQL),
    ("wal_receiver", WAL_RECEIVER_SQL),
    ("archiver", ARCHIVER_SQL),
    ("archive_status", ARCHIVE_STATUS_SQL),
    ("wal_dir", WAL_DIR_SQL),
    ("slots", SLOTS_SQL),
    ("connections", CONNECTIONS_SQL),
    ("sizes", DATABASE_SIZES_SQL),
    ("sizes", TABLESPACE_SIZES_SQL),
    ("repmgr", REPMGR_SQL),
];

/// Every prepared statement, in the order of [`Session::statements`].
#[derive(Clone, Copy)]
enum Query {
    Status,
    Control,
    Replication,
    WalReceiver,
    Archiver,
    ArchiveStatus,
    WalDir,
    Slots,
    Connections,
    DatabaseSizes,
    TablespaceSizes,
}

impl Query {
    const ALL: [Query; 11] = [
        Query::Status,
        Query::Control,
        Query::Replication,
        Query::WalReceiver,
        Query::Archiver,
        Query::ArchiveStatus,
        Query::WalDir,
        Query::Slots,
        Query::Connections,
        Query::DatabaseSizes,
        Query::TablespaceSizes,
    ];

    fn sql(self) -> &'static str {
        match self {
            Query::Status => STATUS_SQL,
            Query::Control => CONTROL_SQL,
            Query::Replication => REPLICATION_SQL,
            Query::WalReceiver => WAL_RECEIVER_SQL,
            Query::Archiver => ARCHIVER_SQL,
            Query::ArchiveStatus => ARCHIVE_STATUS_SQL,
            Query::WalDir => WAL_DIR_SQL,
            Query::Slots => SLOTS_SQL,
            Query::Connections => CONNECTIONS_SQL,
            Query::DatabaseSizes => DATABASE_SIZES_SQL,
            Query::TablespaceSizes => TABLESPACE_SIZES_SQL,
        }
    }
}

/// Which of the skippable groups one scrape runs; the others are reported as working.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// System identifier and checkpoint timeline (slow cadence).
    pub control: bool,
    /// The WAL receiver (pointless on a known primary).
    pub wal_receiver: bool,
    /// Database and tablespace sizes (slow cadence).
    pub sizes: bool,
}

impl Plan {
    /// Everything, as on a new connection.
    pub const ALL: Plan = Plan {
        control: true,
        wal_receiver: true,
        sizes: true,
    };
}

/// A connection and its prepared statements. A statement that could not be prepared (old
/// server, missing function) keeps its error so the group is reported and skipped.
pub(crate) struct Session {
    client: Client,
    /// Indexed by `Query as usize`.
    statements: Vec<Result<Statement, String>>,
}

impl Session {
    /// Connects within `deadline` and prepares every statement in one pipelined round trip.
    /// `target` only names the connection in the debug log of its end.
    pub async fn open(
        config: &tokio_postgres::Config,
        deadline: Instant,
        target: &str,
    ) -> Result<Session, CollectError> {
        let mut cfg = config.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        cfg.connect_timeout(remaining.max(Duration::from_millis(10)));
        let (client, connection) = cfg.connect(NoTls).await.map_err(|e| classify(&e))?;
        let target = target.to_owned();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(collector = "pg", target = %target, error = %describe(&e), "connection closed");
            }
        });
        let prepared =
            futures::future::join_all(Query::ALL.iter().map(|q| client.prepare(q.sql()))).await;
        let statements: Vec<_> = prepared
            .into_iter()
            .map(|r| r.map_err(|e| describe(&e)))
            .collect();
        if let Err(e) = &statements[Query::Status as usize] {
            return Err(CollectError::Query(format!(
                "status query cannot be prepared: {e}"
            )));
        }
        Ok(Session { client, statements })
    }

    /// Whether the server closed the connection.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs the status query and the groups `plan` asks for, all pipelined on the connection
    /// (a scrape costs about one round trip), then repmgr's table where there is one. A
    /// failed status query fails the scrape; a failed group is only that group's error.
    pub async fn scrape(&self, plan: Plan) -> Result<Scrape, CollectError> {
        let (
            status,
            control,
            replication,
            wal_receiver,
            archiver,
            archive_status,
            wal_dir,
            slots,
            connections,
            sizes,
        ) = futures::join!(
            self.typed::<StatusRow>(Query::Status),
            self.group_if(plan.control, Query::Control),
            self.group(Query::Replication),
            self.group_if(plan.wal_receiver, Query::WalReceiver),
            self.group(Query::Archiver),
            self.group(Query::ArchiveStatus),
            self.group(Query::WalDir),
            self.group(Query::Slots),
            self.group(Query::Connections),
            self.sizes(plan.sizes),
        );
        let status = status?
            .into_iter()
            .next()
            .ok_or_else(|| CollectError::Protocol("status query returned no row".into()))?;
        let repmgr = if status.has_repmgr {
            Some(self.repmgr().await)
        } else {
            None
        };
        Ok(Scrape {
            status,
            control,
            replication,
            wal_receiver,
            archiver,
            archive_status,
            wal_dir,
            slots,
            connections,
            sizes,
            repmgr,
        })
    }

    /// Runs a prepared statement and types its rows; a row that does not fit is a protocol
    /// error (the SQL and the row type disagree).
    async fn typed<R: FromRow>(&self, query: Query) -> Result<Vec<R>, CollectError> {
        let stmt = match &self.statements[query as usize] {
            Ok(stmt) => stmt,
            Err(e) => return Err(CollectError::Query(format!("cannot prepare: {e}"))),
        };
        let rows = self
            .client
            .query(stmt, &[])
            .await
            .map_err(|e| classify(&e))?;
        read_rows(&rows)
    }

    async fn group<R: FromRow>(&self, query: Query) -> Group<R> {
        self.typed(query).await.map_err(GroupError::from)
    }

    async fn group_if<R: FromRow>(&self, wanted: bool, query: Query) -> Group<R> {
        if wanted {
            self.group(query).await
        } else {
            Ok(Vec::new())
        }
    }

    /// Both size groups or neither; the first failure stands for both.
    async fn sizes(&self, due: bool) -> Option<Result<Sizes, GroupError>> {
        if !due {
            return None;
        }
        let (databases, tablespaces) = futures::join!(
            self.group::<SizeRow>(Query::DatabaseSizes),
            self.group::<SizeRow>(Query::TablespaceSizes)
        );
        Some(databases.and_then(|databases| {
            Ok(Sizes {
                databases,
                tablespaces: tablespaces?,
            })
        }))
    }

    async fn repmgr(&self) -> Group<RepmgrNodeRow> {
        match self.client.query(REPMGR_SQL, &[]).await {
            Ok(rows) => read_rows(&rows).map_err(GroupError::from),
            Err(e) => Err(classify(&e).into()),
        }
    }
}

fn read_rows<R: FromRow>(rows: &[tokio_postgres::Row]) -> Result<Vec<R>, CollectError> {
    rows.iter()
        .map(|row| R::from_row(row).map_err(|e| CollectError::Protocol(describe(&e))))
        .collect()
}

/// Maps a driver error to the failure reason the engine and the group report use.
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
