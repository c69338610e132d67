//! Captures the PostgreSQL collector's typed rows from a real primary and standby, in the
//! states its unit tests need, into `exporter/src/collector/testdata/pg/`. Ignored: it is run
//! by hand when the queries change, then the golden expositions are rewritten:
//!
//! ```text
//! cargo test -p clusterwatch-tests --test e2e postgres_fixtures -- --ignored
//! UPDATE_GOLDEN=1 cargo test -p clusterwatch --lib collector::pg
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clusterwatch::collector::pg::capture_rows;
use clusterwatch_tests::harness::postgres::STANDBY_NAME;
use clusterwatch_tests::harness::{wait_until, PgCluster, PgNode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The least-privilege role without `pg_monitor`.
const PLAIN_USER: &str = "plain";
const PLAIN_PASSWORD: &str = "plainpass";

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../exporter/src/collector/testdata/pg")
}

/// The rows of group `name` if it worked (`{"Ok": [...]}`).
fn ok_rows<'a>(scrape: &'a Value, name: &str) -> Option<&'a Vec<Value>> {
    scrape[name]["Ok"].as_array()
}

fn failed(scrape: &Value, name: &str) -> bool {
    scrape[name].get("Err").is_some()
}

fn status_f64(scrape: &Value, field: &str) -> Option<f64> {
    scrape["status"][field].as_f64()
}

/// Standby caught up: everything received is replayed and its receiver streams.
fn standby_idle(s: &Value) -> bool {
    ok_rows(s, "wal_receiver")
        .is_some_and(|r| r.first().is_some_and(|r| r["status"] == "streaming"))
        && status_f64(s, "receive_lsn").is_some()
        && status_f64(s, "receive_lsn") == status_f64(s, "replay_lsn")
}

/// Primary sees the standby streaming with nothing left to replay.
fn primary_idle(s: &Value) -> bool {
    ok_rows(s, "replication").is_some_and(|rows| {
        rows.iter().any(|r| {
            r["application_name"] == STANDBY_NAME
                && r["state"] == "streaming"
                && r["replay_lag_bytes"].as_f64() == Some(0.0)
        })
    })
}

/// Captures from `dsn` until `check` accepts the rows, then saves them as `NAME.json`.
async fn capture(name: &str, dsn: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = None;
    wait_until(WAIT, &format!("rows for fixture {name}"), async || {
        let text = capture_rows(dsn, Duration::from_secs(10)).await?;
        let value: Value = serde_json::from_str(&text)?;
        let accepted = check(&value);
        last = Some((text, value));
        Ok(accepted)
    })
    .await?;
    let (text, value) = last.expect("captured at least once");
    let path = fixture_dir().join(format!("{name}.json"));
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(value)
}

async fn grant_repmgr_and_wait(pair: &PgCluster) -> Result<()> {
    pair.primary.grant_repmgr().await?;
    let standby: &PgNode = &pair.standby;
    wait_until(WAIT, "the grant to reach the standby", async || {
        Ok(standby
            .psql("SELECT has_table_privilege('monitor', 'repmgr.nodes', 'SELECT')")
            .await?
            == "t")
    })
    .await
}

#[tokio::test]
#[ignore = "writes fixtures; run by hand when the queries change"]
async fn capture_pg_fixtures() -> Result<()> {
    std::fs::create_dir_all(fixture_dir())?;
    let pair = PgCluster::start_pair().await?;
    let (primary, standby) = (pair.primary.monitor_dsn(), pair.standby.monitor_dsn());

    // Healthy and idle.
    capture("primary-streaming", &primary, primary_idle).await?;
    capture("standby-streaming", &standby, standby_idle).await?;

    // A role without pg_monitor (created on the primary, replicated to the standby).
    pair.primary
        .psql(&format!(
            "CREATE ROLE {PLAIN_USER} LOGIN PASSWORD '{PLAIN_PASSWORD}'"
        ))
        .await?;
    let plain = |node: &PgNode| node.dsn_for(PLAIN_USER, PLAIN_PASSWORD);
    capture("primary-no-pg-monitor", &plain(&pair.primary), |s| {
        failed(s, "wal_dir")
    })
    .await?;
    capture("standby-no-pg-monitor", &plain(&pair.standby), |s| {
        failed(s, "wal_dir")
    })
    .await?;

    // Archiving failing: a segment waits, failures count.
    pair.primary.set_archive_command("false").await?;
    pair.primary.switch_wal().await?;
    capture("primary-archiver-failing", &primary, |s| {
        ok_rows(s, "archiver").is_some_and(|r| r[0]["failed_count"].as_i64() >= Some(1))
            && ok_rows(s, "archive_status").is_some_and(|r| r[0]["ready_count"].as_i64() >= Some(1))
    })
    .await?;
    pair.primary.reset_archive_command().await?;
    wait_until(WAIT, "the archive backlog to drain", async || {
        let s: Value = serde_json::from_str(&capture_rows(&primary, WAIT).await?)?;
        Ok(ok_rows(&s, "archive_status").is_some_and(|r| r[0]["ready_count"] == 0))
    })
    .await?;

    // repmgr's node table, as `repmgr primary register` / `standby register` fill it: first
    // unreadable by pg_monitor, then granted.
    pair.primary.create_repmgr_nodes().await?;
    capture("primary-repmgr-not-granted", &primary, |s| {
        s["repmgr"].get("Err").is_some()
    })
    .await?;
    grant_repmgr_and_wait(&pair).await?;
    let two_nodes = |s: &Value| ok_rows(s, "repmgr").is_some_and(|r| r.len() == 2);
    capture("primary-repmgr", &primary, |s| {
        two_nodes(s) && primary_idle(s)
    })
    .await?;
    capture("standby-repmgr", &standby, |s| {
        two_nodes(s) && standby_idle(s)
    })
    .await?;

    // The upstream gone: the standby's receiver stops streaming; a few seconds later.
    pair.primary.stop().await?;
    let first = capture("standby-link-down", &standby, |s| {
        ok_rows(s, "wal_receiver")
            .is_some_and(|r| r.first().is_none_or(|r| r["status"] != "streaming"))
    })
    .await?;
    let since = status_f64(&first, "server_time").context("server_time")?;
    capture("standby-link-down-later", &standby, |s| {
        status_f64(s, "server_time").is_some_and(|t| t >= since + 3.0)
    })
    .await?;
    Ok(())
}
