//! The PostgreSQL collector through every state a failover passes through, on a real primary
//! and streaming standby: healthy and idle, under write load, standby down and back, primary
//! down, split brain after a promotion, archiving failing and recovering.

use std::time::Duration;

use anyhow::{bail, Result};
use clusterwatch_tests::exposition::{scrape, scrape_until, Exposition};
use clusterwatch_tests::harness::postgres::STANDBY_NAME;
use clusterwatch_tests::harness::{Clusterwatch, PgCluster};

const WAIT: Duration = Duration::from_secs(60);

/// An exporter watching both nodes as one cluster, `primary` and `standby`.
async fn watch(pair: &PgCluster) -> Result<Clusterwatch> {
    let config = format!(
        "global:\n  timeout: 3s\npostgres:\n  - {{ name: primary, cluster: pg, dsn: '{}', expected_standbys: 1 }}\n  - {{ name: standby, cluster: pg, dsn: '{}' }}\n",
        pair.primary.monitor_dsn(),
        pair.standby.monitor_dsn(),
    );
    Clusterwatch::start(Some(&config), &[]).await
}

fn on(target: &'static str) -> (&'static str, &'static str) {
    ("target", target)
}

/// Polls the exporter until `check` accepts a scrape; the last scrape's complaint is the error.
async fn until(
    cw: &Clusterwatch,
    what: &str,
    check: impl Fn(&Exposition) -> Result<bool>,
) -> Result<Exposition> {
    scrape_until(cw, WAIT, what, check).await
}

fn streaming_seen_from_primary(m: &Exposition) -> bool {
    m.value(
        "clusterwatch_pg_replication_state",
        &[
            on("primary"),
            ("application_name", STANDBY_NAME),
            ("state", "streaming"),
        ],
    ) == Some(1.0)
}

#[tokio::test]
async fn healthy_pair_streams_with_zero_lag_while_idle() -> Result<()> {
    healthy_pair_streams(&PgCluster::start_pair().await?, Duration::from_secs(30)).await
}

