//! A MongoDB stand-in for the tests: a loopback TCP server speaking the wire protocol (OP_MSG
//! with BSON, legacy OP_QUERY for old handshakes) that plays one replica set member with
//! documents shaped like MongoDB 4.4, 5.0 and 7.0 replies. It stores no data and implements
//! only the commands a monitoring client sends; the scenario can change between scrapes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bson::oid::ObjectId;
use bson::{doc, Bson, DateTime, Document, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// The server versions whose reply shapes the stand-in imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// 4.4: the oldest the driver accepts; no voting member counts in replSetGetStatus.
    V4_4,
    /// 5.0: adds lastAppliedWallTime/lastDurableWallTime and the voting member counts.
    V5_0,
    /// 7.0: the current shape.
    V7_0,
}

impl Version {
    /// Every version, for tests that run each scenario on each.
    pub const ALL: [Version; 3] = [Version::V4_4, Version::V5_0, Version::V7_0];

    /// The `version` buildInfo reports.
    pub fn release(self) -> &'static str {
        match self {
            Version::V4_4 => "4.4.29",
            Version::V5_0 => "5.0.26",
            Version::V7_0 => "7.0.12",
        }
    }

    fn max_wire_version(self) -> i32 {
        match self {
            Version::V4_4 => 9,
            Version::V5_0 => 13,
            Version::V7_0 => 21,
        }
    }
}

/// Oddities the stand-in can put into an otherwise healthy reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The third member has no optime fields at all.
    MissingOptime,
    /// The third member reports state 42, which MongoDB does not define.
    UnknownState,
    /// Fields no version sends, at the top level and in members (must be ignored silently).
    ExtraFields,
    /// health as a string, pingMs as a string, term as a string.
    WrongTypes,
    /// No `members` array: the reply is unusable.
    NoMembers,
}

/// What the set looks like. The stand-in is always the first member (`127.0.0.1:PORT`);
/// the other two are `mongo-b.test:27017` and `mongo-c.test:27017`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Self PRIMARY; b SECONDARY in sync; c SECONDARY 3 s behind, syncing from b.
    Healthy,
    /// b (the old primary) DOWN with health 0; self elected PRIMARY in a new term; c 1 s behind.
    PrimaryDown,
    /// b and c DOWN; self SECONDARY with no sync source: no primary, majority lost.
    NoPrimary,
    /// Self PRIMARY; b SECONDARY; c RECOVERING 120 s behind.
    Recovering,
    /// Self PRIMARY; b SECONDARY; c an ARBITER (no optime).
    Arbiter,
    /// Self PRIMARY; b SECONDARY with an empty sync source, 30 s behind; c in sync.
    EmptySyncSource,
    /// A healthy set whose reply has an oddity.
    Malformed(Malformed),
    /// Not running with --replSet: replSetGetStatus fails with code 76.
    Standalone,
    /// Accepts connections and never answers anything.
    Silent,
}

impl Scenario {
    /// Every replica set scenario (not the malformed ones, standalone or silent).
    pub const SETS: [Scenario; 6] = [
        Scenario::Healthy,
        Scenario::PrimaryDown,
        Scenario::NoPrimary,
        Scenario::Recovering,
        Scenario::Arbiter,
        Scenario::EmptySyncSource,
    ];
}

/// The name of the set the stand-in's members belong to.
pub const SET_NAME: &str = "rs0";
/// The second member's name.
pub const MEMBER_B: &str = "mongo-b.test:27017";
/// The third member's name.
pub const MEMBER_C: &str = "mongo-c.test:27017";

#[derive(Clone, Copy, Debug)]
struct Setting {
    version: Version,
    scenario: Scenario,
    /// Bumped on every change: the topologyVersion counter, and what wakes awaiting hellos.
    generation: i64,
}

