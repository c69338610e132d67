//! Redis failover drills on real servers, through a real Prometheus (the shipped rules, windows
//! shortened to 3 s: three scrapes in a row at 1 s) and a real Alertmanager into clusterwatch's
//! hook runner, with the `failed-redis` recipe as the hook:
//!
//! - observer quorum: a master with two replicas, three observers each reaching the master
//!   through its own [`TcpProxy`]. One observer cut warns (`RedisMasterPartialView`) and never
//!   fails over; the master killed promotes the replica with the highest offset, once, and
//!   re-points the other;
//! - Whiskymedia (`examples/whiskymedia/`): three Redis groups whose masters share host A and
//!   replicas host B, two HAProxies in front of every group and the application's HAProxy in
//!   front of both. Host A dies: one promotion per group, each once; with `hooks.storm`'s
//!   `max_groups: 2` the third is refused and `HookStormBreakerTripped` pages. A Redis outage
//!   seen through HAProxy never fires `HaproxyDown`; HAProxy itself dying does, and reaches the
//!   `failed-haproxy` notification.
//!
//! `CW_DRILL_TRIALS` (default 1) repeats the kill trials; each prints its kill → hook-started
//! time against the bound *scrape interval + window + group_wait + 5 s*.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::failover_rules::{
    active_alerts, alerts_ever, rules_with_short_windows, ShortWindow,
};
use clusterwatch_tests::harness::haproxy::redis_backend;
use clusterwatch_tests::harness::webhook::HookLab;
use clusterwatch_tests::harness::{
    free_port, repo_root, temp_dir, wait_until, Alertmanager, Clusterwatch, Haproxy, Prometheus,
    PrometheusConfig, RedisNode, ScrapeJob, TcpProxy,
};
use serde_json::Value;
use tempfile::TempDir;

/// The windows the test gives the rules instead of the shipped 1 minute (Redis failover) and
/// 2 minutes (HaproxyDown): with 1 s scrapes, three failures in a row, the seed's count.
const WINDOW: &str = "3s";
const WINDOW_SECONDS: f64 = 3.0;
const SCRAPE_SECONDS: f64 = 1.0;
/// Alertmanager's `group_wait` on the hook route.
const GROUP_WAIT_SECONDS: f64 = 0.0;
/// Kill → hook started must stay within this.
const BOUND_SECONDS: f64 = SCRAPE_SECONDS + WINDOW_SECONDS + GROUP_WAIT_SECONDS + 5.0;
/// Long enough for anything the drills wait for on a busy two-core machine.
const WAIT: Duration = Duration::from_secs(60);
const RECIPE_TIMEOUT: &str = "30s";

