//! The failover decision on real servers: a PostgreSQL primary with two streaming standbys,
//! three clusterwatch observers each reaching the primary through a path of its own, and a real
//! Prometheus with the shipped rules. One observer cut off from the primary raises the
//! partial-view warning and never the failover alert; the primary cut off from everyone (while
//! it keeps running) makes the failover alert fire, naming the most advanced standby.
//!
//! Every path to the primary is a [`TcpProxy`]: one per observer, and one per standby for its
//! replication connection. The failover rules run with their windows shortened from 2 minutes
//! to 20 seconds, the tuning the README describes, so the test takes about a minute and a half.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::failover_rules::{active_alerts as active, alerts_ever};
use clusterwatch_tests::harness::{
    temp_dir, wait_until, Clusterwatch, PgNode, Prometheus, PrometheusConfig, ScrapeJob, TcpProxy,
};
use clusterwatch_tests::lab::rules_with_short_window;

const CLUSTER: &str = "qdb";
const PRIMARY: &str = "pg-a";
const STANDBY_B: &str = "pg-b";
const STANDBY_C: &str = "pg-c";
/// The window the test gives the failover rules instead of the shipped 2 minutes.
const WINDOW: &str = "20s";
/// Long enough for a window, an evaluation and the slowest scrape on a busy machine.
const WAIT: Duration = Duration::from_secs(90);

