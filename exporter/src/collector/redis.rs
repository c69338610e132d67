//! Redis per instance: role, replication seen from the master and from the replica, RDB
//! persistence, memory and uptime, all from one `INFO` per scrape on a kept connection.
//! It only reads: no CONFIG, no REPLICAOF, no key access.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisConnectionInfo, RedisError,
    ServerErrorKind, TlsCertificates,
};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{
    read_password_file, HumanDuration, Located, Problem, SectionContext, TargetId,
};
use crate::snapshot::SampleBuffer;

/// The `redis` collector, configured by the `redis:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "redis",
    section: "redis",
    always_on: false,
    configure,
};

/// The sections a scrape asks for: one `INFO` each, sent at once on the multiplexed
/// connection (only Redis 7 takes several sections in one `INFO`; 6.x answers
/// `syntax error`).
const INFO_SECTIONS: &[&str] = &["server", "replication", "persistence", "memory"];

/// Every role of the role state-set (INFO's `slave` is reported as `replica`).
const ROLES: &[&str] = &["master", "replica"];

/// States a master reports for a connected replica (`slaveN:…,state=…`).
const REPLICA_STATES: &[&str] = &["wait_bgsave", "send_bulk", "online"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    address: String,
    username: Option<String>,
    password_file: Option<std::path::PathBuf>,
    tls_ca_file: Option<std::path::PathBuf>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawRedis>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let Some(tls) = check_address(&raw.address, &item, problems) else {
            continue;
        };
        let mut settings = RedisConnectionInfo::default();
        if let Some(user) = raw.username.as_deref() {
            if user.is_empty() {
                problems.push(item.problem("username", "username must not be empty when given"));
            }
            settings = settings.set_username(user);
        }
        if let Some(secret) = read_password_file(raw.password_file.as_deref(), ctx, &item, problems)
        {
            settings = settings.set_password(secret.expose());
        }
        let ca = match (&raw.tls_ca_file, tls) {
            (Some(_), false) => {
                problems.push(
                    item.problem("tls_ca_file", "tls_ca_file needs a rediss:// address")
                        .hint("write the address as rediss://host:port to use TLS"),
                );
                None
            }
            (Some(path), true) => {
                let path = ctx.resolve(path);
                match std::fs::read(&path) {
                    Ok(pem) => Some(pem),
                    Err(e) => {
                        problems.push(item.problem(
                            "tls_ca_file",
                            format!("cannot read {}: {e}", path.display()),
                        ));
                        None
                    }
                }
            }
            (None, _) => None,
        };
        if problems.len() > before {
            continue;
        }
        let client = raw
            .address
            .as_str()
            .into_connection_info()
            .map(|info| info.set_redis_settings(settings))
            .and_then(|info| match ca {
                Some(pem) => Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                ),
                None => Client::open(info),
            });
        match client {
            Ok(client) => out.push(Target::new(
                &KIND,
                id,
                RedisCollector {
                    client,
                    state: Mutex::new(State::default()),
                },
            )),
            // The address was checked above and holds no credentials, but the library's
            // message is not echoed all the same.
            Err(_) => problems.push(
                item.problem("address", "not a usable Redis address")
                    .hint("write it as redis://host:port or rediss://host:port"),
            ),
        }
    }
    out
}

/// Checks `redis://host:port` / `rediss://host:port`; returns whether it asks for TLS.
/// Never echoes the address: someone may have written a password into it.
fn check_address(address: &str, item: &Located, problems: &mut Vec<Problem>) -> Option<bool> {
    const HINT: &str = "write it as redis://host:port, or rediss://host:port for TLS";
    let Ok(url) = url::Url::parse(address) else {
        problems.push(item.problem("address", "not a valid URL").hint(HINT));
        return None;
    };
    let tls = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        _ => {
            problems.push(
                item.problem("address", "the scheme must be redis:// or rediss://")
                    .hint(HINT),
            );
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        problems.push(
            item.problem("address", "the address must not carry a user or password")
                .hint("use `username:` and `password_file:` instead"),
        );
        return None;
    }
    if url.host_str().is_none_or(str::is_empty) {
        problems.push(
            item.problem("address", "the address names no host")
                .hint(HINT),
        );
        return None;
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        problems.push(
            item.problem("address", "the address must be only a host and port")
                .hint("INFO does not depend on a database number; drop the path and query"),
        );
        return None;
    }
    Some(tls)
}

