//! Typed rows of every PostgreSQL query group, read by column name, and [`Scrape`]: what one
//! scrape read, each optional group as its own result. No I/O and no metrics here: the rows
//! are filled in `queries.rs` and turned into samples in `samples.rs`.

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::collector::CollectError;

/// A row type built from a result row by column name (the SQL aliases are the field names).
pub(crate) trait FromRow: Sized {
    /// Reads every field from the column of the same name; fails on a missing column or a
    /// NULL or type where the field does not allow one.
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error>;
}

/// Declares a row struct whose fields are read from the columns of the same name, so a field
/// and its SQL alias cannot drift apart unnoticed (a missing column fails the group).
macro_rules! typed_row {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl FromRow for $name {
            fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
                Ok(Self { $($field: row.try_get(stringify!($field))?,)* })
            }
        }
    };
}

typed_row! {
    /// The node's status (required: without it the target is down).
    StatusRow {
        /// `server_version_num`, e.g. 150004.
        version_num: i32,
        /// `server_version`, e.g. `15.4 (Debian 15.4-1)`.
        version: String,
        /// `pg_is_in_recovery()`: a standby.
        in_recovery: bool,
        /// A primary's current WAL position in bytes since 0/0; NULL on a standby.
        current_lsn: Option<f64>,
        /// A standby's last received WAL position; NULL on a primary that never was one.
        receive_lsn: Option<f64>,
        /// A standby's last replayed WAL position.
        replay_lsn: Option<f64>,
        /// A primary's timeline, from its current WAL file name; NULL on a standby.
        primary_timeline: Option<i64>,
        /// The server's clock, in Unix seconds: every age is measured against it.
        server_time: f64,
        /// When the last replayed transaction was committed on the primary, Unix seconds.
        last_replay_time: Option<f64>,
        /// The `max_connections` setting.
        max_connections: i32,
        /// The `archive_mode` setting (`off`, `on`, `always`).
        archive_mode: String,
        /// Whether a `repmgr.nodes` table exists.
        has_repmgr: bool,
    }
}

typed_row! {
    /// `pg_control_system()` and the last checkpoint's timeline.
    ControlRow {
        /// The cluster's system identifier (equal on a primary and its standbys).
        system_identifier: String,
        /// Timeline of the last checkpoint.
        timeline_id: Option<i64>,
    }
}

typed_row! {
    /// One WAL sender of `pg_stat_replication`, with its lags behind this node's position.
    ReplicationRow {
        /// The standby's `application_name` (empty when unknown).
        application_name: String,
        /// The standby's address (empty for a unix socket or when hidden).
        client_addr: String,
        /// WAL sender state (empty when hidden from an unprivileged role).
        state: String,
        /// Synchronous state (empty when hidden).
        sync_state: String,
        /// Bytes not yet sent.
        sent_lag_bytes: Option<f64>,
        /// Bytes not yet written by the standby.
        write_lag_bytes: Option<f64>,
        /// Bytes not yet flushed by the standby.
        flush_lag_bytes: Option<f64>,
        /// Bytes not yet replayed by the standby.
        replay_lag_bytes: Option<f64>,
        /// `write_lag` in seconds; NULL once an idle standby has caught up.
        write_lag_seconds: Option<f64>,
        /// `flush_lag` in seconds.
        flush_lag_seconds: Option<f64>,
        /// `replay_lag` in seconds.
        replay_lag_seconds: Option<f64>,
    }
}

typed_row! {
    /// A standby's WAL receiver (`pg_stat_wal_receiver`; no row when none runs).
    WalReceiverRow {
        /// `streaming`, `waiting`, …; NULL when hidden from an unprivileged role.
        status: Option<String>,
        /// Timeline of the last WAL received.
        received_tli: Option<i64>,
        /// When the last message from upstream arrived, Unix seconds.
        last_msg_receipt_time: Option<f64>,
        /// Upstream host (empty when unknown).
        sender_host: String,
        /// Upstream port (0 when unknown).
        sender_port: i32,
    }
}

typed_row! {
    /// `pg_stat_archiver`.
    ArchiverRow {
        /// WAL files archived since statistics were reset.
        archived_count: i64,
        /// Failed archive attempts since statistics were reset.
        failed_count: i64,
        /// Seconds since the last successful archive; NULL if never.
        last_archived_age: Option<f64>,
        /// Seconds since the last failed attempt; NULL if never.
        last_failed_age: Option<f64>,
    }
}

typed_row! {
    /// The `.ready` files of `pg_wal/archive_status`.
    ArchiveStatusRow {
        /// Segments waiting to be archived.
        ready_count: i64,
        /// Age of the oldest of them in seconds (0 when none).
        oldest_ready_age: f64,
    }
}

