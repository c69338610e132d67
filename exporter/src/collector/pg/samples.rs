//! From one scrape's typed rows to samples: a pure function (no I/O, no clock) over the rows
//! and [`Memory`], the little kept between scrapes (cached slow groups, when upstream last
//! spoke, when unreplayed WAL arrived). Which queries run and logging are not done here.

use super::rows::{
    ArchiveStatusRow, ArchiverRow, ConnectionRow, ControlRow, ReplicationRow, RepmgrNodeRow,
    Scrape, Sizes, SlotRow, StatusRow, WalDirRow, WalReceiverRow,
};
use crate::snapshot::{Kind, SampleBuffer};

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

/// What the samples depend on besides the current rows, kept by the collector between scrapes
/// on one server.
#[derive(Default)]
pub(crate) struct Memory {
    /// The last control row read (its group runs on the slow cadence).
    pub control: Option<ControlRow>,
    /// The last sizes read (slow cadence).
    pub sizes: Option<Sizes>,
    /// Server time of the last message from upstream while the WAL receiver was streaming,
    /// so the lag keeps growing after the link is gone.
    pub last_upstream_message: Option<f64>,
    /// When the WAL a standby has not replayed yet arrived, for its lag in seconds.
    pub replay: ReplayTracker,
}

/// Which cached groups a scrape refreshed, so the collector restarts their cadence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Refreshed {
    /// The control row was read.
    pub control: bool,
    /// Both size groups were read.
    pub sizes: bool,
}

/// Writes every sample of one scrape and updates `memory`; the result says what was
/// refreshed. Groups that failed write nothing but their `clusterwatch_pg_query_success` 0.
pub(crate) fn write(
    scrape: &Scrape,
    memory: &mut Memory,
    expected_standbys: Option<u32>,
    out: &mut SampleBuffer,
) -> Refreshed {
    let refreshed = remember(scrape, memory);
    let s = &scrape.status;
    write_node(s, memory.control.as_ref(), expected_standbys, out);
    let receiver = scrape.wal_receiver.as_ref().ok().map(|rows| rows.first());
    write_timeline(s, receiver.flatten(), memory.control.as_ref(), out);
    if s.in_recovery {
        write_standby_side(s, receiver, memory, out);
    } else {
        memory.last_upstream_message = None;
        memory.replay = ReplayTracker::default();
    }
    if let Some(sizes) = &memory.sizes {
        write_sizes(sizes, out);
    }
    if let Ok(rows) = &scrape.replication {
        write_replication(rows, out);
    }
    if let Some(row) = scrape.archiver.as_ref().ok().and_then(|r| r.first()) {
        write_archiver(row, out);
    }
    if let Some(row) = scrape.archive_status.as_ref().ok().and_then(|r| r.first()) {
        write_archive_status(row, out);
    }
    if let Some(row) = scrape.wal_dir.as_ref().ok().and_then(|r| r.first()) {
        write_wal_dir(row, out);
    }
    if let Ok(rows) = &scrape.slots {
        write_slots(rows, out);
    }
    if let Ok(rows) = &scrape.connections {
        write_connections(rows, out);
    }
    if let Some(Ok(rows)) = &scrape.repmgr {
        write_repmgr(rows, out);
    }
    for (name, error) in scrape.outcomes() {
        let ok = if error.is_none() { 1.0 } else { 0.0 };
        out.gauge(
            "clusterwatch_pg_query_success",
            H_QUERY_OK,
            &[("query", name)],
            ok,
        );
    }
    refreshed
}

