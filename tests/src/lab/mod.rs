//! The local lab: a PostgreSQL primary/standby pair with archiving, a Redis master/replica
//! pair, clusterwatch with hooks, Prometheus loading `rules/` and Alertmanager routing failover
//! alerts to clusterwatch's receiver, all on loopback, all built from the test harness.
//!
//! The `lab` binary runs it for people (`up`, `down`, `drill`); the failover tests run the
//! very same [`Lab`] and [`drill`](drill::drill) in-process.

pub mod drill;
pub mod pg_failover;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::harness::{
    free_port, repo_root, temp_dir, Alertmanager, Clusterwatch, PgCluster, Prometheus,
    PrometheusConfig, RedisPair, ScrapeJob,
};

/// The `cluster` label of the PostgreSQL pair.
pub const PG_CLUSTER: &str = "lab-pg";
/// The `cluster` label of the Redis pair.
pub const REDIS_CLUSTER: &str = "lab-redis";
/// Target names, as they appear in the `target` label.
pub const PG_PRIMARY: &str = "pg-a";
/// The PostgreSQL standby's target name.
pub const PG_STANDBY: &str = "pg-b";
/// The Redis master's target name.
pub const REDIS_MASTER: &str = "redis-a";
/// The Redis replica's target name.
pub const REDIS_REPLICA: &str = "redis-b";
/// The hook that promotes the PostgreSQL standby.
pub const PG_HOOK: &str = "pg-promote-standby";
/// The hook that promotes the Redis replica.
pub const REDIS_HOOK: &str = "redis-promote-replica";

/// How the lab is wired; the defaults are what `lab up` uses.
#[derive(Debug, Clone)]
pub struct LabSettings {
    /// Prometheus scrapes clusterwatch this often (and evaluates rules this often).
    pub scrape_interval: Duration,
    /// Alertmanager's `group_wait` on the failover route.
    pub group_wait: Duration,
    /// More configuration for clusterwatch, merged into the lab's own.
    pub extra_config: Option<ExtraConfig>,
}

/// Builds extra clusterwatch configuration once the pairs run (so it can use their ports).
/// Merged into the lab's configuration: maps key by key, lists appended (so extra hook rules
/// join the lab's two), anything else replaced.
#[derive(Clone)]
pub struct ExtraConfig(pub Arc<BuildConfig>);

/// What an [`ExtraConfig`] calls: the running pairs in, configuration sections out.
pub type BuildConfig = dyn Fn(&PgCluster, &RedisPair) -> Value + Send + Sync;

impl std::fmt::Debug for ExtraConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraConfig(..)")
    }
}

impl Default for LabSettings {
    fn default() -> Self {
        LabSettings {
            scrape_interval: Duration::from_secs(2),
            group_wait: Duration::from_secs(0),
            extra_config: None,
        }
    }
}

/// The running lab. Dropping it stops every server and removes every directory.
pub struct Lab {
    // Declaration order is drop order: the watchers stop before what they watch.
    /// Prometheus, loading every file of `rules/`.
    pub prometheus: Prometheus,
    /// Alertmanager, routing `action="failover"` to clusterwatch's hook receiver.
    pub alertmanager: Alertmanager,
    /// clusterwatch, watching both pairs and running the hooks.
    pub clusterwatch: Clusterwatch,
    /// PostgreSQL primary (`pg-a`) and streaming standby (`pg-b`).
    pub pg: PgCluster,
    /// Redis master (`redis-a`) and replica (`redis-b`).
    pub redis: RedisPair,
    /// What the lab wrote itself: hook token, hook state, the kill switch's place.
    dir: TempDir,
    settings: LabSettings,
    hooks_port: u16,
}

