//! MongoDB per member (or per replica-set URI): `replSetGetStatus` as member states, health,
//! lag behind the primary, sync sources, term, election date and vote counts. One kept driver
//! client per target; it does not read collections, oplog sizes or sharding state.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ConnectionString, ReadPreference, SelectionCriteria};
use mongodb::Client;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::Secret;
use crate::config::{
    read_password_file, HumanDuration, Located, Problem, SectionContext, TargetId,
};
use crate::logging::OnChange;
use crate::snapshot::SampleBuffer;

/// The `mongo` collector, configured by the `mongodb:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "mongo",
    section: "mongodb",
    always_on: false,
    configure,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMongo {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    uri: String,
    username: Option<String>,
    password_file: Option<std::path::PathBuf>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawMongo>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        if raw.uri.starts_with("mongodb+srv://") {
            problems.push(
                item.problem(
                    "uri",
                    "mongodb+srv URIs are not supported (they need DNS SRV lookups)",
                )
                .hint("list the members instead, e.g. mongodb://db1:27017/?directConnection=true"),
            );
            continue;
        }
        // Never echo the URI or the driver's message about it: either may hold a password.
        let conn = match ConnectionString::parse(&raw.uri) {
            Ok(c) => c,
            Err(_) => {
                problems.push(item.problem("uri", "not a valid MongoDB connection string").hint(
                    "use mongodb://host:27017/?directConnection=true for one member, or mongodb://h1,h2,h3/?replicaSet=NAME",
                ));
                continue;
            }
        };
        let password = read_password_file(raw.password_file.as_deref(), ctx, &item, problems);
        let uri_user = conn.credential.as_ref().and_then(|c| c.username.clone());
        if raw.password_file.is_some() && raw.username.is_none() && uri_user.is_none() {
            problems.push(
                item.problem("password_file", "a password needs a user name")
                    .hint("add `username: monitor` (a user with the clusterMonitor role)"),
            );
        }
        if problems.len() > before {
            continue;
        }
        let timeout = id.timeout.unwrap_or(ctx.global.timeout);
        let name = id.name.clone();
        out.push(Target::new(
            &KIND,
            id,
            MongoCollector {
                name,
                conn,
                username: raw.username,
                password,
                timeout,
                state: Mutex::new(State::default()),
            },
        ));
    }
    out
}

/// One MongoDB member or replica set.
pub struct MongoCollector {
    /// The target name, for log lines.
    name: String,
    conn: ConnectionString,
    username: Option<String>,
    password: Option<Secret>,
    /// This target's deadline; the driver's connect and server selection timeouts follow it
    /// so a dead member costs one deadline, not the driver's 30 s default.
    timeout: Duration,
    state: Mutex<State>,
}

/// What survives between scrapes.
#[derive(Default)]
struct State {
    /// The driver client: its monitors keep connections warm and follow topology changes.
    client: Option<Client>,
    /// Server version from `buildInfo`, read once per client.
    version: Option<String>,
    /// Oddities of the last reply, so each kind is logged when it changes, not per scrape.
    reported_anomalies: OnChange<Vec<String>>,
}

impl MongoCollector {
    async fn client(&self, state: &mut State) -> Result<Client, CollectError> {
        if let Some(c) = &state.client {
            return Ok(c.clone());
        }
        // No lookups happen here (mongodb+srv is refused at configuration time).
        let mut opts = ClientOptions::parse(self.conn.clone())
            .await
            .map_err(|e| CollectError::Connect(describe(&e)))?;
        let timeout = self.timeout.max(Duration::from_millis(100));
        opts.connect_timeout = Some(timeout);
        opts.server_selection_timeout = Some(timeout);
        opts.app_name = Some("clusterwatch".into());
        if self.username.is_some() || self.password.is_some() {
            let mut cred = opts.credential.take().unwrap_or_default();
            if let Some(u) = &self.username {
                cred.username = Some(u.clone());
            }
            if let Some(p) = &self.password {
                cred.password = Some(p.expose().to_owned());
            }
            opts.credential = Some(cred);
        }
        let client = Client::with_options(opts).map_err(|e| CollectError::Connect(describe(&e)))?;
        state.client = Some(client.clone());
        Ok(client)
    }
}