/// A running stand-in; dropping it stops the server thread and closes every connection.
pub struct MongoStandin {
    addr: SocketAddr,
    setting: watch::Sender<Setting>,
    commands: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MongoStandin {
    /// Binds `127.0.0.1:0` and starts serving `scenario` in `version`'s shapes.
    ///
    /// It runs on its own thread and runtime, like the black hole, so a test that blocks its
    /// own runtime cannot stall the server.
    pub fn start(version: Version, scenario: Scenario) -> Result<MongoStandin> {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("could not bind the MongoDB stand-in listener")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (setting, watcher) = watch::channel(Setting {
            version,
            scenario,
            generation: 1,
        });
        let commands = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not build the stand-in's runtime")?;
        let server = Server {
            me: addr.to_string(),
            process_id: ObjectId::new(),
            setting: watcher,
            commands: Arc::clone(&commands),
            connections: Arc::clone(&connections),
        };
        let thread = std::thread::Builder::new()
            .name(format!("mongo-standin-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(err) => {
                            eprintln!("harness: mongo stand-in listener failed: {err}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = server.accept_loop(listener) => {}
                    }
                });
                // Dropping the runtime cancels every connection task.
            })
            .context("could not start the stand-in thread")?;
        Ok(MongoStandin {
            addr,
            setting,
            commands,
            connections,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`: also the stand-in's own member name in its replies.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mongodb://127.0.0.1:PORT/?directConnection=true`.
    pub fn uri(&self) -> String {
        format!("mongodb://{}/?directConnection=true", self.addr)
    }

    /// Switches what the stand-in answers from the next command on.
    pub fn set(&self, version: Version, scenario: Scenario) {
        self.setting.send_modify(|s| {
            s.version = version;
            s.scenario = scenario;
            s.generation += 1;
        });
    }

    /// Names of the commands received so far, in order.
    pub fn commands(&self) -> Vec<String> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for MongoStandin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for MongoStandin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStandin")
            .field("addr", &self.addr)
            .finish()
    }
}

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_MSG: i32 = 2013;
/// OP_MSG flag: a CRC-32C trails the message.
const CHECKSUM_PRESENT: u32 = 1;
/// Far above anything a monitoring client sends; a bigger length means a confused peer.
const MAX_MESSAGE: usize = 48_000_000;

#[derive(Clone)]
struct Server {
    me: String,
    process_id: ObjectId,
    setting: watch::Receiver<Setting>,
    commands: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

/// One request: its id, opcode and command document.
struct Request {
    id: i32,
    op: i32,
    body: Document,
}

impl Server {
    async fn accept_loop(self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    self.connections.fetch_add(1, Ordering::SeqCst);
                    let server = self.clone();
                    tokio::spawn(async move {
                        // A client hanging up mid-message is normal (the driver gives up at
                        // its deadline); nothing to report.
                        let _ = server.serve(stream).await;
                    });
                }
                Err(err) => {
                    eprintln!("harness: mongo stand-in accept failed: {err}");
                    return;
                }
            }
        }
    }

    async fn serve(mut self, mut stream: TcpStream) -> Result<()> {
        loop {
            if self.setting.borrow().scenario == Scenario::Silent {
                return self.hold(stream).await;
            }
            let request = read_request(&mut stream).await?;
            let name = command_name(&request.body);
            self.commands
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(name.clone());
            let reply = self.answer(&name, &request.body).await;
            if self.setting.borrow().scenario == Scenario::Silent {
                return self.hold(stream).await;
            }
            let bytes = encode_reply(request.id, request.op, &reply)?;
            stream.write_all(&bytes).await?;
        }
    }

    /// Keeps the connection open and unanswered until the scenario changes.
    async fn hold(&mut self, stream: TcpStream) -> Result<()> {
        let _stream = stream;
        while self.setting.borrow().scenario == Scenario::Silent {
            self.setting.changed().await?;
        }
        // Whatever the client sent meanwhile is lost; it will time out and reconnect.
        bail!("silence over")
    }

    async fn answer(&mut self, name: &str, body: &Document) -> Document {
        match name {
            "hello" | "ismaster" => {
                self.await_topology_change(body).await;
                self.hello(name == "hello")
            }
            "ping" | "endsessions" => doc! { "ok": 1.0 },
            "buildinfo" => {
                let v = self.setting.borrow().version;
                doc! {
                    "version": v.release(),
                    "versionArray": v.release().split('.').map(|p| p.parse::<i32>().unwrap_or(0)).collect::<Vec<_>>(),
                    "gitVersion": "0000000000000000000000000000000000000000",
                    "bits": 64, "maxBsonObjectSize": 16_777_216, "ok": 1.0,
                }
            }
            "replsetgetstatus" => self.status(),
            "saslstart" | "authenticate" => {
                error(18, "AuthenticationFailed", "Authentication failed.")
            }
            other => error(
                59,
                "CommandNotFound",
                &format!("no such command: '{other}'"),
            ),
        }
    }

    /// A hello carrying the topologyVersion it last saw is the driver's streaming monitor:
    /// a real server answers when the topology changes or after maxAwaitTimeMS.
    async fn await_topology_change(&mut self, body: &Document) {
        let Ok(seen) = body.get_document("topologyVersion") else {
            return;
        };
        let seen = seen.get_i64("counter").unwrap_or(0);
        let wait = body
            .get("maxAwaitTimeMS")
            .and_then(|v| match v {
                Bson::Int32(i) => Some(i64::from(*i)),
                Bson::Int64(i) => Some(*i),
                _ => None,
            })
            .unwrap_or(10_000)
            .clamp(0, 60_000);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait as u64);
        while self.setting.borrow().generation == seen {
            if tokio::time::timeout_at(deadline, self.setting.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn hello(&self, new_name: bool) -> Document {
        let s = *self.setting.borrow();
        let mut d = doc! {};
        let members = self.members(s.scenario);
        let primary = members
            .iter()
            .find(|m| m.state == 1)
            .map(|m| m.name.clone());
        let my_state = members[0].state;
        let writable = s.scenario != Scenario::Standalone && my_state == 1
            || s.scenario == Scenario::Standalone;
        d.insert("helloOk", true);
        if new_name {
            d.insert("isWritablePrimary", writable);
        } else {
            d.insert("ismaster", writable);
        }
        d.insert(
            "topologyVersion",
            doc! { "processId": self.process_id, "counter": s.generation },
        );
        if s.scenario != Scenario::Standalone {
            let hosts: Vec<Bson> = members
                .iter()
                .filter(|m| m.state != 7)
                .map(|m| Bson::String(m.name.clone()))
                .collect();
            let arbiters: Vec<Bson> = members
                .iter()
                .filter(|m| m.state == 7)
                .map(|m| Bson::String(m.name.clone()))
                .collect();
            d.insert("hosts", hosts);
            if !arbiters.is_empty() {
                d.insert("arbiters", arbiters);
            }
            d.insert("setName", SET_NAME);
            d.insert("setVersion", 1);
            d.insert("secondary", my_state == 2);
            if let Some(p) = primary {
                d.insert("primary", p);
            }
            d.insert("me", self.me.clone());
            if my_state == 1 {
                d.insert(
                    "electionId",
                    ObjectId::from([
                        0x7f,
                        0xff,
                        0xff,
                        0xff,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        term(s.scenario) as u8,
                    ]),
                );
            }
        }
        d.insert("maxBsonObjectSize", 16_777_216);
        d.insert("maxMessageSizeBytes", 48_000_000);
        d.insert("maxWriteBatchSize", 100_000);
        d.insert("localTime", DateTime::now());
        d.insert("logicalSessionTimeoutMinutes", 30);
        d.insert(
            "connectionId",
            self.connections.load(Ordering::SeqCst) as i32,
        );
        d.insert("minWireVersion", 0);
        d.insert("maxWireVersion", s.version.max_wire_version());
        d.insert("readOnly", false);
        d.insert("ok", 1.0);
        d
    }

    fn members(&self, scenario: Scenario) -> Vec<MemberSpec> {
        let m = |name: &str, state: i32, health: f64, behind: i64, sync: &str| MemberSpec {
            name: name.to_owned(),
            state,
            health,
            behind,
            sync: sync.to_owned(),
        };
        let me = self.me.as_str();
        match scenario {
            Scenario::Healthy
            | Scenario::Malformed(_)
            | Scenario::Standalone
            | Scenario::Silent => vec![
                m(me, 1, 1.0, 0, ""),
                m(MEMBER_B, 2, 1.0, 0, me),
                m(MEMBER_C, 2, 1.0, 3, MEMBER_B),
            ],
            Scenario::PrimaryDown => vec![
                m(me, 1, 1.0, 0, ""),
                m(MEMBER_B, 8, 0.0, 0, ""),
                m(MEMBER_C, 2, 1.0, 1, me),
            ],
            Scenario::NoPrimary => vec![
                m(me, 2, 1.0, 0, ""),
                m(MEMBER_B, 8, 0.0, 0, ""),
                m(MEMBER_C, 8, 0.0, 0, ""),
            ],
            Scenario::Recovering => vec![
                m(me, 1, 1.0, 0, ""),
                m(MEMBER_B, 2, 1.0, 0, me),
                m(MEMBER_C, 3, 1.0, 120, ""),
            ],
            Scenario::Arbiter => vec![
                m(me, 1, 1.0, 0, ""),
                m(MEMBER_B, 2, 1.0, 0, me),
                m(MEMBER_C, 7, 1.0, 0, ""),
            ],
            Scenario::EmptySyncSource => vec![
                m(me, 1, 1.0, 0, ""),
                m(MEMBER_B, 2, 1.0, 30, ""),
                m(MEMBER_C, 2, 1.0, 0, me),
            ],
        }
    }

    fn status(&self) -> Document {
        let s = *self.setting.borrow();
        if s.scenario == Scenario::Standalone {
            return error(76, "NoReplicationEnabled", "not running with --replSet");
        }
        let now_ms = DateTime::now().timestamp_millis();
        let now = now_ms / 1000;
        let members = self.members(s.scenario);
        let has_primary = members.iter().any(|m| m.state == 1);
        // With no primary, the newest optime anyone has is a while ago.
        let newest = if has_primary { now } else { now - 45 };
        let term = term(s.scenario);
        let version = s.version;
        let mut out: Vec<Bson> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let is_self = i == 0;
            let mut d = doc! { "_id": i as i32, "name": m.name.clone(), "health": m.health, "state": m.state, "stateStr": state_str(m.state) };
            d.insert(
                "uptime",
                if m.health > 0.0 {
                    86_400 - i as i32 * 100
                } else {
                    0
                },
            );
            let optime_secs = if m.health > 0.0 { newest - m.behind } else { 0 };
            let optime = if m.health > 0.0 {
                doc! { "ts": Timestamp { time: optime_secs as u32, increment: 1 }, "t": term }
            } else {
                // What a real server reports for a member it cannot reach.
                doc! { "ts": Timestamp { time: 0, increment: 0 }, "t": -1_i64 }
            };
            let date = DateTime::from_millis(optime_secs * 1000);
            if m.state != 7 {
                d.insert("optime", optime.clone());
                if !is_self {
                    d.insert("optimeDurable", optime);
                }
                d.insert("optimeDate", date);
                if !is_self {
                    d.insert("optimeDurableDate", date);
                }
                if version != Version::V4_4 {
                    d.insert("lastAppliedWallTime", date);
                    d.insert("lastDurableWallTime", date);
                }
            }
            if !is_self {
                let heartbeat = DateTime::from_millis(now_ms - 1500);
                d.insert("lastHeartbeat", heartbeat);
                d.insert(
                    "lastHeartbeatRecv",
                    if m.health > 0.0 {
                        heartbeat
                    } else {
                        DateTime::from_millis(0)
                    },
                );
                d.insert("pingMs", if m.health > 0.0 { 2_i64 + i as i64 } else { 0 });
                d.insert(
                    "lastHeartbeatMessage",
                    if m.health > 0.0 {
                        ""
                    } else {
                        "Error connecting to host (connection refused)"
                    },
                );
            }
            d.insert("syncSourceHost", m.sync.clone());
            let sync_id = members
                .iter()
                .position(|x| x.name == m.sync)
                .map_or(-1, |p| p as i32);
            d.insert("syncSourceId", sync_id);
            d.insert("infoMessage", "");
            if m.state == 1 {
                d.insert(
                    "electionTime",
                    Timestamp {
                        time: (now - election_age(s.scenario)) as u32,
                        increment: 1,
                    },
                );
                d.insert(
                    "electionDate",
                    DateTime::from_millis((now - election_age(s.scenario)) * 1000),
                );
            }
            d.insert("configVersion", 1);
            d.insert("configTerm", term);
            if is_self {
                d.insert("self", true);
                d.insert("lastHeartbeatMessage", "");
            }
            out.push(Bson::Document(d));
        }
        let mut reply = doc! {
            "set": SET_NAME,
            "date": DateTime::from_millis(now_ms),
            "myState": members[0].state,
            "term": term,
            "syncSourceHost": members[0].sync.clone(),
            "syncSourceId": -1,
            "heartbeatIntervalMillis": 2000_i64,
            "majorityVoteCount": 2,
            "writeMajorityCount": 2,
        };
        if version != Version::V4_4 {
            reply.insert("votingMembersCount", 3);
            reply.insert(
                "writableVotingMembersCount",
                if s.scenario == Scenario::Arbiter {
                    2
                } else {
                    3
                },
            );
        }
        reply.insert(
            "optimes",
            doc! { "lastCommittedWallTime": DateTime::from_millis(newest * 1000) },
        );
        reply.insert("members", out);
        reply.insert("ok", 1.0);
        if let Scenario::Malformed(kind) = s.scenario {
            malform(&mut reply, kind);
        }
        reply
    }
}