impl Lab {
    /// Brings everything up and returns once Prometheus scrapes clusterwatch successfully.
    pub async fn up(settings: LabSettings) -> Result<Lab> {
        let (pg, redis) = tokio::try_join!(PgCluster::start_pair(), async {
            let pair = RedisPair::start().await?;
            pair.wait_replication_up(crate::harness::redis::REPLICATION_TIMEOUT)
                .await?;
            Ok(pair)
        })
        .context("starting the PostgreSQL and Redis pairs")?;

        let dir = temp_dir("cw-lab-")?;
        let token = format!("lab-{:016x}", rand_u64());
        let token_file = dir.path().join("hook.token");
        write_private(&token_file, &token)?;
        let hooks_port = free_port()?;
        let mut config = clusterwatch_config(&pg, &redis, dir.path(), hooks_port)?;
        if let Some(extra) = &settings.extra_config {
            merge(&mut config, (extra.0)(&pg, &redis));
        }
        // JSON is YAML.
        let config = serde_json::to_string_pretty(&config)?;
        std::fs::write(dir.path().join("clusterwatch.yml"), &config)?;
        let clusterwatch = Clusterwatch::start(Some(&config), &["--log.level", "info"])
            .await
            .context("starting clusterwatch with the lab configuration")?;

        let alertmanager = Alertmanager::start(Some(&alertmanager_config(
            settings.group_wait,
            &[format!("http://127.0.0.1:{hooks_port}/hooks/alertmanager")],
            &token_file,
        )))
        .await
        .context("starting Alertmanager")?;

        let prometheus = Prometheus::start(&PrometheusConfig {
            jobs: vec![ScrapeJob {
                scrape_interval: settings.scrape_interval,
                scrape_timeout: settings.scrape_interval,
                ..ScrapeJob::new("clusterwatch", &[&clusterwatch.addr()])
            }],
            rule_files: rule_files()?,
            alertmanagers: vec![alertmanager.addr()],
            evaluation_interval: settings.scrape_interval,
        })
        .await
        .context("starting Prometheus")?;
        prometheus
            .wait_for_target_up("clusterwatch", Duration::from_secs(60))
            .await?;

        Ok(Lab {
            prometheus,
            alertmanager,
            clusterwatch,
            pg,
            redis,
            dir,
            settings,
            hooks_port,
        })
    }

    /// The file holding the bearer token Alertmanager presents to the hook receiver.
    pub fn hook_token_file(&self) -> PathBuf {
        self.dir.path().join("hook.token")
    }

    /// Everything a person or a drill needs to reach the lab, as JSON (`lab.json`).
    pub fn info(&self) -> Result<LabInfo> {
        Ok(LabInfo {
            prometheus: self.prometheus.url(""),
            alertmanager: self.alertmanager.url(""),
            clusterwatch: self.clusterwatch.url(""),
            hooks: format!("http://127.0.0.1:{}/hooks/alertmanager", self.hooks_port),
            hook_state_dir: hook_state_dir(self.dir.path()),
            kill_switch_file: self.dir.path().join("hooks.disabled"),
            scrape_interval: self.settings.scrape_interval,
            group_wait: self.settings.group_wait,
            pg_primary: Member {
                target: PG_PRIMARY.to_owned(),
                port: self.pg.primary.port(),
                pid_file: Some(self.pg.primary.data_dir().join("postmaster.pid")),
                pid: None,
            },
            pg_standby: Member {
                target: PG_STANDBY.to_owned(),
                port: self.pg.standby.port(),
                pid_file: Some(self.pg.standby.data_dir().join("postmaster.pid")),
                pid: None,
            },
            redis_master: Member {
                target: REDIS_MASTER.to_owned(),
                port: self.redis.master.port(),
                pid_file: None,
                pid: self.redis.master.process().pid().map(|pid| pid as i32),
            },
            redis_replica: Member {
                target: REDIS_REPLICA.to_owned(),
                port: self.redis.replica.port(),
                pid_file: None,
                pid: self.redis.replica.process().pid().map(|pid| pid as i32),
            },
        })
    }
}

/// One server of the lab, as the drill sees it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its `target` label.
    pub target: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Where its PID is written (PostgreSQL's `postmaster.pid`), if it has one.
    pub pid_file: Option<PathBuf>,
    /// Its PID when it is known up front (Redis runs in the foreground under the harness).
    pub pid: Option<i32>,
}

impl Member {
    fn to_json(&self) -> Value {
        json!({ "target": self.target, "port": self.port, "pid_file": self.pid_file, "pid": self.pid })
    }

    fn from_json(value: &Value) -> Result<Member> {
        Ok(Member {
            target: str_field(value, "target")?.to_owned(),
            port: value["port"]
                .as_u64()
                .and_then(|port| u16::try_from(port).ok())
                .context("a member without a port")?,
            pid_file: value["pid_file"].as_str().map(PathBuf::from),
            pid: value["pid"]
                .as_i64()
                .and_then(|pid| i32::try_from(pid).ok()),
        })
    }
}

/// Addresses and files of a running lab.
#[derive(Debug, Clone)]
pub struct LabInfo {
    /// Prometheus' base URL.
    pub prometheus: String,
    /// Alertmanager's base URL.
    pub alertmanager: String,
    /// clusterwatch's base URL (`/metrics` below it).
    pub clusterwatch: String,
    /// The webhook URL Alertmanager posts to.
    pub hooks: String,
    /// The hook runner's state directory (its journal lives there).
    pub hook_state_dir: PathBuf,
    /// Creating this file stops every hook from running.
    pub kill_switch_file: PathBuf,
    /// Prometheus' scrape and evaluation interval.
    pub scrape_interval: Duration,
    /// Alertmanager's group_wait on the failover route.
    pub group_wait: Duration,
    /// The PostgreSQL node started as primary.
    pub pg_primary: Member,
    /// The PostgreSQL node started as standby.
    pub pg_standby: Member,
    /// The Redis node started as master.
    pub redis_master: Member,
    /// The Redis node started as replica.
    pub redis_replica: Member,
}

