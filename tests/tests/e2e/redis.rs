//! The Redis collector through the states a master/replica pair passes through on real
//! `redis-server`s: healthy, split brain after `REPLICAOF NO ONE`, master killed, replica
//! re-pointed, an instance frozen with SIGSTOP, and password and ACL-user authentication.

use std::time::Duration;

use anyhow::{bail, Result};
use clusterwatch_tests::exposition::{scrape, scrape_until, Exposition};
use clusterwatch_tests::harness::{Clusterwatch, RedisNode, RedisPair, TestCertificates};

const WAIT: Duration = Duration::from_secs(60);

fn on(target: &'static str) -> (&'static str, &'static str) {
    ("target", target)
}

/// An exporter watching both instances of `pair` as cluster `r`, `master` and `replica`.
async fn watch(pair: &RedisPair, timeout: &str) -> Result<Clusterwatch> {
    let config = format!(
        "global:\n  timeout: {timeout}\nredis:\n  - {{ name: master, cluster: r, address: '{}' }}\n  - {{ name: replica, cluster: r, address: '{}' }}\n",
        pair.master.url(),
        pair.replica.url(),
    );
    Clusterwatch::start(Some(&config), &[]).await
}

fn role(m: &Exposition, target: &'static str, role: &str) -> Option<f64> {
    m.value("clusterwatch_redis_role", &[on(target), ("role", role)])
}

fn up(m: &Exposition, target: &'static str) -> Option<f64> {
    m.value(
        "clusterwatch_target_up",
        &[("collector", "redis"), on(target)],
    )
}