/// Where commands go: any member that answers. The status of a set without a primary is
/// exactly what must still be read (runbook: "no primary"), so never insist on one.
fn any_member() -> SelectionCriteria {
    SelectionCriteria::ReadPreference(ReadPreference::PrimaryPreferred {
        options: Default::default(),
    })
}

/// MongoDB's "not running with --replSet".
const NO_REPLICATION_ENABLED: i32 = 76;
/// A member started with --replSet whose set has not been initiated yet.
const NOT_YET_INITIALIZED: i32 = 94;
/// The monitoring user lacks a privilege (clusterMonitor).
const UNAUTHORIZED: i32 = 13;
/// Wrong user name or password.
const AUTHENTICATION_FAILED: i32 = 18;

/// A one-line description of a driver error; the driver never includes the password, and we
/// never add the URI.
fn describe(e: &mongodb::error::Error) -> String {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => format!("{} ({} {})", c.message, c.code, c.code_name),
        other => {
            let s = other.to_string();
            // Server selection errors carry the whole topology description; the first line
            // says what went wrong.
            s.lines().next().unwrap_or("").chars().take(300).collect()
        }
    }
}

fn classify(e: &mongodb::error::Error) -> CollectError {
    let msg = describe(e);
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. } => CollectError::Auth(msg),
        ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => CollectError::Auth(msg),
        ErrorKind::Command(c) if c.code == UNAUTHORIZED => CollectError::Permission(msg),
        ErrorKind::Command(_) => CollectError::Query(msg),
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => CollectError::Connect(msg),
        ErrorKind::InvalidResponse { .. }
        | ErrorKind::BsonDeserialization(_)
        | ErrorKind::IncompatibleServer { .. } => CollectError::Protocol(msg),
        _ => CollectError::Query(msg),
    }
}

/// MongoDB's member states by number, as `rs.status()` spells them. 4 is unused.
pub const STATES: &[(i32, &str)] = &[
    (0, "STARTUP"),
    (1, "PRIMARY"),
    (2, "SECONDARY"),
    (3, "RECOVERING"),
    (5, "STARTUP2"),
    (6, "UNKNOWN"),
    (7, "ARBITER"),
    (8, "DOWN"),
    (9, "ROLLBACK"),
    (10, "REMOVED"),
];

fn state_names() -> Vec<&'static str> {
    STATES.iter().map(|(_, n)| *n).collect()
}

/// The name of a state number; `None` for a number MongoDB does not define.
pub fn state_name(n: i32) -> Option<&'static str> {
    STATES.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
}

/// States whose members can vote and count towards a majority (not DOWN, UNKNOWN, REMOVED
/// or still in STARTUP).
fn can_vote(state: i32) -> bool {
    matches!(state, 1 | 2 | 3 | 5 | 7 | 9)
}

/// States whose members hold data, so their optime means something.
fn holds_data(state: i32) -> bool {
    matches!(state, 1 | 2 | 3 | 5 | 9)
}

/// One entry of `members` in a `replSetGetStatus` reply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Member {
    /// `host:port` as configured in the set.
    pub name: String,
    /// 1 when this node can reach the member (always 1 for itself).
    pub health: Option<f64>,
    /// State number; see [`STATES`].
    pub state: Option<i32>,
    /// The member this reply came from.
    pub is_self: bool,
    /// Wall time of the last operation applied, unix seconds.
    pub optime: Option<f64>,
    /// Whom the member replicates from; empty when it has no sync source.
    pub sync_source: Option<String>,
    /// Round trip of this node's heartbeat to the member, milliseconds (absent for itself).
    pub ping_ms: Option<f64>,
    /// Seconds the member has been up (as seen by this node for others).
    pub uptime: Option<f64>,
    /// When the member became primary, unix seconds (on the primary's entry only).
    pub election_date: Option<f64>,
}