impl LabInfo {
    /// The JSON written to `lab.json`.
    pub fn to_json(&self) -> Value {
        json!({
            "prometheus": self.prometheus,
            "alertmanager": self.alertmanager,
            "clusterwatch": self.clusterwatch,
            "hooks": self.hooks,
            "hook_state_dir": self.hook_state_dir,
            "kill_switch_file": self.kill_switch_file,
            "scrape_interval_ms": self.scrape_interval.as_millis() as u64,
            "group_wait_ms": self.group_wait.as_millis() as u64,
            "pg_primary": self.pg_primary.to_json(),
            "pg_standby": self.pg_standby.to_json(),
            "redis_master": self.redis_master.to_json(),
            "redis_replica": self.redis_replica.to_json(),
        })
    }

    /// Reads back what [`to_json`](Self::to_json) wrote.
    pub fn from_json(value: &Value) -> Result<LabInfo> {
        let millis = |key: &str| -> Result<Duration> {
            Ok(Duration::from_millis(
                value[key]
                    .as_u64()
                    .with_context(|| format!("lab.json has no {key}"))?,
            ))
        };
        Ok(LabInfo {
            prometheus: str_field(value, "prometheus")?.to_owned(),
            alertmanager: str_field(value, "alertmanager")?.to_owned(),
            clusterwatch: str_field(value, "clusterwatch")?.to_owned(),
            hooks: str_field(value, "hooks")?.to_owned(),
            hook_state_dir: PathBuf::from(str_field(value, "hook_state_dir")?),
            kill_switch_file: PathBuf::from(str_field(value, "kill_switch_file")?),
            scrape_interval: millis("scrape_interval_ms")?,
            group_wait: millis("group_wait_ms")?,
            pg_primary: Member::from_json(&value["pg_primary"])?,
            pg_standby: Member::from_json(&value["pg_standby"])?,
            redis_master: Member::from_json(&value["redis_master"])?,
            redis_replica: Member::from_json(&value["redis_replica"])?,
        })
    }

    /// What `lab up` prints.
    pub fn describe(&self) -> String {
        format!(
            "Prometheus    {prom}  (alerts: {prom}/alerts)\n\
             Alertmanager  {am}\n\
             clusterwatch  {cw}/metrics\n\
             hook receiver {hooks}\n\
             PostgreSQL    primary {pa} 127.0.0.1:{pap}, standby {pb} 127.0.0.1:{pbp} (user postgres)\n\
             Redis         master {ra} 127.0.0.1:{rap}, replica {rb} 127.0.0.1:{rbp}\n\
             hook journal  {journal}\n\
             kill switch   touch {kill}",
            prom = self.prometheus,
            am = self.alertmanager,
            cw = self.clusterwatch,
            hooks = self.hooks,
            pa = self.pg_primary.target,
            pap = self.pg_primary.port,
            pb = self.pg_standby.target,
            pbp = self.pg_standby.port,
            ra = self.redis_master.target,
            rap = self.redis_master.port,
            rb = self.redis_replica.target,
            rbp = self.redis_replica.port,
            journal = self.hook_state_dir.display(),
            kill = self.kill_switch_file.display(),
        )
    }
}

fn str_field<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    value[key]
        .as_str()
        .with_context(|| format!("lab.json has no {key}"))
}

/// Every rule file of the pack, as Prometheus would be given them.
pub fn rule_files() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("could not list {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.rules.yml in {}", dir.display());
    }
    Ok(files)
}

/// The pack's rule files copied into `dir`, the PostgreSQL failover window of
/// `failover.rules.yml` (every `[2m]` and `offset 2m`, as the README prescribes) shortened to
/// `window` (a PromQL duration such as `20s`), so a test sees a failover decision in seconds.
pub fn rules_with_short_window(dir: &Path, window: &str) -> Result<Vec<PathBuf>> {
    use crate::harness::failover_rules::{rules_with_short_windows, ShortWindow};
    rules_with_short_windows(
        dir,
        &[ShortWindow {
            file: "failover.rules.yml",
            from: "2m",
            to: window,
        }],
    )
}

fn hook_state_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("hooks")
}

fn example_hook(name: &str) -> String {
    repo_root()
        .join("alertmanager/hooks")
        .join(name)
        .display()
        .to_string()
}