/// One Redis instance.
pub struct RedisCollector {
    client: Client,
    state: Mutex<State>,
}

/// What survives between scrapes.
#[derive(Default)]
struct State {
    /// Taken out while a scrape uses it and put back only on success, so a scrape that fails
    /// or is abandoned at its deadline (a paused server) drops it and the next reconnects.
    conn: Option<MultiplexedConnection>,
    /// When this collector first saw the master link down while Redis itself could not say
    /// since when (`master_link_down_since_seconds:-1`: never connected since start or
    /// since the last REPLICAOF).
    link_down_seen: Option<Instant>,
}

fn classify(e: &RedisError) -> CollectError {
    let msg = describe(e);
    match e.kind() {
        ErrorKind::AuthenticationFailed => CollectError::Auth(msg),
        _ if matches!(e.code(), Some("NOAUTH" | "WRONGPASS")) => CollectError::Auth(msg),
        ErrorKind::Server(ServerErrorKind::NoPerm) => CollectError::Permission(msg),
        _ if e.is_timeout() => CollectError::Timeout,
        _ if e.is_connection_refusal() || e.is_io_error() => CollectError::Connect(msg),
        ErrorKind::Server(_) | ErrorKind::Extension => CollectError::Query(msg),
        _ => CollectError::Protocol(msg),
    }
}

/// The library's message: kind, code and the server's detail. It never holds the password
/// (AUTH failures are reported without the arguments).
fn describe(e: &RedisError) -> String {
    e.to_string()
}

impl RedisCollector {
    async fn connect(&self, deadline: Instant) -> Result<MultiplexedConnection, CollectError> {
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        // Requests are bounded by each scrape's own deadline (below), not by a timeout fixed
        // when the connection was made.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(remaining))
            .set_response_timeout(None);
        // A paused server accepts the TCP connection (the kernel does) but never answers the
        // handshake, so the whole setup, not only connect(), is bounded by the deadline.
        match tokio::time::timeout_at(
            deadline,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(CollectError::Timeout),
        }
    }
}

#[async_trait]
impl Collector for RedisCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut state = self.state.lock().await;
        let conn = match state.conn.take() {
            Some(c) => c,
            None => self.connect(ctx.deadline).await?,
        };
        // Redis 6 takes one section per INFO; sent together, the multiplexed connection
        // writes them in one go.
        let queries = INFO_SECTIONS.iter().map(|section| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("INFO")
                    .arg(*section)
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| classify(&e))
            }
        });
        let parts = ctx.within(futures::future::try_join_all(queries)).await?;
        let info = Info::parse(&parts.concat())?;
        write(&info, &mut state, out);
        state.conn = Some(conn);
        Ok(())
    }
}

/// One replica as its master lists it (`slave0:ip=…,port=…,state=…,offset=…,lag=…`).
#[derive(Debug, Clone, PartialEq)]
struct ReplicaLine {
    /// `ip:port` (`[ip]:port` for IPv6), as the replica announced itself.
    addr: String,
    state: String,
    offset: Option<f64>,
    /// Seconds since the replica last acknowledged.
    ack_age: Option<f64>,
}

/// The fields of `INFO server replication persistence memory` clusterwatch reports.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Info {
    version: String,
    /// `master` or `replica`.
    role: &'static str,
    uptime: Option<f64>,
    connected_replicas: Option<f64>,
    replicas: Vec<ReplicaLine>,
    master_repl_offset: Option<f64>,
    master_host: Option<String>,
    master_port: Option<String>,
    link_up: Option<bool>,
    /// `None` when absent or `-1` (Redis does not know).
    link_down_since: Option<f64>,
    sync_in_progress: Option<bool>,
    slave_repl_offset: Option<f64>,
    rdb_last_save_ok: Option<bool>,
    rdb_last_save_time: Option<f64>,
    rdb_changes: Option<f64>,
    used_memory: Option<f64>,
    maxmemory: Option<f64>,
}