/// A `replSetGetStatus` reply, reduced to what clusterwatch exports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplSetStatus {
    /// The set name.
    pub set: String,
    /// This node's own state number.
    pub my_state: Option<i32>,
    /// The election term (absent on very old servers).
    pub term: Option<f64>,
    /// Votes needed to elect a primary (4.2.1+).
    pub majority_vote_count: Option<f64>,
    /// Voting members in the configuration (4.4+).
    pub voting_members_count: Option<f64>,
    /// Voting members that hold data (4.4+).
    pub writable_voting_members_count: Option<f64>,
    /// Every member, in the order of the reply.
    pub members: Vec<Member>,
    /// Fields that were present with an unexpected type or value, or members that had to be
    /// skipped: reported, never fatal.
    pub anomalies: Vec<String>,
}

/// What one scrape learnt about replication.
#[derive(Debug, PartialEq)]
pub enum Replication {
    /// A member of a replica set, with its view of the set.
    Member(ReplSetStatus),
    /// Started with --replSet but not initiated yet.
    NotInitialized,
    /// A standalone server: not running with --replSet.
    Standalone,
}

fn number(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(d) if d.is_finite() => Some(*d),
        _ => None,
    }
}

/// A point in time as unix seconds: a date, or the seconds part of a BSON timestamp.
fn time(v: &Bson) -> Option<f64> {
    match v {
        Bson::DateTime(d) => Some(d.timestamp_millis() as f64 / 1000.0),
        Bson::Timestamp(t) => Some(f64::from(t.time)),
        _ => None,
    }
}

/// Reads an optional field with `read`; a present field of the wrong type is an anomaly.
fn field<T>(
    doc: &Document,
    key: &str,
    read: impl Fn(&Bson) -> Option<T>,
    what: &str,
    anomalies: &mut Vec<String>,
) -> Option<T> {
    let v = doc.get(key)?;
    if matches!(v, Bson::Null) {
        return None;
    }
    let r = read(v);
    if r.is_none() {
        anomalies.push(format!("{what}{key} has type {:?}", v.element_type()));
    }
    r
}

fn string(v: &Bson) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn int32(v: &Bson) -> Option<i32> {
    number(v)
        .filter(|n| n.fract() == 0.0 && *n >= f64::from(i32::MIN) && *n <= f64::from(i32::MAX))
        .map(|n| n as i32)
}

