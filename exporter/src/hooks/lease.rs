//! The leader lease (`hooks.lease`): this host's clusterwatch keeps `PREFIX/leader/<cluster>`
//! in etcd while its own server answers as primary, and fences that server itself before the
//! lease can end when it cannot renew; a promotion hook (`wait_for_lease`) waits until no one
//! holds the key. etcd is reached through `hooks.lock`'s client; the failover decision is the
//! rules'.
//!
//! Why: observers decide from outside that a primary is gone, but a primary cut off from them
//! may still serve writes. Like Patroni's leader key, the lease makes "the old primary has
//! stopped" something the promoting side can wait for: either the holder renews (it is alive
//! and reaches etcd: no promotion), or its lease ends, and before it ends the holder has run
//! its self-fence (read-only or stop).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::journal::{Event, Record};
use super::lock::{
    call, field, grant, int, keepalive, kv_value, owner_of, revoke_later, LockConfig, CALL_TIMEOUT,
};
use super::{now, Hooks};
use crate::collector::{Engine, Target};
use crate::config::{HumanDuration, Located, Pos, Problem};
use crate::snapshot::SampleBuffer;

const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Below this, a renewal every ttl/4 is too tight for one slow etcd round trip.
const MIN_TTL: Duration = Duration::from_secs(2);
/// Above this, a dead primary holds a failover up for too long.
const MAX_TTL: Duration = Duration::from_secs(300);
/// How long a promotion polls a held key between reads.
const POLL: Duration = Duration::from_secs(1);

/// The checked `hooks.lease` section.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Names of this host's `postgres:` or `redis:` targets (with a `cluster`) whose primary
    /// role this clusterwatch vouches for.
    pub targets: Vec<String>,
    /// Where `targets` was written, for the assembler's check that each names a server.
    pub targets_at: (String, Pos),
    /// The lease's TTL: how long after its last renewal etcd keeps the key.
    pub ttl: Duration,
    /// Run (argv, no shell) when the lease cannot be kept while this host's server may still
    /// be primary.
    pub self_fence: Vec<String>,
    /// Deadline of the self-fence: it must end before the lease does.
    pub self_fence_timeout: Duration,
    /// How long a `wait_for_lease` hook waits for another holder's key to go before it refuses.
    pub wait: Duration,
}

impl LeaseConfig {
    /// How often the holder checks its server and renews: four times per TTL.
    fn tick(&self) -> Duration {
        self.ttl / 4
    }

    /// After this long without a renewal the holder fences: half the TTL, so that the fence
    /// (at most `self_fence_timeout`, a quarter of it by default) ends before etcd drops the key.
    fn fence_after(&self) -> Duration {
        self.ttl / 2
    }

