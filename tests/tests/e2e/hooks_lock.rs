//! Several hook receivers sharing one etcd (`hooks.lock`): the same notification delivered to
//! two receivers runs the disruptive hook once, a holder killed mid-run is not re-run by the
//! other, a lease lost mid-run is journaled and counted, and no etcd means no run.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clusterwatch_tests::exposition::scrape;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab};
use clusterwatch_tests::harness::{wait_until, Clusterwatch, EtcdCluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const PREFIX: &str = "/cw-test/hooks/";

/// A receiver whose disruptive `promote` hook runs `then` after recording itself.
async fn receiver(etcd: &[String], ttl: &str, then: &str) -> Result<(HookLab, Clusterwatch)> {
    let lab = HookLab::new()?;
    let hook = lab.recorder("promote", then)?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}], disruptive: true, timeout: 60s }}\n",
        hook.display()
    );
    let settings = format!(
        "  max_disruptive_per_hour: 1000\n  lock:\n    etcd: {{ endpoints: [{}] }}\n    prefix: {PREFIX}\n    ttl: {ttl}\n",
        etcd.join(", ")
    );
    let cw = Clusterwatch::start(Some(&lab.config(&settings, &rules)), &[]).await?;
    Ok((lab, cw))
}

fn body(fp: &str) -> String {
    let a = alert(
        "firing",
        json!({"alertname": "NoPrimary"}),
        fp,
        "2026-01-01T00:00:00Z",
    );
    notification("firing", fp, vec![a]).to_string()
}

/// Invocations of `promote` for this fingerprint in a lab.
fn runs_for(lab: &HookLab, fp: &str) -> usize {
    lab.invocations("promote")
        .iter()
        .filter(|l| l.ends_with(&format!(" {fp}")))
        .count()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    wait_until(WAIT, what, async || Ok(check())).await
}

/// Keys under `PREFIX/running/`: runs whose lease is alive.
async fn running_keys(endpoint: &str) -> Result<usize> {
    let from = format!("{PREFIX}running/");
    let to = format!("{PREFIX}running0");
    let answer = clusterwatch_tests::harness::http::client()?
        .post(format!("{endpoint}/v3/kv/range"))
        .body(
            json!({"key": B64.encode(from), "range_end": B64.encode(to), "count_only": true})
                .to_string(),
        )
        .send()
        .await?
        .bytes()
        .await?;
    let v: Value = serde_json::from_slice(&answer)?;
    Ok(v["count"].as_str().unwrap_or("0").parse()?)
}

#[tokio::test]
async fn two_receivers_given_the_same_notification_run_the_hook_once_over_50_trials() -> Result<()>
{
    const TRIALS: usize = 50;
    let etcd = EtcdCluster::start(1).await?;
    let (a, _cw_a) = receiver(&etcd.endpoints(), "15s", "exit 0").await?;
    let (b, _cw_b) = receiver(&etcd.endpoints(), "15s", "exit 0").await?;
    for trial in 0..TRIALS {
        let fp = format!("pair{trial:02}");
        let (ra, rb) = tokio::join!(a.post(body(&fp)), b.post(body(&fp)));
        assert_eq!((ra?.as_u16(), rb?.as_u16()), (200, 200), "trial {trial}");
        let decided = |lab: &HookLab| {
            lab.events("lock_acquired").len() + lab.events("lock_held_elsewhere").len()
        };
        wait_for("both receivers to decide", || {
            decided(&a) + decided(&b) == 2 * (trial + 1)
        })
        .await?;
        wait_for("the winner's run to finish", || {
            a.events("finished").len() + b.events("finished").len() == trial + 1
        })
        .await?;
        assert_eq!(
            runs_for(&a, &fp) + runs_for(&b, &fp),
            1,
            "trial {trial}: the hook must run exactly once"
        );
    }
    // Re-sends to either side after the fact run nothing more.
    let fp = "pair00";
    for lab in [&a, &b] {
        assert_eq!(lab.post(body(fp)).await?, 200);
    }
    assert_eq!(runs_for(&a, fp) + runs_for(&b, fp), 1);
    // The winner's hook saw a fencing token: the claim's revision, growing trial by trial.
    let (winner, run) = [&a, &b]
        .into_iter()
        .find_map(|l| Some((l, l.events("lock_acquired").first()?["run"].clone())))
        .context("a lock_acquired record")?;
    let env = String::from_utf8(winner.read(&format!("promote.env.{run}"))?)?;
    let token = env
        .split('\0')
        .find_map(|kv| kv.strip_prefix("CW_FENCING_TOKEN="))
        .context("CW_FENCING_TOKEN in the hook's environment")?;
    assert!(token.parse::<u64>()? > 0, "{token}");
    let (ma, mb) = (scrape(&_cw_a).await?, scrape(&_cw_b).await?);
    let count = |result: &str| {
        [&ma, &mb]
            .iter()
            .map(|m| {
                m.value(
                    "clusterwatch_hook_lock_total",
                    &[("hook", "promote"), ("result", result)],
                )
                .unwrap_or(-1.0)
            })
            .sum::<f64>()
    };
    assert_eq!(count("acquired"), TRIALS as f64);
    assert_eq!(count("held_elsewhere"), TRIALS as f64);
    assert_eq!(count("unavailable"), 0.0);
    Ok(())
}

