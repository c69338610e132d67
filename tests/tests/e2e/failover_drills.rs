//! PostgreSQL failover drills on the whole chain: a primary with two streaming standbys, three
//! clusterwatch observers that are also each host's hook receiver, Prometheus with the shipped
//! rules (PostgreSQL window 20 s) and Alertmanager routed like the example
//! (`lab::pg_failover`). A killed primary is replaced exactly once by the most advanced
//! standby, whose host alone runs fence → promote → repoint, and the other standby follows it;
//! a primary lost on one scrape in four pages nobody and runs nothing; a primary lost when the
//! only reachable standby is too far behind fires `PostgresFailoverNoCandidate`, promotes
//! nothing, and every receiver journals the refusal with its reason.
//!
//! Each drill runs once; `CW_DRILL_TRIALS=N` repeats each N times on a fresh stack and prints
//! the counts (trials, false failovers, double runs, kill → hook start).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::wait_until;
use clusterwatch_tests::lab::drill::unix_now;
use clusterwatch_tests::lab::pg_failover::{
    promql_range, PgFailoverStack, CLUSTER, FAILOVER_HOOK, GROUP_WAIT, NODES, REFUSAL_HOOK,
    SCRAPE_INTERVAL, WAIT, WINDOW,
};

/// The default maximum lag of a candidate (`clusterwatch_failover_max_lag_bytes` unset).
const MAX_LAG_BYTES: f64 = 1048576.0;

/// How many times each drill runs: `CW_DRILL_TRIALS`, default 1.
fn trials() -> Result<usize> {
    match std::env::var("CW_DRILL_TRIALS") {
        Err(_) => Ok(1),
        Ok(text) => match text.parse::<usize>() {
            Ok(count) if count > 0 => Ok(count),
            _ => bail!("CW_DRILL_TRIALS must be a positive whole number, not `{text}`"),
        },
    }
}

/// What the trials of one drill add up to, printed at the end.
#[derive(Default)]
struct Tally {
    trials: usize,
    /// Promotions where none should happen, or of the wrong node.
    false_failovers: usize,
    /// Incidents that started the failover hook more than once.
    double_runs: usize,
    /// Kill → the first `started` of the hook the drill expects (failover or refusal).
    to_hook_start: Vec<Duration>,
}

impl Tally {
    fn report(&self, drill: &str) -> String {
        let mut times = self.to_hook_start.clone();
        times.sort();
        let timing = match (times.first(), times.last()) {
            (Some(min), Some(max)) => format!(
                ", kill -> hook start min {:.1}s median {:.1}s max {:.1}s",
                min.as_secs_f64(),
                times[times.len() / 2].as_secs_f64(),
                max.as_secs_f64()
            ),
            _ => String::new(),
        };
        format!(
            "drill {drill}: {} trial(s), {} false failover(s), {} double run(s){timing}",
            self.trials, self.false_failovers, self.double_runs
        )
    }
}

/// How many failover runs started, on all hosts together.
fn failover_runs(stack: &PgFailoverStack) -> usize {
    stack.journaled("started", FAILOVER_HOOK).len()
}