/// Reads a `replSetGetStatus` reply. Only a reply without a set name or a member list is
/// unusable; anything else odd (a missing optime, an unknown state number, a field of the
/// wrong type, extra fields) is tolerated and listed in `anomalies`.
pub fn parse_status(reply: &Document) -> Result<ReplSetStatus, String> {
    let mut anomalies = Vec::new();
    let set = reply
        .get_str("set")
        .map_err(|_| "reply has no set name".to_owned())?
        .to_owned();
    let raw_members = reply
        .get_array("members")
        .map_err(|_| "reply has no members array".to_owned())?;
    let mut members = Vec::with_capacity(raw_members.len());
    for (i, m) in raw_members.iter().enumerate() {
        let Some(m) = m.as_document() else {
            anomalies.push(format!("members[{i}] is not a document"));
            continue;
        };
        let at = format!("members[{i}].");
        let Some(name) = field(m, "name", string, &at, &mut anomalies) else {
            anomalies.push(format!("members[{i}] has no name"));
            continue;
        };
        if members.iter().any(|x: &Member| x.name == name) {
            anomalies.push(format!("members[{i}] repeats member {name}"));
            continue;
        }
        let state = field(m, "state", int32, &at, &mut anomalies);
        if let Some(s) = state.filter(|s| state_name(*s).is_none()) {
            anomalies.push(format!("{at}state {s} is not a known state"));
        }
        // optimeDate on every version; the optime's timestamp if a server leaves it out.
        let optime = field(m, "optimeDate", time, &at, &mut anomalies).or_else(|| {
            m.get_document("optime")
                .ok()
                .and_then(|o| o.get("ts"))
                .and_then(time)
        });
        let health = field(m, "health", number, &at, &mut anomalies);
        // A reachable data-bearing member always has one; arbiters and DOWN members do not.
        if optime.is_none() && health == Some(1.0) && state.is_some_and(holds_data) {
            anomalies.push(format!("members[{i}] has no optime"));
        }
        // syncSourceHost since 4.4; syncingTo before.
        let sync_source = field(m, "syncSourceHost", string, &at, &mut anomalies)
            .or_else(|| field(m, "syncingTo", string, &at, &mut anomalies));
        members.push(Member {
            name,
            health,
            state,
            is_self: m.get_bool("self").unwrap_or(false),
            optime: optime.filter(|t| *t > 0.0),
            sync_source,
            ping_ms: field(m, "pingMs", number, &at, &mut anomalies),
            uptime: field(m, "uptime", number, &at, &mut anomalies),
            election_date: field(m, "electionDate", time, &at, &mut anomalies),
        });
    }
    let my_state = field(reply, "myState", int32, "", &mut anomalies);
    Ok(ReplSetStatus {
        set,
        my_state,
        term: field(reply, "term", number, "", &mut anomalies),
        majority_vote_count: field(reply, "majorityVoteCount", number, "", &mut anomalies),
        voting_members_count: field(reply, "votingMembersCount", number, "", &mut anomalies),
        writable_voting_members_count: field(
            reply,
            "writableVotingMembersCount",
            number,
            "",
            &mut anomalies,
        ),
        members,
        anomalies,
    })
}

impl ReplSetStatus {
    /// The member in PRIMARY state, if exactly one claims it; with two (a stale view during
    /// an election) there is no single reference for lag.
    pub fn primary(&self) -> Option<&Member> {
        let mut primaries = self.members.iter().filter(|m| m.state == Some(1));
        match (primaries.next(), primaries.next()) {
            (Some(p), None) => Some(p),
            _ => None,
        }
    }

    /// Seconds each healthy data-bearing member is behind the primary, as
    /// `rs.printSecondaryReplicationInfo()` computes it; empty without a primary.
    pub fn lags(&self) -> Vec<(&str, f64)> {
        let Some(primary_optime) = self.primary().and_then(|p| p.optime) else {
            return Vec::new();
        };
        self.members
            .iter()
            .filter(|m| m.health == Some(1.0) && m.state.is_some_and(holds_data))
            .filter_map(|m| Some((m.name.as_str(), (primary_optime - m.optime?).max(0.0))))
            .collect()
    }

    /// Members that are reachable and in a state that votes. Assumes every member votes
    /// (MongoDB's default); capped by the server's own count of voting members when known.
    pub fn healthy_voting_members(&self) -> f64 {
        let n = self
            .members
            .iter()
            .filter(|m| m.health == Some(1.0) && m.state.is_some_and(can_vote))
            .count() as f64;
        match self.voting_members_count {
            Some(v) => n.min(v),
            None => n,
        }
    }

    /// Voting members: the server's count, else every member.
    pub fn voting_members(&self) -> f64 {
        self.voting_members_count
            .unwrap_or(self.members.len() as f64)
    }

    /// Votes a primary needs: the server's count, else a strict majority of voting members.
    pub fn majority(&self) -> f64 {
        self.majority_vote_count
            .unwrap_or((self.voting_members() / 2.0).floor() + 1.0)
    }
}

