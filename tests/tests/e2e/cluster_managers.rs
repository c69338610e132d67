//! Cluster managers as an operator meets them: a real 3-member etcd cluster losing members
//! until quorum is gone, HAProxy in front of a Redis pair noticing a stopped master, and real
//! `crm_mon` reading saved Pacemaker CIBs (started, stopped, failed, standby, offline).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::{scrape_until, Exposition};
use clusterwatch_tests::harness::clusterwatch::binary;
use clusterwatch_tests::harness::haproxy::redis_backend;
use clusterwatch_tests::harness::process::run;
use clusterwatch_tests::harness::{free_port, Clusterwatch, EtcdCluster, Haproxy, RedisPair};

/// Elections and health checks take seconds; a loaded 2-core machine may take a minute.
const WAIT: Duration = Duration::from_secs(60);

fn member_value(m: &Exposition, name: &str, endpoint: &str) -> Option<f64> {
    m.value(name, &[("endpoint", endpoint)])
}

fn cluster_value(m: &Exposition, name: &str) -> Result<f64> {
    m.value(name, &[("target", "ce")])
        .with_context(|| format!("{name} missing"))
}

#[tokio::test]
async fn etcd_one_member_down_keeps_quorum_two_down_lose_it() -> Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let endpoints = etcd.endpoints();
    let config = format!(
        "global:\n  timeout: 4s\netcd:\n  - name: ce\n    cluster: clearwater\n    endpoints: [{}]\n",
        endpoints.join(", ")
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;

    let m = scrape_until(&cw, WAIT, "three healthy members and one leader", |m| {
        Ok(cluster_value(m, "clusterwatch_etcd_members_healthy")? == 3.0)
    })
    .await?;
    assert_eq!(cluster_value(&m, "clusterwatch_etcd_members")?, 3.0);
    assert_eq!(cluster_value(&m, "clusterwatch_etcd_quorum_held")?, 1.0);
    assert_eq!(cluster_value(&m, "clusterwatch_etcd_leader_present")?, 1.0);
    let leaders: f64 = endpoints
        .iter()
        .map(|e| member_value(&m, "clusterwatch_etcd_member_is_leader", e).unwrap_or(0.0))
        .sum();
    assert_eq!(leaders, 1.0, "exactly one leader");
    for e in &endpoints {
        assert_eq!(
            member_value(&m, "clusterwatch_etcd_member_up", e),
            Some(1.0)
        );
        assert!(member_value(&m, "clusterwatch_etcd_member_raft_term", e).unwrap() >= 2.0);
        assert!(member_value(&m, "clusterwatch_etcd_member_raft_index", e).unwrap() > 0.0);
        assert!(
            member_value(&m, "clusterwatch_etcd_member_leader_changes_seen_total", e).unwrap()
                >= 1.0
        );
    }
    assert_eq!(
        m.value("clusterwatch_target_up", &[("collector", "etcd")]),
        Some(1.0)
    );

    etcd.member(0).process().kill9()?;
    let m = scrape_until(&cw, WAIT, "two healthy members, quorum held", |m| {
        Ok(
            cluster_value(m, "clusterwatch_etcd_members_healthy")? == 2.0
                && cluster_value(m, "clusterwatch_etcd_leader_present")? == 1.0,
        )
    })
    .await?;
    assert_eq!(cluster_value(&m, "clusterwatch_etcd_quorum_held")?, 1.0);
    assert_eq!(
        member_value(&m, "clusterwatch_etcd_member_up", &endpoints[0]),
        Some(0.0)
    );
    assert_eq!(
        member_value(&m, "clusterwatch_etcd_member_healthy", &endpoints[0]),
        Some(0.0)
    );

    etcd.member(1).process().kill9()?;
    let m = scrape_until(&cw, WAIT, "quorum lost", |m| {
        Ok(cluster_value(m, "clusterwatch_etcd_quorum_held")? == 0.0
            && cluster_value(m, "clusterwatch_etcd_leader_present")? == 0.0)
    })
    .await?;
    assert_eq!(cluster_value(&m, "clusterwatch_etcd_members_healthy")?, 0.0);
    // The survivor still answers: it is up, but has no leader and is not healthy.
    let survivor = &endpoints[2];
    assert_eq!(
        member_value(&m, "clusterwatch_etcd_member_up", survivor),
        Some(1.0)
    );
    assert_eq!(
        member_value(&m, "clusterwatch_etcd_member_has_leader", survivor),
        Some(0.0)
    );
    assert_eq!(
        m.value("clusterwatch_target_up", &[("collector", "etcd")]),
        Some(1.0),
        "losing quorum is what the target reports, not a failed scrape"
    );
    Ok(())
}

fn server_state(m: &Exposition, target: &str, server: &str, state: &str) -> Option<f64> {
    m.value(
        "clusterwatch_haproxy_server_status",
        &[
            ("target", target),
            ("backend", "redis_9001"),
            ("server", server),
            ("state", state),
        ],
    )
}