typed_row! {
    /// `pg_ls_waldir()` summed up.
    WalDirRow {
        /// WAL segment files.
        segments: i64,
        /// Bytes of every file in `pg_wal`.
        bytes: f64,
    }
}

typed_row! {
    /// One replication slot.
    SlotRow {
        /// Slot name.
        slot_name: String,
        /// `physical` or `logical`.
        slot_type: String,
        /// Whether a consumer is connected.
        active: bool,
        /// WAL retained for it, in bytes.
        retained_bytes: f64,
    }
}

typed_row! {
    /// Client connections grouped by database, user and state.
    ConnectionRow {
        /// Database (empty when none).
        database: String,
        /// User (empty when hidden).
        user_name: String,
        /// `active`, `idle`, `idle in transaction`, … (`unknown` when hidden).
        state: String,
        /// How many.
        connections: i64,
        /// Age of the oldest transaction an idle-in-transaction session of the group holds.
        oldest_idle_in_transaction_age: f64,
    }
}

typed_row! {
    /// The size of one database or tablespace.
    SizeRow {
        /// Database or tablespace name.
        name: String,
        /// Size in bytes; NULL when it went away while being measured.
        bytes: Option<f64>,
    }
}

typed_row! {
    /// One node of repmgr's node table.
    RepmgrNodeRow {
        /// repmgr's node id.
        node_id: i64,
        /// repmgr's node name.
        node_name: String,
        /// `primary`, `standby`, `witness` or `bdr`.
        node_type: String,
        /// Whether repmgr marks it active.
        active: bool,
        /// Name of its upstream node (empty when none).
        upstream_node_name: String,
    }
}

/// Why an optional query group failed, kept apart from the target's own [`CollectError`]:
/// the group is reported on `clusterwatch_pg_query_success` and logged, the scrape goes on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupError {
    /// The [`CollectError::reason`] word (`permission`, `query`, …).
    pub reason: String,
    /// What failed, for the log; never a secret.
    pub message: String,
}

impl GroupError {
    /// Whether a missing privilege caused it (a grant fixes it).
    pub fn is_permission(&self) -> bool {
        self.reason == "permission"
    }
}

impl From<CollectError> for GroupError {
    fn from(e: CollectError) -> Self {
        GroupError {
            reason: e.reason().to_owned(),
            message: e.to_string(),
        }
    }
}

/// The rows of one optional query group. A group not run on this scrape (cached, or not
/// applicable to the node's role) is `Ok` and empty: skipping is not failing.
pub type Group<R> = Result<Vec<R>, GroupError>;

/// Database and tablespace sizes, read together on the slow cadence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// One row per database that allows connections.
    pub databases: Vec<SizeRow>,
    /// One row per tablespace.
    pub tablespaces: Vec<SizeRow>,
}

/// Everything one scrape read from one server: the status row and each group's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scrape {
    /// The status row.
    pub status: StatusRow,
    /// System identifier and checkpoint timeline (read on the slow cadence).
    pub control: Group<ControlRow>,
    /// WAL senders.
    pub replication: Group<ReplicationRow>,
    /// The WAL receiver (not run once the node is known to be a primary).
    pub wal_receiver: Group<WalReceiverRow>,
    /// Archiver statistics.
    pub archiver: Group<ArchiverRow>,
    /// Segments waiting to be archived.
    pub archive_status: Group<ArchiveStatusRow>,
    /// The WAL directory.
    pub wal_dir: Group<WalDirRow>,
    /// Replication slots.
    pub slots: Group<SlotRow>,
    /// Client connections.
    pub connections: Group<ConnectionRow>,
    /// Sizes: `None` when the cached ones are still fresh (reported as working).
    pub sizes: Option<Result<Sizes, GroupError>>,
    /// repmgr's node table: `None` where there is no repmgr schema (no series at all).
    pub repmgr: Option<Group<RepmgrNodeRow>>,
}

impl Scrape {
    /// Each group's name (the `query` label) and its error if it failed, sorted by name.
    pub fn outcomes(&self) -> Vec<(&'static str, Option<&GroupError>)> {
        fn failed<T>(r: &Result<T, GroupError>) -> Option<&GroupError> {
            r.as_ref().err()
        }
        let mut all = vec![
            ("control", failed(&self.control)),
            ("replication", failed(&self.replication)),
            ("wal_receiver", failed(&self.wal_receiver)),
            ("archiver", failed(&self.archiver)),
            ("archive_status", failed(&self.archive_status)),
            ("wal_dir", failed(&self.wal_dir)),
            ("slots", failed(&self.slots)),
            ("connections", failed(&self.connections)),
            ("sizes", self.sizes.as_ref().and_then(failed)),
        ];
        if let Some(repmgr) = &self.repmgr {
            all.push(("repmgr", failed(repmgr)));
        }
        all.sort_by_key(|(name, _)| *name);
        all
    }
}