/// Turns the outcome of `replSetGetStatus` into what to export; `Err` fails the scrape.
pub fn interpret(reply: Result<Document, (i32, String)>) -> Result<Replication, CollectError> {
    match reply {
        Ok(doc) => parse_status(&doc)
            .map(Replication::Member)
            .map_err(CollectError::Protocol),
        Err((NO_REPLICATION_ENABLED, _)) => Ok(Replication::Standalone),
        Err((NOT_YET_INITIALIZED, _)) => Ok(Replication::NotInitialized),
        Err((UNAUTHORIZED, msg)) => Err(CollectError::Permission(msg)),
        Err((AUTHENTICATION_FAILED, msg)) => Err(CollectError::Auth(msg)),
        Err((_, msg)) => Err(CollectError::Query(msg)),
    }
}

const H_INFO: &str = "Always 1; labels carry the server version.";
const H_ENABLED: &str = "1 if the server runs as a replica set member, 0 for a standalone server (not running with --replSet).";
const H_SET: &str = "Always 1; labels name the replica set this node belongs to.";
const H_STATE: &str = "This node's own replica set state (PRIMARY, SECONDARY, ARBITER, ...).";
const H_MEMBERS: &str = "Members in the replica set configuration, as this node sees it.";
const H_MEMBER_STATE: &str = "State of one member as this node sees it; all 0 when the member reports a state number MongoDB does not define.";
const H_MEMBER_HEALTH: &str =
    "1 if this node can reach the member (heartbeats answered), 0 if not.";
const H_MEMBER_LAG: &str = "How far a healthy data-bearing member's last applied operation is behind the primary's, in seconds; absent when there is no primary.";
const H_SYNC_SOURCE: &str =
    "Always 1; labels name the member's sync source (empty when it has none).";
const H_PING: &str = "Heartbeat round trip from this node to the member, in seconds.";
const H_UPTIME: &str = "Seconds the member has been running.";
const H_PRIMARY_PRESENT: &str = "1 if this node sees a primary in the set, 0 if it sees none.";
const H_TERM: &str = "Election term; it goes up with every election.";
const H_ELECTION: &str = "Unix time the current primary was elected.";
const H_MAJORITY: &str = "Votes needed to elect a primary.";
const H_VOTING: &str = "Voting members in the configuration.";
const H_HEALTHY_VOTING: &str =
    "Voting members this node can reach that are in a voting state (PRIMARY, SECONDARY, RECOVERING, STARTUP2, ARBITER, ROLLBACK).";
const H_ANOMALIES: &str = "Fields of the last replSetGetStatus reply that had an unexpected type or value, or members that had to be skipped.";

#[async_trait]
impl Collector for MongoCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut state = self.state.lock().await;
        // The driver's own timeouts follow the configured timeout; a shorter scrape deadline
        // (Prometheus' header) must still end this target as a timeout.
        let replication = ctx.within(self.query(&mut state)).await?;

        out.gauge(
            "clusterwatch_mongo_info",
            H_INFO,
            &[("version", state.version.as_deref().unwrap_or(""))],
            1.0,
        );
        let enabled = !matches!(replication, Replication::Standalone);
        out.gauge(
            "clusterwatch_mongo_replset_enabled",
            H_ENABLED,
            &[],
            if enabled { 1.0 } else { 0.0 },
        );
        if let Replication::Member(status) = &replication {
            self.report_anomalies(&mut state, &status.anomalies);
            write_status(status, out);
        }
        Ok(())
    }
}

impl MongoCollector {
    /// `buildInfo` (once per client) and `replSetGetStatus`, read into the model.
    async fn query(&self, state: &mut State) -> Result<Replication, CollectError> {
        let client = self.client(state).await?;
        let admin = client.database("admin");
        if state.version.is_none() {
            let info = admin
                .run_command(doc! { "buildInfo": 1 })
                .selection_criteria(any_member())
                .await
                .map_err(|e| classify(&e))?;
            state.version = Some(info.get_str("version").unwrap_or("").to_owned());
        }
        let reply = admin
            .run_command(doc! { "replSetGetStatus": 1 })
            .selection_criteria(any_member())
            .await;
        let reply = match reply {
            Ok(d) => Ok(d),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::Command(c) => Err((c.code, describe(&e))),
                _ => return Err(classify(&e)),
            },
        };
        interpret(reply)
    }

    /// Logs the reply's oddities when they change, not on every scrape.
    fn report_anomalies(&self, state: &mut State, anomalies: &[String]) {
        if state.reported_anomalies.changed(anomalies.to_vec()) && !anomalies.is_empty() {
            tracing::warn!(collector = "mongo", target = %self.name, anomalies = %anomalies.join("; "), "unexpected fields in replSetGetStatus reply");
        }
    }
}

