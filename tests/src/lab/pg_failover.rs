//! The PostgreSQL failover stack of the drills: a primary and two streaming standbys, one
//! clusterwatch per node (an observer and that host's hook receiver, running the example
//! `pg-fence` → `pg-promote` → `pg-repoint` steps only when its node is the candidate),
//! Prometheus with the shipped rules and Alertmanager routed like the example.
//!
//! Every path a drill may cut is a [`TcpProxy`]: each observer reaches the primary through one
//! of its own, and each standby replicates through one. The stack starts healthy and acts on
//! nothing by itself; the drills (`tests/tests/e2e/failover_drills.rs`) break it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::{alertmanager_config, example_hook, rules_with_short_window};
use crate::harness::webhook::HookLab;
use crate::harness::{
    temp_dir, wait_until, Alertmanager, Clusterwatch, PgNode, Prometheus, PrometheusConfig,
    ScrapeJob, TcpProxy,
};

/// The `cluster` label of the three nodes.
pub const CLUSTER: &str = "drill-pg";
/// Target names, which are also the hosts' names: the primary, then the two standbys.
pub const NODES: [&str; 3] = ["pg-a", "pg-b", "pg-c"];
/// The standbys' `application_name`s (and replication slots), by index of [`NODES`].
const APPLICATION_NAMES: [&str; 3] = ["", "standby_b", "standby_c"];
/// The disruptive hook every host has: fence → promote → repoint, on the candidate's host.
pub const FAILOVER_HOOK: &str = "pg-failover";
/// The non-disruptive hook every host has for `PostgresFailoverNoCandidate`.
pub const REFUSAL_HOOK: &str = "pg-failover-refused";
/// The PostgreSQL failover window the stack gives the rules instead of the shipped 2 minutes,
/// as `failover_quorum` does: 20 scrapes at [`SCRAPE_INTERVAL`].
pub const WINDOW: Duration = Duration::from_secs(20);
/// Prometheus scrapes every observer, and evaluates the rules, this often.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// Alertmanager's `group_wait` on the failover route, as in the example.
pub const GROUP_WAIT: Duration = Duration::ZERO;
/// Long enough for a window, an evaluation and the slowest scrape on a busy machine.
pub const WAIT: Duration = Duration::from_secs(90);

/// One host: its node's clusterwatch, observing all three nodes and receiving the webhook.
pub struct Host {
    /// The node this host carries, also the `only_if_candidate` of its failover hook.
    pub name: &'static str,
    /// clusterwatch: observer and hook receiver.
    pub clusterwatch: Clusterwatch,
    /// Its token, port and hook state directory.
    pub hooks: HookLab,
}

/// The running stack; dropping it stops everything.
pub struct PgFailoverStack {
    // Declaration order is drop order: the watchers stop before what they watch.
    /// Prometheus with the pack, the PostgreSQL window shortened to [`WINDOW`].
    pub prometheus: Prometheus,
    /// Alertmanager posting failover decisions and refusals to every host.
    pub alertmanager: Alertmanager,
    /// One per node, in the order of [`NODES`].
    pub hosts: Vec<Host>,
    /// Each observer's path to the primary, by host.
    pub observer_paths: Vec<TcpProxy>,
    /// Each standby's replication path to the primary: `[pg-b, pg-c]`.
    pub replication: Vec<TcpProxy>,
    /// The servers, in the order of [`NODES`]; `nodes[0]` starts as primary.
    pub nodes: Vec<PgNode>,
    _rules: TempDir,
}