    /// What the running lease was built from, to tell whether a reload changes it.
    pub fn identity(&self) -> (&[String], Duration, &[String], Duration, Duration) {
        (
            &self.targets,
            self.ttl,
            &self.self_fence,
            self.self_fence_timeout,
            self.wait,
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    targets: Vec<String>,
    ttl: Option<HumanDuration>,
    self_fence: Vec<String>,
    self_fence_timeout: Option<HumanDuration>,
    wait: Option<HumanDuration>,
}

/// Parses and checks `hooks.lease`; `resolve` checks the self-fence command like a hook's.
/// That each target names a server is checked once every section is read (`configuration`).
pub fn parse(
    at: Located,
    resolve: impl FnOnce(Vec<String>, &Located, &str, &mut Vec<Problem>) -> Vec<String>,
    problems: &mut Vec<Problem>,
) -> Option<LeaseConfig> {
    let raw = at.parse::<RawLease>(problems)?;
    let before = problems.len();
    if raw.targets.is_empty() {
        problems.push(
            at.problem("targets", "name at least one target")
                .hint("the `postgres:` or `redis:` item of this host's own server, e.g. [pg-a]"),
        );
    }
    let ttl = raw.ttl.map_or(DEFAULT_TTL, |d| d.0);
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        problems.push(
            at.problem("ttl", "ttl must be between 2s and 5m")
                .hint("the holder renews every ttl/4 and fences after ttl/2 without a renewal"),
        );
    }
    let self_fence_timeout = raw.self_fence_timeout.map_or(ttl / 4, |d| d.0);
    if self_fence_timeout.is_zero() || self_fence_timeout >= ttl / 2 {
        problems.push(
            at.problem(
                "self_fence_timeout",
                "self_fence_timeout must be more than 0s and less than ttl/2",
            )
            .hint("the fence starts ttl/2 after the last renewal and must end before the lease"),
        );
    }
    let wait = raw.wait.map_or(ttl * 2, |d| d.0);
    if wait < ttl || wait > MAX_TTL * 4 {
        problems.push(
            at.problem("wait", "wait must be at least ttl and at most 20m")
                .hint("a promotion waits this long for the old primary's lease to end; 2×ttl by default"),
        );
    }
    let self_fence = resolve(raw.self_fence, &at, "self_fence", problems);
    if problems.len() > before {
        return None;
    }
    Some(LeaseConfig {
        targets_at: (
            crate::config::source::join_path(&at.path, "targets"),
            at.pos_of("targets"),
        ),
        targets: raw.targets,
        ttl,
        self_fence,
        self_fence_timeout,
        wait,
    })
}

/// The (collector, target, cluster) of each lease target among `targets`, or what is wrong
/// with them: each must be a `postgres:` or `redis:` item with a `cluster`.
pub fn servers(
    lease: &LeaseConfig,
    targets: &[Arc<Target>],
) -> Result<Vec<(&'static str, String, String)>, Vec<Problem>> {
    let (path, pos) = &lease.targets_at;
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for name in &lease.targets {
        let named: Vec<&Arc<Target>> = targets.iter().filter(|t| t.target() == name).collect();
        let server = named.iter().find(|t| matches!(t.name(), "pg" | "redis"));
        let problem = match (named.is_empty(), server) {
            (true, _) => {
                let names: Vec<&str> = targets.iter().map(|t| t.target()).collect();
                let p = Problem::new(path, *pos, format!("no target is named `{name}`"));
                match crate::config::source::suggest(name, &names) {
                    Some(hint) => p.hint(hint),
                    None => p,
                }
            }
            (false, None) => Problem::new(
                path,
                *pos,
                format!("`{name}` is not a `postgres:` or `redis:` target"),
            )
            .hint("the lease vouches for a server's primary role"),
            (false, Some(t)) => match t.cluster() {
                Some(cluster) => {
                    found.push((t.name(), name.clone(), cluster.to_owned()));
                    continue;
                }
                None => Problem::new(path, *pos, format!("`{name}` has no `cluster`"))
                    .hint("the lease is kept per replication group: set the item's `cluster`"),
            },
        };
        problems.push(problem);
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems)
    }
}

/// The leader key of a replication group.
pub fn key(prefix: &str, cluster: &str) -> String {
    format!("{prefix}leader/{cluster}")
}

// --- the holder: this host's server, primary, keeps the key ------------------------------

/// What this host's server answered in the holder's own collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    /// Up, and in the primary (PostgreSQL) or master (Redis) role.
    Primary,
    /// Up in another role: demoted, or a standby that was never primary.
    NotPrimary,
    /// Did not answer within the tick, or is no longer configured.
    Down,
}

/// The role a collection of `kind` wrote.
fn local_role(kind: &str, collected: Option<(bool, &SampleBuffer)>) -> Local {
    let Some((true, buffer)) = collected else {
        return Local::Down;
    };
    let (family, primary) = match kind {
        "pg" => ("clusterwatch_pg_role", "primary"),
        _ => ("clusterwatch_redis_role", "master"),
    };
    let is_primary = buffer.families().any(|f| {
        f.name == family
            && f.samples.iter().any(|s| {
                s.value == 1.0 && s.labels.iter().any(|(k, v)| k == "role" && v == primary)
            })
    });
    if is_primary {
        Local::Primary
    } else {
        Local::NotPrimary
    }
}

/// The holder's state, the `state` label of `clusterwatch_leader_lease_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderState {
    /// Not holding: this host's server is not primary.
    NotPrimary,
    /// Holding and renewed within the tick.
    Held,
    /// Holding, but the last renewals failed or the server did not answer.
    Unsure,
    /// The server is primary but another host holds the key: two primaries, or a switchover
    /// in progress.
    Conflict,
    /// The server is primary and etcd could not be asked.
    Unavailable,
    /// The self-fence ran; nothing is taken until the server is seen in another role.
    Fenced,
}