/// One member of a scenario: who, in which state, and how far behind the newest optime.
struct MemberSpec {
    name: String,
    state: i32,
    health: f64,
    behind: i64,
    sync: String,
}

fn term(scenario: Scenario) -> i64 {
    match scenario {
        Scenario::PrimaryDown => 4,
        _ => 3,
    }
}

/// How long ago the current primary was elected.
fn election_age(scenario: Scenario) -> i64 {
    match scenario {
        Scenario::PrimaryDown => 20,
        _ => 86_000,
    }
}

fn state_str(state: i32) -> &'static str {
    match state {
        0 => "STARTUP",
        1 => "PRIMARY",
        2 => "SECONDARY",
        3 => "RECOVERING",
        5 => "STARTUP2",
        7 => "ARBITER",
        8 => "(not reachable/healthy)",
        9 => "ROLLBACK",
        10 => "REMOVED",
        _ => "UNKNOWN",
    }
}

fn malform(reply: &mut Document, kind: Malformed) {
    let member = |reply: &mut Document, i: usize, edit: &dyn Fn(&mut Document)| {
        if let Ok(members) = reply.get_array_mut("members") {
            if let Some(Bson::Document(m)) = members.get_mut(i) {
                edit(m);
            }
        }
    };
    match kind {
        Malformed::MissingOptime => member(reply, 2, &|m| {
            for k in [
                "optime",
                "optimeDurable",
                "optimeDate",
                "optimeDurableDate",
                "lastAppliedWallTime",
                "lastDurableWallTime",
            ] {
                m.remove(k);
            }
        }),
        Malformed::UnknownState => member(reply, 2, &|m| {
            m.insert("state", 42);
            m.insert("stateStr", "FUTURE");
        }),
        Malformed::ExtraFields => {
            reply.insert("futureTopLevel", doc! { "nested": [1, 2, 3] });
            member(reply, 1, &|m| {
                m.insert("futureMemberField", "surprise");
                m.insert("anotherOne", Bson::Null);
            });
        }
        Malformed::WrongTypes => {
            reply.insert("term", "3");
            member(reply, 1, &|m| {
                m.insert("health", "1");
            });
            member(reply, 2, &|m| {
                m.insert("pingMs", "2ms");
            });
        }
        Malformed::NoMembers => {
            reply.remove("members");
        }
    }
}