impl PgFailoverStack {
    /// Starts everything and returns once every observer sees the primary and both standbys
    /// stream through their proxies.
    pub async fn up() -> Result<PgFailoverStack> {
        let primary = PgNode::start_primary(NODES[0]).await?;
        // One base backup at a time: a second one's checkpoint can recycle the WAL segment the
        // first is still streaming before its slot holds it.
        let standby_b = PgNode::start_standby(NODES[1], &primary, APPLICATION_NAMES[1]).await?;
        let standby_c = PgNode::start_standby(NODES[2], &primary, APPLICATION_NAMES[2]).await?;
        let primary_addr = format!("127.0.0.1:{}", primary.port()).parse()?;
        let replication = vec![
            TcpProxy::start(primary_addr).await?,
            TcpProxy::start(primary_addr).await?,
        ];
        tokio::try_join!(
            standby_b.stream_through(APPLICATION_NAMES[1], replication[0].port()),
            standby_c.stream_through(APPLICATION_NAMES[2], replication[1].port()),
        )?;
        let nodes = vec![primary, standby_b, standby_c];

        let pg_nodes = NODES
            .iter()
            .zip(&nodes)
            .map(|(name, node)| format!("{name}=127.0.0.1:{}", node.port()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut hosts = Vec::new();
        let mut observer_paths = Vec::new();
        for name in NODES {
            let path = TcpProxy::start(primary_addr).await?;
            let hooks = HookLab::new()?;
            let config = host_config(name, &nodes, path.port(), &hooks, &pg_nodes)?;
            let clusterwatch = Clusterwatch::start(Some(&config), &["--log.level", "info"])
                .await
                .with_context(|| format!("starting the clusterwatch of host {name}"))?;
            hosts.push(Host {
                name,
                clusterwatch,
                hooks,
            });
            observer_paths.push(path);
        }

        let hook_urls: Vec<String> = hosts.iter().map(|host| host.hooks.url()).collect();
        let alertmanager = Alertmanager::start(Some(&alertmanager_config(
            GROUP_WAIT,
            &hook_urls,
            &hosts[0].hooks.dir().join("token"),
        )))
        .await?;
        let rules = temp_dir("cw-drill-rules-")?;
        let addrs: Vec<String> = hosts.iter().map(|host| host.clusterwatch.addr()).collect();
        let targets: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let prometheus = Prometheus::start(&PrometheusConfig {
            jobs: vec![ScrapeJob {
                scrape_interval: SCRAPE_INTERVAL,
                scrape_timeout: SCRAPE_INTERVAL,
                ..ScrapeJob::new("clusterwatch", &targets)
            }],
            rule_files: rules_with_short_window(rules.path(), &format!("{}s", WINDOW.as_secs()))?,
            alertmanagers: vec![alertmanager.addr()],
            evaluation_interval: SCRAPE_INTERVAL,
        })
        .await?;
        let stack = PgFailoverStack {
            prometheus,
            alertmanager,
            hosts,
            observer_paths,
            replication,
            nodes,
            _rules: rules,
        };
        stack
            .prometheus
            .wait_for_target_up("clusterwatch", WAIT)
            .await?;
        let seeing = format!(
            "cluster:clusterwatch_pg_observers_seeing_primary:count{{cluster='{CLUSTER}'}}"
        );
        wait_until(
            WAIT,
            "three healthy observers seeing the primary",
            async || Ok(stack.prometheus.query_f64(&seeing).await? == Some(3.0)),
        )
        .await?;
        Ok(stack)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &PgNode {
        let index = NODES
            .iter()
            .position(|node| *node == name)
            .expect("a node of NODES");
        &self.nodes[index]
    }

    /// `pg_is_in_recovery()` of every node, in the order of [`NODES`]; `None` where the node
    /// does not answer.
    pub async fn in_recovery(&self) -> Vec<Option<bool>> {
        let mut states = Vec::new();
        for node in &self.nodes {
            states.push(match node.psql("SELECT pg_is_in_recovery()").await {
                Ok(answer) => Some(answer == "t"),
                Err(_) => None,
            });
        }
        states
    }

    /// Every host's journal records whose `event` is `event` and whose `hook` is `hook`, as
    /// (host, record).
    pub fn journaled(&self, event: &str, hook: &str) -> Vec<(&'static str, Value)> {
        self.hosts
            .iter()
            .flat_map(|host| {
                host.hooks
                    .events(event)
                    .into_iter()
                    .filter(|record| record["hook"] == hook)
                    .map(|record| (host.name, record))
            })
            .collect()
    }

    /// The active alerts of the cluster named `alertname` in `state`, as label maps.
    pub async fn alerts(&self, alertname: &str, state: &str) -> Result<Vec<Value>> {
        let all = crate::harness::failover_rules::active_alerts(&self.prometheus, alertname, state);
        Ok(all
            .await?
            .into_iter()
            .filter(|labels| labels["cluster"] == CLUSTER)
            .collect())
    }

    /// Cuts the replication path of `standby` (pg-b or pg-c), makes the primary write
    /// `rows` rows of about 200 bytes, and waits until Prometheus sees the standby behind by
    /// more than `min_lag_bytes`.
    pub async fn leave_behind(&self, standby: &str, rows: u32, min_lag_bytes: f64) -> Result<()> {
        let index = NODES
            .iter()
            .position(|node| *node == standby)
            .filter(|&index| index > 0)
            .with_context(|| format!("{standby} is not a standby of the stack"))?;
        self.replication[index - 1].cut();
        self.nodes[0]
            .psql(&format!(
                "CREATE TABLE written_while_{table}_was_cut AS \
                 SELECT g AS id, repeat('x', 200) AS padding FROM generate_series(1, {rows}) g",
                table = standby.replace('-', "_")
            ))
            .await?;
        let lag = format!(
            "cluster_target:clusterwatch_pg_standby_lag:bytes{{cluster='{CLUSTER}', target='{standby}'}}"
        );
        wait_until(
            WAIT,
            &format!("{standby} to be seen behind"),
            async || match self.prometheus.query_f64(&lag).await? {
                Some(bytes) if bytes > min_lag_bytes => Ok(true),
                other => bail!("{standby} lag {other:?}, waiting for more than {min_lag_bytes}"),
            },
        )
        .await
    }
}

/// One host's clusterwatch configuration: all three nodes (the primary through `path_port`)
/// and the two hooks, the failover one acting only when `name` is the candidate.
fn host_config(
    name: &str,
    nodes: &[PgNode],
    path_port: u16,
    hooks: &HookLab,
    pg_nodes: &str,
) -> Result<String> {
    let postgres: Vec<Value> = NODES
        .iter()
        .zip(nodes)
        .enumerate()
        .map(|(index, (target, node))| {
            let dsn = if index == 0 {
                node.monitor_dsn_via(path_port)
            } else {
                node.monitor_dsn()
            };
            json!({ "name": target, "cluster": CLUSTER, "dsn": dsn })
        })
        .collect();
    let failover = json!({
        "name": FAILOVER_HOOK,
        "match": { "alertname": "PostgresFailoverNeeded", "cluster": CLUSTER },
        "only_if_candidate": name,
        "disruptive": true,
        "timeout": "90s",
        "cooldown": "10m",
        "validate": [example_hook("pg-fence"), "--check"],
        "steps": [
            { "name": "fence", "command": [example_hook("pg-fence")], "timeout": "20s" },
            { "name": "promote", "command": [example_hook("pg-promote")] },
            { "name": "repoint", "command": [example_hook("pg-repoint")] },
        ],
        // The hosts are loopback ports: the superuser over 127.0.0.1 is trusted. A killed
        // primary does not answer, and its host (a process here) is known to be down with
        // it, which is what FENCE_UNREACHABLE_OK declares.
        "env": {
            "PG_NODES": pg_nodes,
            "PGUSER": "postgres",
            "FENCE_UNREACHABLE_OK": "1",
            "PGCONNECT_TIMEOUT": "3",
            "REPOINT_TIMEOUT": "60",
        },
    });
    let refusal = json!({
        "name": REFUSAL_HOOK,
        "match": { "alertname": "PostgresFailoverNoCandidate", "cluster": CLUSTER },
        "command": [example_hook("failover-refused")],
        "timeout": "10s",
    });
    let rules = [failover, refusal]
        .iter()
        .map(|rule| format!("    - {rule}\n"))
        .collect::<String>();
    // JSON is YAML: the sections above are flow mappings.
    Ok(format!(
        "global: {{ timeout: 2s }}\npostgres: {}\n{}",
        serde_json::to_string(&postgres)?,
        hooks.config("  max_disruptive_per_hour: 2\n", &rules)
    ))
}

/// A duration as Prometheus reads it in a range selector (`95s`), rounded up.
pub fn promql_range(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64().ceil() as u64)
}