#[tokio::test]
async fn haproxy_shows_a_stopped_redis_master_down() -> Result<()> {
    let mut pair = RedisPair::start().await?;
    let backend = redis_backend("redis_9001", free_port()?, &[&pair.master, &pair.replica]);
    let haproxy = Haproxy::start(&backend).await?;
    let config = format!(
        "haproxy:\n  - {{ name: http, cluster: redis-9001, url: '{}' }}\n  - {{ name: socket, cluster: redis-9001, url: 'unix://{}' }}\n",
        haproxy.stats_url(),
        haproxy.socket().display()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;

    // The seed's layout: only the master passes `role:master`, so the replica is DOWN.
    let m = scrape_until(&cw, WAIT, "master UP, replica DOWN", |m| {
        Ok(["http", "socket"].iter().all(|t| {
            server_state(m, t, "master", "up") == Some(1.0)
                && server_state(m, t, "replica", "down") == Some(1.0)
        }))
    })
    .await?;
    for t in ["http", "socket"] {
        let backend = [("target", t), ("backend", "redis_9001")];
        assert_eq!(
            m.value("clusterwatch_haproxy_backend_up", &backend),
            Some(1.0)
        );
        assert_eq!(
            m.value("clusterwatch_haproxy_backend_active_servers", &backend),
            Some(1.0)
        );
        assert_eq!(
            m.value("clusterwatch_haproxy_backend_servers", &backend),
            Some(2.0)
        );
    }
    assert!(
        m.find(
            "clusterwatch_haproxy_server_status",
            &[("server", "master")]
        )
        .len()
            == 2 * 6,
        "every state of the master is present for both targets"
    );

    pair.master.stop()?;
    let m = scrape_until(&cw, WAIT, "master DOWN, backend without servers", |m| {
        Ok(server_state(m, "http", "master", "down") == Some(1.0)
            && m.value(
                "clusterwatch_haproxy_backend_active_servers",
                &[("target", "http"), ("backend", "redis_9001")],
            ) == Some(0.0))
    })
    .await?;
    assert_eq!(server_state(&m, "http", "master", "up"), Some(0.0));
    assert_eq!(
        m.value(
            "clusterwatch_haproxy_backend_up",
            &[("target", "http"), ("backend", "redis_9001")]
        ),
        Some(0.0)
    );
    assert!(
        m.value(
            "clusterwatch_haproxy_server_check_downs_total",
            &[("target", "http"), ("server", "master")]
        )
        .unwrap()
            >= 1.0
    );
    Ok(())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pacemaker")
        .join(name)
}

/// `clusterwatch once` with only a `pacemaker:` section, crm_mon reading `cib` via `CIB_file`.
async fn once_on_cib(cib: &Path) -> Result<Exposition> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("clusterwatch.yml");
    std::fs::write(&config, "pacemaker:\n  name: sre\n  timeout: 20s\n")?;
    let mut command = Command::new(binary()?);
    command
        .arg("once")
        .arg("--config.file")
        .arg(&config)
        .env("CIB_file", cib);
    let out = run(command, Duration::from_secs(60)).await?;
    let m = Exposition::parse(&out)?;
    if m.value("clusterwatch_target_up", &[("collector", "pacemaker")]) != Some(1.0) {
        bail!("the pacemaker target is down:\n{out}");
    }
    Ok(m)
}

#[tokio::test]
async fn pacemaker_saved_cibs_through_real_crm_mon() -> Result<()> {
    let m = once_on_cib(&fixture("mixed.xml")).await?;
    // Where is the VIP? One series names the node.
    let vip = m.find(
        "clusterwatch_pacemaker_resource_running",
        &[("resource", "vip")],
    );
    assert_eq!(vip.len(), 1, "{vip:?}");
    assert_eq!(vip[0].labels["node"], "em1");
    assert_eq!(vip[0].labels["type"], "ocf:heartbeat:IPaddr2");
    let node = |m: &Exposition, n: &str, s: &str| {
        m.value(
            "clusterwatch_pacemaker_node_state",
            &[("node", n), ("state", s)],
        )
    };
    assert_eq!(node(&m, "em1", "online"), Some(1.0));
    assert_eq!(node(&m, "em3", "standby"), Some(1.0));
    assert_eq!(node(&m, "em3", "online"), Some(0.0));
    let res = |m: &Exposition, name: &str, r: &str| m.value(name, &[("resource", r)]);
    assert_eq!(
        res(&m, "clusterwatch_pacemaker_resource_failed", "app"),
        Some(1.0)
    );
    assert_eq!(
        res(&m, "clusterwatch_pacemaker_resource_failed", "vip"),
        Some(0.0)
    );
    assert_eq!(
        res(
            &m,
            "clusterwatch_pacemaker_resource_nodes_running",
            "backup"
        ),
        Some(0.0)
    );
    assert_eq!(
        res(&m, "clusterwatch_pacemaker_resource_disabled", "backup"),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_pacemaker_resource_fail_count",
            &[("resource", "app"), ("node", "em1")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_pacemaker_resource_role",
            &[("resource", "app"), ("node", "em2"), ("role", "started")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_pacemaker_failed_actions", &[]),
        Some(1.0)
    );
    assert_eq!(m.value("clusterwatch_pacemaker_quorum", &[]), Some(1.0));
    assert_eq!(m.value("clusterwatch_pacemaker_dc_present", &[]), Some(1.0));

    let m = once_on_cib(&fixture("no-quorum.xml")).await?;
    assert_eq!(node(&m, "em2", "offline"), Some(1.0));
    assert_eq!(m.value("clusterwatch_pacemaker_quorum", &[]), Some(0.0));
    assert_eq!(m.value("clusterwatch_pacemaker_dc_present", &[]), Some(0.0));
    assert_eq!(
        res(&m, "clusterwatch_pacemaker_resource_nodes_running", "app"),
        Some(0.0),
        "app stopped with its node gone"
    );
    Ok(())
}
