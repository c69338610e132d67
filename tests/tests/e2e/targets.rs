//! What every target may carry whatever its collector, on real `redis-server`s: its own
//! `labels:` on all of its series, and `active_when:` making a probe run only on the master;
//! and `check-config`'s warnings, which are printed without failing it.

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

/// `check-config` prints warnings and still exits 0; beside an error it exits 1.
#[test]
fn check_config_warns_without_failing() -> Result<()> {
    let dir = clusterwatch_tests::harness::temp_dir("cw-warn")?;
    std::fs::write(dir.path().join("token"), "secret\n")?;
    let hooks = "hooks:\n  bearer_token_file: token\n  state_dir: st\n  rules:\n    - { name: h, match: { alertname: PostgresNoPrimry, cluster: 'db-.*' }, command: [/bin/true] }\n";
    let run = |yaml: &str| -> Result<std::process::Output> {
        let file = dir.path().join("c.yml");
        std::fs::write(&file, yaml)?;
        Ok(
            std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
                .arg("check-config")
                .arg(&file)
                .output()?,
        )
    };
    let out = run(hooks)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "warning: hooks.rules[0].match.cluster: `db-.*` looks like a regular expression"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("did you mean `PostgresNoPrimary`?"),
        "{stderr}"
    );

    let out = run(&format!(
        "{hooks}probes:\n  - {{ name: p, tcp: {{ address: '127.0.0.1:1' }}, labels: {{ job: x }} }}\n"
    ))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("probes[0].labels.job: label `job` is reserved"),
        "{stderr}"
    );
    assert!(stderr.contains(": 1 problem(s) found"), "{stderr}");
    Ok(())
}
