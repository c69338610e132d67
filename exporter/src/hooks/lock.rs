//! The cluster-wide lock for disruptive hook runs (`hooks.lock`): an incident claim and a run
//! lease in etcd, taken over etcd's v3 JSON gateway, and the lease kept alive while the hook
//! runs. It says whether this receiver may act; whether a hook should run is `policy`'s call.
//!
//! Two keys per incident (hook, alert fingerprint, `startsAt`, status), written by one
//! transaction that succeeds only if the claim key was never created:
//! - `PREFIX/incidents/...` on a lease of `keep` (24 h) that nobody renews: the memory that the
//!   incident was taken. It outlives the run and a crash of its holder, so a second receiver
//!   given the same notification, now or after a kill -9 of the first, never runs it.
//! - `PREFIX/running/...` on a lease of `ttl`, kept alive while the hook runs and revoked when
//!   it ends: who is acting now. Its claim's create revision is the fencing token.

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;
use url::Url;

use super::gate::{Pass, Refusal, RunGate};
use super::journal::AlertRef;
use crate::config::{HumanDuration, Located, Problem, SectionContext};
use crate::etcd_v3::{build_client, check_endpoints, TlsFiles};

const DEFAULT_PREFIX: &str = "/clusterwatch/hooks/";
const DEFAULT_TTL: Duration = Duration::from_secs(15);
const DEFAULT_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Below this, one slow keepalive round trip loses the lease.
const MIN_TTL: Duration = Duration::from_secs(2);
/// Above this, a dead holder keeps a failover waiting too long.
const MAX_TTL: Duration = Duration::from_secs(600);
/// How long etcd may be asked to remember an incident.
const MAX_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// Each etcd call, per endpoint; a dead member must not hold a failover up for long.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The checked `hooks.lock` section.
#[derive(Clone, Debug)]
pub struct LockConfig {
    /// etcd client URLs, tried in order.
    pub endpoints: Vec<Url>,
    /// Client with the configured TLS files.
    pub client: reqwest::Client,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// The run lease's TTL: how long a silent holder keeps it.
    pub ttl: Duration,
    /// How long an incident's claim is kept after it was taken.
    pub keep: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    // Checked field by field below, so problems name `lock.etcd.<field>`.
    #[allow(dead_code)]
    etcd: serde::de::IgnoredAny,
    prefix: Option<String>,
    ttl: Option<HumanDuration>,
    keep: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Parses and checks `hooks.lock`. Reads the TLS files; never contacts etcd.
pub fn parse(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Option<LockConfig> {
    let raw = at.parse::<RawLock>(problems)?;
    let before = problems.len();
    let etcd_at = at.field("etcd")?;
    let etcd = etcd_at.parse::<RawEtcd>(problems)?;
    let endpoints = check_endpoints(&etcd.endpoints, &etcd_at, problems);
    let tls = TlsFiles {
        ca: etcd.ca_file.map(|p| ctx.resolve(&p)),
        cert: etcd.cert_file.map(|p| ctx.resolve(&p)),
        key: etcd.key_file.map(|p| ctx.resolve(&p)),
    };
    let client = build_client(&tls, &etcd_at, problems);
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        problems.push(
            at.problem("prefix", "the key prefix must start and end with `/`")
                .hint("e.g. `/clusterwatch/hooks/`; every receiver of one site uses the same"),
        );
    }
    let ttl = raw.ttl.map(|d| d.0).unwrap_or(DEFAULT_TTL);
    if ttl < MIN_TTL {
        problems.push(
            at.problem("ttl", "ttl must be at least 2s")
                .hint("the lease is renewed every ttl/3; 15s suits most networks"),
        );
    }
    if ttl > MAX_TTL {
        problems.push(at.problem("ttl", "ttl must be at most 10m"));
    }
    let keep = raw.keep.map(|d| d.0).unwrap_or(DEFAULT_KEEP);
    if keep > MAX_KEEP {
        problems.push(at.problem("keep", "keep must be at most 30days"));
    }
    if keep < ttl {
        problems.push(
            at.problem("keep", "keep must be longer than ttl")
                .hint("keep is how long a handled incident is remembered, e.g. 24h"),
        );
    }
    if problems.len() > before {
        return None;
    }
    Some(LockConfig {
        endpoints,
        client: client?,
        prefix,
        ttl,
        keep,
    })
}

/// The etcd keys of one incident: (claim, running).
pub fn keys(prefix: &str, hook: &str, alert: &AlertRef) -> (String, String) {
    let id = format!(
        "{hook}/{}/{}/{}",
        alert.fingerprint, alert.starts_at, alert.status
    );
    (
        format!("{prefix}incidents/{id}"),
        format!("{prefix}running/{id}"),
    )
}

/// What a keepalive answer means for the lease, given when the last good one came.
#[derive(Debug, PartialEq, Eq)]
enum Renewal {
    Held,
    /// etcd says the lease is gone (TTL 0).
    Expired,
    /// No answer, but the lease may still be alive.
    Unsure,
    /// No answer for longer than the TTL: count it lost.
    Lost,
}

fn renewal(answer: Result<i64, ()>, since_last_ok: Duration, ttl: Duration) -> Renewal {
    match answer {
        Ok(t) if t > 0 => Renewal::Held,
        Ok(_) => Renewal::Expired,
        Err(()) if since_last_ok >= ttl => Renewal::Lost,
        Err(()) => Renewal::Unsure,
    }
}

/// This host's name, as etcd values name their writer.
pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The gate of a receiver with `hooks.lock`: one claim per incident, cluster-wide.
pub struct EtcdLock {
    cfg: LockConfig,
    /// Who we are in the claim's value: host, PID and start time.
    owner: String,
}

/// An etcd int64, which the JSON gateway writes as a string.
pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        other => other.as_i64(),
    }
}