impl Info {
    /// Parses INFO's `key:value` lines (CRLF or LF; `#` section headers skipped). Only a
    /// missing or unknown role is an error: without it nothing else can be read correctly.
    pub(crate) fn parse(text: &str) -> Result<Info, CollectError> {
        let fields: HashMap<&str, &str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':'))
            .collect();
        let num = |k: &str| fields.get(k).and_then(|v| v.trim().parse::<f64>().ok());
        let role = match fields.get("role").copied() {
            Some("master") => "master",
            Some("slave") | Some("replica") => "replica",
            Some(other) => {
                return Err(CollectError::Protocol(format!(
                    "INFO reports an unknown role `{other}`"
                )))
            }
            None => return Err(CollectError::Protocol("INFO has no role field".into())),
        };
        let mut replicas: Vec<ReplicaLine> = Vec::new();
        let mut keys: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("slave")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|(k, v)| (*k, *v))
            .collect();
        keys.sort_by_key(|(k, _)| k[5..].parse::<u32>().unwrap_or(u32::MAX));
        for (_, value) in keys {
            if let Some(line) = parse_replica_line(value) {
                // A reconnecting replica can be listed twice for a moment; series must be
                // unique, so keep the entry that is online.
                match replicas.iter_mut().find(|r| r.addr == line.addr) {
                    Some(seen) if seen.state != "online" && line.state == "online" => *seen = line,
                    Some(_) => {}
                    None => replicas.push(line),
                }
            }
        }
        let down_since = num("master_link_down_since_seconds").filter(|v| *v >= 0.0);
        Ok(Info {
            version: fields
                .get("redis_version")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            role,
            uptime: num("uptime_in_seconds"),
            connected_replicas: num("connected_slaves"),
            replicas,
            master_repl_offset: num("master_repl_offset"),
            master_host: fields.get("master_host").map(|v| v.to_string()),
            master_port: fields.get("master_port").map(|v| v.to_string()),
            link_up: fields.get("master_link_status").map(|v| *v == "up"),
            link_down_since: down_since,
            sync_in_progress: num("master_sync_in_progress").map(|v| v != 0.0),
            slave_repl_offset: num("slave_repl_offset"),
            rdb_last_save_ok: fields.get("rdb_last_bgsave_status").map(|v| *v == "ok"),
            rdb_last_save_time: num("rdb_last_save_time"),
            rdb_changes: num("rdb_changes_since_last_save"),
            used_memory: num("used_memory"),
            maxmemory: num("maxmemory"),
        })
    }
}

fn parse_replica_line(value: &str) -> Option<ReplicaLine> {
    let kv: HashMap<&str, &str> = value.split(',').filter_map(|p| p.split_once('=')).collect();
    let ip = kv.get("ip")?;
    let port = kv.get("port")?;
    let addr = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    Some(ReplicaLine {
        addr,
        state: kv.get("state").unwrap_or(&"").to_string(),
        offset: kv.get("offset").and_then(|v| v.parse().ok()),
        ack_age: kv.get("lag").and_then(|v| v.parse().ok()),
    })
}

const H_INFO: &str = "Always 1; the label carries the Redis server version.";
const H_ROLE: &str = "Replication role of the instance: 1 for the current role (master or replica), 0 for the other.";
const H_UPTIME: &str = "Seconds since the Redis server started.";
const H_CONNECTED: &str = "Number of replicas connected to this instance.";
const H_OFFSET: &str = "Replication offset of this instance in bytes: a master's write position, a replica's applied position.";
const H_REPLICA_STATE: &str =
    "State of one connected replica as its master reports it (wait_bgsave, send_bulk, online).";
const H_REPLICA_LAG: &str =
    "How far one connected replica is behind this master's replication offset, in bytes.";
const H_REPLICA_ACK: &str =
    "Seconds since one connected replica last acknowledged the replication stream.";
const H_LINK_UP: &str = "On a replica: 1 if the link to its master is up, 0 if it is down.";
const H_LINK_DOWN: &str = "On a replica: seconds the link to its master has been down (0 while it is up); keeps growing while down.";
const H_MASTER: &str =
    "On a replica: always 1; labels name the master host and port as the replica sees them.";