/// Every state, so each series exists from the first scrape.
pub const HOLDER_STATES: &[HolderState] = &[
    HolderState::NotPrimary,
    HolderState::Held,
    HolderState::Unsure,
    HolderState::Conflict,
    HolderState::Unavailable,
    HolderState::Fenced,
];

impl HolderState {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HolderState::NotPrimary => "not_primary",
            HolderState::Held => "held",
            HolderState::Unsure => "unsure",
            HolderState::Conflict => "conflict",
            HolderState::Unavailable => "unavailable",
            HolderState::Fenced => "fenced",
        }
    }
}

/// What the holders report to `/metrics`, by (cluster, target).
#[derive(Default)]
pub struct Board {
    entries: Mutex<BTreeMap<(String, String), BoardEntry>>,
}

#[derive(Clone, Copy)]
struct BoardEntry {
    state: HolderState,
    fences_ok: u64,
    fences_failed: u64,
}

impl Board {
    fn set(&self, cluster: &str, target: &str, state: HolderState) {
        let mut entries = crate::sync::lock(&self.entries);
        let e = entries
            .entry((cluster.to_owned(), target.to_owned()))
            .or_insert(BoardEntry {
                state,
                fences_ok: 0,
                fences_failed: 0,
            });
        e.state = state;
    }

    fn fenced(&self, cluster: &str, target: &str, ok: bool) {
        let mut entries = crate::sync::lock(&self.entries);
        if let Some(e) = entries.get_mut(&(cluster.to_owned(), target.to_owned())) {
            e.state = HolderState::Fenced;
            if ok {
                e.fences_ok += 1;
            } else {
                e.fences_failed += 1;
            }
        }
    }

    /// `clusterwatch_leader_lease_state` and `clusterwatch_leader_lease_self_fences_total`.
    pub fn write(&self, out: &mut SampleBuffer) {
        let entries = crate::sync::lock(&self.entries);
        if entries.is_empty() {
            return;
        }
        for ((cluster, target), e) in entries.iter() {
            let labels = [("cluster", cluster.as_str()), ("target", target.as_str())];
            out.state_set(
                "clusterwatch_leader_lease_state",
                "This host's hold on its replication group's leader lease in etcd (hooks.lease).",
                &labels,
                "state",
                &HOLDER_STATES.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                Some(e.state.as_str()),
            );
            for (result, n) in [("ok", e.fences_ok), ("failed", e.fences_failed)] {
                out.counter(
                    "clusterwatch_leader_lease_self_fences_total",
                    "Self-fences run because the leader lease could not be kept, by result.",
                    &[
                        ("cluster", cluster.as_str()),
                        ("target", target.as_str()),
                        ("result", result),
                    ],
                    n as f64,
                );
            }
        }
    }
}

/// One holder: one of this host's servers and its replication group's key.
struct Holder {
    lock: LockConfig,
    lease: LeaseConfig,
    /// Collector of the server: `pg` or `redis`.
    kind: &'static str,
    target: String,
    cluster: String,
    key: String,
    /// Host and target: the same after a restart of clusterwatch, so a restarted holder takes
    /// its own key back instead of calling it a conflict.
    owner: String,
}

/// A lease held: its ID and when the last renewal that etcd answered was sent.
struct Held {
    lease: i64,
    renewed: Instant,
}

/// What taking the key gave.
enum Taken {
    Held(i64),
    /// Another host holds it (its owner).
    Elsewhere(String),
}