fn errors(m: &Exposition, target: &'static str, reason: &str) -> f64 {
    m.value(
        "clusterwatch_target_scrape_errors_total",
        &[("collector", "redis"), on(target), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

fn link_up(m: &Exposition, target: &'static str) -> Option<f64> {
    m.value("clusterwatch_redis_master_link_up", &[on(target)])
}

#[tokio::test]
async fn healthy_pair_has_one_master_and_a_linked_replica_with_small_lag() -> Result<()> {
    healthy_pair(&RedisPair::start().await?).await
}

/// One master, a linked replica with small lag, offsets and uptime. Also run by the
/// version matrix.
pub(crate) async fn healthy_pair(pair: &RedisPair) -> Result<()> {
    pair.master.cli(&["SET", "greeting", "hello"]).await?;
    let cw = watch(pair, "3s").await?;
    let replica_addr = pair.replica.addr();
    let m = scrape_until(&cw, WAIT, "the master to list its replica online", |m| {
        Ok(m.value(
            "clusterwatch_redis_connected_replica_state",
            &[
                on("master"),
                ("replica", &replica_addr),
                ("state", "online"),
            ],
        ) == Some(1.0))
    })
    .await?;
    assert_eq!(up(&m, "master"), Some(1.0));
    assert_eq!(up(&m, "replica"), Some(1.0));
    assert_eq!(role(&m, "master", "master"), Some(1.0));
    assert_eq!(role(&m, "master", "replica"), Some(0.0));
    assert_eq!(role(&m, "replica", "replica"), Some(1.0));
    assert_eq!(role(&m, "replica", "master"), Some(0.0));
    let masters = m
        .find(
            "clusterwatch_redis_role",
            &[("cluster", "r"), ("role", "master")],
        )
        .iter()
        .filter(|s| s.value == 1.0)
        .count();
    assert_eq!(masters, 1);
    assert_eq!(
        m.value("clusterwatch_redis_connected_replicas", &[on("master")]),
        Some(1.0)
    );
    let lag = m
        .value(
            "clusterwatch_redis_connected_replica_lag_bytes",
            &[on("master"), ("replica", &replica_addr)],
        )
        .expect("per-replica lag");
    assert!((0.0..1024.0).contains(&lag), "lag of an idle pair: {lag}");
    assert_eq!(link_up(&m, "replica"), Some(1.0));
    assert_eq!(
        m.value(
            "clusterwatch_redis_master_link_down_seconds",
            &[on("replica")]
        ),
        Some(0.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_redis_master_sync_in_progress",
            &[on("replica")]
        ),
        Some(0.0)
    );
    let master_port = pair.master.port().to_string();
    assert_eq!(
        m.value(
            "clusterwatch_redis_master_info",
            &[
                on("replica"),
                ("master_host", "127.0.0.1"),
                ("master_port", &master_port)
            ]
        ),
        Some(1.0)
    );
    let lag = m.value("clusterwatch_redis_replica_lag_bytes", &[on("replica")]);
    assert!(lag.is_some_and(|v| v < 1024.0), "{lag:?}");
    // An idle pair catches up completely, seen from both sides: the replica has applied
    // everything the master wrote, and has acknowledged it (acks go out once a second, so
    // the master's view trails for a moment after each write or replication ping).
    let offset = |m: &Exposition, t: &'static str| {
        m.value("clusterwatch_redis_replication_offset_bytes", &[on(t)])
            .unwrap_or(-1.0)
    };
    scrape_until(
        &cw,
        WAIT,
        "the replica caught up, as both sides see it",
        |m| {
            let acked = m.value(
                "clusterwatch_redis_connected_replica_lag_bytes",
                &[on("master"), ("replica", &replica_addr)],
            );
            Ok(offset(m, "master") > 0.0
                && offset(m, "replica") == offset(m, "master")
                && acked == Some(0.0))
        },
    )
    .await?;
    assert!(
        link_up(&m, "master").is_none(),
        "a master has no master link"
    );
    assert_eq!(
        m.value("clusterwatch_redis_rdb_last_save_success", &[on("master")]),
        Some(1.0)
    );
    assert!(m
        .value("clusterwatch_redis_memory_used_bytes", &[on("master")])
        .is_some_and(|v| v > 0.0));
    assert_eq!(
        m.value("clusterwatch_redis_memory_max_bytes", &[on("master")]),
        Some(0.0)
    );
    assert!(m
        .value("clusterwatch_redis_uptime_seconds", &[on("replica")])
        .is_some_and(|v| v >= 0.0));
    Ok(())
}

#[tokio::test]
async fn replicaof_no_one_shows_two_masters_in_one_cluster() -> Result<()> {
    replicaof_no_one_shows_two_masters(&RedisPair::start().await?).await
}

/// `REPLICAOF NO ONE` on the replica: two masters in one cluster, no stale replica series.
/// Leaves the pair split. Also run by the version matrix.
pub(crate) async fn replicaof_no_one_shows_two_masters(pair: &RedisPair) -> Result<()> {
    let cw = watch(pair, "3s").await?;
    scrape_until(&cw, WAIT, "a linked replica", |m| {
        Ok(link_up(m, "replica") == Some(1.0))
    })
    .await?;

    let answer = pair.replica.cli(&["REPLICAOF", "NO", "ONE"]).await?;
    assert_eq!(answer, "OK");
    let m = scrape_until(&cw, WAIT, "the replica to report the master role", |m| {
        Ok(role(m, "replica", "master") == Some(1.0))
    })
    .await?;
    let masters: Vec<&str> = m
        .find(
            "clusterwatch_redis_role",
            &[("cluster", "r"), ("role", "master")],
        )
        .iter()
        .filter(|s| s.value == 1.0)
        .map(|s| s.labels["target"].as_str())
        .collect();
    assert_eq!(masters, vec!["master", "replica"], "split brain is visible");
    // The old role is 0, not gone or stale, and the replica-only series are gone.
    assert_eq!(role(&m, "replica", "replica"), Some(0.0));
    assert!(link_up(&m, "replica").is_none());
    assert!(m
        .find("clusterwatch_redis_master_info", &[on("replica")])
        .is_empty());
    // The old master lost its replica.
    scrape_until(&cw, WAIT, "the old master to count no replica", |m| {
        Ok(m.value("clusterwatch_redis_connected_replicas", &[on("master")]) == Some(0.0))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn master_killed_then_replica_repointed() -> Result<()> {
    let mut pair = RedisPair::start().await?;
    let cw = watch(&pair, "2s").await?;
    scrape_until(&cw, WAIT, "a linked replica", |m| {
        Ok(link_up(m, "replica") == Some(1.0))
    })
    .await?;

    pair.master.kill9()?;
    let first = scrape_until(&cw, WAIT, "the replica to see its link down", |m| {
        Ok(link_up(m, "replica") == Some(0.0) && up(m, "master") == Some(0.0))
    })
    .await?;
    assert!(errors(&first, "master", "connect") >= 1.0);
    assert_eq!(up(&first, "replica"), Some(1.0));
    assert_eq!(role(&first, "replica", "replica"), Some(1.0));
    let down = |m: &Exposition| {
        m.value(
            "clusterwatch_redis_master_link_down_seconds",
            &[on("replica")],
        )
        .unwrap_or(-1.0)
    };
    let before = down(&first);
    assert!(before >= 0.0);
    // Redis counts whole seconds: wait until the count has moved on by at least two.
    let later = scrape_until(&cw, WAIT, "the link-down time to grow", |m| {
        Ok(down(m) >= before + 2.0)
    })
    .await?;
    assert_eq!(link_up(&later, "replica"), Some(0.0));

    // A new master elsewhere; the replica is pointed at it, as a failover script would.
    let new_master = RedisNode::standalone("new-master", None).await?;
    let port = new_master.port().to_string();
    assert_eq!(
        pair.replica.cli(&["REPLICAOF", "127.0.0.1", &port]).await?,
        "OK"
    );
    let m = scrape_until(
        &cw,
        WAIT,
        "the replica to be linked to the new master",
        |m| Ok(link_up(m, "replica") == Some(1.0)),
    )
    .await?;
    assert_eq!(
        m.value(
            "clusterwatch_redis_master_info",
            &[on("replica"), ("master_port", &port)]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.find("clusterwatch_redis_master_info", &[on("replica")])
            .len(),
        1,
        "no series left for the old master"
    );
    assert_eq!(
        m.value(
            "clusterwatch_redis_master_link_down_seconds",
            &[on("replica")]
        ),
        Some(0.0)
    );
    Ok(())
}

#[tokio::test]
async fn paused_instance_costs_only_its_deadline() -> Result<()> {
    let pair = RedisPair::start().await?;
    let cw = watch(&pair, "1s").await?;
    scrape_until(&cw, WAIT, "both instances up", |m| {
        Ok(up(m, "master") == Some(1.0) && up(m, "replica") == Some(1.0))
    })
    .await?;

    pair.master.pause()?;
    let outcome = async {
        // Once on the kept connection, once on a fresh one (connection setup must respect
        // the deadline too: the kernel accepts the TCP connection of a stopped process).
        for attempt in ["kept connection", "new connection"] {
            let started = tokio::time::Instant::now();
            let m = scrape(&cw).await?;
            let took = started.elapsed();
            if took > Duration::from_secs(3) {
                bail!("scrape with a paused master ({attempt}) took {took:?}");
            }
            assert_eq!(up(&m, "master"), Some(0.0), "{attempt}");
            assert_eq!(up(&m, "replica"), Some(1.0), "{attempt}");
            assert_eq!(role(&m, "replica", "replica"), Some(1.0), "{attempt}");
            assert!(m
                .find("clusterwatch_redis_role", &[on("master")])
                .is_empty());
            let spent = m
                .value(
                    "clusterwatch_target_scrape_duration_seconds",
                    &[("collector", "redis"), on("master")],
                )
                .unwrap_or(0.0);
            assert!((0.9..2.0).contains(&spent), "{attempt}: {spent}");
        }
        let m = scrape(&cw).await?;
        assert!(errors(&m, "master", "timeout") >= 2.0);
        anyhow::Ok(())
    }
    .await;
    pair.master.resume()?;
    outcome?;
    scrape_until(&cw, WAIT, "the resumed master to be up again", |m| {
        Ok(up(m, "master") == Some(1.0) && role(m, "master", "master") == Some(1.0))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn password_and_acl_user_authenticate_and_failures_say_auth() -> Result<()> {
    const PASSWORD: &str = "pw-7f3e9c1d";
    const MONITOR_PASSWORD: &str = "mon-55aa0c2e";
    let pair = RedisPair::start_with_password(PASSWORD).await?;
    // A least-privilege ACL user that may run INFO and nothing else, and one that may not.
    for (user, rights) in [("monitor", "+info"), ("nobody", "+ping")] {
        let pass = format!(">{MONITOR_PASSWORD}");
        let answer = pair
            .master
            .cli(&["ACL", "SETUSER", user, "on", &pass, rights])
            .await?;
        assert_eq!(answer, "OK");
    }
    let dir = clusterwatch_tests::harness::temp_dir("cw-redis-auth-")?;
    let write = |name: &str, text: &str| -> Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{text}\n"))?;
        Ok(path.display().to_string())
    };
    let good = write("good.pass", PASSWORD)?;
    let bad = write("bad.pass", "not-the-password")?;
    let monitor = write("monitor.pass", MONITOR_PASSWORD)?;
    let url = pair.master.url();
    let config = format!(
        "global:\n  timeout: 3s\nredis:\n\
         \x20 - {{ name: with-password, address: '{url}', password_file: '{good}' }}\n\
         \x20 - {{ name: wrong-password, address: '{url}', password_file: '{bad}' }}\n\
         \x20 - {{ name: no-password, address: '{url}' }}\n\
         \x20 - {{ name: acl-user, address: '{url}', username: monitor, password_file: '{monitor}' }}\n\
         \x20 - {{ name: acl-no-info, address: '{url}', username: nobody, password_file: '{monitor}' }}\n"
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let m = scrape_until(&cw, WAIT, "every target scraped once", |m| {
        Ok(up(m, "with-password") == Some(1.0) && up(m, "acl-user") == Some(1.0))
    })
    .await?;
    assert_eq!(role(&m, "acl-user", "master"), Some(1.0));
    assert_eq!(up(&m, "wrong-password"), Some(0.0));
    assert!(errors(&m, "wrong-password", "auth") >= 1.0);
    assert_eq!(up(&m, "no-password"), Some(0.0));
    assert!(errors(&m, "no-password", "auth") >= 1.0);
    assert_eq!(up(&m, "acl-no-info"), Some(0.0));
    assert!(errors(&m, "acl-no-info", "permission") >= 1.0);

    let (_, _, body) = cw.get("/metrics").await?;
    let (_, _, landing) = cw.get("/").await?;
    for secret in [PASSWORD, MONITOR_PASSWORD] {
        assert!(!body.contains(secret), "password in the metrics");
        assert!(!landing.contains(secret), "password on the landing page");
        assert!(!cw.logs().contains(secret), "password in the log");
    }
    Ok(())
}

#[tokio::test]
async fn tls_address_is_verified_against_the_configured_ca() -> Result<()> {
    let certs = TestCertificates::create().await?;
    let node = RedisNode::standalone_tls("tls", &certs).await?;
    let url = node.tls_url().expect("started with TLS");
    let config = format!(
        "global:\n  timeout: 3s\nredis:\n\
         \x20 - {{ name: trusted, address: '{url}', tls_ca_file: '{}' }}\n\
         \x20 - {{ name: system-roots, address: '{url}' }}\n",
        certs.ca_file().display()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let m = scrape_until(&cw, WAIT, "the TLS target up", |m| {
        Ok(up(m, "trusted") == Some(1.0))
    })
    .await?;
    assert_eq!(role(&m, "trusted", "master"), Some(1.0));
    // The test CA is not among the system's roots: the handshake must fail.
    assert_eq!(up(&m, "system-roots"), Some(0.0));
    assert!(
        errors(&m, "system-roots", "connect") >= 1.0,
        "{:?}",
        m.find(
            "clusterwatch_target_scrape_errors_total",
            &[on("system-roots")]
        )
    );
    Ok(())
}