/// Roles, streaming, receiver, timelines and identifiers of a healthy pair, then `idle` of
/// scrapes in which the standby's lag stays exactly 0. Also run by the version matrix.
pub(crate) async fn healthy_pair_streams(pair: &PgCluster, idle: Duration) -> Result<()> {
    let cw = watch(pair).await?;
    let m = until(&cw, "a streaming, caught-up pair", |m| {
        Ok(streaming_seen_from_primary(m)
            && m.value("clusterwatch_pg_replay_lag_seconds", &[on("standby")]) == Some(0.0))
    })
    .await?;
    assert_eq!(
        m.value(
            "clusterwatch_pg_role",
            &[on("primary"), ("role", "primary")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_pg_role",
            &[on("standby"), ("role", "standby")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_pg_walsenders", &[on("primary")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_pg_expected_standbys", &[on("primary")]),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_pg_wal_receiver_status",
            &[on("standby"), ("status", "streaming")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_pg_wal_receiver_status",
            &[on("standby"), ("status", "stopped")]
        ),
        Some(0.0)
    );
    let upstream = m.find("clusterwatch_pg_upstream_info", &[on("standby")]);
    assert_eq!(upstream.len(), 1);
    assert_eq!(
        upstream[0].labels["upstream_port"],
        pair.primary.port().to_string()
    );
    assert_eq!(
        m.value("clusterwatch_pg_timeline_id", &[on("primary")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_pg_timeline_id", &[on("standby")]),
        Some(1.0)
    );
    let ids: Vec<&String> = m
        .find("clusterwatch_pg_info", &[])
        .iter()
        .map(|s| &s.labels["system_identifier"])
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids[0] == ids[1] && !ids[0].is_empty(),
        "same cluster, same identifier: {ids:?}"
    );
    assert!(
        m.find("clusterwatch_pg_query_success", &[])
            .iter()
            .all(|s| s.value == 1.0),
        "pg_monitor is enough"
    );

    // Idle: the standby's lag stays exactly 0, in seconds and bytes.
    let idle_until = tokio::time::Instant::now() + idle;
    let mut samples = 0;
    while tokio::time::Instant::now() < idle_until {
        let m = scrape(&cw).await?;
        assert_eq!(
            m.value("clusterwatch_pg_replay_lag_seconds", &[on("standby")]),
            Some(0.0)
        );
        assert_eq!(
            m.value("clusterwatch_pg_replay_lag_bytes", &[on("standby")]),
            Some(0.0)
        );
        for stage in ["write", "flush", "replay"] {
            let lag = m.value(
                "clusterwatch_pg_replication_lag_seconds",
                &[
                    on("primary"),
                    ("application_name", STANDBY_NAME),
                    ("stage", stage),
                ],
            );
            assert!(
                lag.is_some_and(|v| v < 1.0),
                "{stage} lag on an idle pair: {lag:?}"
            );
        }
        samples += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(samples >= idle.as_secs() / 3);
    Ok(())
}

#[tokio::test]
async fn lags_under_write_load_are_non_negative_and_converge() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    let cw = watch(&pair).await?;
    until(&cw, "a streaming pair", |m| {
        Ok(streaming_seen_from_primary(m))
    })
    .await?;
    pair.primary
        .psql("CREATE TABLE load (id bigserial, payload text)")
        .await?;

    let writer = {
        async {
            for _ in 0..40 {
                pair.primary
                    .psql("INSERT INTO load (payload) SELECT repeat('x', 200) FROM generate_series(1, 5000)")
                    .await?;
            }
            anyhow::Ok(())
        }
    };
    let watcher = async {
        let mut scrapes = 0;
        let mut max_lag: f64 = 0.0;
        for _ in 0..30 {
            let m = scrape(&cw).await?;
            for s in m.find("clusterwatch_pg_replication_lag_bytes", &[on("primary")]) {
                assert!(s.value >= 0.0, "negative lag: {s:?}");
                max_lag = max_lag.max(s.value);
            }
            let rx = m.value("clusterwatch_pg_wal_receive_lsn_bytes", &[on("standby")]);
            let rp = m.value("clusterwatch_pg_wal_replay_lsn_bytes", &[on("standby")]);
            if let (Some(rx), Some(rp)) = (rx, rp) {
                assert!(rp <= rx, "replayed {rp} beyond received {rx}");
                let gap = m
                    .value("clusterwatch_pg_replay_lag_bytes", &[on("standby")])
                    .unwrap_or(-1.0);
                assert!(gap >= 0.0);
            }
            scrapes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok((scrapes, max_lag))
    };
    let (written, watched) = tokio::join!(writer, watcher);
    written?;
    let (scrapes, _max_lag) = watched?;
    assert_eq!(scrapes, 30);

    // Load over: both views agree exactly once the standby has caught up.
    until(&cw, "primary and standby views to agree", |m| {
        let primary = m.value("clusterwatch_pg_wal_lsn_bytes", &[on("primary")]);
        let received = m.value("clusterwatch_pg_wal_receive_lsn_bytes", &[on("standby")]);
        let replayed = m.value("clusterwatch_pg_wal_replay_lsn_bytes", &[on("standby")]);
        let replay_lag = m.value(
            "clusterwatch_pg_replication_lag_bytes",
            &[
                on("primary"),
                ("application_name", STANDBY_NAME),
                ("stage", "replay"),
            ],
        );
        Ok(primary.is_some()
            && primary == received
            && received == replayed
            && replay_lag == Some(0.0))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn standby_stopped_then_restarted() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    let cw = watch(&pair).await?;
    until(&cw, "a streaming pair", |m| {
        Ok(streaming_seen_from_primary(m))
    })
    .await?;

    pair.standby.stop().await?;
    let m = until(&cw, "the primary to lose its walsender", |m| {
        Ok(m.value("clusterwatch_pg_walsenders", &[on("primary")]) == Some(0.0))
    })
    .await?;
    assert_eq!(
        m.value("clusterwatch_target_up", &[on("standby")]),
        Some(0.0)
    );
    assert!(m
        .value(
            "clusterwatch_target_scrape_errors_total",
            &[on("standby"), ("reason", "connect")]
        )
        .is_some());
    assert!(m
        .find("clusterwatch_pg_replication_state", &[on("primary")])
        .is_empty());

    pair.standby.start().await?;
    until(&cw, "streaming again", |m| {
        Ok(streaming_seen_from_primary(m)
            && m.value("clusterwatch_target_up", &[on("standby")]) == Some(1.0)
            && m.value("clusterwatch_pg_walsenders", &[on("primary")]) == Some(1.0))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn primary_stopped_makes_standby_lag_grow() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    let cw = watch(&pair).await?;
    until(&cw, "a streaming pair", |m| {
        Ok(streaming_seen_from_primary(m))
    })
    .await?;
    pair.primary.stop().await?;

    let first = until(&cw, "the standby's receiver to stop streaming", |m| {
        Ok(m.value(
            "clusterwatch_pg_wal_receiver_status",
            &[on("standby"), ("status", "streaming")],
        ) == Some(0.0))
    })
    .await?;
    assert_eq!(
        first.value("clusterwatch_target_up", &[on("primary")]),
        Some(0.0)
    );
    assert_eq!(
        first.value(
            "clusterwatch_pg_role",
            &[on("standby"), ("role", "standby")]
        ),
        Some(1.0)
    );
    let lag0 = first
        .value("clusterwatch_pg_replay_lag_seconds", &[on("standby")])
        .unwrap_or(0.0);
    let age0 = first
        .value(
            "clusterwatch_pg_wal_receiver_last_message_age_seconds",
            &[on("standby")],
        )
        .unwrap_or(0.0);
    until(&cw, "lag to keep growing while the primary is gone", |m| {
        let lag = m
            .value("clusterwatch_pg_replay_lag_seconds", &[on("standby")])
            .unwrap_or(0.0);
        let age = m
            .value(
                "clusterwatch_pg_wal_receiver_last_message_age_seconds",
                &[on("standby")],
            )
            .unwrap_or(0.0);
        if lag < lag0 {
            bail!("lag went down from {lag0} to {lag}");
        }
        Ok(lag >= lag0 + 2.0 && lag > 0.0 && age >= age0 + 2.0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn promoting_the_standby_while_the_primary_runs_shows_two_primaries() -> Result<()> {
    promotion_shows_two_primaries(&PgCluster::start_pair().await?).await
}

/// Promotes the standby while the primary runs: two primaries, timelines 1 and 2, no stale
/// standby series. Leaves the pair split. Also run by the version matrix.
pub(crate) async fn promotion_shows_two_primaries(pair: &PgCluster) -> Result<()> {
    let cw = watch(pair).await?;
    until(&cw, "a streaming pair", |m| {
        Ok(streaming_seen_from_primary(m))
    })
    .await?;
    pair.standby.promote().await?;
    let m = until(&cw, "two primaries", |m| {
        Ok(m.value(
            "clusterwatch_pg_role",
            &[on("standby"), ("role", "primary")],
        ) == Some(1.0)
            && m.value(
                "clusterwatch_pg_role",
                &[on("primary"), ("role", "primary")],
            ) == Some(1.0))
    })
    .await?;
    // The state-set has no stale series: the promoted node is no longer a standby.
    assert_eq!(
        m.value(
            "clusterwatch_pg_role",
            &[on("standby"), ("role", "standby")]
        ),
        Some(0.0)
    );
    let old = m.value("clusterwatch_pg_timeline_id", &[on("primary")]);
    let new = m.value("clusterwatch_pg_timeline_id", &[on("standby")]);
    assert_eq!(old, Some(1.0));
    assert_eq!(new, Some(2.0));
    assert!(m
        .find("clusterwatch_pg_wal_receiver_status", &[on("standby")])
        .is_empty());
    assert!(m
        .value("clusterwatch_pg_wal_lsn_bytes", &[on("standby")])
        .is_some());
    Ok(())
}

#[tokio::test]
async fn failing_archive_command_builds_a_backlog_that_drains_when_fixed() -> Result<()> {
    archive_backlog_drains_when_fixed(&PgCluster::start_pair().await?).await
}

/// A failing `archive_command` builds an aging backlog that drains once it is fixed. Also
/// run by the version matrix.
pub(crate) async fn archive_backlog_drains_when_fixed(pair: &PgCluster) -> Result<()> {
    let cw = watch(pair).await?;
    let before = until(&cw, "archiver metrics", |m| {
        Ok(m.value("clusterwatch_pg_archiver_ready_files", &[on("primary")]) == Some(0.0))
    })
    .await?;
    let failed0 = before
        .value("clusterwatch_pg_archiver_failed_total", &[on("primary")])
        .unwrap_or(0.0);
    assert_eq!(
        before.value("clusterwatch_pg_archiver_enabled", &[on("primary")]),
        Some(1.0)
    );

    pair.primary.set_archive_command("false").await?;
    for _ in 0..3 {
        pair.primary.switch_wal().await?;
    }
    let failing = until(&cw, "archiving failures and a backlog", |m| {
        let failed = m
            .value("clusterwatch_pg_archiver_failed_total", &[on("primary")])
            .unwrap_or(0.0);
        let ready = m
            .value("clusterwatch_pg_archiver_ready_files", &[on("primary")])
            .unwrap_or(0.0);
        Ok(failed > failed0 && ready >= 3.0)
    })
    .await?;
    assert!(failing
        .value(
            "clusterwatch_pg_archiver_last_failed_age_seconds",
            &[on("primary")]
        )
        .is_some());
    let age0 = failing
        .value(
            "clusterwatch_pg_archiver_oldest_ready_age_seconds",
            &[on("primary")],
        )
        .unwrap_or(0.0);
    until(&cw, "the backlog to age", |m| {
        Ok(m.value(
            "clusterwatch_pg_archiver_oldest_ready_age_seconds",
            &[on("primary")],
        )
        .unwrap_or(0.0)
            >= age0 + 2.0)
    })
    .await?;

    pair.primary.reset_archive_command().await?;
    let drained = until(&cw, "the backlog to drain", |m| {
        Ok(m.value("clusterwatch_pg_archiver_ready_files", &[on("primary")]) == Some(0.0))
    })
    .await?;
    assert_eq!(
        drained.value(
            "clusterwatch_pg_archiver_oldest_ready_age_seconds",
            &[on("primary")]
        ),
        Some(0.0)
    );
    assert!(drained
        .value(
            "clusterwatch_pg_archiver_last_archived_age_seconds",
            &[on("primary")]
        )
        .is_some());
    Ok(())
}

#[tokio::test]
async fn wal_archive_directory_growth_is_visible() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    let config = format!(
        "directories:\n  - {{ name: wal-archive, cluster: pg, path: '{}', pattern: '^[0-9A-F]{{24}}$' }}\n",
        pair.primary.archive_dir().display()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let before = until(&cw, "the archive directory to be measured", |m| {
        Ok(m.value("clusterwatch_target_up", &[on("wal-archive")]) == Some(1.0))
    })
    .await?;
    let files0 = before
        .value("clusterwatch_dir_files", &[on("wal-archive")])
        .unwrap_or(0.0);
    let bytes0 = before
        .value("clusterwatch_dir_bytes", &[on("wal-archive")])
        .unwrap_or(0.0);
    let segment = pair.primary.switch_wal().await?;
    pair.primary.wait_archived(&segment, WAIT).await?;
    // The archive command copies a 16 MiB segment into place, so one scrape may see a file
    // still being written: wait for the end state rather than asserting on a single scrape.
    let after = until(&cw, "the archived segment to be counted in full", |m| {
        let files = m
            .value("clusterwatch_dir_files", &[on("wal-archive")])
            .unwrap_or(0.0);
        let bytes = m
            .value("clusterwatch_dir_bytes", &[on("wal-archive")])
            .unwrap_or(0.0);
        Ok(files > files0 && bytes >= bytes0 + 16.0 * 1048576.0)
    })
    .await?;
    assert!(after
        .value(
            "clusterwatch_dir_newest_file_age_seconds",
            &[on("wal-archive")]
        )
        .is_some_and(|a| a < 60.0));
    Ok(())
}

/// Every metric a real scrape of every collector emits is in the README's metric reference.
#[tokio::test]
async fn readme_documents_every_emitted_metric() -> Result<()> {
    let readme =
        std::fs::read_to_string(clusterwatch_tests::harness::repo_root().join("README.md"))?;
    let pair = PgCluster::start_pair().await?;
    let config = format!(
        "filesystems: {{}}\nsystem: {{}}\ndirectories:\n  - {{ name: archive, path: '{}' }}\npostgres:\n  - {{ name: primary, cluster: pg, dsn: '{}', expected_standbys: 1 }}\n  - {{ name: standby, cluster: pg, dsn: '{}' }}\n  - {{ name: wrong, dsn: '{}' }}\n",
        pair.primary.archive_dir().display(),
        pair.primary.monitor_dsn(),
        pair.standby.monitor_dsn(),
        pair.primary.dsn_for("monitor", "not-the-password"),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    pair.primary
        .psql("SELECT pg_create_physical_replication_slot('spare')")
        .await?;
    pair.primary.switch_wal().await?;
    let m = until(&cw, "a full scrape", |m| Ok(streaming_seen_from_primary(m))).await?;
    let mut names: Vec<&str> = m.samples.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    names.dedup();
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from the README's metric reference: {missing:?}"
    );
    assert!(
        names.len() > 60,
        "only {} metric names scraped",
        names.len()
    );
    Ok(())
}

#[tokio::test]
async fn missing_privilege_is_reported_once_and_the_rest_still_works() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    pair.primary
        .psql("CREATE ROLE plain LOGIN PASSWORD 'plainpass'")
        .await?;
    let config = format!(
        "postgres:\n  - {{ name: plain, cluster: pg, dsn: '{}' }}\n",
        pair.primary.dsn_for("plain", "plainpass")
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let mut last = None;
    for _ in 0..3 {
        last = Some(scrape(&cw).await?);
    }
    let m = last.expect("scraped");
    assert_eq!(m.value("clusterwatch_target_up", &[on("plain")]), Some(1.0));
    assert_eq!(
        m.value("clusterwatch_pg_role", &[on("plain"), ("role", "primary")]),
        Some(1.0)
    );
    // Functions reserved to pg_monitor fail; everything else is still reported.
    for query in ["wal_dir", "archive_status"] {
        assert_eq!(
            m.value(
                "clusterwatch_pg_query_success",
                &[on("plain"), ("query", query)]
            ),
            Some(0.0),
            "{query}"
        );
    }
    assert_eq!(
        m.value(
            "clusterwatch_pg_query_success",
            &[on("plain"), ("query", "archiver")]
        ),
        Some(1.0)
    );
    assert!(m
        .value("clusterwatch_pg_archiver_archived_total", &[on("plain")])
        .is_some());
    assert!(m
        .value("clusterwatch_pg_wal_dir_bytes", &[on("plain")])
        .is_none());
    let logs = cw.logs();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("query failed") && l.contains("query=wal_dir"))
        .count();
    assert_eq!(warnings, 1, "logged once, not per scrape:\n{logs}");
    assert!(
        logs.contains("pg_monitor"),
        "the log says which grant fixes it:\n{logs}"
    );
    Ok(())
}

/// repmgr's own extension (Debian package `repmgr`) provides the node table, as
/// `repmgr primary register` / `standby register` would fill it.
#[tokio::test]
async fn repmgr_node_table_is_reported_once_readable() -> Result<()> {
    let pair = PgCluster::start_pair().await?;
    pair.primary.create_repmgr_nodes().await?;
    let cw = watch(&pair).await?;
    // pg_monitor does not cover repmgr's schema: reported, the rest works.
    let m = until(&cw, "the repmgr query to be tried", |m| {
        Ok(m.value(
            "clusterwatch_pg_query_success",
            &[on("primary"), ("query", "repmgr")],
        ) == Some(0.0))
    })
    .await?;
    assert_eq!(
        m.value("clusterwatch_target_up", &[on("primary")]),
        Some(1.0)
    );

    pair.primary.grant_repmgr().await?;
    let m = until(&cw, "repmgr nodes on both servers", |m| {
        Ok(m.value(
            "clusterwatch_pg_query_success",
            &[on("primary"), ("query", "repmgr")],
        ) == Some(1.0)
            && m.value(
                "clusterwatch_pg_query_success",
                &[on("standby"), ("query", "repmgr")],
            ) == Some(1.0))
    })
    .await?;
    for node in ["primary", "standby"] {
        let t = ("target", node);
        assert_eq!(
            m.value(
                "clusterwatch_pg_repmgr_node_role",
                &[t, ("node_name", "node1"), ("role", "primary")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "clusterwatch_pg_repmgr_node_role",
                &[t, ("node_name", "node2"), ("role", "standby")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "clusterwatch_pg_repmgr_node_role",
                &[t, ("node_name", "node2"), ("role", "primary")]
            ),
            Some(0.0)
        );
        assert_eq!(
            m.value(
                "clusterwatch_pg_repmgr_node_active",
                &[t, ("node_name", "node2")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "clusterwatch_pg_repmgr_node_upstream_info",
                &[t, ("node_name", "node2"), ("upstream", "node1")]
            ),
            Some(1.0)
        );
    }
    assert!(
        !m.mentions("hunter2"),
        "repmgr's conninfo never reaches the metrics"
    );
    Ok(())
}
