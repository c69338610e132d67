//! The leader lease (`hooks.lease`) on real servers: a PostgreSQL primary and its streaming
//! standby, each with its own clusterwatch and hook receiver, one etcd. While the primary's
//! clusterwatch keeps the lease, a promotion is refused (`lease_held`); cut off from etcd while
//! it keeps running, the primary fences itself (read-only) before its lease ends, the
//! promotion waits for the lease to end and then runs exactly once, and the old primary
//! accepts no writes; the new primary's clusterwatch then holds the key. The Redis self-fence
//! recipe on a real master with its replica.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clusterwatch_tests::exposition::scrape;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab};
use clusterwatch_tests::harness::{
    temp_dir, wait_until, Clusterwatch, EtcdCluster, PgNode, RedisPair, TcpProxy,
};
use serde_json::{json, Value};

const CLUSTER: &str = "leased";
const PREFIX: &str = "/cw-lease-test/";
/// Short, so the test takes seconds: the holder renews every 1.5 s and fences after 3 s
/// without a renewal.
const TTL: &str = "6s";
/// How long the standby's promotion waits for a held lease before refusing.
const LEASE_WAIT: &str = "12s";
const WAIT: Duration = Duration::from_secs(60);

fn recipe(name: &str) -> String {
    format!(
        "{}/../alertmanager/hooks/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The superuser's connection to `node` over loopback (trusted by the harness' pg_hba).
fn conninfo(node: &PgNode) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        node.port()
    )
}

/// A node's clusterwatch: its own server in `postgres:`, a receiver whose etcd is reached at
/// `etcd`, the lease on its own server, and `rules`.
fn config(lab: &HookLab, node: &PgNode, etcd: &str, rules: &str) -> String {
    let settings = format!(
        "  max_disruptive_per_hour: 10\n  lock:\n    etcd: {{ endpoints: [{etcd}] }}\n    prefix: {PREFIX}\n  lease:\n    targets: [{name}]\n    ttl: {TTL}\n    wait: {LEASE_WAIT}\n    self_fence: [{fence}, read-only, '{conninfo}']\n",
        name = node.name(),
        fence = recipe("pg-self-fence"),
        conninfo = conninfo(node),
    );
    format!(
        "global:\n  timeout: 1s\npostgres:\n  - {{ name: {}, cluster: {CLUSTER}, dsn: '{}' }}\n{}",
        node.name(),
        node.monitor_dsn(),
        lab.config(&settings, rules)
    )
}

/// Who holds the group's leader key now (its value's `owner`), if anyone.
async fn leader(etcd: &str) -> Result<Option<String>> {
    let key = format!("{PREFIX}leader/{CLUSTER}");
    let answer = clusterwatch_tests::harness::http::client()?
        .post(format!("{etcd}/v3/kv/range"))
        .body(json!({ "key": B64.encode(key) }).to_string())
        .send()
        .await?
        .bytes()
        .await?;
    let answer: Value = serde_json::from_slice(&answer)?;
    let Some(value) = answer["kvs"][0]["value"].as_str() else {
        return Ok(None);
    };
    let value: Value = serde_json::from_slice(&B64.decode(value)?)?;
    Ok(value["owner"].as_str().map(str::to_owned))
}

async fn lease_state(cw: &Clusterwatch, target: &str) -> Result<Option<String>> {
    let metrics = scrape(cw).await?;
    Ok(metrics
        .find("clusterwatch_leader_lease_state", &[("target", target)])
        .into_iter()
        .find(|s| s.value == 1.0)
        .and_then(|s| s.labels.get("state").cloned()))
}