/// clusterwatch's configuration for the lab: both pairs, and one disruptive hook per pair.
fn clusterwatch_config(
    pg: &PgCluster,
    redis: &RedisPair,
    lab_dir: &Path,
    hooks_port: u16,
) -> Result<Value> {
    let state_dir = hook_state_dir(lab_dir);
    std::fs::create_dir_all(&state_dir)?;
    let pg_promote = example_hook("pg-promote");
    let redis_promote = example_hook("redis-promote");
    // The example hooks run "on the standby's host": here, its port on loopback. They reach
    // PostgreSQL as the superuser over 127.0.0.1 (trusted in the lab's pg_hba).
    let pg_env = json!({
        "PGHOST": "127.0.0.1",
        "PGPORT": pg.standby.port().to_string(),
        "PGUSER": "postgres",
        "OLD_PRIMARY_HOST": "127.0.0.1",
        "OLD_PRIMARY_PORT": pg.primary.port().to_string(),
    });
    let redis_env = json!({
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": redis.replica.port().to_string(),
    });
    let config = json!({
        "global": { "timeout": "2s" },
        "postgres": [
            { "name": PG_PRIMARY, "cluster": PG_CLUSTER, "dsn": pg.primary.monitor_dsn(), "expected_standbys": 1 },
            { "name": PG_STANDBY, "cluster": PG_CLUSTER, "dsn": pg.standby.monitor_dsn(), "expected_standbys": 0 },
        ],
        "redis": [
            { "name": REDIS_MASTER, "cluster": REDIS_CLUSTER, "address": redis.master.url() },
            { "name": REDIS_REPLICA, "cluster": REDIS_CLUSTER, "address": redis.replica.url() },
        ],
        "hooks": {
            "listen": format!("127.0.0.1:{hooks_port}"),
            "bearer_token_file": lab_dir.join("hook.token"),
            "state_dir": state_dir,
            "max_disruptive_per_hour": 4,
            "kill_switch_file": lab_dir.join("hooks.disabled"),
            "rules": [
                {
                    "name": PG_HOOK,
                    // Only when the rules name this node as the one to promote.
                    "match": { "alertname": "PostgresFailoverNeeded", "cluster": PG_CLUSTER, "candidate": PG_STANDBY },
                    "validate": [pg_promote, "--check"],
                    "command": [pg_promote],
                    "env": pg_env,
                    "timeout": "90s",
                    "cooldown": "10m",
                    "disruptive": true,
                },
                {
                    "name": REDIS_HOOK,
                    "match": { "alertname": "RedisFailoverNeeded", "cluster": REDIS_CLUSTER, "candidate": REDIS_REPLICA },
                    "validate": [redis_promote, "--check"],
                    "command": [redis_promote],
                    "env": redis_env,
                    "timeout": "30s",
                    "cooldown": "10m",
                    "disruptive": true,
                },
            ],
        },
    });
    Ok(config)
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (Value::Array(base), Value::Array(extra)) => base.extend(extra),
        (base, extra) => *base = extra,
    }
}

/// Alertmanager configured like `alertmanager/alertmanager.yml` for the hook receivers: the
/// failover route (`action="failover"`, grouped by alert name, cluster and candidate, no
/// resolved notifications) and the refusal route (`*FailoverNoCandidate`), each posting to
/// every URL of `hook_urls` (one receiver per host) with the bearer token in `token_file`;
/// nothing is sent anywhere else.
pub fn alertmanager_config(
    group_wait: Duration,
    hook_urls: &[String],
    token_file: &Path,
) -> String {
    let webhooks: Vec<Value> = hook_urls
        .iter()
        .map(|url| {
            json!({
                "url": url,
                "send_resolved": false,
                "http_config": { "authorization": { "type": "Bearer", "credentials_file": token_file } },
            })
        })
        .collect();
    let config = json!({
        "route": {
            "receiver": "nobody",
            "group_by": ["alertname", "cluster"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": [
                {
                    "receiver": "clusterwatch-hooks",
                    "matchers": ["action=\"failover\""],
                    "group_by": ["alertname", "cluster", "candidate"],
                    "group_wait": format!("{}ms", group_wait.as_millis()),
                    "group_interval": "1m",
                    "repeat_interval": "30m",
                    "continue": true,
                },
                {
                    "receiver": "clusterwatch-refusals",
                    "matchers": ["alertname=~\"PostgresFailoverNoCandidate|RedisFailoverNoCandidate\""],
                    "group_wait": format!("{}ms", group_wait.as_millis()),
                    "group_interval": "1m",
                    "repeat_interval": "30m",
                    "continue": true,
                },
            ],
        },
        "receivers": [
            { "name": "nobody" },
            { "name": "clusterwatch-hooks", "webhook_configs": webhooks },
            { "name": "clusterwatch-refusals", "webhook_configs": webhooks },
        ],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value always serializes")
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("could not create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// A token nobody can guess from outside the lab; the lab is loopback-only, so the OS's
/// randomness through std's hasher seed is enough.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