/// How many kill trials each drill runs: `CW_DRILL_TRIALS`, default 1.
fn trials() -> Result<usize> {
    match std::env::var("CW_DRILL_TRIALS") {
        Err(_) => Ok(1),
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("CW_DRILL_TRIALS must be a whole number of trials, 1 or more, not `{text}`"),
        },
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn recipe(name: &str) -> String {
    repo_root()
        .join("alertmanager/hooks")
        .join(name)
        .display()
        .to_string()
}

/// Prints min/median/max of `seconds` under `label`.
fn print_timings(label: &str, seconds: &[f64]) {
    let mut sorted = seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (sorted.first(), sorted.last()) {
        let median = sorted[sorted.len() / 2];
        println!(
            "redis_drills: {label}: {} run(s), kill -> hook started min {min:.1} s, median {median:.1} s, max {max:.1} s (bound {BOUND_SECONDS:.0} s)",
            sorted.len()
        );
    }
}

/// The shipped rules with the Redis failover and HaproxyDown windows shortened to [`WINDOW`].
fn short_rules(dir: &TempDir) -> Result<Vec<std::path::PathBuf>> {
    rules_with_short_windows(
        dir.path(),
        &[
            ShortWindow {
                file: "failover.rules.yml",
                from: "1m",
                to: WINDOW,
            },
            ShortWindow {
                file: "cluster-managers.rules.yml",
                from: "2m",
                to: WINDOW,
            },
        ],
    )
}

/// One `failed-redis` hook rule for group `cluster` (its instances `NAME=ADDR`), acting on
/// `RedisFailoverNeeded`: the alert names the failed master and the candidate.
fn failed_redis_rule(cluster: &str, nodes: &[(&str, String)], sockets: &[&Haproxy]) -> String {
    let nodes: Vec<String> = nodes.iter().map(|(n, a)| format!("{n}={a}")).collect();
    let sockets: Vec<String> = sockets
        .iter()
        .map(|h| h.socket().display().to_string())
        .collect();
    format!(
        "    - name: failed-{cluster}\n      match: {{ alertname: RedisFailoverNeeded, cluster: {cluster} }}\n\
         \x20     validate: [{s}, --check]\n      command: [{s}]\n      disruptive: true\n      timeout: {RECIPE_TIMEOUT}\n\
         \x20     env: {{ REDIS_NODES: \"{}\", HAPROXY_SOCKETS: \"{}\" }}\n",
        nodes.join(" "),
        sockets.join(" "),
        s = recipe("failed-redis"),
    )
}

/// The journal records of `event` for `hook` written at or after `since`.
fn records(lab: &HookLab, event: &str, hook: &str, since: f64) -> Vec<Value> {
    lab.events(event)
        .into_iter()
        .filter(|r| r["hook"] == hook && r["ts"].as_f64().unwrap_or_default() >= since)
        .collect()
}

/// Runs of `hook` started at or after `since` as (start time, finished record); waits until
/// each has finished.
async fn finished_runs(lab: &HookLab, hook: &str, since: f64) -> Result<Vec<(f64, Value)>> {
    let mut runs = Vec::new();
    wait_until(WAIT, &format!("{hook} to run and finish"), async || {
        let started = records(lab, "started", hook, since);
        let finished = records(lab, "finished", hook, since);
        runs = started
            .iter()
            .filter_map(|s| {
                let end = finished.iter().find(|f| f["run"] == s["run"])?;
                Some((s["ts"].as_f64()?, end.clone()))
            })
            .collect();
        if !started.is_empty() && runs.len() == started.len() {
            Ok(true)
        } else {
            bail!("journal: {:?}", lab.journal().last())
        }
    })
    .await?;
    Ok(runs)
}

async fn role(node: &RedisNode) -> Result<String> {
    Ok(node
        .info("replication")
        .await?
        .get("role")
        .cloned()
        .unwrap_or_default())
}

/// Waits until `replica` replicates from `master`, linked.
async fn wait_following(replica: &RedisNode, master: &RedisNode) -> Result<()> {
    wait_until(
        WAIT,
        &format!("{} to follow {}", replica.name(), master.name()),
        async || {
            let info = replica.info("replication").await?;
            let port = master.port().to_string();
            if info.get("master_port") == Some(&port)
                && info.get("master_link_status").map(String::as_str) == Some("up")
            {
                Ok(true)
            } else {
                bail!("{} replication: {info:?}", replica.name())
            }
        },
    )
    .await
}

async fn query_value(prom: &Prometheus, promql: &str) -> Result<f64> {
    prom.query_f64(promql)
        .await?
        .with_context(|| format!("`{promql}` has no value"))
}

/// Alertmanager sending `action="failover"` alerts to the lab's receiver at once.
fn failover_route(lab: &HookLab) -> String {
    format!(
        "route:\n  receiver: nobody\n  group_by: [alertname, cluster]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         \x20 routes:\n    - receiver: hooks\n      matchers: ['action=\"failover\"']\n\
         receivers:\n  - name: nobody\n  - name: hooks\n    webhook_configs:\n      - url: {url}\n        send_resolved: false\n\
         \x20       http_config: {{ authorization: {{ type: Bearer, credentials_file: {dir}/token }} }}\n",
        url = lab.url(),
        dir = lab.dir().display(),
    )
}

// ---- observer quorum ----------------------------------------------------------------------

const QUORUM_GROUP: &str = "redis-q";

/// One quorum trial on fresh servers; returns kill → hook started in seconds.
async fn quorum_trial(trial: usize) -> Result<f64> {
    let mut master = RedisNode::standalone("redis-a", None).await?;
    let ahead = RedisNode::replica_of("redis-b", &master).await?;
    // redis-c replicates through a path the test cuts, so it falls behind on purpose.
    let behind = RedisNode::standalone("redis-c", None).await?;
    let master_addr = master.addr().parse()?;
    let behind_link = TcpProxy::start(master_addr).await?;
    behind
        .cli(&["REPLICAOF", "127.0.0.1", &behind_link.port().to_string()])
        .await?;
    ahead.wait_link_up(WAIT).await?;
    behind.wait_link_up(WAIT).await?;
    let haproxy = Haproxy::start(&redis_backend(
        QUORUM_GROUP,
        free_port()?,
        &[&master, &ahead, &behind],
    ))
    .await?;

    // Three observers, each reaching the master through its own path; the first also runs
    // the hooks.
    let lab = HookLab::new()?;
    let nodes = [
        ("redis-a", master.addr()),
        ("redis-b", ahead.addr()),
        ("redis-c", behind.addr()),
    ];
    let mut paths = Vec::new();
    let mut observers = Vec::new();
    for index in 0..3 {
        let path = TcpProxy::start(master_addr).await?;
        let mut config = format!(
            "global:\n  timeout: 2s\nredis:\n  - {{ name: redis-a, cluster: {QUORUM_GROUP}, address: 'redis://127.0.0.1:{}' }}\n\
             \x20 - {{ name: redis-b, cluster: {QUORUM_GROUP}, address: 'redis://{}' }}\n\
             \x20 - {{ name: redis-c, cluster: {QUORUM_GROUP}, address: 'redis://{}' }}\n",
            path.port(),
            ahead.addr(),
            behind.addr(),
        );
        if index == 0 {
            config.push_str(&lab.config(
                "  max_disruptive_per_hour: 5\n",
                &failed_redis_rule(QUORUM_GROUP, &nodes, &[&haproxy]),
            ));
        }
        observers.push(Clusterwatch::start(Some(&config), &[]).await?);
        paths.push(path);
    }
    let alertmanager = Alertmanager::start(Some(&failover_route(&lab))).await?;
    let rules_dir = temp_dir("cw-redis-drill-rules-")?;
    let addrs: Vec<String> = observers.iter().map(|o| o.addr()).collect();
    let targets: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let prom = Prometheus::start(&PrometheusConfig {
        jobs: vec![ScrapeJob::new("clusterwatch", &targets)],
        rule_files: short_rules(&rules_dir)?,
        alertmanagers: vec![alertmanager.addr()],
        ..PrometheusConfig::default()
    })
    .await?;

    wait_until(WAIT, "three healthy observers seeing the master", async || {
        let seeing = query_value(
            &prom,
            &format!("cluster:clusterwatch_redis_observers_seeing_master:count{{cluster='{QUORUM_GROUP}'}}"),
        )
        .await?;
        let quorum = query_value(
            &prom,
            &format!("cluster:clusterwatch_redis_failover_quorum:value{{cluster='{QUORUM_GROUP}'}}"),
        )
        .await?;
        Ok(seeing == 3.0 && quorum == 2.0)
    })
    .await?;

    // One observer loses the master: a partial view, never a failover.
    paths[0].cut();
    wait_until(WAIT, "RedisMasterPartialView to fire", async || {
        let firing = active_alerts(&prom, "RedisMasterPartialView", "firing").await?;
        Ok(firing
            .iter()
            .any(|labels| labels["cluster"] == QUORUM_GROUP))
    })
    .await?;

    // redis-c's link is cut, then the master takes writes: redis-b is ahead and the candidate.
    behind_link.cut();
    for key in 0..200 {
        master
            .cli(&["SET", &format!("after-c-was-cut-{key}"), "x"])
            .await?;
    }
    wait_until(WAIT, "redis-b to be ahead and the candidate", async || {
        let lead = query_value(
            &prom,
            "cluster_target:clusterwatch_redis_replica_offset:bytes{target='redis-b'} - ignoring (target) cluster_target:clusterwatch_redis_replica_offset:bytes{target='redis-c'}",
        )
        .await?;
        let candidate = prom
            .query(&format!(
                "cluster_target:clusterwatch_redis_failover_candidate:bytes{{cluster='{QUORUM_GROUP}'}}"
            ))
            .await?;
        Ok(lead > 0.0 && candidate["result"][0]["metric"]["target"] == "redis-b")
    })
    .await?;
    let early = alerts_ever(&prom, "RedisFailoverNeeded|RedisFailoverNoCandidate", "10m").await?;
    ensure!(
        early.is_empty(),
        "a failover decision before the master failed: {early:?}"
    );
    ensure!(
        lab.events("started").is_empty(),
        "a hook ran before the master failed"
    );

    let killed_at = now();
    master.kill9()?;
    let runs = finished_runs(&lab, &format!("failed-{QUORUM_GROUP}"), killed_at).await?;
    let [(started, end)] = runs.as_slice() else {
        bail!("one master lost, {} runs: {runs:?}", runs.len());
    };
    ensure!(end["result"] == "ok", "failed-redis did not succeed: {end}");
    let delay = started - killed_at;
    println!("redis_drills: quorum trial {trial}: kill -> hook started {delay:.1} s");
    ensure!(
        delay <= BOUND_SECONDS,
        "kill -> hook started took {delay:.1} s, more than {BOUND_SECONDS} s"
    );

    // The decision named the right nodes, and the recipe did what it named.
    let decided = alerts_ever(&prom, "RedisFailoverNeeded", "10m").await?;
    ensure!(
        !decided.is_empty()
            && decided
                .iter()
                .all(|l| l["failed"] == "redis-a" && l["candidate"] == "redis-b"),
        "the failover alert named other nodes: {decided:?}"
    );
    ensure!(role(&ahead).await? == "master", "redis-b was not promoted");
    wait_following(&behind, &ahead).await?;
    ensure!(haproxy.server_status(QUORUM_GROUP, "redis-a").await? == "MAINT");
    // Alertmanager re-sends while the alert fires; the incident still runs once.
    wait_until(WAIT, "the failover alert to resolve", async || {
        Ok(active_alerts(&prom, "RedisFailoverNeeded", "firing")
            .await?
            .is_empty())
    })
    .await?;
    let all_runs = lab.events("started");
    ensure!(all_runs.len() == 1, "double run: {all_runs:?}");
    Ok(delay)
}

/// Observer quorum on real Redis: one observer cut warns and never fails over; the master
/// killed promotes the replica with the highest offset once and re-points the other.
#[tokio::test(flavor = "multi_thread")]
async fn redis_quorum_partial_view_warns_and_a_killed_master_promotes_the_replica_ahead_once(
) -> Result<()> {
    let mut delays = Vec::new();
    for trial in 1..=trials()? {
        delays.push(quorum_trial(trial).await?);
    }
    print_timings("quorum", &delays);
    Ok(())
}

// ---- Whiskymedia --------------------------------------------------------------------------

const GROUPS: [&str; 3] = ["redis-9001", "redis-9002", "redis-9003"];
const HAPROXIES: [&str; 2] = ["haproxy1", "haproxy2"];

/// The seed's stack on loopback: `hosts[h][g]` is instance `redis{h+1}-900{g+1}` (group `g` on
/// host `h`), two HAProxies fronting every group, the application's HAProxy in front of them,
/// clusterwatch as the monitoring host (observer and hook runner), Prometheus and Alertmanager
/// with the example's routing.
struct Whiskymedia {
    hosts: [Vec<RedisNode>; 2],
    haproxies: Vec<Haproxy>,
    /// The application HAProxy's port for each group (the seed's app:7001, …).
    app_ports: Vec<u16>,
    _app: Haproxy,
    lab: HookLab,
    _monitor: Clusterwatch,
    prom: Prometheus,
    _alertmanager: Alertmanager,
    _rules_dir: TempDir,
}

/// The example's Alertmanager file pointed at the lab's receiver. Its `group_interval` on the
/// hook route becomes 1 s, like the windows: a later trial's alert of the same group would
/// otherwise wait for the group's next interval.
fn example_routing(lab: &HookLab) -> Result<String> {
    let path = repo_root().join("examples/whiskymedia/alertmanager.yml");
    let text = std::fs::read_to_string(&path)?;
    let replaced = [
        ("http://127.0.0.1:9470/hooks/alertmanager", lab.url()),
        (
            "/etc/alertmanager/clusterwatch-hook.token",
            lab.dir().join("token").display().to_string(),
        ),
        ("group_interval: 1m", "group_interval: 1s".to_owned()),
    ];
    let mut routing = text.clone();
    for (from, to) in replaced {
        ensure!(
            routing.contains(from),
            "{} no longer has `{from}`",
            path.display()
        );
        routing = routing.replace(from, &to);
    }
    Ok(routing)
}

fn instance(host: usize, group: usize) -> String {
    format!("redis{}-900{}", host + 1, group + 1)
}

impl Whiskymedia {
    /// Starts the stack with `hooks.storm` set to `storm`.
    async fn start(storm: &str) -> Result<Whiskymedia> {
        let mut host_a = Vec::new();
        let mut host_b = Vec::new();
        for group in 0..GROUPS.len() {
            let master = RedisNode::standalone(&instance(0, group), None).await?;
            host_b.push(RedisNode::replica_of(&instance(1, group), &master).await?);
            host_a.push(master);
        }
        for replica in &host_b {
            replica.wait_link_up(WAIT).await?;
        }
        let mut haproxies = Vec::new();
        let mut fronts = Vec::new();
        for _ in HAPROXIES {
            let mut proxies = String::new();
            let mut ports = Vec::new();
            for (group, cluster) in GROUPS.iter().enumerate() {
                let port = free_port()?;
                proxies.push_str(&redis_backend(
                    cluster,
                    port,
                    &[&host_a[group], &host_b[group]],
                ));
                proxies.push('\n');
                ports.push(port);
            }
            haproxies.push(Haproxy::start(&proxies).await?);
            fronts.push(ports);
        }
        // The application's HAProxy: haproxy1, and haproxy2 as its backup.
        let mut app_proxies = String::new();
        let mut app_ports = Vec::new();
        for (group, cluster) in GROUPS.iter().enumerate() {
            let port = free_port()?;
            app_proxies.push_str(&format!(
                "frontend app-{cluster}\n  bind 127.0.0.1:{port}\n  default_backend app-{cluster}\n\n\
                 backend app-{cluster}\n  server haproxy1 127.0.0.1:{} check inter 500ms\n\
                 \x20 server haproxy2 127.0.0.1:{} check inter 500ms backup\n\n",
                fronts[0][group], fronts[1][group],
            ));
            app_ports.push(port);
        }
        let app = Haproxy::start(&app_proxies).await?;

        let lab = HookLab::new()?;
        let mut config = String::from("global:\n  timeout: 2s\nredis:\n");
        for (host, nodes) in [&host_a, &host_b].into_iter().enumerate() {
            for (group, node) in nodes.iter().enumerate() {
                config.push_str(&format!(
                    "  - {{ name: {}, cluster: {}, address: 'redis://{}' }}\n",
                    instance(host, group),
                    GROUPS[group],
                    node.addr()
                ));
            }
        }
        config.push_str("haproxy:\n");
        for (name, haproxy) in HAPROXIES.iter().zip(&haproxies) {
            config.push_str(&format!(
                "  - {{ name: {name}, url: '{}' }}\n",
                haproxy.stats_url()
            ));
        }
        let mut rules = String::new();
        let socket_refs: Vec<&Haproxy> = haproxies.iter().collect();
        for (group, cluster) in GROUPS.iter().enumerate() {
            let nodes = [
                (instance(0, group), host_a[group].addr()),
                (instance(1, group), host_b[group].addr()),
            ];
            let nodes: Vec<(&str, String)> =
                nodes.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
            rules.push_str(&failed_redis_rule(cluster, &nodes, &socket_refs));
        }
        let peers: Vec<String> = HAPROXIES
            .iter()
            .zip(&haproxies)
            .map(|(name, h)| format!("{name}={}", h.socket().display()))
            .collect();
        rules.push_str(&format!(
            "    - name: failed-haproxy\n      match: {{ alertname: HaproxyDown }}\n      command: [{}]\n\
             \x20     timeout: 30s\n      env: {{ PEER_SOCKETS: \"{}\" }}\n",
            recipe("failed-haproxy"),
            peers.join(" ")
        ));
        // The budget is per group and hour; every trial fails each group over once more.
        let settings = format!("  max_disruptive_per_hour: 100\n  storm: {storm}\n");
        config.push_str(&lab.config(&settings, &rules));
        let monitor = Clusterwatch::start(Some(&config), &[]).await?;
        let alertmanager = Alertmanager::start(Some(&example_routing(&lab)?)).await?;
        let rules_dir = temp_dir("cw-whiskymedia-rules-")?;
        let prom = Prometheus::start(&PrometheusConfig {
            jobs: vec![ScrapeJob::new("clusterwatch", &[&monitor.addr()])],
            rule_files: short_rules(&rules_dir)?,
            alertmanagers: vec![alertmanager.addr()],
            ..PrometheusConfig::default()
        })
        .await?;
        let stack = Whiskymedia {
            hosts: [host_a, host_b],
            haproxies,
            app_ports,
            _app: app,
            lab,
            _monitor: monitor,
            prom,
            _alertmanager: alertmanager,
            _rules_dir: rules_dir,
        };
        stack.wait_serving(0).await?;
        Ok(stack)
    }

    /// Waits until every group's master is on `host`, seen by the healthy observer, and
    /// writes through the application's HAProxy reach it.
    async fn wait_serving(&self, host: usize) -> Result<()> {
        for (group, cluster) in GROUPS.iter().enumerate() {
            wait_until(WAIT, &format!("{cluster} to be served"), async || {
                let seeing = query_value(
                    &self.prom,
                    &format!("cluster:clusterwatch_redis_observers_seeing_master:count{{cluster='{cluster}'}}"),
                )
                .await?;
                let master = &self.hosts[host][group];
                let stored = RedisNode::cli_at(self.app_ports[group], &["SET", "drill", master.name()]).await?;
                let landed = master.cli(&["GET", "drill"]).await?;
                if seeing == 1.0 && stored == "OK" && landed == master.name() {
                    Ok(true)
                } else {
                    bail!("seeing {seeing}, SET through the app answered `{stored}`, master holds `{landed}`")
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Kills every Redis of `host` (SIGKILL) and returns the kill time.
    fn kill_host(&mut self, host: usize) -> Result<f64> {
        let killed_at = now();
        for node in &mut self.hosts[host] {
            node.kill9()?;
        }
        Ok(killed_at)
    }

    /// Brings `host`'s instances back as replicas of the other host's and back into both
    /// HAProxies, and waits until no failover alert is active.
    async fn rejoin(&mut self, host: usize) -> Result<()> {
        let [a, b] = &mut self.hosts;
        let (returning, masters) = if host == 0 { (a, &*b) } else { (b, &*a) };
        for (node, master) in returning.iter_mut().zip(masters) {
            node.start().await?;
            node.cli(&["REPLICAOF", "127.0.0.1", &master.port().to_string()])
                .await?;
            wait_following(node, master).await?;
        }
        for (group, cluster) in GROUPS.iter().enumerate() {
            for haproxy in &self.haproxies {
                let answer = haproxy
                    .runtime(&format!(
                        "set server {cluster}/{} state ready",
                        instance(host, group)
                    ))
                    .await?;
                ensure!(answer.trim().is_empty(), "HAProxy answered `{answer}`");
            }
        }
        wait_until(WAIT, "the failover alerts to resolve", async || {
            Ok(active_alerts(&self.prom, "RedisFailoverNeeded", "firing")
                .await?
                .is_empty())
        })
        .await
    }
}

/// Whiskymedia: host A's three masters killed at once → one promotion per group through
/// `failed-redis`, each once and within the bound, the dead instances in MAINT on both
/// HAProxies, writes through the application's HAProxy again. Trials alternate the hosts.
/// Then: no `HaproxyDown` ever fired through those Redis outages; haproxy2 stopped fires it
/// (critical) and the `failed-haproxy` notification runs.
#[tokio::test(flavor = "multi_thread")]
async fn whiskymedia_host_loss_promotes_each_group_once_and_haproxy_down_is_its_own_alert(
) -> Result<()> {
    // The example's breaker: as many groups at once as one host carries.
    let mut stack = Whiskymedia::start("{ max_groups: 3, window: 10m }").await?;
    let mut delays = Vec::new();
    let mut host = 0;
    for trial in 1..=trials()? {
        let killed_at = stack.kill_host(host)?;
        let survivor = 1 - host;
        for (group, cluster) in GROUPS.iter().enumerate() {
            let runs = finished_runs(&stack.lab, &format!("failed-{cluster}"), killed_at).await?;
            let [(started, end)] = runs.as_slice() else {
                bail!("{cluster} lost its master, {} runs: {runs:?}", runs.len());
            };
            ensure!(end["result"] == "ok", "failed-redis for {cluster}: {end}");
            let delay = started - killed_at;
            println!("redis_drills: whiskymedia trial {trial}: {cluster} kill -> hook started {delay:.1} s");
            ensure!(
                delay <= BOUND_SECONDS,
                "{cluster}: kill -> hook started took {delay:.1} s, more than {BOUND_SECONDS} s"
            );
            delays.push(delay);
            ensure!(
                role(&stack.hosts[survivor][group]).await? == "master",
                "{} was not promoted",
                instance(survivor, group)
            );
            for haproxy in &stack.haproxies {
                let status = haproxy
                    .server_status(cluster, &instance(host, group))
                    .await?;
                ensure!(status == "MAINT", "{} is {status}", instance(host, group));
            }
        }
        stack.wait_serving(survivor).await?;
        stack.rejoin(host).await?;
        host = survivor;
    }
    // Every incident ran once: Alertmanager's re-sends and resolutions ran nothing more.
    let mut per_hook: BTreeMap<String, usize> = BTreeMap::new();
    for started in stack.lab.events("started") {
        *per_hook
            .entry(started["hook"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let trials = trials()?;
    ensure!(
        GROUPS
            .iter()
            .all(|c| per_hook.get(&format!("failed-{c}")) == Some(&trials))
            && per_hook.len() == GROUPS.len(),
        "runs per hook after {trials} trial(s): {per_hook:?}"
    );
    print_timings("whiskymedia", &delays);

    // Redis servers DOWN in both HAProxies (every trial) never made HAProxy itself down.
    let haproxy_down = alerts_ever(&stack.prom, "HaproxyDown", "30m").await?;
    ensure!(
        haproxy_down.is_empty(),
        "a Redis outage fired HaproxyDown: {haproxy_down:?}"
    );

    // haproxy2 itself stops: its own critical alert, and the notification recipe.
    let stopped_at = now();
    drop(stack.haproxies.pop());
    wait_until(WAIT, "HaproxyDown for haproxy2", async || {
        let firing = active_alerts(&stack.prom, "HaproxyDown", "firing").await?;
        match firing.as_slice() {
            [] => Ok(false),
            [labels] if labels["target"] == "haproxy2" && labels["severity"] == "critical" => {
                Ok(true)
            }
            other => bail!("HaproxyDown for the wrong HAProxy: {other:?}"),
        }
    })
    .await?;
    let runs = finished_runs(&stack.lab, "failed-haproxy", stopped_at).await?;
    let [(started, end)] = runs.as_slice() else {
        bail!(
            "haproxy2 down, {} failed-haproxy runs: {runs:?}",
            runs.len()
        );
    };
    println!(
        "redis_drills: haproxy2 stopped -> failed-haproxy started {:.1} s",
        started - stopped_at
    );
    ensure!(end["result"] == "ok", "failed-haproxy: {end}");
    let journal = serde_json::to_string(end)?;
    ensure!(
        journal.contains("HAProxy haproxy2 has failed"),
        "the notification does not name haproxy2: {journal}"
    );
    // The application still reaches every group through haproxy1.
    stack.wait_serving(host).await?;
    Ok(())
}

/// Whiskymedia with `hooks.storm.max_groups: 2`: host A's three masters killed → two groups
/// fail over, the third is refused as `storm_breaker`, and `HookStormBreakerTripped` fires as
/// critical in Prometheus.
#[tokio::test(flavor = "multi_thread")]
async fn whiskymedia_host_loss_with_a_storm_limit_of_two_groups_refuses_the_third_and_pages(
) -> Result<()> {
    let mut stack = Whiskymedia::start("{ max_groups: 2, window: 10m }").await?;
    let killed_at = stack.kill_host(0)?;
    let lab = &stack.lab;
    wait_until(WAIT, "two runs and one storm_breaker skip", async || {
        let finished = lab.events("finished").len();
        let refused = lab.events("storm_breaker").len();
        if finished == 2 && refused >= 1 {
            Ok(true)
        } else {
            bail!(
                "{finished} finished, {refused} refused: {:?}",
                lab.journal().last()
            )
        }
    })
    .await?;
    let started: Vec<String> = lab
        .events("started")
        .iter()
        .map(|r| r["hook"].as_str().unwrap_or_default().to_owned())
        .collect();
    let refused: Vec<String> = lab
        .events("storm_breaker")
        .iter()
        .map(|r| r["hook"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        started.len() == 2 && refused.iter().all(|hook| !started.contains(hook)),
        "started {started:?}, refused {refused:?}"
    );
    // The refused group keeps its dead master and its replica: nothing was changed there,
    // and its failover decision still stands for a person to act on.
    let deciding = active_alerts(&stack.prom, "RedisFailoverNeeded", "firing").await?;
    for (group, cluster) in GROUPS.iter().enumerate() {
        if refused.contains(&format!("failed-{cluster}")) {
            ensure!(
                role(&stack.hosts[1][group]).await? == "slave",
                "{cluster} was refused, yet its replica was promoted"
            );
            ensure!(
                deciding.iter().any(|labels| labels["cluster"] == *cluster),
                "{cluster} was refused, yet RedisFailoverNeeded no longer fires: {deciding:?}"
            );
        }
    }
    for run in lab.events("started") {
        let delay = run["ts"].as_f64().unwrap_or_default() - killed_at;
        ensure!(delay <= BOUND_SECONDS, "{run}: {delay:.1} s after the kill");
    }
    wait_until(WAIT, "HookStormBreakerTripped firing as critical", async || {
        let firing = query_value(
            &stack.prom,
            r#"count(ALERTS{alertname="HookStormBreakerTripped", alertstate="firing", severity="critical"})"#,
        )
        .await
        .unwrap_or_default();
        Ok(firing >= 1.0)
    })
    .await?;
    Ok(())
}