fn failover_body() -> String {
    let labels = json!({
        "alertname": "PostgresFailoverNeeded", "cluster": CLUSTER,
        "candidate": "pg-b", "failed": "pg-a", "action": "failover", "severity": "critical",
    });
    let a = alert("firing", labels, "f00d", "2026-12-04T00:00:00Z");
    notification("firing", "lease-test", vec![a]).to_string()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The unix time of a journal record.
fn ts(record: &Value) -> f64 {
    record["ts"].as_f64().unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_waits_for_the_old_primarys_lease_which_fences_itself_first() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let endpoint = etcd.endpoints()[0].clone();
    let primary = PgNode::start_primary("pg-a").await?;
    let standby = PgNode::start_standby("pg-b", &primary, "pg_b").await?;
    primary
        .psql("CREATE TABLE orders (id int)")
        .await
        .context("a table to write to")?;

    // The primary's host reaches etcd through a path the test can cut.
    let etcd_addr = endpoint.trim_start_matches("http://").parse()?;
    let primary_path = TcpProxy::start(etcd_addr).await?;
    let lab_a = HookLab::new()?;
    let idle_rule =
        "    - { name: nothing, match: { alertname: NeverSent }, command: [/bin/true] }\n";
    let cw_a = Clusterwatch::start(
        Some(&config(
            &lab_a,
            &primary,
            &format!("http://{}", primary_path.addr()),
            idle_rule,
        )),
        &[],
    )
    .await?;

    let lab_b = HookLab::new()?;
    let promote_rule = format!(
        "    - name: pg-failover\n      match: {{ alertname: PostgresFailoverNeeded, cluster: {CLUSTER} }}\n      only_if_candidate: pg-b\n      disruptive: true\n      wait_for_lease: true\n      timeout: 60s\n      env: {{ PGHOST: 127.0.0.1, PGPORT: '{}', PGUSER: postgres }}\n      steps:\n        - {{ name: promote, command: [{}] }}\n",
        standby.port(),
        recipe("pg-promote"),
    );
    let cw_b = Clusterwatch::start(
        Some(&config(&lab_b, &standby, &endpoint, &promote_rule)),
        &[],
    )
    .await?;

    // The primary's clusterwatch takes the key; the standby's does not.
    wait_until(
        WAIT,
        "pg-a's clusterwatch to hold the leader key",
        async || {
            let owner = leader(&endpoint).await?;
            let state = lease_state(&cw_a, "pg-a").await?;
            if owner.as_deref().is_some_and(|o| o.ends_with("/pg-a"))
                && state.as_deref() == Some("held")
            {
                Ok(true)
            } else {
                bail!("the key's owner is {owner:?}, pg-a's lease state {state:?}")
            }
        },
    )
    .await?;
    ensure!(
        lease_state(&cw_b, "pg-b").await?.as_deref() == Some("not_primary"),
        "the standby's clusterwatch should hold nothing"
    );

    // A failover decided while the primary still renews: refused after the wait, journaled.
    ensure!(lab_b.post(failover_body()).await?.is_success());
    wait_until(
        WAIT,
        "the promotion to be refused as lease_held",
        async || Ok(!lab_b.events("lease_held").is_empty()),
    )
    .await?;
    let held = &lab_b.events("lease_held")[0];
    ensure!(
        held["holder"]
            .as_str()
            .is_some_and(|h| h.ends_with("/pg-a"))
            && held["waited_seconds"].as_f64().is_some_and(|w| w >= 12.0),
        "the refusal names the holder and the full wait: {held}"
    );
    ensure!(
        lab_b.events("started").is_empty(),
        "a step started: {:?}",
        lab_b.journal()
    );
    ensure!(standby.psql("SELECT pg_is_in_recovery()").await? == "t");
    let skipped = scrape(&cw_b)
        .await?
        .value(
            "clusterwatch_hook_skips_total",
            &[("hook", "pg-failover"), ("reason", "lease_held")],
        )
        .unwrap_or(0.0);
    ensure!(skipped == 1.0, "lease_held skips: {skipped}");

    // The primary is cut off from etcd and keeps running; Alertmanager sends the alert again.
    primary_path.cut();
    let cut_at = unix_now();
    ensure!(lab_b.post(failover_body()).await?.is_success());
    wait_until(WAIT, "the promotion to run", async || {
        Ok(lab_b.events("finished").iter().any(|f| f["result"] == "ok"))
    })
    .await
    .with_context(|| format!("journal of pg-b's receiver: {:?}", lab_b.journal()))?;

    // The old primary fenced itself before the lease could end, and before the promotion.
    let fenced = lab_a.events("self_fenced");
    let [fence] = fenced.as_slice() else {
        bail!(
            "pg-a's receiver journaled {} self-fences: {fenced:?}",
            fenced.len()
        );
    };
    ensure!(
        fence["outcome"] == "exit 0",
        "the self-fence failed: {fence}"
    );
    let waited = lab_b.events("lease_waited");
    let [waited] = waited.as_slice() else {
        bail!("expected one lease_waited: {waited:?}");
    };
    let started = lab_b.events("started");
    ensure!(
        started.len() == 1,
        "the promotion ran {} times",
        started.len()
    );
    let fence_after = ts(fence) - cut_at;
    ensure!(
        fence_after < 6.0,
        "the self-fence came {fence_after:.1}s after the cut, not within the 6 s lease"
    );
    ensure!(
        ts(fence) < ts(waited) && ts(waited) <= ts(&started[0]),
        "order: self-fence {}, lease gone {}, promotion {}",
        ts(fence),
        ts(waited),
        ts(&started[0])
    );
    println!(
        "cut → self-fence {fence_after:.1}s; cut → promotion started {:.1}s (waited {:.1}s for the lease)",
        ts(&started[0]) - cut_at,
        waited["waited_seconds"].as_f64().unwrap_or(f64::NAN)
    );

    // One primary: pg-b. The old one takes no writes, new sessions or old.
    ensure!(standby.psql("SELECT pg_is_in_recovery()").await? == "f");
    ensure!(primary.psql("SELECT pg_is_in_recovery()").await? == "f");
    let write = primary.psql("INSERT INTO orders VALUES (1)").await;
    ensure!(
        write
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("read-only transaction")),
        "the fenced primary took a write: {write:?}"
    );
    ensure!(
        lease_state(&cw_a, "pg-a").await?.as_deref() == Some("fenced"),
        "pg-a's clusterwatch should report itself fenced"
    );

    // The new primary's clusterwatch takes the key.
    wait_until(
        WAIT,
        "pg-b's clusterwatch to hold the leader key",
        async || {
            Ok(leader(&endpoint)
                .await?
                .is_some_and(|o| o.ends_with("/pg-b")))
        },
    )
    .await?;

    // A re-send of the same incident is a repeat: still one promotion.
    ensure!(lab_b.post(failover_body()).await?.is_success());
    wait_until(WAIT, "the re-send to be deduplicated", async || {
        Ok(!lab_b.events("deduped").is_empty())
    })
    .await?;
    ensure!(lab_b.events("started").len() == 1);
    Ok(())
}