/// The most advanced standby is promoted once, by its own host; the other follows it.
async fn kill_trial(tally: &mut Tally) -> Result<()> {
    let stack = PgFailoverStack::up().await?;
    // pg-c stops receiving, then the primary writes: pg-b is the most advanced standby, and
    // pg-c stays reachable for the observers, eligible (well within 1 MiB) but behind.
    stack.leave_behind("pg-c", 500, 0.0).await?;
    let candidate =
        format!("cluster_target:clusterwatch_pg_failover_candidate:bytes{{cluster='{CLUSTER}'}}");
    wait_until(WAIT, "pg-b to be the candidate", async || {
        Ok(stack.prometheus.query(&candidate).await?["result"][0]["metric"]["target"] == "pg-b")
    })
    .await?;

    let killed_at = unix_now();
    let kill_clock = Instant::now();
    stack.node("pg-a").kill9()?;
    wait_until(
        WAIT + WINDOW,
        "the failover run to finish and pg-c to stream from pg-b",
        async || {
            let finished = stack.journaled("finished", FAILOVER_HOOK);
            let pg_c = stack
                .node("pg-c")
                .psql("SELECT status, sender_port FROM pg_stat_wal_receiver")
                .await
                .unwrap_or_default();
            let following = pg_c == format!("streaming|{}", stack.node("pg-b").port());
            Ok(!finished.is_empty() && following)
        },
    )
    .await
    .with_context(|| {
        format!(
            "after {:.0}s; journals: {:?}",
            kill_clock.elapsed().as_secs_f64(),
            stack
                .hosts
                .iter()
                .map(|host| host.hooks.journal())
                .collect::<Vec<_>>()
        )
    })?;
    // The incident is over once the rules see the new primary; a second run could only come
    // before that (or from a re-send, which must be deduped).
    wait_until(WAIT, "PostgresFailoverNeeded to resolve", async || {
        Ok(stack
            .alerts("PostgresFailoverNeeded", "firing")
            .await?
            .is_empty())
    })
    .await?;

    let started = stack.journaled("started", FAILOVER_HOOK);
    tally.double_runs += usize::from(started.len() > 1);
    tally.false_failovers += started.iter().filter(|(host, _)| *host != "pg-b").count();
    let [(host, run)] = started.as_slice() else {
        bail!("one incident must be one failover run, saw {started:?}");
    };
    ensure!(*host == "pg-b", "host {host} ran the failover, not pg-b's");
    let started_at = run["ts"]
        .as_f64()
        .context("a `started` record without ts")?;
    let to_hook_start = Duration::try_from_secs_f64(started_at - killed_at)
        .context("the failover run started before the kill")?;
    tally.to_hook_start.push(to_hook_start);
    let budget = SCRAPE_INTERVAL + WINDOW + GROUP_WAIT + Duration::from_secs(5);
    println!(
        "kill -> hook started {:.1}s (goal <= {:.0}s: scrape interval + window + group_wait + 5s)",
        to_hook_start.as_secs_f64(),
        budget.as_secs_f64()
    );
    ensure!(
        to_hook_start <= budget,
        "kill -> hook start took {to_hook_start:?}, more than {budget:?}"
    );

    // Every step ran and succeeded, in order; the other hosts skipped as not the candidate.
    let steps: Vec<(String, String)> = stack
        .journaled("step_finished", FAILOVER_HOOK)
        .into_iter()
        .map(|(_, record)| {
            (
                record["step"].as_str().unwrap_or("?").to_owned(),
                record["result"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    let ok = |step: &str| (step.to_owned(), "ok".to_owned());
    ensure!(
        steps == [ok("fence"), ok("promote"), ok("repoint")],
        "steps: {steps:?}; journal of pg-b: {:?}",
        stack.hosts[1].hooks.journal()
    );
    let skipped: Vec<&str> = stack
        .journaled("not_candidate", FAILOVER_HOOK)
        .into_iter()
        .map(|(host, _)| host)
        .collect();
    ensure!(
        skipped.contains(&"pg-a") && skipped.contains(&"pg-c"),
        "pg-a's and pg-c's receivers must skip as not the candidate: {skipped:?}"
    );

    // Exactly one primary: pg-b. The killed pg-a does not answer; pg-c is a standby of pg-b.
    let states = stack.in_recovery().await;
    ensure!(
        states == [None, Some(false), Some(true)],
        "pg_is_in_recovery() of {NODES:?}: {states:?}"
    );
    stack
        .node("pg-b")
        .wait_standby_streaming("standby_c", WAIT)
        .await?;
    // pg-c took what it missed from pg-b: the rows written while it was cut off.
    let rows = stack
        .node("pg-c")
        .psql("SELECT count(*) FROM written_while_pg_c_was_cut")
        .await;
    ensure!(
        rows.as_deref().ok() == Some("500"),
        "pg-c did not catch up: {rows:?}"
    );
    Ok(())
}

/// The primary is out of reach of everyone for one scrape in four, for at least 5 windows.
async fn flapping_trial(tally: &mut Tally) -> Result<()> {
    let stack = PgFailoverStack::up().await?;
    let started = Instant::now();
    let duration = WINDOW * 6;
    let mut cuts = 0;
    while started.elapsed() < duration {
        // The fault schedule itself: one scrape interval cut, three restored.
        for path in stack.observer_paths.iter().chain(&stack.replication) {
            path.cut();
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
        for path in stack.observer_paths.iter().chain(&stack.replication) {
            path.restore().await?;
        }
        cuts += 1;
        tokio::time::sleep(SCRAPE_INTERVAL * 3).await;
    }
    let range = promql_range(started.elapsed() + Duration::from_secs(5));

    // The cuts were real: the observers lost the primary on some of their scrapes.
    let failed = stack
        .prometheus
        .query_f64(&format!(
            "sum(count_over_time(clusterwatch_target_up{{target='pg-a'}}[{range}])) - sum(sum_over_time(clusterwatch_target_up{{target='pg-a'}}[{range}]))"
        ))
        .await?
        .unwrap_or_default();
    let total = stack
        .prometheus
        .query_f64(&format!(
            "sum(count_over_time(clusterwatch_target_up{{target='pg-a'}}[{range}]))"
        ))
        .await?
        .unwrap_or_default();
    println!(
        "{cuts} cuts over {:.0}s: {failed} of {total} observer scrapes of pg-a failed",
        duration.as_secs_f64()
    );
    ensure!(
        failed >= cuts as f64,
        "the cuts did not make scrapes of the primary fail ({failed} of {total})"
    );

    // Pending is allowed (PostgresNoPrimary is pending while every observer is cut off at
    // once); firing is a page.
    let critical = stack
        .prometheus
        .query(&format!(
            "ALERTS{{severity='critical', alertstate='firing'}}[{range}]"
        ))
        .await?;
    let pending = stack
        .prometheus
        .query(&format!(
            "count by (alertname) (count_over_time(ALERTS{{severity='critical', alertstate='pending'}}[{range}]))"
        ))
        .await?;
    println!("critical alerts pending at some evaluation (never firing): {pending}");
    let runs = failover_runs(&stack);
    let states = stack.in_recovery().await;
    let promoted = states.iter().filter(|state| **state == Some(false)).count();
    tally.false_failovers += runs + promoted.saturating_sub(1);
    ensure!(
        runs == 0,
        "a primary lost on 1 scrape in 4 ran the failover hook {runs} time(s)"
    );
    ensure!(
        critical["result"].as_array().is_some_and(Vec::is_empty),
        "a critical alert fired: {critical}"
    );
    ensure!(
        states == [Some(false), Some(true), Some(true)],
        "pg_is_in_recovery() of {NODES:?}: {states:?}"
    );
    Ok(())
}

/// The primary is lost while pg-b is down and pg-c is more than 1 MiB behind: no candidate.
async fn no_candidate_trial(tally: &mut Tally) -> Result<()> {
    let stack = PgFailoverStack::up().await?;
    stack.node("pg-b").kill9()?;
    // About 4 MiB of WAL pg-c never receives.
    stack.leave_behind("pg-c", 16_000, MAX_LAG_BYTES).await?;
    let killed_at = unix_now();
    stack.node("pg-a").kill9()?;

    wait_until(
        WAIT + WINDOW,
        "PostgresFailoverNoCandidate to fire and the refusal to be journaled",
        async || {
            let firing = stack
                .alerts("PostgresFailoverNoCandidate", "firing")
                .await?;
            let refused = stack.journaled("finished", REFUSAL_HOOK);
            Ok(!firing.is_empty() && refused.len() == NODES.len())
        },
    )
    .await
    .with_context(|| {
        format!(
            "journal of pg-c's host: {:?}",
            stack.hosts[2].hooks.journal()
        )
    })?;
    let first_start = stack
        .journaled("started", REFUSAL_HOOK)
        .iter()
        .filter_map(|(_, record)| record["ts"].as_f64())
        .fold(f64::INFINITY, f64::min);
    let to_hook_start = Duration::try_from_secs_f64(first_start - killed_at)
        .context("no refusal run started after the kill")?;
    tally.to_hook_start.push(to_hook_start);
    println!(
        "kill -> refusal hook started {:.1}s",
        to_hook_start.as_secs_f64()
    );

    // Every host journaled the refusal with the reason: pg-c's lag, from the alert.
    for (host, matched) in stack.journaled("matched", REFUSAL_HOOK) {
        let reason = matched["evidence"]["description"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            reason.contains("pg-c") && reason.contains("behind"),
            "host {host} journaled the refusal without its reason: {matched}"
        );
    }
    let runs = failover_runs(&stack);
    let decided = stack.journaled("matched", FAILOVER_HOOK).len();
    let states = stack.in_recovery().await;
    tally.false_failovers += runs;
    ensure!(
        runs == 0 && decided == 0,
        "the failover hook was decided {decided}, started {runs} time(s)"
    );
    ensure!(
        states == [None, None, Some(true)],
        "pg_is_in_recovery() of {NODES:?}: {states:?}"
    );
    let ever = stack
        .prometheus
        .query("ALERTS{alertname='PostgresFailoverNeeded'}[10m]")
        .await?;
    ensure!(
        ever["result"].as_array().is_some_and(Vec::is_empty),
        "PostgresFailoverNeeded fired without a candidate: {ever}"
    );
    Ok(())
}

/// Runs `trial` [`trials`] times and prints the tally; the first failure fails the test.
async fn repeat<F>(drill: &str, mut trial: F) -> Result<()>
where
    F: AsyncFnMut(&mut Tally) -> Result<()>,
{
    let mut tally = Tally::default();
    for index in 1..=trials()? {
        tally.trials = index;
        let outcome = trial(&mut tally).await;
        println!("{}", tally.report(drill));
        outcome.with_context(|| format!("drill {drill}, trial {index}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_primary_is_replaced_once_by_the_most_advanced_standby() -> Result<()> {
    repeat("kill", kill_trial).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_lost_on_one_scrape_in_four_runs_nothing_and_pages_nobody() -> Result<()> {
    repeat("flapping", flapping_trial).await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_standby_within_the_lag_limit_refuses_and_journals_why() -> Result<()> {
    repeat("no-candidate", no_candidate_trial).await
}

/// Runs the example recipe `name` as the hook runner would (a clean environment with `env`),
/// returning its exit code and what it wrote to stderr.
async fn recipe(name: &str, args: &[&str], env: &[(&str, String)]) -> Result<(i32, String)> {
    let path = clusterwatch_tests::harness::repo_root()
        .join("alertmanager/hooks")
        .join(name);
    let output = tokio::process::Command::new(&path)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .current_dir("/")
        .output()
        .await
        .with_context(|| format!("could not run {}", path.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    Ok((output.status.code().unwrap_or(-1), stderr))
}

/// pg-fence on a primary that answers fences it read-only (and pg-promote then accepts it);
/// on one that does not, it refuses unless the STONITH slot or the operator's declaration
/// makes that safe.
#[tokio::test(flavor = "multi_thread")]
async fn pg_fence_fences_a_reachable_primary_and_refuses_an_unreachable_one() -> Result<()> {
    let pair = clusterwatch_tests::harness::PgCluster::start_pair().await?;
    let env = vec![
        (
            "PG_NODES",
            format!(
                "pg-a=127.0.0.1:{} pg-b=127.0.0.1:{}",
                pair.primary.port(),
                pair.standby.port()
            ),
        ),
        ("PGUSER", "postgres".to_owned()),
        ("CW_LABEL_FAILED", "pg-a".to_owned()),
        ("CW_LABEL_CANDIDATE", "pg-b".to_owned()),
        ("CW_FENCING_TOKEN", "4711".to_owned()),
    ];
    let with = |extra: &[(&'static str, &str)]| {
        let mut env = env.clone();
        env.extend(extra.iter().map(|(key, value)| (*key, (*value).to_owned())));
        env
    };

    // The primary answers and takes writes: promoting now would be a split brain.
    let (code, stderr) = recipe("pg-promote", &["--check"], &env).await?;
    ensure!(code == 4, "pg-promote --check: exit {code}: {stderr}");

    // Clients come through an HAProxy too: the fence puts the primary in maintenance there.
    let haproxy = clusterwatch_tests::harness::Haproxy::start(&format!(
        "backend postgres\n  server pg-a 127.0.0.1:{}\n  server pg-b 127.0.0.1:{}\n",
        pair.primary.port(),
        pair.standby.port()
    ))
    .await?;
    let socket = haproxy.socket().display().to_string();
    let (code, stderr) = recipe(
        "pg-fence",
        &["--check"],
        &with(&[
            ("HAPROXY_SOCKETS", &socket),
            ("HAPROXY_SERVER", "postgres/pg-x"),
        ]),
    )
    .await?;
    ensure!(
        code == 4,
        "pg-fence --check, unknown HAProxy server: exit {code}: {stderr}"
    );
    let (code, stderr) = recipe(
        "pg-fence",
        &["--check"],
        &with(&[("HAPROXY_SOCKETS", &socket)]),
    )
    .await?;
    ensure!(code == 0, "pg-fence --check: exit {code}: {stderr}");
    let (code, stderr) = recipe("pg-fence", &[], &with(&[("HAPROXY_SOCKETS", &socket)])).await?;
    ensure!(code == 0, "pg-fence: exit {code}: {stderr}");
    let stats = clusterwatch_tests::harness::http::client()?
        .get(format!("{};csv", haproxy.stats_url()))
        .send()
        .await?
        .text()
        .await?;
    let status = |server: &str| {
        stats
            .lines()
            .find(|line| line.starts_with(&format!("postgres,{server},")))
            .and_then(|line| line.split(',').nth(17))
            .unwrap_or_default()
            .to_owned()
    };
    ensure!(
        status("pg-a") == "MAINT" && status("pg-b") != "MAINT",
        "HAProxy after the fence: pg-a {}, pg-b {}",
        status("pg-a"),
        status("pg-b")
    );
    ensure!(
        pair.primary
            .psql("SHOW default_transaction_read_only")
            .await?
            == "on",
        "the primary was not set read-only: {stderr}"
    );
    let write = pair.primary.psql("CREATE TABLE after_fence (id int)").await;
    ensure!(write.is_err(), "the fenced primary still took a write");
    ensure!(
        pair.primary.logs().contains("fencing token 4711"),
        "the fenced primary's log does not name the fencing token"
    );
    let (code, stderr) = recipe("pg-promote", &["--check"], &env).await?;
    ensure!(
        code == 0,
        "pg-promote --check on a fenced primary: exit {code}: {stderr}"
    );

    // The primary no longer answers: unreachable is not fenced.
    pair.primary.stop().await?;
    let (code, stderr) = recipe("pg-fence", &[], &env).await?;
    ensure!(
        code == 3,
        "pg-fence, primary unreachable: exit {code}: {stderr}"
    );
    let (code, stderr) = recipe("pg-fence", &["--check"], &env).await?;
    ensure!(
        code == 3,
        "pg-fence --check, primary unreachable: exit {code}: {stderr}"
    );
    let (code, stderr) = recipe("pg-fence", &[], &with(&[("FENCE_COMMAND", "/bin/false")])).await?;
    ensure!(code == 6, "pg-fence, STONITH failed: exit {code}: {stderr}");
    let (code, stderr) = recipe("pg-fence", &[], &with(&[("FENCE_COMMAND", "/bin/true")])).await?;
    ensure!(code == 0, "pg-fence, STONITH done: exit {code}: {stderr}");
    let (code, stderr) = recipe("pg-fence", &[], &with(&[("FENCE_UNREACHABLE_OK", "1")])).await?;
    ensure!(
        code == 0,
        "pg-fence, unreachable declared acceptable: exit {code}: {stderr}"
    );
    Ok(())
}
