//! The version matrix: PostgreSQL 15, 16 and 18 and Redis 6.0, 6.2 and 7.0, one pair per
//! version running the replication, role, archiving and split-brain checks of `postgres.rs`
//! and `redis.rs` in turn (split brain last: it leaves the pair split). A version whose
//! programs are missing or do not run here prints `SKIPPED` with the reason.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::exposition::scrape_until;
use clusterwatch_tests::harness::versions::{self, Version};
use clusterwatch_tests::harness::{Clusterwatch, PgCluster, RedisPair};

/// Idle scrapes of the healthy-pair check (the suite's own PostgreSQL test idles 30 s).
const IDLE: Duration = Duration::from_secs(6);

/// Where `server` `version`'s programs are, or `None` after saying why it is skipped.
fn pick(all: Vec<Version>, server: &str, version: &str) -> Option<std::path::PathBuf> {
    let v = all.into_iter().find(|v| v.version == version)?;
    match v.location {
        Ok(path) => Some(path),
        Err(reason) => {
            println!("SKIPPED: {server} {version}: {reason}");
            None
        }
    }
}

/// Starts an exporter on `config` and checks that `label` of `family` names `version`.
async fn reports_version(config: &str, family: &str, label: &str, version: &str) -> Result<()> {
    let cw = Clusterwatch::start(Some(config), &[]).await?;
    let m = scrape_until(&cw, Duration::from_secs(30), family, |m| {
        Ok(!m.find(family, &[]).is_empty())
    })
    .await?;
    let seen = &m.find(family, &[])[0].labels[label];
    ensure!(
        seen.starts_with(&format!("{version}.")),
        "{family} says {label}={seen}, expected {version}.x"
    );
    Ok(())
}

/// The exporter sees the version the pair runs, then every shared check passes on it.
async fn postgres(version: &str) -> Result<()> {
    let Some(bin_dir) = pick(versions::postgres(), "PostgreSQL", version) else {
        return Ok(());
    };
    let pair = PgCluster::start_pair_in(&bin_dir)
        .await
        .with_context(|| format!("PostgreSQL {version} pair"))?;
    let config = format!(
        "postgres:\n  - {{ name: primary, cluster: pg, dsn: '{}' }}\n",
        pair.primary.monitor_dsn()
    );
    reports_version(&config, "clusterwatch_pg_info", "server_version", version).await?;
    let context = || format!("on PostgreSQL {version}");
    crate::postgres::healthy_pair_streams(&pair, IDLE)
        .await
        .with_context(context)?;
    crate::postgres::archive_backlog_drains_when_fixed(&pair)
        .await
        .with_context(context)?;
    crate::postgres::promotion_shows_two_primaries(&pair)
        .await
        .with_context(context)
}

async fn redis(version: &str) -> Result<()> {
    let Some(server) = pick(versions::redis(), "Redis", version) else {
        return Ok(());
    };
    let pair = RedisPair::start_server(&server)
        .await
        .with_context(|| format!("Redis {version} pair"))?;
    let config = format!(
        "redis:\n  - {{ name: master, cluster: r, address: '{}' }}\n",
        pair.master.url()
    );
    reports_version(&config, "clusterwatch_redis_info", "version", version).await?;
    let context = || format!("on Redis {version}");
    crate::redis::healthy_pair(&pair)
        .await
        .with_context(context)?;
    crate::redis::replicaof_no_one_shows_two_masters(&pair)
        .await
        .with_context(context)
}

#[tokio::test]
async fn postgres_15() -> Result<()> {
    postgres("15").await
}

#[tokio::test]
async fn postgres_16() -> Result<()> {
    postgres("16").await
}

#[tokio::test]
async fn postgres_18() -> Result<()> {
    postgres("18").await
}

#[tokio::test]
async fn redis_6_0() -> Result<()> {
    redis("6.0").await
}

#[tokio::test]
async fn redis_6_2() -> Result<()> {
    redis("6.2").await
}

#[tokio::test]
async fn redis_7_0() -> Result<()> {
    redis("7.0").await
}