/// Runs `redis-self-fence ARGS…` as the lease would, `password_file` as REDIS_PASSWORD_FILE;
/// returns its exit code and stderr.
fn redis_self_fence(
    args: &[&str],
    password_file: Option<&std::path::Path>,
) -> Result<(i32, String)> {
    let mut command = std::process::Command::new(recipe("redis-self-fence"));
    command
        .args(args)
        .env("CW_LEASE_CLUSTER", "cache")
        .env("CW_LEASE_TARGET", "master")
        .env("CW_LEASE_REASON", "lease not renewed for 3s")
        .env_remove("REDIS_PASSWORD_FILE");
    if let Some(file) = password_file {
        command.env("REDIS_PASSWORD_FILE", file);
    }
    let output = command.output().context("could not run redis-self-fence")?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A fenced Redis master refuses every write for as long as it runs (no pause that ends),
/// keeps serving reads, and its replica keeps its data; a master that answers but not to the
/// fence (no password) is reported as possibly still writable, and one that is down as
/// taking no writes.
#[tokio::test(flavor = "multi_thread")]
async fn the_redis_self_fence_refuses_every_write_and_keeps_reads() -> Result<()> {
    const PASSWORD: &str = "fence-secret";
    let mut pair = RedisPair::start_with_password(PASSWORD).await?;
    let master = pair.master.addr();
    pair.master.cli(&["SET", "order:1", "paid"]).await?;

    let (code, stderr) = redis_self_fence(&["no-writes", &master], None)?;
    ensure!(
        code == 3 && stderr.contains("may still accept writes"),
        "without the password the fence must say it could not fence (exit 3), got {code}: {stderr}"
    );
    ensure!(
        pair.master.cli(&["SET", "order:2", "paid"]).await? == "OK",
        "the failed fence changed the master"
    );

    let dir = temp_dir("cw-redis-fence-")?;
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, PASSWORD)?;
    let (code, stderr) = redis_self_fence(&["no-writes", &master], Some(&password_file))?;
    ensure!(code == 0, "the fence failed with {code}: {stderr}");
    ensure!(
        stderr.contains("cluster cache target master: lease not renewed for 3s")
            && stderr.contains("writes refused now"),
        "the fence does not say why and what it did: {stderr}"
    );
    ensure!(
        !stderr.contains(PASSWORD),
        "the fence printed the password: {stderr}"
    );
    for write in [
        vec!["SET", "order:3", "paid"],
        vec!["INCR", "orders"],
        vec![
            "EVAL",
            "return redis.call('SET', KEYS[1], 'x')",
            "1",
            "order:4",
        ],
    ] {
        let answer = pair.master.cli(&write).await?;
        ensure!(
            answer.contains("NOREPLICAS"),
            "the fenced master took `{}`: {answer}",
            write.join(" ")
        );
    }
    ensure!(
        pair.master.cli(&["GET", "order:1"]).await? == "paid",
        "the fenced master no longer serves reads"
    );
    wait_until(
        WAIT,
        "the replica to hold the writes made before the fence",
        async || Ok(pair.replica.cli(&["GET", "order:2"]).await? == "paid"),
    )
    .await?;

    pair.master.stop()?;
    let (code, stderr) = redis_self_fence(&["no-writes", &master], Some(&password_file))?;
    ensure!(
        code == 0 && stderr.contains("does not accept connections"),
        "a stopped master takes no writes: the fence should succeed, got {code}: {stderr}"
    );
    let (code, stderr) = redis_self_fence(&["no-writes", "localhost"], None)?;
    ensure!(
        code == 2,
        "an address without a port must be a usage error, got {code}: {stderr}"
    );
    Ok(())
}