async fn query_value(prom: &Prometheus, promql: &str) -> Result<f64> {
    prom.query_f64(promql)
        .await?
        .with_context(|| format!("`{promql}` has no value"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_observer_cut_warns_and_the_primary_cut_from_everyone_names_the_best_standby(
) -> Result<()> {
    // A primary and two standbys, each standby replicating through its own proxy.
    let primary = PgNode::start_primary(PRIMARY).await?;
    // One base backup at a time: a second one's checkpoint can recycle the WAL segment the
    // first is still streaming before its slot holds it ("requested WAL segment ... has
    // already been removed").
    let standby_b = PgNode::start_standby(STANDBY_B, &primary, "standby_b").await?;
    let standby_c = PgNode::start_standby(STANDBY_C, &primary, "standby_c").await?;
    let primary_addr = format!("127.0.0.1:{}", primary.port()).parse()?;
    let replication_b = TcpProxy::start(primary_addr).await?;
    let replication_c = TcpProxy::start(primary_addr).await?;
    tokio::try_join!(
        standby_b.stream_through("standby_b", replication_b.port()),
        standby_c.stream_through("standby_c", replication_c.port()),
    )?;

    // Three observers, each reaching the primary through its own proxy, the standbys directly.
    let mut paths = Vec::new();
    let mut observers = Vec::new();
    for _ in 0..3 {
        let path = TcpProxy::start(primary_addr).await?;
        let config = format!(
            "global:\n  timeout: 2s\npostgres:\n  - {{ name: {PRIMARY}, cluster: {CLUSTER}, dsn: '{}' }}\n  - {{ name: {STANDBY_B}, cluster: {CLUSTER}, dsn: '{}' }}\n  - {{ name: {STANDBY_C}, cluster: {CLUSTER}, dsn: '{}' }}\n",
            primary.monitor_dsn_via(path.port()),
            standby_b.monitor_dsn(),
            standby_c.monitor_dsn(),
        );
        observers.push(Clusterwatch::start(Some(&config), &[]).await?);
        paths.push(path);
    }
    let rules_dir = temp_dir("cw-quorum-rules-")?;
    let addrs: Vec<String> = observers.iter().map(|o| o.addr()).collect();
    let targets: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let prom = Prometheus::start(&PrometheusConfig {
        jobs: vec![ScrapeJob::new("clusterwatch", &targets)],
        rule_files: rules_with_short_window(rules_dir.path(), WINDOW)?,
        ..PrometheusConfig::default()
    })
    .await?;
    prom.wait_for_target_up("clusterwatch", WAIT).await?;

    // Every observer healthy and seeing the primary; the default quorum is 2 of 3.
    wait_until(
        WAIT,
        "three healthy observers seeing the primary",
        async || {
            let seeing = query_value(
                &prom,
                &format!(
                    "cluster:clusterwatch_pg_observers_seeing_primary:count{{cluster='{CLUSTER}'}}"
                ),
            )
            .await?;
            let quorum = query_value(
                &prom,
                &format!("cluster:clusterwatch_pg_failover_quorum:value{{cluster='{CLUSTER}'}}"),
            )
            .await?;
            Ok(seeing == 3.0 && quorum == 2.0)
        },
    )
    .await?;

    // One observer loses the primary: a partial view, never a failover.
    paths[0].cut();
    wait_until(WAIT, "PostgresPrimaryPartialView to fire", async || {
        let firing = active(&prom, "PostgresPrimaryPartialView", "firing").await?;
        if firing.iter().any(|labels| labels["cluster"] == CLUSTER) {
            Ok(true)
        } else {
            bail!("active alerts: {}", prom.alerts().await?)
        }
    })
    .await?;
    let ever = alerts_ever(
        &prom,
        "PostgresFailoverNeeded|PostgresFailoverNoCandidate",
        "10m",
    )
    .await?;
    ensure!(
        ever.is_empty(),
        "one observer's lost path started a failover decision: {ever:?}"
    );

    // pg-c's replication is cut first, then the primary writes: pg-b is the most advanced.
    replication_c.cut();
    primary
        .psql("CREATE TABLE written_after_c_was_cut AS SELECT generate_series(1, 2000) AS id")
        .await?;
    let candidate =
        format!("cluster_target:clusterwatch_pg_failover_candidate:bytes{{cluster='{CLUSTER}'}}");
    wait_until(WAIT, "pg-b to be ahead of pg-c and the candidate", async || {
        let positions = prom
            .query(&format!(
                "cluster_target:clusterwatch_pg_standby_wal_position:bytes{{cluster='{CLUSTER}'}}"
            ))
            .await?;
        let chosen = prom.query(&candidate).await?;
        let b_ahead = query_value(
            &prom,
            &format!("cluster_target:clusterwatch_pg_standby_wal_position:bytes{{target='{STANDBY_B}'}} - ignoring (target) cluster_target:clusterwatch_pg_standby_wal_position:bytes{{target='{STANDBY_C}'}}"),
        )
        .await?;
        if b_ahead > 0.0 && chosen["result"][0]["metric"]["target"] == STANDBY_B {
            Ok(true)
        } else {
            bail!("positions {positions}, candidate {chosen}")
        }
    })
    .await?;

    // The primary is cut off from everyone, observers and standbys, and keeps running.
    for path in &paths {
        path.cut();
    }
    replication_b.cut();
    wait_until(WAIT, "PostgresFailoverNeeded to fire", async || {
        let firing = active(&prom, "PostgresFailoverNeeded", "firing").await?;
        match firing.as_slice() {
            [] => bail!("active alerts: {}", prom.alerts().await?),
            [labels] => {
                ensure!(
                    labels["cluster"] == CLUSTER
                        && labels["candidate"] == STANDBY_B
                        && labels["failed"] == PRIMARY
                        && labels["action"] == "failover",
                    "the failover alert names the wrong nodes: {labels}"
                );
                Ok(true)
            }
            several => bail!("more than one failover alert: {several:?}"),
        }
    })
    .await?;
    // No observer sees the primary any more: the view is no longer partial.
    let partial = active(&prom, "PostgresPrimaryPartialView", "firing").await?;
    ensure!(partial.is_empty(), "partial view still firing: {partial:?}");
    // All three observers agreed; the primary itself never stopped.
    let agreeing = query_value(
        &prom,
        &format!("cluster:clusterwatch_pg_observers_agreeing:count{{cluster='{CLUSTER}'}}"),
    )
    .await?;
    ensure!(agreeing == 3.0, "{agreeing} observers agree, expected 3");
    ensure!(
        primary.psql("SELECT pg_is_in_recovery()").await? == "f",
        "the cut-off primary should still be running as primary"
    );
    Ok(())
}
