//! Program checks and log matching through the running binary, against real things: the SRE
//! data-version query run by `psql` against a real PostgreSQL with a password file, and a log
//! rotated by the real `logrotate`, both ways (`create` and `copytruncate`).

use std::time::Duration;

use anyhow::{Context, Result};
use clusterwatch_tests::exposition::{scrape, scrape_until, Exposition};
use clusterwatch_tests::harness::postgres::{MONITOR_PASSWORD, MONITOR_USER};
use clusterwatch_tests::harness::process::find_program;
use clusterwatch_tests::harness::{repo_root, temp_dir, Clusterwatch, PgNode};

const WAIT: Duration = Duration::from_secs(30);

/// Every metric of `subsystem` in a real scrape is in the README's metric reference.
fn documented(m: &Exposition, subsystem: &str) -> Result<()> {
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let prefix = format!("clusterwatch_{subsystem}_");
    let names: Vec<&str> = m
        .samples
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    anyhow::ensure!(names.len() >= 5, "only {names:?}");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    anyhow::ensure!(missing.is_empty(), "not in README.md: {missing:?}");
    Ok(())
}

#[tokio::test]
async fn the_data_version_query_runs_through_psql_with_a_password_file() -> Result<()> {
    let node = PgNode::start_primary("program-check").await?;
    node.psql("CREATE TABLE data_version (version int); INSERT INTO data_version VALUES (41)")
        .await?;
    node.psql(&format!("GRANT SELECT ON data_version TO {MONITOR_USER}"))
        .await?;
    let dir = temp_dir("cw-program-")?;
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "127.0.0.1:{}:postgres:{MONITOR_USER}:{MONITOR_PASSWORD}\n",
            node.port()
        ),
    )?;
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let config = format!(
        "programs:\n  - name: data-version\n    interval: 1s\n    timeout: 10s\n    command: [psql, -XAtq, -h, 127.0.0.1, -p, '{port}', -U, {MONITOR_USER}, -d, postgres, -w, -c, 'select max(version) from data_version']\n    env: {{ PGPASSFILE: '{pgpass}' }}\n    value: true\n",
        port = node.port(),
        pgpass = pgpass.display(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let value =
        |m: &Exposition| m.value("clusterwatch_program_value", &[("target", "data-version")]);
    scrape_until(&cw, WAIT, "the data version is read", |m| {
        Ok(value(m) == Some(41.0))
    })
    .await?;
    node.psql("INSERT INTO data_version VALUES (42)").await?;
    let m = scrape_until(&cw, WAIT, "the new data version is read", |m| {
        Ok(value(m) == Some(42.0))
    })
    .await?;
    assert_eq!(
        m.value(
            "clusterwatch_program_success",
            &[("target", "data-version")]
        ),
        Some(1.0)
    );

    // The table is gone: psql exits 1, the check fails and says how.
    node.psql("ALTER TABLE data_version RENAME TO data_version_old")
        .await?;
    let m = scrape_until(&cw, WAIT, "the check fails", |m| {
        Ok(m.value(
            "clusterwatch_program_success",
            &[("target", "data-version")],
        ) == Some(0.0))
    })
    .await?;
    assert_eq!(
        m.value(
            "clusterwatch_program_exit_code",
            &[("target", "data-version")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_program_result",
            &[("target", "data-version"), ("result", "exit_nonzero")]
        ),
        Some(1.0)
    );
    documented(&m, "program")?;
    let (_, _, body) = cw.get("/metrics").await?;
    for text in [body, cw.logs()] {
        assert!(!text.contains(MONITOR_PASSWORD), "the password leaked");
    }
    Ok(())
}

#[tokio::test]
async fn a_log_is_followed_across_logrotate_create_and_copytruncate() -> Result<()> {
    let logrotate = find_program("CLUSTERWATCH_LOGROTATE", &["logrotate"])
        .context("logrotate is missing: apt-get install logrotate")?;
    let dir = temp_dir("cw-log-")?;
    let log = dir.path().join("app.log");
    // History that must not count: an ERROR far past the first 64 KiB.
    std::fs::write(
        &log,
        format!("{}ERROR before start\n", "INFO ok\n".repeat(170 * 128)),
    )?;
    let config = format!(
        "logs:\n  - {{ name: app, path: '{}', patterns: {{ error: 'ERROR', oom: 'Out of memory' }} }}\n",
        log.display()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let errors = |m: &Exposition| {
        m.value(
            "clusterwatch_log_matches_total",
            &[("target", "app"), ("pattern", "error")],
        )
    };
    let m = scrape(&cw).await?;
    assert_eq!(errors(&m), Some(0.0));
    assert_eq!(
        m.value(
            "clusterwatch_log_matches_total",
            &[("target", "app"), ("pattern", "oom")]
        ),
        Some(0.0)
    );

    let append = |text: &str| -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };
    let rotate = |how: &str| -> Result<()> {
        let conf = dir.path().join("logrotate.conf");
        std::fs::write(
            &conf,
            format!(
                "{} {{\n  rotate 3\n  {how}\n  missingok\n}}\n",
                log.display()
            ),
        )?;
        let out = std::process::Command::new(&logrotate)
            .arg("-f")
            .arg("-s")
            .arg(dir.path().join("logrotate.state"))
            .arg(&conf)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "logrotate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };

    append("ERROR one\n")?;
    scrape_until(&cw, WAIT, "one error", |m| Ok(errors(m) == Some(1.0))).await?;

    // `create`: the last line of the old file and the first of the new one both count.
    append("ERROR two, in the file about to be rotated\n")?;
    rotate("create")?;
    append("ERROR three, in the new file\n")?;
    let m = scrape_until(&cw, WAIT, "three errors", |m| Ok(errors(m) == Some(3.0))).await?;
    assert_eq!(
        m.value("clusterwatch_log_rotations_total", &[("target", "app")]),
        Some(1.0)
    );

    // `copytruncate`: the file shrinks under the read position.
    append(&"INFO padding\n".repeat(50))?;
    scrape(&cw).await?;
    rotate("copytruncate")?;
    append("ERROR four, after the truncation\n")?;
    let m = scrape_until(&cw, WAIT, "four errors", |m| Ok(errors(m) == Some(4.0))).await?;
    assert_eq!(
        m.value("clusterwatch_log_truncations_total", &[("target", "app")]),
        Some(1.0)
    );
    let last = m
        .value(
            "clusterwatch_log_last_match_timestamp_seconds",
            &[("target", "app"), ("pattern", "error")],
        )
        .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!((now - last).abs() < 60.0, "last match at {last}, now {now}");
    documented(&m, "log")?;
    Ok(())
}