/// A field by its proto name or the gateway's camelCase name.
pub(super) fn field<'a>(v: &'a Value, snake: &str, camel: &str) -> &'a Value {
    match v.get(snake) {
        Some(x) => x,
        None => &v[camel],
    }
}

impl LockConfig {
    /// What the running lock was built from, to tell whether a reload changes it (TLS files
    /// are read into the client once, at start).
    pub fn identity(&self) -> (Vec<&str>, &str, Duration, Duration) {
        let endpoints = self.endpoints.iter().map(Url::as_str).collect();
        (endpoints, &self.prefix, self.ttl, self.keep)
    }
}

impl EtcdLock {
    /// A gate over the configured etcd; contacts nothing until the first disruptive run.
    pub fn new(cfg: LockConfig) -> EtcdLock {
        let owner = format!(
            "{}/{}/{}",
            hostname(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        EtcdLock { cfg, owner }
    }

    /// POSTs to `/v3/<path>` on each endpoint in turn until one answers 2xx.
    async fn call(&self, path: &str, body: &Value, timeout: Duration) -> Result<Value, String> {
        call(&self.cfg, path, body, timeout).await
    }

    async fn claim(&self, hook: &str, run: u64, alert: &AlertRef) -> Result<Pass, Refusal> {
        let (claim_key, running_key) = keys(&self.cfg.prefix, hook, alert);
        let keep = grant(&self.cfg, self.cfg.keep)
            .await
            .map_err(Refusal::Unavailable)?;
        let lease = match grant(&self.cfg, self.cfg.ttl).await {
            Ok(l) => l,
            Err(e) => {
                revoke_later(&self.cfg, keep);
                return Err(Refusal::Unavailable(e));
            }
        };
        let value = json!({ "owner": self.owner, "hook": hook, "run": run }).to_string();
        let txn = json!({
            "compare": [{ "key": B64.encode(&claim_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [
                { "request_put": { "key": B64.encode(&claim_key), "value": B64.encode(&value), "lease": keep.to_string() } },
                { "request_put": { "key": B64.encode(&running_key), "value": B64.encode(&value), "lease": lease.to_string() } },
            ],
            "failure": [{ "request_range": { "key": B64.encode(&claim_key) } }],
        });
        let answer = match self.call("kv/txn", &txn, CALL_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                revoke_later(&self.cfg, keep);
                revoke_later(&self.cfg, lease);
                return Err(Refusal::Unavailable(e));
            }
        };
        let (holder, token) = if answer["succeeded"] == Value::Bool(true) {
            (value.clone(), int(&answer["header"]["revision"]))
        } else {
            let kv = &field(&answer["responses"][0], "response_range", "responseRange")["kvs"][0];
            (
                kv_value(kv),
                int(field(kv, "create_revision", "createRevision")),
            )
        };
        // A retry on another endpoint after an unanswered but applied transaction finds our
        // own claim: that is ours, not someone else's.
        if holder != value {
            revoke_later(&self.cfg, keep);
            revoke_later(&self.cfg, lease);
            return Err(Refusal::HeldElsewhere(owner_of(holder)));
        }
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (lost_tx, lost_rx) = oneshot::channel::<String>();
        tokio::spawn(keep_alive(self.cfg.clone(), lease, stop_rx, lost_tx));
        Ok(Pass {
            fencing_token: token.map(|t| t as u64),
            key: Some(claim_key),
            lost: Some(lost_rx),
            guard: Box::new(stop_tx),
        })
    }
}

pub(super) async fn call(
    cfg: &LockConfig,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let mut errors = Vec::new();
    for endpoint in &cfg.endpoints {
        let url = format!("{endpoint}v3/{path}");
        let sent = cfg
            .client
            .post(&url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status().is_success() => r.bytes().await.map_err(|e| e.to_string()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Err(if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "connection refused or unreachable".to_owned()
            } else {
                e.to_string()
            }),
        };
        match answer.and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string())) {
            // The keepalive stream wraps its answer in `result`.
            Ok(v) => return Ok(v.get("result").cloned().unwrap_or(v)),
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    Err(format!("etcd {path}: {}", errors.join("; ")))
}

/// Grants a lease of `ttl` (whole seconds, at least 1); its ID.
pub(super) async fn grant(cfg: &LockConfig, ttl: Duration) -> Result<i64, String> {
    let body = json!({ "TTL": ttl.as_secs().max(1) });
    let v = call(cfg, "lease/grant", &body, CALL_TIMEOUT).await?;
    int(&v["ID"]).ok_or_else(|| format!("lease grant answered without an ID: {v}"))
}

/// Renews a lease once; the TTL etcd answers (0: the lease is gone).
pub(super) async fn keepalive(
    cfg: &LockConfig,
    lease: i64,
    timeout: Duration,
) -> Result<i64, String> {
    let body = json!({ "ID": lease.to_string() });
    let v = call(cfg, "lease/keepalive", &body, timeout).await?;
    Ok(int(&v["TTL"]).unwrap_or(0))
}

/// A key's value as text, from a range answer's `kvs` entry (empty if it has none).
pub(super) fn kv_value(kv: &Value) -> String {
    kv["value"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The `owner` a claim or leader key's JSON value names; the raw value if it is not ours to
/// read.
pub(super) fn owner_of(value: String) -> String {
    serde_json::from_str::<Value>(&value)
        .ok()
        .and_then(|v| v["owner"].as_str().map(str::to_owned))
        .unwrap_or(value)
}

/// Revokes a lease in the background; if it fails, the lease expires by itself.
pub(super) fn revoke_later(cfg: &LockConfig, lease: i64) {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let _ = call(
            &cfg,
            "lease/revoke",
            &json!({ "ID": lease.to_string() }),
            CALL_TIMEOUT,
        )
        .await;
    });
}

/// Renews the run lease every ttl/3 until `stop` (the run ended: revoke it) or until it is
/// lost (say so on `lost` and stop renewing).
async fn keep_alive(
    cfg: LockConfig,
    lease: i64,
    mut stop: oneshot::Receiver<()>,
    lost: oneshot::Sender<String>,
) {
    let every = cfg.ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => {
                revoke_later(&cfg, lease);
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let answer = keepalive(&cfg, lease, every).await;
        match renewal(
            answer.as_ref().copied().map_err(|_| ()),
            last_ok.elapsed(),
            cfg.ttl,
        ) {
            Renewal::Held => last_ok = Instant::now(),
            Renewal::Unsure => {}
            Renewal::Expired => {
                let _ = lost.send("etcd says the lease expired".into());
                return;
            }
            Renewal::Lost => {
                let e = answer.err().unwrap_or_default();
                let _ = lost.send(format!(
                    "no keepalive answer for {}s: {e}",
                    cfg.ttl.as_secs()
                ));
                return;
            }
        }
    }
}

#[async_trait::async_trait]
impl RunGate for EtcdLock {
    async fn acquire(&self, hook: &str, run: u64, alert: &AlertRef) -> Result<Pass, Refusal> {
        self.claim(hook, run, alert).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse as parse_config;

    #[test]
    fn keys_name_the_incident_and_differ_by_start() {
        let a = AlertRef {
            fingerprint: "ab12".into(),
            starts_at: "2026-01-01T00:00:00Z".into(),
            status: "firing".into(),
            alertname: "NoPrimary".into(),
        };
        let (claim, running) = keys("/cw/", "promote", &a);
        assert_eq!(
            claim,
            "/cw/incidents/promote/ab12/2026-01-01T00:00:00Z/firing"
        );
        assert_eq!(
            running,
            "/cw/running/promote/ab12/2026-01-01T00:00:00Z/firing"
        );
        let mut later = a.clone();
        later.starts_at = "2026-01-02T00:00:00Z".into();
        assert_ne!(keys("/cw/", "promote", &later).0, claim);
    }

    #[test]
    fn a_lease_is_lost_only_after_a_ttl_without_answers_or_when_etcd_says_so() {
        let ttl = Duration::from_secs(15);
        assert_eq!(renewal(Ok(15), Duration::from_secs(30), ttl), Renewal::Held);
        assert_eq!(
            renewal(Err(()), Duration::from_secs(14), ttl),
            Renewal::Unsure
        );
        assert_eq!(
            renewal(Err(()), Duration::from_secs(15), ttl),
            Renewal::Lost
        );
        assert_eq!(renewal(Ok(0), Duration::ZERO, ttl), Renewal::Expired);
    }

    #[test]
    fn gateway_numbers_and_names_are_read_either_way() {
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(42)), Some(42));
        let v = json!({ "createRevision": "7" });
        assert_eq!(int(field(&v, "create_revision", "createRevision")), Some(7));
    }

    #[test]
    fn the_section_parses_with_defaults_and_problems_have_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "tok\n").unwrap();
        let head = "hooks:\n  bearer_token_file: t\n  state_dir: st\n  rules:\n    - { name: r, match: { a: b }, command: [/bin/true] }\n";
        let yaml = format!("{head}  lock:\n    etcd: {{ endpoints: [http://127.0.0.1:2379] }}\n");
        let cfg = parse_config(&yaml, "c.yml", dir.path()).unwrap();
        let lock = cfg.hooks.unwrap().lock.unwrap();
        assert_eq!(lock.prefix, DEFAULT_PREFIX);
        assert_eq!(lock.ttl, DEFAULT_TTL);
        assert_eq!(lock.keep, DEFAULT_KEEP);

        let yaml = format!(
            "{head}  lock:\n    etcd:\n      endpoints: [ftp://x]\n    prefix: cw\n    ttl: 1s\n    keep: 500ms\n"
        );
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            text.contains("c.yml:8:7: hooks.lock.etcd.endpoints[0]"),
            "{text}"
        );
        assert!(text.contains("hooks.lock.prefix: the key prefix"), "{text}");
        assert!(
            text.contains("hooks.lock.ttl: ttl must be at least 2s"),
            "{text}"
        );
        assert!(text.contains("hooks.lock.keep"), "{text}");

        let yaml = format!(
            "{head}  lock:\n    etcd: {{ endpoints: [http://127.0.0.1:2379] }}\n    ttl: 11m\n    keep: 31days\n"
        );
        let text = parse_config(&yaml, "c.yml", dir.path())
            .unwrap_err()
            .render();
        assert!(
            text.contains("hooks.lock.ttl: ttl must be at most 10m"),
            "{text}"
        );
        assert!(
            text.contains("hooks.lock.keep: keep must be at most 30days"),
            "{text}"
        );
    }
}