const H_SYNC: &str = "On a replica: 1 while a full synchronisation with the master is running.";
const H_OWN_LAG: &str = "On a replica: bytes of the replication stream it knows of but has not applied (master_repl_offset minus slave_repl_offset as the replica reports them).";
const H_RDB_OK: &str = "1 if the last RDB save (BGSAVE) succeeded, 0 if it failed.";
const H_RDB_TIME: &str = "Unix time of the last successful RDB save, in seconds.";
const H_RDB_CHANGES: &str = "Writes since the last successful RDB save.";
const H_USED: &str = "Memory allocated by Redis (used_memory), in bytes.";
const H_MAX: &str = "The maxmemory setting in bytes; 0 means no limit.";

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn write(info: &Info, state: &mut State, out: &mut SampleBuffer) {
    out.gauge(
        "clusterwatch_redis_info",
        H_INFO,
        &[("version", &info.version)],
        1.0,
    );
    out.state_set(
        "clusterwatch_redis_role",
        H_ROLE,
        &[],
        "role",
        ROLES,
        Some(info.role),
    );
    let numbers = [
        ("clusterwatch_redis_uptime_seconds", H_UPTIME, info.uptime),
        (
            "clusterwatch_redis_connected_replicas",
            H_CONNECTED,
            info.connected_replicas,
        ),
        (
            "clusterwatch_redis_rdb_last_save_timestamp_seconds",
            H_RDB_TIME,
            info.rdb_last_save_time,
        ),
        (
            "clusterwatch_redis_rdb_changes_since_last_save",
            H_RDB_CHANGES,
            info.rdb_changes,
        ),
        (
            "clusterwatch_redis_memory_used_bytes",
            H_USED,
            info.used_memory,
        ),
        ("clusterwatch_redis_memory_max_bytes", H_MAX, info.maxmemory),
    ];
    for (name, help, value) in numbers {
        if let Some(v) = value {
            out.gauge(name, help, &[], v);
        }
    }
    if let Some(ok) = info.rdb_last_save_ok {
        out.gauge(
            "clusterwatch_redis_rdb_last_save_success",
            H_RDB_OK,
            &[],
            flag(ok),
        );
    }
    let own_offset = if info.role == "replica" {
        info.slave_repl_offset.or(info.master_repl_offset)
    } else {
        info.master_repl_offset
    };
    if let Some(v) = own_offset {
        out.gauge(
            "clusterwatch_redis_replication_offset_bytes",
            H_OFFSET,
            &[],
            v,
        );
    }
    // A replica can feed replicas of its own, so the per-replica view is written for any
    // role that lists some.
    for r in &info.replicas {
        let labels = [("replica", r.addr.as_str())];
        out.state_set(
            "clusterwatch_redis_connected_replica_state",
            H_REPLICA_STATE,
            &labels,
            "state",
            REPLICA_STATES,
            Some(r.state.as_str()),
        );
        if let (Some(master), Some(offset)) = (info.master_repl_offset, r.offset) {
            out.gauge(
                "clusterwatch_redis_connected_replica_lag_bytes",
                H_REPLICA_LAG,
                &labels,
                (master - offset).max(0.0),
            );
        }
        if let Some(age) = r.ack_age {
            out.gauge(
                "clusterwatch_redis_connected_replica_ack_age_seconds",
                H_REPLICA_ACK,
                &labels,
                age.max(0.0),
            );
        }
    }
    if info.role != "replica" {
        state.link_down_seen = None;
        return;
    }
    let up = info.link_up.unwrap_or(false);
    out.gauge(
        "clusterwatch_redis_master_link_up",
        H_LINK_UP,
        &[],
        flag(up),
    );
    let down_for = if up {
        state.link_down_seen = None;
        0.0
    } else {
        let seen = *state.link_down_seen.get_or_insert_with(Instant::now);
        info.link_down_since
            .unwrap_or_else(|| seen.elapsed().as_secs_f64())
    };
    out.gauge(
        "clusterwatch_redis_master_link_down_seconds",
        H_LINK_DOWN,
        &[],
        down_for,
    );
    out.gauge(
        "clusterwatch_redis_master_info",
        H_MASTER,
        &[
            ("master_host", info.master_host.as_deref().unwrap_or("")),
            ("master_port", info.master_port.as_deref().unwrap_or("")),
        ],
        1.0,
    );
    if let Some(sync) = info.sync_in_progress {
        out.gauge(
            "clusterwatch_redis_master_sync_in_progress",
            H_SYNC,
            &[],
            flag(sync),
        );
    }
    if let (Some(known), Some(applied)) = (info.master_repl_offset, info.slave_repl_offset) {
        out.gauge(
            "clusterwatch_redis_replica_lag_bytes",
            H_OWN_LAG,
            &[],
            (known - applied).max(0.0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;
    use std::path::Path;

    const MASTER: &str = include_str!("testdata/redis-7.0-master-healthy.info");
    const REPLICA: &str = include_str!("testdata/redis-7.0-replica-healthy.info");
    const LINK_DOWN: &str = include_str!("testdata/redis-7.0-replica-link-down.info");
    const REPOINTED: &str = include_str!("testdata/redis-7.0-replica-connecting.info");

    fn value(out: &SampleBuffer, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let fam = out.get(name)?;
        let hits: Vec<f64> = fam
            .samples
            .iter()
            .filter(|s| label.is_none_or(|(k, v)| s.labels.iter().any(|(n, x)| n == k && x == v)))
            .map(|s| s.value)
            .collect();
        assert!(hits.len() <= 1, "{name} {label:?}: {hits:?}");
        hits.first().copied()
    }

    fn render(info: &Info) -> SampleBuffer {
        let mut out = SampleBuffer::new();
        write(info, &mut State::default(), &mut out);
        out
    }

    #[test]
    fn master_with_one_online_replica() {
        let info = Info::parse(MASTER).unwrap();
        assert_eq!(info.role, "master");
        assert_eq!(info.version, "7.0.15");
        assert_eq!(info.connected_replicas, Some(1.0));
        assert_eq!(
            info.replicas,
            vec![ReplicaLine {
                addr: "127.0.0.1:46380".into(),
                state: "online".into(),
                offset: Some(50.0),
                ack_age: Some(0.0),
            }]
        );
        assert_eq!(info.master_repl_offset, Some(50.0));
        assert_eq!(info.rdb_last_save_ok, Some(true));
        assert_eq!(info.maxmemory, Some(0.0));
        assert!(info.used_memory.is_some_and(|m| m > 100_000.0));
        let out = render(&info);
        assert_eq!(
            value(&out, "clusterwatch_redis_role", Some(("role", "master"))),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_role", Some(("role", "replica"))),
            Some(0.0)
        );
        let online = ("state", "online");
        assert_eq!(
            value(
                &out,
                "clusterwatch_redis_connected_replica_state",
                Some(online)
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_connected_replica_lag_bytes", None),
            Some(0.0)
        );
        assert!(
            out.get("clusterwatch_redis_master_link_up").is_none(),
            "not on a master"
        );
    }

    #[test]
    fn replica_with_link_up() {
        let info = Info::parse(REPLICA).unwrap();
        assert_eq!(info.role, "replica");
        assert_eq!(info.master_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(info.master_port.as_deref(), Some("46379"));
        assert_eq!(info.link_up, Some(true));
        assert_eq!(info.sync_in_progress, Some(false));
        let out = render(&info);
        assert_eq!(
            value(&out, "clusterwatch_redis_role", Some(("role", "replica"))),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_master_link_up", None),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_master_link_down_seconds", None),
            Some(0.0)
        );
        assert_eq!(
            value(
                &out,
                "clusterwatch_redis_master_info",
                Some(("master_port", "46379"))
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_replication_offset_bytes", None),
            Some(50.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_replica_lag_bytes", None),
            Some(0.0)
        );
    }

    #[test]
    fn replica_whose_master_died_counts_seconds_down() {
        let info = Info::parse(LINK_DOWN).unwrap();
        assert_eq!(info.link_up, Some(false));
        assert_eq!(info.link_down_since, Some(3.0));
        let out = render(&info);
        assert_eq!(
            value(&out, "clusterwatch_redis_master_link_up", None),
            Some(0.0)
        );
        assert_eq!(
            value(&out, "clusterwatch_redis_master_link_down_seconds", None),
            Some(3.0)
        );
    }

    #[test]
    fn repointed_replica_names_its_new_master() {
        let info = Info::parse(REPOINTED).unwrap();
        assert_eq!(info.master_port.as_deref(), Some("1"));
        assert_eq!(info.link_up, Some(false));
    }

    #[test]
    fn never_connected_replica_counts_down_time_itself() {
        // Redis 7.0 right after start, before the first sync: it does not know since when.
        let text = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:46379\r\nmaster_link_status:down\r\nmaster_last_io_seconds_ago:-1\r\nmaster_sync_in_progress:0\r\nslave_read_repl_offset:1\r\nslave_repl_offset:1\r\nmaster_link_down_since_seconds:-1\r\nconnected_slaves:0\r\nmaster_repl_offset:0\r\n";
        let info = Info::parse(text).unwrap();
        assert_eq!(info.link_down_since, None);
        let mut state = State {
            link_down_seen: Some(Instant::now() - Duration::from_secs(40)),
            ..State::default()
        };
        let mut out = SampleBuffer::new();
        write(&info, &mut state, &mut out);
        let down = value(&out, "clusterwatch_redis_master_link_down_seconds", None).unwrap();
        assert!((40.0..60.0).contains(&down), "{down}");
        // The link comes up: the count starts over next time.
        let mut up = Info::parse(REPLICA).unwrap();
        write(&up, &mut state, &mut SampleBuffer::new());
        assert!(state.link_down_seen.is_none());
        up.role = "master";
        write(&up, &mut state, &mut SampleBuffer::new());
        assert!(state.link_down_seen.is_none());
    }

    #[test]
    fn master_lists_syncing_and_duplicate_replicas_once_each() {
        let text = "role:master\r\nconnected_slaves:3\r\nslave0:ip=10.0.0.2,port=6379,state=wait_bgsave,offset=0,lag=0\r\nslave1:ip=10.0.0.2,port=6379,state=online,offset=900,lag=1\r\nslave2:ip=::1,port=7000,state=send_bulk,offset=0,lag=0\r\nslave10:garbage\r\nmaster_repl_offset:1000\r\n";
        let info = Info::parse(text).unwrap();
        let addrs: Vec<(&str, &str)> = info
            .replicas
            .iter()
            .map(|r| (r.addr.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            addrs,
            vec![("10.0.0.2:6379", "online"), ("[::1]:7000", "send_bulk")]
        );
        let out = render(&info);
        assert_eq!(
            value(
                &out,
                "clusterwatch_redis_connected_replica_lag_bytes",
                Some(("replica", "10.0.0.2:6379"))
            ),
            Some(100.0)
        );
    }

    #[test]
    fn info_without_a_role_is_a_protocol_error() {
        let e = Info::parse("# Server\r\nredis_version:7.0.15\r\n").unwrap_err();
        assert_eq!(e.reason(), "protocol");
        assert_eq!(
            Info::parse("role:sentinel\r\n").unwrap_err().reason(),
            "protocol"
        );
    }

    #[test]
    fn address_is_checked_and_never_echoed() {
        let yaml = "redis:\n  - { name: a, address: 'redis://:s3cret@127.0.0.1:6379' }\n  - { name: b, address: 'http://127.0.0.1:6379' }\n  - { name: c, address: redis://127.0.0.1:6379, tls_ca_file: ca.pem }\n  - { name: d, address: redis://127.0.0.1:6379, password_file: /nonexistent/redis.pass }\n  - { name: e, address: 'redis://127.0.0.1:6379/3' }\n";
        let err = parse(yaml, "c.yml", Path::new(".")).unwrap_err();
        let text = err.render();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains(
                "c.yml:2:16: redis[0].address: the address must not carry a user or password"
            ),
            "{text}"
        );
        assert!(
            text.contains("redis[1].address: the scheme must be redis:// or rediss://"),
            "{text}"
        );
        assert!(
            text.contains("redis[2].tls_ca_file: tls_ca_file needs a rediss:// address"),
            "{text}"
        );
        assert!(
            text.contains(
                "redis[3].password_file: cannot read secret file /nonexistent/redis.pass"
            ),
            "{text}"
        );
        assert!(
            text.contains("redis[4].address: the address must be only a host and port"),
            "{text}"
        );
    }

    #[test]
    fn valid_targets_keep_cluster_and_timeout() {
        let yaml = "redis:\n  - { name: r1, cluster: redis-9001, address: redis://127.0.0.1:9001, timeout: 2s }\n  - { name: r2, address: rediss://redis2.example:9001, username: monitor }\n";
        let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
        let targets: Vec<_> = cfg.targets.iter().filter(|t| t.name() == "redis").collect();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].target(), "r1");
        assert_eq!(targets[0].cluster(), Some("redis-9001"));
        assert_eq!(targets[0].timeout(), Some(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn golden_exposition_of_captured_info() {
        for name in [
            "redis-7.0-master-healthy",
            "redis-7.0-replica-healthy",
            "redis-7.0-replica-connecting",
            "redis-7.0-replica-link-down",
        ] {
            let text = crate::collector::golden::input(&format!("{name}.info"));
            let info = Info::parse(&text).unwrap();
            crate::collector::golden::assert_golden(name, render(&info));
        }
    }
}
