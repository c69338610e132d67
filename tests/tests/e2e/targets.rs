//! What every target may carry whatever its collector, on real `redis-server`s: its own
//! `labels:` on all of its series, and `active_when:` making a probe run only on the master.

use std::time::Duration;

use anyhow::Result;
use clusterwatch_tests::exposition::{scrape_until, Exposition};
use clusterwatch_tests::harness::{Clusterwatch, RedisPair};

const WAIT: Duration = Duration::from_secs(60);

fn active(m: &Exposition, target: &str) -> Option<f64> {
    m.value(
        "clusterwatch_target_active",
        &[("collector", "probe"), ("target", target)],
    )
}

fn up(m: &Exposition, target: &str) -> Option<f64> {
    m.value(
        "clusterwatch_target_up",
        &[("collector", "probe"), ("target", target)],
    )
}

#[tokio::test]
async fn a_master_only_probe_runs_where_redis_is_master_and_carries_its_labels() -> Result<()> {
    let pair = RedisPair::start().await?;
    pair.wait_replication_up(WAIT).await?;
    let config = format!(
        "redis:\n  - {{ name: one, address: '{m}', labels: {{ team: cache, role: mine }} }}\n  - {{ name: two, address: '{r}' }}\n\
         probes:\n  - {{ name: app-on-one, tcp: {{ address: '{ma}' }}, labels: {{ page: 'no' }}, active_when: {{ target: one, metric: clusterwatch_redis_role, role: master }} }}\n  - {{ name: app-on-two, tcp: {{ address: '{ra}' }}, active_when: {{ target: two, role: master }} }}\n",
        m = pair.master.url(),
        r = pair.replica.url(),
        ma = pair.master.addr(),
        ra = pair.replica.addr(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let m = scrape_until(&cw, WAIT, "the probe on the master to run", |m| {
        Ok(up(m, "app-on-one") == Some(1.0))
    })
    .await?;
    assert_eq!(active(&m, "app-on-one"), Some(1.0));
    assert_eq!(active(&m, "app-on-two"), Some(0.0));
    assert_eq!(
        up(&m, "app-on-two"),
        None,
        "an inactive target has no up series"
    );
    assert!(
        m.find("clusterwatch_probe_success", &[("target", "app-on-two")])
            .is_empty(),
        "an inactive probe is not run"
    );
    // Labels on the collector's series and the engine's, on an active conditional target too.
    assert_eq!(
        m.value(
            "clusterwatch_target_up",
            &[
                ("collector", "probe"),
                ("target", "app-on-one"),
                ("page", "no")
            ]
        ),
        Some(1.0)
    );
    assert!(!m
        .find(
            "clusterwatch_probe_success",
            &[("target", "app-on-one"), ("page", "no")]
        )
        .is_empty());
    // `role: mine` gives way to the collector's own `role` label on the role state-set.
    assert_eq!(
        m.value(
            "clusterwatch_redis_role",
            &[("target", "one"), ("team", "cache"), ("role", "master")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_redis_uptime_seconds",
            &[("target", "one"), ("role", "mine")]
        )
        .map(|v| v >= 0.0),
        Some(true)
    );
    assert_eq!(
        m.value(
            "clusterwatch_target_scrape_errors_total",
            &[("target", "one"), ("reason", "timeout"), ("team", "cache")]
        ),
        Some(0.0)
    );

    // The replica is promoted: its probe starts in the scrape that sees it master.
    pair.replica.cli(&["REPLICAOF", "NO", "ONE"]).await?;
    let m = scrape_until(&cw, WAIT, "the probe on the promoted replica to run", |m| {
        Ok(active(m, "app-on-two") == Some(1.0))
    })
    .await?;
    assert_eq!(up(&m, "app-on-two"), Some(1.0));
    Ok(())
}