fn error(code: i32, code_name: &str, message: &str) -> Document {
    doc! { "ok": 0.0, "errmsg": message, "code": code, "codeName": code_name }
}

/// The command is the first key of the body; matched case-insensitively like the server.
fn command_name(body: &Document) -> String {
    body.keys()
        .next()
        .map(|k| k.to_ascii_lowercase())
        .unwrap_or_default()
}

async fn read_request(stream: &mut TcpStream) -> Result<Request> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).await?;
    let word = |i: usize| i32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    let (length, id, op) = (word(0), word(1), word(3));
    let length = usize::try_from(length).unwrap_or(0);
    if !(16..=MAX_MESSAGE).contains(&length) {
        bail!("message length {length} out of range");
    }
    let mut rest = vec![0u8; length - 16];
    stream.read_exact(&mut rest).await?;
    let body = match op {
        OP_MSG => parse_op_msg(&rest)?,
        OP_QUERY => parse_op_query(&rest)?,
        other => bail!("unsupported opcode {other}"),
    };
    Ok(Request { id, op, body })
}

/// flagBits, then sections: kind 0 is the body document, kind 1 a document sequence that
/// belongs to the body under its identifier.
fn parse_op_msg(bytes: &[u8]) -> Result<Document> {
    let flags = u32::from_le_bytes(bytes.get(..4).context("short OP_MSG")?.try_into()?);
    let end = if flags & CHECKSUM_PRESENT != 0 {
        bytes.len().saturating_sub(4)
    } else {
        bytes.len()
    };
    let mut at = 4;
    let mut body = None;
    let mut sequences: Vec<(String, Vec<Bson>)> = Vec::new();
    while at < end {
        let kind = bytes[at];
        at += 1;
        match kind {
            0 => {
                let len = doc_len(bytes, at)?;
                body = Some(Document::from_reader(&bytes[at..at + len])?);
                at += len;
            }
            1 => {
                let size = doc_len(bytes, at)?;
                let section_end = at + size;
                let mut p = at + 4;
                let nul = bytes[p..section_end]
                    .iter()
                    .position(|b| *b == 0)
                    .context("unterminated sequence identifier")?;
                let ident = String::from_utf8_lossy(&bytes[p..p + nul]).into_owned();
                p += nul + 1;
                let mut docs = Vec::new();
                while p < section_end {
                    let len = doc_len(bytes, p)?;
                    docs.push(Bson::Document(Document::from_reader(&bytes[p..p + len])?));
                    p += len;
                }
                sequences.push((ident, docs));
                at = section_end;
            }
            other => bail!("unknown OP_MSG section kind {other}"),
        }
    }
    let mut body = body.context("OP_MSG without a body section")?;
    for (ident, docs) in sequences {
        body.insert(ident, docs);
    }
    Ok(body)
}