/// Takes the slow groups this scrape read into `memory`.
fn remember(scrape: &Scrape, memory: &mut Memory) -> Refreshed {
    let mut refreshed = Refreshed::default();
    if let Some(row) = scrape.control.as_ref().ok().and_then(|rows| rows.first()) {
        memory.control = Some(row.clone());
        refreshed.control = true;
    }
    if let Some(Ok(sizes)) = &scrape.sizes {
        memory.sizes = Some(sizes.clone());
        refreshed.sizes = true;
    }
    refreshed
}

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Identity, role and settings.
fn write_node(
    s: &StatusRow,
    control: Option<&ControlRow>,
    expected_standbys: Option<u32>,
    out: &mut SampleBuffer,
) {
    let system_identifier = control.map_or("", |c| c.system_identifier.as_str());
    out.gauge(
        "clusterwatch_pg_info",
        H_INFO,
        &[
            ("server_version", &s.version),
            ("system_identifier", system_identifier),
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
        bool_value(archiving),
    );
    if let Some(n) = expected_standbys {
        out.gauge(
            "clusterwatch_pg_expected_standbys",
            H_EXPECTED,
            &[],
            f64::from(n),
        );
    }
}

/// Timeline and a primary's WAL position.
fn write_timeline(
    s: &StatusRow,
    receiver: Option<&WalReceiverRow>,
    control: Option<&ControlRow>,
    out: &mut SampleBuffer,
) {
    // A primary's timeline comes from its current WAL file name (exact right after a
    // promotion); a standby's from what it receives, else its last checkpoint.
    let timeline = s
        .primary_timeline
        .or(receiver.and_then(|r| r.received_tli))
        .or(control.and_then(|c| c.timeline_id));
    if let Some(tl) = timeline {
        out.gauge("clusterwatch_pg_timeline_id", H_TIMELINE, &[], tl as f64);
    }
    if let Some(lsn) = s.current_lsn {
        out.gauge("clusterwatch_pg_wal_lsn_bytes", H_WAL_LSN, &[], lsn);
    }
}

/// A standby's positions, WAL receiver and replay lag. `receiver` is `None` when its query
/// failed (then nothing about the receiver is known), `Some(None)` when none runs.
fn write_standby_side(
    s: &StatusRow,
    receiver: Option<Option<&WalReceiverRow>>,
    memory: &mut Memory,
    out: &mut SampleBuffer,
) {
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
    let Some(receiver) = receiver else {
        return;
    };
    let current = receiver
        .and_then(|r| r.status.as_deref())
        .unwrap_or("stopped");
    out.state_set(
        "clusterwatch_pg_wal_receiver_status",
        H_RECEIVER,
        &[],
        "status",
        RECEIVER_STATUSES,
        Some(current),
    );
    if let Some(r) = receiver {
        out.gauge(
            "clusterwatch_pg_upstream_info",
            H_UPSTREAM,
            &[
                ("upstream_host", &r.sender_host),
                ("upstream_port", &r.sender_port.to_string()),
            ],
            1.0,
        );
    }
    let last_msg = receiver.and_then(|r| r.last_msg_receipt_time);
    write_replay_lag(s, current == "streaming", last_msg, memory, out);
}

/// Time since upstream last spoke and how far replay is behind, in bytes and seconds.
fn write_replay_lag(
    s: &StatusRow,
    streaming: bool,
    last_msg: Option<f64>,
    memory: &mut Memory,
    out: &mut SampleBuffer,
) {
    if streaming {
        if let Some(t) = last_msg {
            memory.last_upstream_message = Some(t);
        }
    }
    let heard = if streaming {
        last_msg
    } else {
        memory.last_upstream_message
    };
    // Never heard from upstream since we started watching: the last replayed transaction
    // is the best lower bound there is.
    let heard_or_replayed = heard.or(s.last_replay_time);
    if let Some(t) = heard_or_replayed {
        out.gauge(
            "clusterwatch_pg_wal_receiver_last_message_age_seconds",
            H_LAST_MSG,
            &[],
            (s.server_time - t).max(0.0),
        );
    }
    let positions = s.receive_lsn.zip(s.replay_lsn);
    let replay_gap = positions.map_or(0.0, |(rx, rp)| (rx - rp).max(0.0));
    out.gauge(
        "clusterwatch_pg_replay_lag_bytes",
        H_REPLAY_LAG_BYTES,
        &[],
        replay_gap,
    );
    let behind = positions.map_or(0.0, |(rx, rp)| memory.replay.observe(s.server_time, rx, rp));
    let lag_seconds = if streaming {
        behind
    } else {
        // Link down: behind by at least the time since upstream last spoke.
        let silent = heard_or_replayed.map_or(0.0, |t| s.server_time - t);
        behind.max(silent).max(0.0)
    };
    out.gauge(
        "clusterwatch_pg_replay_lag_seconds",
        H_REPLAY_LAG_SECONDS,
        &[],
        lag_seconds,
    );
}

fn write_sizes(sizes: &Sizes, out: &mut SampleBuffer) {
    for row in &sizes.databases {
        if let Some(bytes) = row.bytes {
            out.gauge(
                "clusterwatch_pg_database_size_bytes",
                H_DB_SIZE,
                &[("database", &row.name)],
                bytes,
            );
        }
    }
    for row in &sizes.tablespaces {
        if let Some(bytes) = row.bytes {
            out.gauge(
                "clusterwatch_pg_tablespace_size_bytes",
                H_TS_SIZE,
                &[("tablespace", &row.name)],
                bytes,
            );
        }
    }
}

fn write_replication(rows: &[ReplicationRow], out: &mut SampleBuffer) {
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

/// pg_stat_replication can hold two rows for one standby name and address (a base backup
/// beside the stream, a reconnect racing the old sender); series must be unique, so keep the
/// row that matters most: streaming over catchup over the rest.
fn dedupe_standbys(rows: &[ReplicationRow]) -> Vec<&ReplicationRow> {
    fn rank(state: &str) -> u8 {
        match state {
            "streaming" => 0,
            "catchup" => 1,
            "startup" => 2,
            "stopping" => 3,
            _ => 4,
        }
    }
    let mut best: Vec<&ReplicationRow> = Vec::new();
    for row in rows {
        let kept = best.iter_mut().find(|b| {
            b.application_name == row.application_name && b.client_addr == row.client_addr
        });
        match kept {
            Some(kept) if rank(&row.state) < rank(&kept.state) => *kept = row,
            Some(_) => {}
            None => best.push(row),
        }
    }
    best
}

/// One standby as its upstream sees it.
fn write_standby(row: &ReplicationRow, out: &mut SampleBuffer) {
    let labels = [
        ("application_name", row.application_name.as_str()),
        ("client_addr", row.client_addr.as_str()),
    ];
    out.state_set(
        "clusterwatch_pg_replication_state",
        H_REPL_STATE,
        &labels,
        "state",
        REPLICATION_STATES,
        Some(row.state.as_str()),
    );
    out.state_set(
        "clusterwatch_pg_replication_sync_state",
        H_SYNC_STATE,
        &labels,
        "sync_state",
        SYNC_STATES,
        Some(row.sync_state.as_str()),
    );
    let byte_lags = [
        ("sent", row.sent_lag_bytes),
        ("write", row.write_lag_bytes),
        ("flush", row.flush_lag_bytes),
        ("replay", row.replay_lag_bytes),
    ];
    for (stage, lag) in byte_lags {
        if let Some(v) = lag {
            out.gauge(
                "clusterwatch_pg_replication_lag_bytes",
                H_LAG_BYTES,
                &[labels[0], labels[1], ("stage", stage)],
                v,
            );
        }
    }
    let time_lags = [
        ("write", row.write_lag_seconds, row.write_lag_bytes),
        ("flush", row.flush_lag_seconds, row.flush_lag_bytes),
        ("replay", row.replay_lag_seconds, row.replay_lag_bytes),
    ];
    for (stage, seconds, bytes) in time_lags {
        // PostgreSQL clears these once a streaming standby has caught up and gone idle; a
        // periodic record may make the byte lag briefly non-zero before a new time is
        // measured. That is 0, not unknown.
        let caught_up = row.state == "streaming" || bytes.unwrap_or(0.0) == 0.0;
        if let Some(v) = seconds.or(caught_up.then_some(0.0)) {
            out.gauge(
                "clusterwatch_pg_replication_lag_seconds",
                H_LAG_SECONDS,
                &[labels[0], labels[1], ("stage", stage)],
                v.max(0.0),
            );
        }
    }
}

fn write_archiver(row: &ArchiverRow, out: &mut SampleBuffer) {
    out.counter(
        "clusterwatch_pg_archiver_archived_total",
        H_ARCHIVED,
        &[],
        row.archived_count as f64,
    );
    out.counter(
        "clusterwatch_pg_archiver_failed_total",
        H_ARCHIVE_FAILED,
        &[],
        row.failed_count as f64,
    );
    if let Some(age) = row.last_archived_age {
        out.gauge(
            "clusterwatch_pg_archiver_last_archived_age_seconds",
            H_ARCHIVED_AGE,
            &[],
            age.max(0.0),
        );
    }
    if let Some(age) = row.last_failed_age {
        out.gauge(
            "clusterwatch_pg_archiver_last_failed_age_seconds",
            H_FAILED_AGE,
            &[],
            age.max(0.0),
        );
    }
}

fn write_archive_status(row: &ArchiveStatusRow, out: &mut SampleBuffer) {
    out.gauge(
        "clusterwatch_pg_archiver_ready_files",
        H_READY,
        &[],
        row.ready_count as f64,
    );
    out.gauge(
        "clusterwatch_pg_archiver_oldest_ready_age_seconds",
        H_READY_AGE,
        &[],
        row.oldest_ready_age.max(0.0),
    );
}

fn write_wal_dir(row: &WalDirRow, out: &mut SampleBuffer) {
    out.gauge(
        "clusterwatch_pg_wal_dir_segments",
        H_WAL_DIR_SEGMENTS,
        &[],
        row.segments as f64,
    );
    out.gauge(
        "clusterwatch_pg_wal_dir_bytes",
        H_WAL_DIR_BYTES,
        &[],
        row.bytes,
    );
}

fn write_slots(rows: &[SlotRow], out: &mut SampleBuffer) {
    for row in rows {
        let labels = [
            ("slot_name", row.slot_name.as_str()),
            ("slot_type", row.slot_type.as_str()),
        ];
        out.gauge(
            "clusterwatch_pg_slot_active",
            H_SLOT_ACTIVE,
            &labels,
            bool_value(row.active),
        );
        out.gauge(
            "clusterwatch_pg_slot_retained_bytes",
            H_SLOT_RETAINED,
            &labels,
            row.retained_bytes.max(0.0),
        );
    }
}

fn write_connections(rows: &[ConnectionRow], out: &mut SampleBuffer) {
    // Declared so the family shows even with no client connected.
    out.declare("clusterwatch_pg_connections", H_CONNECTIONS, Kind::Gauge);
    let mut oldest_idle_tx: f64 = 0.0;
    for row in rows {
        oldest_idle_tx = oldest_idle_tx.max(row.oldest_idle_in_transaction_age);
        out.gauge(
            "clusterwatch_pg_connections",
            H_CONNECTIONS,
            &[
                ("database", &row.database),
                ("user", &row.user_name),
                ("state", &row.state),
            ],
            row.connections as f64,
        );
    }
    out.gauge(
        "clusterwatch_pg_oldest_idle_in_transaction_seconds",
        H_IDLE_TX_AGE,
        &[],
        oldest_idle_tx,
    );
}

fn write_repmgr(rows: &[RepmgrNodeRow], out: &mut SampleBuffer) {
    for row in rows {
        let labels = [("node_name", row.node_name.as_str())];
        out.state_set(
            "clusterwatch_pg_repmgr_node_role",
            H_REPMGR_ROLE,
            &labels,
            "role",
            REPMGR_ROLES,
            Some(row.node_type.as_str()),
        );
        out.gauge(
            "clusterwatch_pg_repmgr_node_active",
            H_REPMGR_ACTIVE,
            &labels,
            bool_value(row.active),
        );
        out.gauge(
            "clusterwatch_pg_repmgr_node_upstream_info",
            H_REPMGR_UPSTREAM,
            &[
                ("node_name", &row.node_name),
                ("upstream", &row.upstream_node_name),
            ],
            1.0,
        );
    }
}

/// Estimates how long ago the oldest WAL a standby has received but not replayed arrived,
/// from the receive positions seen at earlier scrapes. The last replayed transaction's time
/// would be wrong both ways: an idle standby that just received a periodic record is not
/// "minutes behind", and a standby replaying steadily under load is not behind forever.
#[derive(Default)]
pub(crate) struct ReplayTracker {
    /// (server time, receive position) at scrapes where the standby was behind, oldest first.
    seen: std::collections::VecDeque<(f64, f64)>,
}

/// Bound on remembered positions: a day of 15 s scrapes; beyond that the oldest are kept
/// and later ones thinned, so the estimate can only err towards "longer".
const REPLAY_TRACKER_CAPACITY: usize = 6000;

impl ReplayTracker {
    /// Records a scrape and returns the lag in seconds (0 when all received WAL is replayed
    /// or the unreplayed WAL was first seen at this scrape).
    pub fn observe(&mut self, now: f64, received: f64, replayed: f64) -> f64 {
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
