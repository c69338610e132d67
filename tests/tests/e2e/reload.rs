//! Live reload as an operator uses it: a broken edit is refused and the old configuration keeps
//! serving; a good edit (SIGHUP or `POST /-/reload`) adds, changes and removes targets in the
//! same process, while unchanged targets keep their connection, parse cache and failure streak.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::exposition::{scrape, scrape_until, Exposition};
use clusterwatch_tests::harness::redis::RedisNode;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{free_port, wait_until, Clusterwatch};
use nix::sys::signal::Signal;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn counters_csv(minute: u64) -> String {
    format!("cp1,request.INVITE,2022-05-10T16:31:00,{minute},12,11,13,12,12,12,12,12,12,12,12,12,12,12,12\n")
}

fn value(m: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.value(name, labels).unwrap_or(f64::NAN)
}

async fn connections_received(redis: &RedisNode) -> Result<u64> {
    let stats = redis.info("stats").await?;
    let n = stats
        .get("total_connections_received")
        .context("INFO stats has total_connections_received")?;
    Ok(n.parse()?)
}

async fn post_reload(cw: &Clusterwatch) -> Result<(u16, String)> {
    let response = cw
        .client()
        .post(cw.url("/-/reload"))
        .send()
        .await
        .context("POST /-/reload")?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

#[tokio::test]
async fn reload_refuses_a_broken_edit_and_applies_a_good_one_without_losing_state() -> Result<()> {
    let redis_a = RedisNode::standalone("reload-a", None).await?;
    let redis_b = RedisNode::standalone("reload-b", None).await?;
    let lab = HookLab::new()?;
    let note = lab.recorder("note", "exit 0")?;
    let csv = lab.dir().join("counters.csv");
    std::fs::write(&csv, counters_csv(1652193060))?;
    std::fs::write(lab.dir().join("token2"), "rotated-token-3c1d\n")?;
    let closed = free_port()?;

    let rules = format!(
        "    - {{ name: note, match: {{ alertname: ReloadTest }}, command: [{}] }}\n",
        note.display()
    );
    let hooks = lab.config("", &rules);
    let base = format!(
        "redis:\n  - {{ name: redis-a, address: {a} }}\n\
         probes:\n  - {{ name: closed, interval: 0s, tcp: {{ address: \"127.0.0.1:{closed}\" }} }}\n\
         sre_stats:\n  files:\n    - {{ name: sre-counters, path: {csv}, kind: events }}\n{hooks}",
        a = redis_a.url(),
        csv = csv.display(),
    );
    let mut cw = Clusterwatch::start(Some(&base), &[]).await?;
    let config_path = cw.config_path().context("started with a file")?.to_owned();
    let pid = cw.process().pid().context("clusterwatch runs")?;

    // State worth keeping: a failure streak, several parses, one connection, one hook run.
    for minute in [1652193120u64, 1652193180] {
        let want = value(
            &scrape(&cw).await?,
            "clusterwatch_sre_file_parses_total",
            &[("target", "sre-counters")],
        ) + 1.0;
        std::fs::write(&csv, counters_csv(minute))?;
        scrape_until(&cw, WAIT, "the rewritten stats file parsed", |m| {
            Ok(value(
                m,
                "clusterwatch_sre_file_parses_total",
                &[("target", "sre-counters")],
            ) >= want)
        })
        .await?;
    }
    let before = scrape_until(&cw, WAIT, "a failure streak of 3 and Redis up", |m| {
        Ok(value(
            m,
            "clusterwatch_probe_consecutive_failures",
            &[("target", "closed")],
        ) >= 3.0
            && value(m, "clusterwatch_target_up", &[("target", "redis-a")]) == 1.0)
    })
    .await?;
    let connections = connections_received(&redis_a).await?;
    let parses = value(
        &before,
        "clusterwatch_sre_file_parses_total",
        &[("target", "sre-counters")],
    );
    let streak = value(
        &before,
        "clusterwatch_probe_consecutive_failures",
        &[("target", "closed")],
    );
    let loaded_at = value(
        &before,
        "clusterwatch_config_last_reload_success_timestamp_seconds",
        &[],
    );
    assert_eq!(
        value(&before, "clusterwatch_config_last_reload_successful", &[]),
        1.0
    );
    let incident = notification(
        "firing",
        "{}:{alertname=\"ReloadTest\"}",
        vec![alert(
            "firing",
            json!({ "alertname": "ReloadTest" }),
            "f00d",
            "2026-01-01T00:00:00Z",
        )],
    );
    assert_eq!(lab.post(incident.to_string()).await?.as_u16(), 200);
    wait_until(WAIT, "the hook to run", async || {
        Ok(lab.invocations("note").len() == 1)
    })
    .await?;

    // A broken edit: refused with the problem and its line, the old configuration serves on.
    std::fs::write(&config_path, format!("{base}bogus_section:\n  x: 1\n"))?;
    let (status, body) = post_reload(&cw).await?;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("unknown section `bogus_section`"), "{body}");
    let m = scrape(&cw).await?;
    assert_eq!(
        value(&m, "clusterwatch_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "clusterwatch_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "clusterwatch_config_last_reload_success_timestamp_seconds",
            &[]
        ),
        loaded_at
    );
    assert_eq!(
        value(&m, "clusterwatch_target_up", &[("target", "redis-a")]),
        1.0
    );

    // What was opened at start cannot move under a running process: refused, by SIGHUP too.
    let moved = base.replace("/state", "/state-elsewhere");
    ensure!(moved != base, "the hooks section names a state dir");
    std::fs::write(&config_path, &moved)?;
    cw.process().signal(Signal::SIGHUP)?;
    scrape_until(&cw, WAIT, "the second refused reload", |m| {
        Ok(value(
            m,
            "clusterwatch_config_reloads_total",
            &[("result", "failure")],
        ) == 2.0)
    })
    .await?;
    assert!(
        cw.logs().contains("hooks.state_dir cannot change"),
        "{}",
        cw.logs()
    );

    // A good edit by SIGHUP: one more Redis target and a rotated webhook token.
    let good = base
        .replace(
            "redis:\n",
            &format!(
                "redis:\n  - {{ name: redis-b, address: {} }}\n",
                redis_b.url()
            ),
        )
        .replace("/token\n", "/token2\n");
    ensure!(
        good.contains("/token2"),
        "the token file was replaced: {good}"
    );
    std::fs::write(&config_path, &good)?;
    cw.process().signal(Signal::SIGHUP)?;
    let after = scrape_until(&cw, WAIT, "redis-b scraped after the reload", |m| {
        Ok(value(m, "clusterwatch_target_up", &[("target", "redis-b")]) == 1.0)
    })
    .await?;
    assert_eq!(cw.process().pid(), Some(pid), "no restart");
    assert_eq!(
        value(&after, "clusterwatch_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "clusterwatch_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "clusterwatch_config_last_reload_success_timestamp_seconds",
            &[]
        ) > loaded_at
    );
    // Each `info` here is one redis-cli connection of its own; clusterwatch made none.
    assert_eq!(
        connections_received(&redis_a).await?,
        connections + 1,
        "the running Redis target kept its connection"
    );
    assert!(
        value(
            &after,
            "clusterwatch_sre_file_parses_total",
            &[("target", "sre-counters")]
        ) >= parses,
        "the stats file's parse cache and counters were kept"
    );
    assert!(
        value(
            &after,
            "clusterwatch_probe_consecutive_failures",
            &[("target", "closed")]
        ) > streak,
        "the failure streak went on instead of starting again"
    );
    // The hook journal and decision state survive: the same incident is a repeat, and only
    // the rotated token is accepted now.
    assert_eq!(
        lab.post_with(Some(&format!("Bearer {TOKEN}")), incident.to_string())
            .await?
            .as_u16(),
        401
    );
    assert_eq!(
        lab.post_with(Some("Bearer rotated-token-3c1d"), incident.to_string())
            .await?
            .as_u16(),
        200
    );
    scrape_until(&cw, WAIT, "the repeat deduplicated", |m| {
        Ok(value(
            m,
            "clusterwatch_hook_skips_total",
            &[("hook", "note"), ("reason", "deduped")],
        ) == 1.0)
    })
    .await?;
    assert_eq!(lab.invocations("note").len(), 1);

    // A good edit by POST: redis-b goes away again, and its series with it.
    std::fs::write(&config_path, &base)?;
    let (status, body) = post_reload(&cw).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 stopped"), "{body}");
    let m = scrape(&cw).await?;
    assert!(m
        .find("clusterwatch_target_up", &[("target", "redis-b")])
        .is_empty());
    assert_eq!(
        value(&m, "clusterwatch_target_up", &[("target", "redis-a")]),
        1.0
    );
    assert_eq!(cw.process().pid(), Some(pid));
    Ok(())
}