/// flags, fullCollectionName (cstring), numberToSkip, numberToReturn, query document.
fn parse_op_query(bytes: &[u8]) -> Result<Document> {
    let nul = bytes
        .get(4..)
        .and_then(|b| b.iter().position(|c| *c == 0))
        .context("OP_QUERY without a collection name")?;
    let at = 4 + nul + 1 + 8;
    let len = doc_len(bytes, at)?;
    let query = Document::from_reader(&bytes[at..at + len])?;
    // Old drivers wrap the command as {$query: {...}, $readPreference: ...}.
    Ok(match query.get_document("$query") {
        Ok(inner) => inner.clone(),
        Err(_) => query,
    })
}

fn doc_len(bytes: &[u8], at: usize) -> Result<usize> {
    let raw = bytes.get(at..at + 4).context("truncated document")?;
    let len = i32::from_le_bytes(raw.try_into()?);
    let len = usize::try_from(len).context("negative document length")?;
    if len < 5 || at + len > bytes.len() {
        bail!("document length {len} does not fit the message");
    }
    Ok(len)
}

/// An OP_MSG reply to OP_MSG, an OP_REPLY to a legacy OP_QUERY (also how [`run_command`]
/// frames its request).
fn encode_reply(response_to: i32, op: i32, reply: &Document) -> Result<Vec<u8>> {
    let doc = reply.to_vec()?;
    let mut payload = Vec::with_capacity(doc.len() + 24);
    let opcode = if op == OP_QUERY {
        // responseFlags, cursorID, startingFrom, numberReturned.
        payload.extend_from_slice(&0i32.to_le_bytes());
        payload.extend_from_slice(&0i64.to_le_bytes());
        payload.extend_from_slice(&0i32.to_le_bytes());
        payload.extend_from_slice(&1i32.to_le_bytes());
        payload.extend_from_slice(&doc);
        OP_REPLY
    } else {
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.push(0);
        payload.extend_from_slice(&doc);
        OP_MSG
    };
    static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) as i32;
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&((payload.len() + 16) as i32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&opcode.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Sends one command to `addr` over OP_MSG on a fresh connection and returns the reply
/// document, within `timeout`. For harness chores on a real server (`replSetInitiate`),
/// not a driver: no handshake, no authentication, no retries.
pub async fn run_command(
    addr: SocketAddr,
    db: &str,
    command: Document,
    timeout: Duration,
) -> Result<Document> {
    let name = command_name(&command);
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut body = command;
        body.insert("$db", db);
        let bytes = encode_reply(0, OP_MSG, &body)?;
        stream.write_all(&bytes).await?;
        Ok::<_, anyhow::Error>(read_request(&mut stream).await?.body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("`{name}` on {addr} did not answer within {timeout:?}"))?
        .with_context(|| format!("`{name}` on {addr}"))
}
