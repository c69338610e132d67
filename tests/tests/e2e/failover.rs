//! The whole chain on real servers, through the lab: a killed primary makes the rules pack's
//! failover alert fire, Alertmanager posts it to clusterwatch, the example hook promotes the
//! standby exactly once; and a healthy pair under write load with a short restart runs nothing.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::exposition::scrape;
use clusterwatch_tests::harness::wait_until;
use clusterwatch_tests::lab::drill::{drill, System, Timeline};
use clusterwatch_tests::lab::{Lab, LabSettings, PG_CLUSTER, REDIS_CLUSTER};

/// How long a drill may take: the alerts' `for` (2 min at most in the pack) and margins.
const DRILL_TIMEOUT: Duration = Duration::from_secs(300);

fn test_settings() -> LabSettings {
    LabSettings {
        scrape_interval: Duration::from_secs(1),
        group_wait: Duration::from_secs(0),
        ..LabSettings::default()
    }
}

/// Primaries of `cluster` in one scrape: (role metric, role value).
async fn primaries(lab: &Lab, metric: &str, role: &str, cluster: &str) -> Result<usize> {
    let metrics = scrape(&lab.clusterwatch).await?;
    Ok(metrics
        .find(metric, &[("role", role), ("cluster", cluster)])
        .iter()
        .filter(|sample| sample.value == 1.0)
        .count())
}

async fn run_drill(system: System) -> Result<(Lab, Timeline)> {
    let lab = Lab::up(test_settings()).await?;
    let timeline = drill(&lab.info()?, system, DRILL_TIMEOUT).await?;
    // The timeline is the point of the exercise: print it whatever happens next.
    println!("{timeline}");
    ensure!(
        timeline.complete(),
        "the failover did not complete:\n{timeline}\nclusterwatch log:\n{}",
        lab.clusterwatch.logs()
    );
    ensure!(
        timeline.hook_runs == 1,
        "one incident must be one hook run, saw {}",
        timeline.hook_runs
    );
    Ok((lab, timeline))
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_pg_primary_promotes_the_standby_once() -> Result<()> {
    let (lab, _) = run_drill(System::Pg).await?;
    ensure!(primaries(&lab, "clusterwatch_pg_role", "primary", PG_CLUSTER).await? == 1);
    // The promoted standby takes writes.
    lab.pg
        .standby
        .psql("CREATE TABLE after_failover (id int); INSERT INTO after_failover VALUES (1)")
        .await
        .context("the promoted standby does not accept writes")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_redis_master_promotes_the_replica_once() -> Result<()> {
    let (lab, _) = run_drill(System::Redis).await?;
    ensure!(primaries(&lab, "clusterwatch_redis_role", "master", REDIS_CLUSTER).await? == 1);
    let answer = lab
        .redis
        .replica
        .cli(&["SET", "after_failover", "1"])
        .await?;
    ensure!(
        answer == "OK",
        "the promoted replica refused a write: {answer}"
    );
    Ok(())
}

/// Two minutes of writes with a quick restart of both primaries: nothing fires, nothing runs.
#[tokio::test(flavor = "multi_thread")]
async fn steady_state_with_a_short_restart_runs_no_hook() -> Result<()> {
    const STEADY: Duration = Duration::from_secs(120);
    let mut lab = Lab::up(test_settings()).await?;
    lab.pg
        .primary
        .psql("CREATE TABLE load (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
        .await?;

    let started = Instant::now();
    let mut writes = 0u64;
    let mut restarted = false;
    while started.elapsed() < STEADY {
        // Writes fail while the primary restarts; that is the point of the restart.
        if lab
            .pg
            .primary
            .psql("INSERT INTO load DEFAULT VALUES")
            .await
            .is_ok()
        {
            writes += 1;
        }
        let _ = lab.redis.master.cli(&["INCR", "load"]).await;
        if !restarted && started.elapsed() > Duration::from_secs(30) {
            // Far shorter than the failover alerts' `for`.
            lab.pg.primary.stop().await?;
            lab.pg.primary.start().await?;
            lab.redis.master.stop()?;
            lab.redis.master.start().await?;
            restarted = true;
        }
    }
    ensure!(writes > 100, "the write load did not run ({writes} writes)");
    lab.pg.wait_streaming(Duration::from_secs(60)).await?;

    let metrics = scrape(&lab.clusterwatch).await?;
    let runs: f64 = metrics
        .find("clusterwatch_hook_runs_started_total", &[])
        .iter()
        .map(|sample| sample.value)
        .sum();
    ensure!(
        runs == 0.0,
        "a hook ran during a healthy steady state ({runs} runs)"
    );
    // Nothing failover-worthy fired at any point of the run.
    let fired = lab
        .prometheus
        .query(r#"max_over_time(ALERTS{action="failover",alertstate="firing"}[5m])"#)
        .await?;
    ensure!(
        fired["result"]
            .as_array()
            .is_some_and(|result| result.is_empty()),
        "a failover alert fired during the steady state: {fired}"
    );
    wait_until(
        Duration::from_secs(30),
        "one PostgreSQL primary",
        async || Ok(primaries(&lab, "clusterwatch_pg_role", "primary", PG_CLUSTER).await? == 1),
    )
    .await?;
    Ok(())
}
