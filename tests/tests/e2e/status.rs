//! `clusterwatch status` and the landing page's status table: what an operator on the box
//! sees of a running clusterwatch — a target up in its role, a target down with its reason,
//! how long each has been so, and the hook runner's last decisions.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::harness::clusterwatch::binary;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab};
use clusterwatch_tests::harness::{free_port, wait_until, Clusterwatch};
use serde_json::json;

/// `clusterwatch status` against the instance, as the operator types it.
fn status(cw: &Clusterwatch) -> Result<String> {
    let out = Command::new(binary()?)
        .args([
            "status",
            "--web.listen-address",
            &format!("127.0.0.1:{}", cw.port()),
        ])
        .output()
        .context("running clusterwatch status")?;
    ensure!(
        out.status.success(),
        "clusterwatch status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The line of the table whose first two columns are `collector target`.
fn row<'a>(table: &'a str, collector: &str, target: &str) -> Option<Vec<&'a str>> {
    table.lines().find_map(|l| {
        let cols: Vec<&str> = l
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        (cols.first() == Some(&collector) && cols.get(1) == Some(&target)).then_some(cols)
    })
}

#[tokio::test]
async fn status_shows_each_target_its_role_reason_and_time_and_the_hook_decisions() -> Result<()> {
    let lab = HookLab::new()?;
    let hook = lab.recorder("promote", "exit 0")?;
    let role_file = lab.dir().join("role");
    std::fs::write(&role_file, "standby\n")?;
    let dead = free_port()?;
    let config = format!(
        "programs:\n  - {{ name: cluster-state, interval: 1s, command: [cat, {role}], states: [production, standby] }}\n\
         redis:\n  - {{ name: redis-gone, cluster: redis-9001, address: 'redis://127.0.0.1:{dead}' }}\n{hooks}",
        role = role_file.display(),
        hooks = lab.config(
            "",
            &format!(
                "    - {{ name: promote, match: {{ alertname: TestNoPrimary }}, command: [{}] }}\n",
                hook.display()
            )
        ),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;

    let table = status(&cw)?;
    let program = row(&table, "program", "cluster-state").context(table.clone())?;
    assert_eq!(program[2..5], ["-", "up", "standby"], "{table}");
    let redis = row(&table, "redis", "redis-gone").context(table.clone())?;
    assert_eq!(redis[2..4], ["redis-9001", "down (connect)"], "{table}");
    assert!(
        table.contains("hook runner, last decisions:\n  (none yet)"),
        "{table}"
    );

    // The role changes: the table says so, and for how long (a change it saw, so no `≥`).
    std::fs::write(&role_file, "production\n")?;
    wait_until(
        Duration::from_secs(20),
        "the status shows production",
        async || {
            let table = status(&cw)?;
            Ok(row(&table, "program", "cluster-state")
                .is_some_and(|r| r[4] == "production" && !r[6].starts_with('≥')))
        },
    )
    .await?;

    // A webhook decision appears under the table.
    let body = notification(
        "firing",
        "g1",
        vec![alert(
            "firing",
            json!({"alertname": "TestNoPrimary"}),
            "fp1",
            "2026-01-01T00:00:00Z",
        )],
    );
    assert_eq!(lab.post(body.to_string()).await?, reqwest::StatusCode::OK);
    wait_until(
        Duration::from_secs(20),
        "the decision is listed",
        async || Ok(status(&cw)?.contains("hook=promote")),
    )
    .await?;

    // The landing page: the same table in plain HTML, no script.
    let (code, _, html) = cw.get("/").await?;
    assert_eq!(code, reqwest::StatusCode::OK);
    assert!(
        html.contains("<tr class=\"down\"><td>redis</td><td>redis-gone</td><td>redis-9001</td><td>down (connect)</td>"),
        "{html}"
    );
    assert!(html.contains("<td>production</td>"), "{html}");
    assert!(html.contains("hook=promote"), "{html}");
    assert!(!html.to_lowercase().contains("<script"), "{html}");
    Ok(())
}

#[tokio::test]
async fn status_once_runs_the_collectors_here_and_a_missing_instance_is_explained() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cw.yml");
    std::fs::write(
        &config,
        "programs:\n  - { name: fails, command: [sh, -c, 'exit 3'] }\nfilesystems:\n  discover: false\n  mounts:\n    - { path: / }\n    - { path: /nonexistent/backups }\n",
    )?;
    let out = Command::new(binary()?)
        .arg("--config.file")
        .arg(&config)
        .args(["status", "--once"])
        .output()?;
    let table = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{table}");
    let program = row(&table, "program", "fails").context(table.clone())?;
    assert_eq!(program[3], "failing (exit_nonzero)", "{table}");
    assert!(program[5].starts_with("exit_nonzero"), "{table}");
    let fs = row(&table, "fs", "local").context(table.clone())?;
    assert!(fs[5].contains("1 configured path(s) not found"), "{table}");

    let port = free_port()?;
    let out = Command::new(binary()?)
        .args([
            "status",
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach clusterwatch") && err.contains("--once"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn status_shows_a_real_primary_and_standby_in_their_roles() -> Result<()> {
    let pair = clusterwatch_tests::harness::PgCluster::start_pair().await?;
    let config = format!(
        "postgres:\n  - {{ name: db1, cluster: sre-db, dsn: '{}' }}\n  - {{ name: db2, cluster: sre-db, dsn: '{}' }}\n",
        pair.primary.monitor_dsn(),
        pair.standby.monitor_dsn()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let table = status(&cw)?;
    let primary = row(&table, "pg", "db1").context(table.clone())?;
    assert_eq!(
        primary[2..6],
        ["sre-db", "up", "primary", "1 WAL sender(s)"],
        "{table}"
    );
    let standby = row(&table, "pg", "db2").context(table.clone())?;
    assert_eq!(standby[3..5], ["up", "standby"], "{table}");
    assert!(standby[5].starts_with("replay lag "), "{table}");
    for secret in [pair.primary.monitor_dsn(), "monitorpass".to_owned()] {
        assert!(!table.contains(&secret), "{table}");
    }
    Ok(())
}