fn write_status(s: &ReplSetStatus, out: &mut SampleBuffer) {
    let states = state_names();
    out.gauge(
        "clusterwatch_mongo_replset_info",
        H_SET,
        &[("set", &s.set)],
        1.0,
    );
    out.state_set(
        "clusterwatch_mongo_state",
        H_STATE,
        &[],
        "state",
        &states,
        s.my_state.and_then(state_name),
    );
    out.gauge(
        "clusterwatch_mongo_members",
        H_MEMBERS,
        &[],
        s.members.len() as f64,
    );
    let primary = s.primary();
    out.gauge(
        "clusterwatch_mongo_primary_present",
        H_PRIMARY_PRESENT,
        &[],
        if primary.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(t) = s.term {
        out.gauge("clusterwatch_mongo_term", H_TERM, &[], t);
    }
    if let Some(d) = primary.and_then(|p| p.election_date) {
        out.gauge(
            "clusterwatch_mongo_election_date_seconds",
            H_ELECTION,
            &[],
            d,
        );
    }
    out.gauge(
        "clusterwatch_mongo_majority_vote_count",
        H_MAJORITY,
        &[],
        s.majority(),
    );
    out.gauge(
        "clusterwatch_mongo_voting_members",
        H_VOTING,
        &[],
        s.voting_members(),
    );
    out.gauge(
        "clusterwatch_mongo_healthy_voting_members",
        H_HEALTHY_VOTING,
        &[],
        s.healthy_voting_members(),
    );
    out.gauge(
        "clusterwatch_mongo_status_anomalies",
        H_ANOMALIES,
        &[],
        s.anomalies.len() as f64,
    );
    for m in &s.members {
        let labels = [("member", m.name.as_str())];
        out.state_set(
            "clusterwatch_mongo_member_state",
            H_MEMBER_STATE,
            &labels,
            "state",
            &states,
            m.state.and_then(state_name),
        );
        if let Some(h) = m.health {
            out.gauge(
                "clusterwatch_mongo_member_health",
                H_MEMBER_HEALTH,
                &labels,
                h,
            );
        }
        if m.state != Some(7) {
            out.gauge(
                "clusterwatch_mongo_member_sync_source_info",
                H_SYNC_SOURCE,
                &[
                    labels[0],
                    ("sync_source", m.sync_source.as_deref().unwrap_or("")),
                ],
                1.0,
            );
        }
        if let Some(p) = m.ping_ms {
            out.gauge(
                "clusterwatch_mongo_member_ping_seconds",
                H_PING,
                &labels,
                p / 1000.0,
            );
        }
        if let Some(u) = m.uptime {
            out.gauge(
                "clusterwatch_mongo_member_uptime_seconds",
                H_UPTIME,
                &labels,
                u,
            );
        }
    }
    for (member, lag) in s.lags() {
        out.gauge(
            "clusterwatch_mongo_member_replication_lag_seconds",
            H_MEMBER_LAG,
            &[("member", member)],
            lag,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;
    use mongodb::bson::{DateTime, Timestamp};
    use std::path::Path;

    fn date(secs: i64) -> DateTime {
        DateTime::from_millis(secs * 1000)
    }

    /// A member entry shaped like MongoDB 7.0's.
    fn member(id: i32, name: &str, state: i32, optime: i64) -> Document {
        doc! {
            "_id": id, "name": name, "health": 1.0, "state": state,
            "stateStr": state_name(state).unwrap_or("?"), "uptime": 3600,
            "optime": { "ts": Timestamp { time: optime as u32, increment: 1 }, "t": 3_i64 },
            "optimeDate": date(optime), "lastAppliedWallTime": date(optime),
            "syncSourceHost": "db1:27017", "syncSourceId": 0, "pingMs": 2_i64,
            "configVersion": 1, "configTerm": 3,
        }
    }

    fn reply(members: Vec<Document>) -> Document {
        doc! {
            "set": "rs0", "date": date(1_700_000_100), "myState": 1, "term": 3_i64,
            "majorityVoteCount": 2, "writeMajorityCount": 2, "votingMembersCount": 3,
            "writableVotingMembersCount": 3, "members": members, "ok": 1.0,
        }
    }

    #[test]
    fn healthy_set_has_lags_behind_the_primary_and_all_votes() {
        let mut primary = member(0, "db1:27017", 1, 1_700_000_100);
        primary.insert("self", true);
        primary.insert("electionDate", date(1_699_990_000));
        primary.insert("syncSourceHost", "");
        primary.remove("pingMs");
        let s = parse_status(&reply(vec![
            primary,
            member(1, "db2:27017", 2, 1_700_000_100),
            member(2, "db3:27017", 2, 1_700_000_093),
        ]))
        .unwrap();
        assert!(s.anomalies.is_empty(), "{:?}", s.anomalies);
        assert_eq!(s.set, "rs0");
        assert_eq!(s.primary().unwrap().name, "db1:27017");
        assert_eq!(
            s.lags(),
            vec![("db1:27017", 0.0), ("db2:27017", 0.0), ("db3:27017", 7.0)]
        );
        assert_eq!(s.majority(), 2.0);
        assert_eq!(s.healthy_voting_members(), 3.0);
        assert_eq!(s.members[0].election_date, Some(1_699_990_000.0));
        assert_eq!(s.members[1].ping_ms, Some(2.0));
        assert!(s.members[0].is_self);
    }

    #[test]
    fn no_primary_means_no_lag_and_down_members_do_not_vote() {
        let mut down = member(0, "db1:27017", 8, 0);
        down.insert("health", 0.0);
        let s = parse_status(&reply(vec![
            down,
            member(1, "db2:27017", 2, 1_700_000_100),
            member(2, "db3:27017", 6, 1_700_000_000),
        ]))
        .unwrap();
        assert!(s.primary().is_none());
        assert!(s.lags().is_empty());
        assert_eq!(s.healthy_voting_members(), 1.0);
        assert_eq!(s.members[0].optime, None, "epoch optime of a down member");
    }

    #[test]
    fn malformed_members_are_tolerated_and_listed() {
        let mut no_optime = member(1, "db2:27017", 2, 0);
        no_optime.remove("optime");
        no_optime.remove("optimeDate");
        let mut wrong_types = member(2, "db3:27017", 2, 1_700_000_000);
        wrong_types.insert("health", "yes");
        wrong_types.insert("pingMs", doc! { "ms": 1 });
        wrong_types.insert("futureField", [1, 2, 3].as_slice());
        let s = parse_status(&reply(vec![
            member(0, "db1:27017", 1, 1_700_000_100),
            no_optime,
            wrong_types,
            member(3, "db4:27017", 42, 1_700_000_100),
            doc! { "_id": 4, "state": 2 },
            member(5, "db4:27017", 2, 1_700_000_100),
        ]))
        .unwrap();
        assert_eq!(s.members.len(), 4);
        assert_eq!(s.members[1].optime, None);
        assert_eq!(s.members[2].health, None);
        assert_eq!(s.members[3].state, Some(42));
        // Only members with a known optime and a known health get a lag.
        assert_eq!(s.lags(), vec![("db1:27017", 0.0)]);
        assert_eq!(
            s.anomalies,
            vec![
                "members[1] has no optime",
                "members[2].health has type String",
                "members[2].pingMs has type EmbeddedDocument",
                "members[3].state 42 is not a known state",
                "members[4] has no name",
                "members[5] repeats member db4:27017",
            ]
        );
    }

    #[test]
    fn older_shapes_use_syncing_to_and_count_votes_themselves() {
        let mut m = member(1, "db2:27017", 2, 1_700_000_000);
        m.remove("syncSourceHost");
        m.insert("syncingTo", "db1:27017");
        let mut r = reply(vec![member(0, "db1:27017", 1, 1_700_000_000), m]);
        for k in [
            "majorityVoteCount",
            "votingMembersCount",
            "writableVotingMembersCount",
            "term",
        ] {
            r.remove(k);
        }
        let s = parse_status(&r).unwrap();
        assert_eq!(s.members[1].sync_source.as_deref(), Some("db1:27017"));
        assert_eq!((s.voting_members(), s.majority()), (2.0, 2.0));
        assert_eq!(s.term, None);
    }

    #[test]
    fn unusable_replies_and_standalone_servers() {
        assert!(matches!(
            interpret(Ok(doc! { "ok": 1.0 })),
            Err(CollectError::Protocol(_))
        ));
        assert!(matches!(
            interpret(Ok(doc! { "set": "rs0", "members": "none" })),
            Err(CollectError::Protocol(_))
        ));
        assert_eq!(
            interpret(Err((76, "not running with --replSet".into()))).unwrap(),
            Replication::Standalone
        );
        assert_eq!(
            interpret(Err((94, "no replset config has been received".into()))).unwrap(),
            Replication::NotInitialized
        );
        assert!(matches!(
            interpret(Err((13, "not authorized".into()))),
            Err(CollectError::Permission(_))
        ));
    }

    #[test]
    fn uri_credentials_are_never_echoed() {
        let yaml = "mongodb:\n  - name: a\n    uri: 'mongodb://mon:s3cret@[bad'\n  - name: b\n    uri: 'mongodb+srv://mon:s3cret@rs.example'\n  - name: c\n    uri: mongodb://127.0.0.1:27017/\n    password_file: /nonexistent/mongo.pass\n  - name: d\n    uri: mongodb://127.0.0.1:27017/?directConnection=true\n";
        let err = parse(yaml, "c.yml", Path::new(".")).unwrap_err();
        let text = err.render();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("c.yml:3:5: mongodb[0].uri: not a valid MongoDB connection string"),
            "{text}"
        );
        assert!(
            text.contains("mongodb[1].uri: mongodb+srv URIs are not supported"),
            "{text}"
        );
        assert!(
            text.contains("mongodb[2].password_file: cannot read secret file"),
            "{text}"
        );
        assert!(
            text.contains("mongodb[2].password_file: a password needs a user name"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 4, "{text}");
    }

    #[test]
    fn valid_target_keeps_cluster_and_timeout() {
        let yaml = "mongodb:\n  - { name: cp1, cluster: sre_location, timeout: 2s, uri: 'mongodb://127.0.0.1:27017/?directConnection=true' }\n";
        let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
        let t = cfg.targets.iter().find(|t| t.name() == "mongo").unwrap();
        assert_eq!(t.target(), "cp1");
        assert_eq!(t.cluster(), Some("sre_location"));
        assert_eq!(t.timeout(), Some(Duration::from_secs(2)));
    }

    /// A three-member set shaped like MongoDB 7.0's reply: the primary, a secondary 5 s
    /// behind it, and a member that is down.
    #[test]
    fn golden_exposition_of_a_replsetgetstatus_reply() {
        let mut down = member(2, "db3:27017", 8, 1_700_000_000);
        down.insert("health", 0.0);
        let reply = reply(vec![
            member(0, "db1:27017", 1, 1_700_000_095),
            member(1, "db2:27017", 2, 1_700_000_090),
            down,
        ]);
        let status = parse_status(&reply).unwrap();
        let mut out = SampleBuffer::new();
        write_status(&status, &mut out);
        crate::collector::golden::assert_golden("mongo-7.0-three-members", out);
    }
}