/// Starts one holder per configured target, for as long as the process runs. `servers` are
/// this configuration's (kind, target, cluster) triples for the lease's targets.
pub fn spawn_holders(
    hooks: Arc<Hooks>,
    engine: Arc<Engine>,
    lock: LockConfig,
    lease: LeaseConfig,
    servers: Vec<(&'static str, String, String)>,
) {
    let host = super::lock::hostname();
    for (kind, target, cluster) in servers {
        let holder = Holder {
            key: key(&lock.prefix, &cluster),
            owner: format!("{host}/{target}"),
            lock: lock.clone(),
            lease: lease.clone(),
            kind,
            target,
            cluster,
        };
        hooks
            .leases
            .set(&holder.cluster, &holder.target, HolderState::NotPrimary);
        tokio::spawn(holder.run(hooks.clone(), engine.clone()));
    }
}

impl Holder {
    async fn run(self, hooks: Arc<Hooks>, engine: Arc<Engine>) {
        let tick = self.lease.tick();
        let mut held: Option<Held> = None;
        let mut fenced = false;
        let mut last_state = None;
        loop {
            let started = Instant::now();
            let budget = held.as_ref().map_or(tick, |h| {
                (h.renewed + self.lease.fence_after())
                    .saturating_duration_since(Instant::now())
                    .min(tick)
            });
            let collected = engine.collect_one(self.kind, &self.target, budget).await;
            let local = local_role(self.kind, collected.as_ref().map(|(r, b)| (r.is_ok(), b)));
            let state = if fenced {
                // Stays fenced until the server is seen in another role (rejoined as a
                // standby); a restart of clusterwatch also re-arms it.
                if local == Local::NotPrimary {
                    fenced = false;
                    HolderState::NotPrimary
                } else {
                    HolderState::Fenced
                }
            } else {
                self.step(&hooks, local, &mut held, &mut fenced).await
            };
            if last_state != Some(state) {
                tracing::info!(cluster = %self.cluster, target = %self.target, state = state.as_str(), key = %self.key, "leader lease");
                last_state = Some(state);
            }
            hooks.leases.set(&self.cluster, &self.target, state);
            // While holding, wake no later than the fence is due, whatever the tick's own
            // work cost: the fence must end before the lease does.
            let fence_due = held.as_ref().map(|h| h.renewed + self.lease.fence_after());
            let next = fence_due.map_or(started + tick, |due| (started + tick).min(due));
            tokio::time::sleep_until(next).await;
        }
    }

    /// One tick while not fenced: take, renew, release or fence.
    async fn step(
        &self,
        hooks: &Hooks,
        local: Local,
        held: &mut Option<Held>,
        fenced: &mut bool,
    ) -> HolderState {
        let Some(h) = held.as_mut() else {
            if local != Local::Primary {
                return HolderState::NotPrimary;
            }
            return match self.take().await {
                Ok(Taken::Held(lease)) => {
                    *held = Some(Held {
                        lease,
                        renewed: Instant::now(),
                    });
                    HolderState::Held
                }
                Ok(Taken::Elsewhere(owner)) => {
                    tracing::warn!(cluster = %self.cluster, target = %self.target, holder = %owner, "this server is primary but another host holds the leader lease");
                    HolderState::Conflict
                }
                Err(e) => {
                    tracing::warn!(cluster = %self.cluster, target = %self.target, error = %e, "cannot take the leader lease");
                    HolderState::Unavailable
                }
            };
        };
        let reason = match local {
            Local::NotPrimary => {
                // Demoted in order (a switchover): give the key up now, nothing to fence.
                revoke_later(&self.lock, h.lease);
                *held = None;
                return HolderState::NotPrimary;
            }
            // Not renewed: a server that does not answer is not vouched for.
            Local::Down => "this host's server does not answer as primary".to_owned(),
            Local::Primary => {
                let sent = Instant::now();
                // A renewal that cannot answer before the fence is due must not delay it.
                let budget = self
                    .lease
                    .fence_after()
                    .saturating_sub(h.renewed.elapsed())
                    .min(self.lease.tick());
                let answer = match budget.is_zero() {
                    true => Err("no time left to renew before the fence".to_owned()),
                    false => self.renew(h.lease, budget).await,
                };
                match answer {
                    Ok(true) => {
                        h.renewed = sent;
                        return HolderState::Held;
                    }
                    Ok(false) => {
                        let reason = "etcd says the leader lease expired".to_owned();
                        self.fence(hooks, &reason).await;
                        *held = None;
                        *fenced = true;
                        return HolderState::Fenced;
                    }
                    Err(e) => format!("the leader lease could not be renewed: {e}"),
                }
            }
        };
        if h.renewed.elapsed() < self.lease.fence_after() {
            return HolderState::Unsure;
        }
        let reason = format!(
            "{reason}; no renewal for {:.1}s of a {}s lease",
            h.renewed.elapsed().as_secs_f64(),
            self.lease.ttl.as_secs()
        );
        self.fence(hooks, &reason).await;
        *held = None;
        *fenced = true;
        HolderState::Fenced
    }

    /// Takes the key on a new lease, or takes back our own from before a restart.
    async fn take(&self) -> Result<Taken, String> {
        let lease = grant(&self.lock, self.lease.ttl).await?;
        let value = json!({ "owner": self.owner, "target": self.target }).to_string();
        let key = B64.encode(&self.key);
        let txn = json!({
            "compare": [{ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [{ "request_put": { "key": key, "value": B64.encode(&value), "lease": lease.to_string() } }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let answer = match call(&self.lock, "kv/txn", &txn, CALL_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                revoke_later(&self.lock, lease);
                return Err(e);
            }
        };
        if answer["succeeded"] == Value::Bool(true) {
            return Ok(Taken::Held(lease));
        }
        revoke_later(&self.lock, lease);
        let kv = &field(&answer["responses"][0], "response_range", "responseRange")["kvs"][0];
        let holder = holder_of(kv);
        let theirs = int(&kv["lease"]).unwrap_or(0);
        if holder == self.owner && theirs != 0 && self.renew(theirs, CALL_TIMEOUT).await == Ok(true)
        {
            return Ok(Taken::Held(theirs));
        }
        Ok(Taken::Elsewhere(holder))
    }

    /// One keepalive: `Ok(true)` renewed, `Ok(false)` etcd says the lease is gone.
    async fn renew(&self, lease: i64, timeout: Duration) -> Result<bool, String> {
        Ok(keepalive(&self.lock, lease, timeout).await? > 0)
    }

    /// Runs the self-fence once and journals it. Whatever it returns, the holder stops
    /// vouching: the lease is left to end.
    async fn fence(&self, hooks: &Hooks, reason: &str) {
        tracing::error!(cluster = %self.cluster, target = %self.target, reason, "leader lease cannot be kept: running the self-fence");
        let env = vec![
            ("PATH".to_owned(), super::env::HOOK_PATH.to_owned()),
            ("CW_LEASE_CLUSTER".to_owned(), self.cluster.clone()),
            ("CW_LEASE_TARGET".to_owned(), self.target.clone()),
            ("CW_LEASE_KEY".to_owned(), self.key.clone()),
            ("CW_LEASE_REASON".to_owned(), reason.to_owned()),
        ];
        let o = super::runner::run(super::runner::Spec {
            argv: &self.lease.self_fence,
            env,
            stdin: Arc::new(Vec::new()),
            timeout: self.lease.self_fence_timeout,
            grace: hooks.config().kill_grace.min(self.lease.self_fence_timeout),
        })
        .await;
        let ok = o.exit == super::runner::Exit::Code(0);
        if ok {
            tracing::warn!(cluster = %self.cluster, target = %self.target, seconds = o.duration.as_secs_f64(), "self-fence done");
        } else {
            tracing::error!(cluster = %self.cluster, target = %self.target, outcome = %o.exit, "self-fence failed: this server may still accept writes");
        }
        hooks.leases.fenced(&self.cluster, &self.target, ok);
        let event = Event::SelfFenced {
            cluster: self.cluster.clone(),
            target: self.target.clone(),
            reason: reason.to_owned(),
            outcome: o.exit.to_string(),
            duration_seconds: o.duration.as_secs_f64(),
            stderr_tail: o.stderr_tail,
        };
        let _ = hooks.commit(vec![Record { ts: now(), event }]).await;
    }
}

/// The `owner` written in a leader key's value (the raw value if it is not ours to read).
fn holder_of(kv: &Value) -> String {
    owner_of(kv_value(kv))
}

// --- the promoting side: wait until no one holds the key ---------------------------------

/// Why a promotion did not start.
#[derive(Debug, PartialEq)]
pub enum LeaseRefusal {
    /// The key was still held after `wait`: the old primary keeps renewing (who, seconds).
    Held(String, f64),
    /// etcd could not be read until `wait` ended.
    Unavailable(String),
}

/// Reads the leader key: `Some(owner)` while someone holds it.
async fn holder(lock: &LockConfig, key: &str) -> Result<Option<String>, String> {
    let v = call(
        lock,
        "kv/range",
        &json!({ "key": B64.encode(key) }),
        CALL_TIMEOUT,
    )
    .await?;
    let kv = &v["kvs"][0];
    Ok((!kv.is_null()).then(|| holder_of(kv)))
}

/// Waits until `cluster`'s leader key is free, for at most `lease.wait`. `Ok(None)`: it was
/// free at once; `Ok(Some((owner, seconds)))`: it was held by `owner` and went after `seconds`.
pub async fn wait_until_free(
    lock: &LockConfig,
    lease: &LeaseConfig,
    cluster: &str,
) -> Result<Option<(String, f64)>, LeaseRefusal> {
    let key = key(&lock.prefix, cluster);
    let started = Instant::now();
    let mut seen: Option<String> = None;
    loop {
        let error = match holder(lock, &key).await {
            Ok(None) => {
                return Ok(seen.map(|owner| (owner, started.elapsed().as_secs_f64())));
            }
            Ok(Some(owner)) => {
                seen = Some(owner);
                None
            }
            Err(e) => Some(e),
        };
        if started.elapsed() >= lease.wait {
            let waited = started.elapsed().as_secs_f64();
            return Err(match (error, seen) {
                (Some(e), _) => LeaseRefusal::Unavailable(e),
                (None, owner) => LeaseRefusal::Held(owner.unwrap_or_default(), waited),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse as parse_config;

    fn buffer(family: &str, role: &str) -> SampleBuffer {
        let mut b = SampleBuffer::new();
        b.state_set(
            family,
            "role",
            &[("target", "x")],
            "role",
            &["primary", "standby", "master", "replica"],
            Some(role),
        );
        b
    }

    #[test]
    fn the_local_role_is_read_from_the_collection() {
        let pg = buffer("clusterwatch_pg_role", "primary");
        assert_eq!(local_role("pg", Some((true, &pg))), Local::Primary);
        let standby = buffer("clusterwatch_pg_role", "standby");
        assert_eq!(local_role("pg", Some((true, &standby))), Local::NotPrimary);
        assert_eq!(local_role("pg", Some((false, &pg))), Local::Down);
        assert_eq!(local_role("pg", None), Local::Down);
        let master = buffer("clusterwatch_redis_role", "master");
        assert_eq!(local_role("redis", Some((true, &master))), Local::Primary);
        // A Redis master's buffer says nothing of a PostgreSQL primary.
        assert_eq!(local_role("pg", Some((true, &master))), Local::NotPrimary);
    }

    #[test]
    fn the_fence_starts_at_half_the_ttl_and_ends_before_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "tok\n").unwrap();
        let head = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - { name: r, match: { a: b }, command: [/bin/true] }\n  lock:\n    etcd: { endpoints: [http://127.0.0.1:2379] }\n";
        let yaml = format!("{head}  lease: {{ targets: [pg-a], self_fence: [/bin/true] }}\n");
        let cfg = parse_config(
            &format!("postgres:\n  - {{ name: pg-a, cluster: c, dsn: 'postgres://u@127.0.0.1/x' }}\n{yaml}"),
            "c.yml",
            dir.path(),
        )
        .unwrap();
        let lease = cfg.hooks.unwrap().lease.unwrap();
        assert_eq!(lease.ttl, DEFAULT_TTL);
        assert_eq!(lease.tick(), Duration::from_millis(7500));
        assert_eq!(lease.fence_after(), Duration::from_secs(15));
        assert!(lease.fence_after() + lease.self_fence_timeout < lease.ttl);
        assert_eq!(lease.wait, 2 * DEFAULT_TTL);

        let yaml = format!(
            "{head}  lease:\n    targets: []\n    ttl: 1s\n    self_fence: [/nonexistent/fence]\n    self_fence_timeout: 10s\n    wait: 0s\n"
        );
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        for expected in [
            "hooks.lease.targets: name at least one target",
            "hooks.lease.ttl: ttl must be between 2s and 5m",
            "hooks.lease.self_fence_timeout",
            "hooks.lease.wait",
            "hooks.lease.self_fence: /nonexistent/fence is not an executable file",
        ] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    }

    #[test]
    fn a_lease_needs_the_lock_servers_with_a_cluster_and_waiting_hooks_need_a_lease() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "tok\n").unwrap();
        let servers = "postgres:\n  - { name: pg-a, cluster: c, dsn: 'postgres://u@127.0.0.1/x' }\n  - { name: pg-lone, dsn: 'postgres://u@127.0.0.1/x' }\nprobes:\n  - { name: web, tcp: { address: '127.0.0.1:1' } }\n";
        let yaml = format!("{servers}hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - {{ name: r, match: {{ a: b }}, command: [/bin/true], wait_for_lease: true }}\n");
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            text.contains("wait_for_lease: there is no `hooks.lease`"),
            "{text}"
        );

        let head = format!("{servers}hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - {{ name: r, match: {{ a: b }}, command: [/bin/true] }}\n");
        let yaml = format!("{head}  lease: {{ targets: [pg-a], self_fence: [/bin/true] }}\n");
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(text.contains("hooks.lease: needs `hooks.lock`"), "{text}");

        let yaml = format!("{head}  lock: {{ etcd: {{ endpoints: [http://127.0.0.1:2379] }} }}\n  lease: {{ targets: [pg-a, pg-lone, web, pg-x], self_fence: [/bin/true] }}\n");
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(text.contains("`pg-lone` has no `cluster`"), "{text}");
        assert!(
            text.contains("`web` is not a `postgres:` or `redis:` target"),
            "{text}"
        );
        assert!(text.contains("no target is named `pg-x`"), "{text}");
        // pg-a is a server with a cluster: nothing is said of it.
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn the_board_writes_one_state_per_holder_and_counts_fences() {
        let board = Board::default();
        let mut empty = SampleBuffer::new();
        board.write(&mut empty);
        assert_eq!(
            empty.families().count(),
            0,
            "no lease configured: no series"
        );
        board.set("main", "pg-a", HolderState::Held);
        board.fenced("main", "pg-a", true);
        let mut out = SampleBuffer::new();
        board.write(&mut out);
        let states = crate::status::from_buffer(&out);
        let on: Vec<_> = states
            .iter()
            .filter(|s| s.name == "clusterwatch_leader_lease_state" && s.value == 1.0)
            .collect();
        assert_eq!(on.len(), 1);
        assert!(on[0].labels.contains(&("state".into(), "fenced".into())));
        let ok = states
            .iter()
            .find(|s| {
                s.name == "clusterwatch_leader_lease_self_fences_total"
                    && s.labels.contains(&("result".into(), "ok".into()))
            })
            .unwrap();
        assert_eq!(ok.value, 1.0);
    }

    #[test]
    fn replay_says_a_promotion_would_wait_for_the_leader_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "tok\n").unwrap();
        let yaml = "postgres:\n  - { name: pg2, cluster: pg, dsn: 'postgres://u@127.0.0.1/x' }\nhooks:\n  bearer_token_file: t\n  state_dir: st\n  lock: { etcd: { endpoints: [http://127.0.0.1:2379] } }\n  lease: { targets: [pg2], self_fence: [/bin/true] }\n  rules:\n    - { name: promote, match: { alertname: NoPrimary }, command: [/bin/true], disruptive: true, wait_for_lease: true }\n";
        let hooks = parse_config(yaml, "c.yml", dir.path())
            .unwrap()
            .hooks
            .unwrap();
        let with = |labels: &str| {
            let body = crate::hooks::payload::tests::body("firing", labels, "f1", "t0");
            crate::hooks::replay(&hooks, body.as_bytes())
                .unwrap()
                .join("\n")
        };
        let text = with(r#"{"alertname":"NoPrimary","cluster":"pg"}"#);
        assert!(
            text.contains(
                "would first wait up to 1m 0s until no host holds /clusterwatch/hooks/leader/pg"
            ),
            "{text}"
        );
        let text = with(r#"{"alertname":"NoPrimary"}"#);
        assert!(
            text.contains("would refuse: the alert has no `cluster` label"),
            "{text}"
        );
    }

    #[test]
    fn a_leader_key_names_its_group_and_the_holder_is_read_from_its_value() {
        assert_eq!(key("/cw/", "main"), "/cw/leader/main");
        let value = B64.encode(r#"{"owner":"db1/pg-a","target":"pg-a"}"#);
        assert_eq!(holder_of(&json!({ "value": value })), "db1/pg-a");
        let foreign = B64.encode("someone else");
        assert_eq!(holder_of(&json!({ "value": foreign })), "someone else");
    }
}