#[tokio::test]
async fn the_lock_holder_killed_mid_run_is_not_rerun_by_the_other_receiver() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let endpoint = etcd.endpoints()[0].clone();
    let (a, mut cw_a) = receiver(&etcd.endpoints(), "2s", "sleep 30").await?;
    let (b, _cw_b) = receiver(&etcd.endpoints(), "2s", "exit 0").await?;
    let fp = "killed";
    assert_eq!(a.post(body(fp)).await?, 200);
    wait_for("the hook to start on the first receiver", || {
        runs_for(&a, fp) == 1
    })
    .await?;
    assert_eq!(running_keys(&endpoint).await?, 1);
    let hook_pid: i32 = String::from_utf8(a.read("promote.pid")?)?.trim().parse()?;
    cw_a.process().kill9()?;
    // Nothing renews the holder's lease any more: its running key goes with it.
    wait_until(WAIT, "the dead holder's lease to expire", async || {
        Ok(running_keys(&endpoint).await? == 0)
    })
    .await?;
    // Alertmanager re-sends to the surviving receiver.
    assert_eq!(b.post(body(fp)).await?, 200);
    wait_for("the second receiver to decide", || {
        !b.events("lock_held_elsewhere").is_empty()
    })
    .await?;
    assert_eq!(
        runs_for(&b, fp),
        0,
        "the surviving receiver re-ran the hook"
    );
    assert!(b.events("started").is_empty());
    // And again: deduped locally now, without asking etcd.
    assert_eq!(b.post(body(fp)).await?, 200);
    wait_for("the re-send to be deduped", || {
        !b.events("deduped").is_empty()
    })
    .await?;
    assert_eq!(runs_for(&b, fp), 0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hook_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    Ok(())
}

#[tokio::test]
async fn a_lease_lost_mid_run_is_recorded_and_no_etcd_means_no_run() -> Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let marker = tempfile::tempdir()?;
    let done = marker.path().join("done");
    // The hook runs until the test lets it finish.
    let then = format!(
        "while [ ! -e {d} ]; do sleep 0.1; done; echo \"$CW_FENCING_TOKEN\"",
        d = done.display()
    );
    let (lab, cw) = receiver(&etcd.endpoints(), "2s", &then).await?;
    assert_eq!(lab.post(body("lost")).await?, 200);
    wait_for("the hook to start", || runs_for(&lab, "lost") == 1).await?;
    // A hung etcd: the keepalives go unanswered for longer than the TTL.
    etcd.member(0).process().pause()?;
    wait_for("lock_lost in the journal", || {
        !lab.events("lock_lost").is_empty()
    })
    .await?;
    etcd.member(0).process().resume()?;
    // The hook was left to finish: stopping a promotion half way is worse than a lost lease.
    std::fs::write(&done, "")?;
    wait_for("the hook to finish", || !lab.events("finished").is_empty()).await?;
    assert_eq!(lab.events("finished")[0]["result"], "ok");
    let m = scrape(&cw).await?;
    let lock = |result: &str| {
        m.value(
            "clusterwatch_hook_lock_total",
            &[("hook", "promote"), ("result", result)],
        )
    };
    assert_eq!(lock("lost"), Some(1.0));

    // etcd down: the disruptive run does not start, and the receiver says why.
    etcd.member(0).process().stop()?;
    assert_eq!(lab.post(body("no-etcd")).await?, 200);
    wait_for("lock_unavailable in the journal", || {
        !lab.events("lock_unavailable").is_empty()
    })
    .await?;
    assert_eq!(runs_for(&lab, "no-etcd"), 0);
    let m = scrape(&cw).await?;
    assert_eq!(
        m.value(
            "clusterwatch_hook_lock_total",
            &[("hook", "promote"), ("result", "unavailable")],
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_hook_skips_total",
            &[("hook", "promote"), ("reason", "lock_unavailable")],
        ),
        Some(1.0)
    );
    // Not remembered as handled: once etcd is back, Alertmanager's re-send runs it.
    etcd.member(0).process().start()?;
    wait_until(WAIT, "the re-send to run the hook", async || {
        let _ = lab.post(body("no-etcd")).await;
        Ok(runs_for(&lab, "no-etcd") == 1)
    })
    .await?;
    Ok(())
}
