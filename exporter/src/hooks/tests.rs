//! The receiver and runner together: decisions, runs, restarts.
use std::time::Duration;

use super::config::HookRule;
use super::journal::RunResult;
use super::*;
use crate::config::Secret;
use crate::hooks::payload::tests::body;
use crate::hooks::policy::tests::rule;

fn config(dir: &std::path::Path, rules: Vec<HookRule>) -> HooksConfig {
    HooksConfig {
        listen: config::Listen::Main,
        auth: config::Auth::Bearer(Secret::new("t")),
        state_dir: dir.to_path_buf(),
        max_body_bytes: 1 << 20,
        max_disruptive_per_hour: 5,
        kill_switch_file: Some(dir.join("stop")),
        dry_run: false,
        max_concurrent_runs: 2,
        kill_grace: Duration::from_millis(100),
        resume_max_age: Duration::from_secs(600),
        rules,
        lock: None,
        storm: None,
        lease: None,
        web: None,
    }
}

fn alert_body(fp: &str) -> bytes::Bytes {
    body("firing", r#"{"alertname":"NoPrimary"}"#, fp, "t0").into()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn events(dir: &std::path::Path) -> Vec<Event> {
    journal::read(dir)
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect()
}

#[tokio::test]
async fn exit_1_is_retried_then_succeeds_and_exit_2_is_not() {
    let dir = tempfile::tempdir().unwrap();
    // Fails with 1 on the first attempt, succeeds on the second.
    let flaky = dir.path().join("flaky");
    let mut r = rule("flaky", false, 0);
    r.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "[ -e {m} ] && exit 0; touch {m}; exit 1",
            m = flaky.display()
        ),
    ];
    r.retries = 3;
    r.retry_backoff = Duration::from_millis(10);
    let mut hard = rule("hard", false, 0);
    hard.command = vec!["/bin/sh".into(), "-c".into(), "exit 2".into()];
    hard.retries = 3;
    let hooks = Hooks::start(config(dir.path(), vec![r, hard]), Box::new(LocalGate))
        .await
        .unwrap();
    let receipt = hooks.receive(alert_body("f1")).await.unwrap();
    assert_eq!(receipt.runs, 2);
    let finished = |d: &std::path::Path| {
        events(d)
            .into_iter()
            .filter_map(|e| match e {
                Event::Finished {
                    hook,
                    attempt,
                    result,
                    ..
                } => Some((hook, attempt, result)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    until("both runs to end", || {
        finished(dir.path())
            .iter()
            .filter(|f| f.2 != RunResult::Retry)
            .count()
            == 2
    })
    .await;
    let mut f = finished(dir.path());
    f.sort();
    assert_eq!(
        f,
        vec![
            ("flaky".into(), 1, RunResult::Retry),
            ("flaky".into(), 2, RunResult::Ok),
            ("hard".into(), 1, RunResult::Failed),
        ]
    );
}

#[tokio::test]
async fn a_notification_that_could_not_be_stored_is_decided_afresh_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the payload directory should be: storing the payload fails.
    std::fs::write(dir.path().join("payloads"), "").unwrap();
    let hooks = Hooks::start(
        config(dir.path(), vec![rule("promote", true, 3600)]),
        Box::new(LocalGate),
    )
    .await
    .unwrap();
    let err = hooks.receive(alert_body("f1")).await.unwrap_err();
    assert_eq!(err.status(), "error");
    std::fs::remove_file(dir.path().join("payloads")).unwrap();
    // Alertmanager's retry: not a repeat, not in cooldown, not over budget.
    assert_eq!(hooks.receive(alert_body("f1")).await.unwrap().runs, 1);
}

#[tokio::test]
async fn cooldown_and_kill_switch_survive_a_restart_and_replay_shows_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks::start(
        config(dir.path(), vec![rule("promote", true, 3600)]),
        Box::new(LocalGate),
    )
    .await
    .unwrap();
    assert_eq!(hooks.receive(alert_body("f1")).await.unwrap().runs, 1);
    until("the run to finish", || {
        events(dir.path())
            .iter()
            .any(|e| matches!(e, Event::Finished { .. }))
    })
    .await;
    drop(hooks);

    let cfg = config(dir.path(), vec![rule("promote", true, 3600)]);
    let before = events(dir.path()).len();
    let lines = replay(&cfg, &alert_body("f2")).unwrap();
    assert!(lines[0].contains("cooldown_skipped"), "{lines:?}");
    let lines = replay(&cfg, &alert_body("f1")).unwrap();
    assert!(lines[0].contains("deduped"), "{lines:?}");
    // Replay journals nothing.
    assert_eq!(events(dir.path()).len(), before);

    // The first runner's journal writer lets go of its lock once its last task is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let hooks = loop {
        match Hooks::start(
            config(dir.path(), vec![rule("promote", true, 3600)]),
            Box::new(LocalGate),
        )
        .await
        {
            Ok(h) => break h,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    assert_eq!(hooks.receive(alert_body("f2")).await.unwrap().runs, 0);
    assert!(matches!(
        events(dir.path()).last(),
        Some(Event::CooldownSkipped { .. })
    ));
    std::fs::write(dir.path().join("stop"), "").unwrap();
    assert_eq!(hooks.receive(alert_body("f3")).await.unwrap().runs, 0);
    assert!(matches!(
        events(dir.path()).last(),
        Some(Event::KillSwitch { .. })
    ));
    let mut out = SampleBuffer::new();
    hooks.write_metrics(&mut out);
    let text = out.into_snapshot().encode_text();
    assert!(
        text.contains("clusterwatch_hook_kill_switch_active 1"),
        "{text}"
    );
    assert!(
        text.contains("clusterwatch_hook_skips_total{hook=\"promote\",reason=\"cooldown\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn runs_accepted_before_a_restart_start_after_it_when_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let mut r = rule("promote", true, 0);
    r.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo \"$CW_RUN $CW_PAYLOAD_FILE\" >> {}", ran.display()),
    ];
    // A journal as a killed process leaves it: two runs matched, neither started; run 0 was
    // accepted a minute ago, run 1 an hour ago.
    let t = now();
    let alert = |fp: &str| journal::AlertRef {
        fingerprint: fp.into(),
        starts_at: "t0".into(),
        status: "firing".into(),
        alertname: "NoPrimary".into(),
    };
    let mut bytes = Vec::new();
    for (n, age, fp) in [(0u64, 60.0, "fresh"), (1, 3600.0, "stale")] {
        for event in [
            Event::Received {
                notification: n,
                receiver: "hooks".into(),
                status: "firing".into(),
                group_key: "{}".into(),
                alerts: 1,
            },
            Event::Matched {
                run: n,
                hook: "promote".into(),
                alert: alert(fp),
                disruptive: true,
                notification: n,
                cluster: String::new(),
                evidence: Default::default(),
            },
        ] {
            journal::encode(&Record { ts: t - age, event }, &mut bytes);
        }
        std::fs::create_dir_all(dir.path().join("payloads")).unwrap();
        std::fs::write(
            dir.path().join(format!("payloads/{n}.json")),
            &*alert_body(fp),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join(journal::FILE_NAME), bytes).unwrap();

    let mut cfg = config(dir.path(), vec![r]);
    cfg.max_disruptive_per_hour = 10;
    let _hooks = Hooks::start(cfg, Box::new(LocalGate)).await.unwrap();
    until("the fresh run to finish", || {
        events(dir.path())
            .iter()
            .any(|e| matches!(e, Event::Finished { run: 0, .. }))
    })
    .await;
    let ev = events(dir.path());
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Resumed { run: 0, .. })));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Abandoned { run: 1, .. })));
    assert!(!ev
        .iter()
        .any(|e| matches!(e, Event::Started { run: 1, .. })));
    let ran = std::fs::read_to_string(&ran).unwrap();
    let payload = dir.path().join("payloads/0.json");
    assert_eq!(ran, format!("0 {}\n", payload.display()));
}

#[tokio::test]
async fn steps_run_in_order_and_stop_at_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps.log");
    let step = |name: &str, exit: u8| config::Step {
        name: name.into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo \"$CW_STEP $CW_STEP_INDEX $CW_RUN $CW_LABEL_ALERTNAME\" >> {}; exit {exit}",
                log.display()
            ),
        ],
        timeout: Duration::from_secs(5),
    };
    let mut r = rule("failover", true, 0);
    r.command = Vec::new();
    r.steps = vec![step("fence", 0), step("promote", 3), step("repoint", 0)];
    let hooks = Hooks::start(config(dir.path(), vec![r]), Box::new(LocalGate))
        .await
        .unwrap();
    assert_eq!(hooks.receive(alert_body("f1")).await.unwrap().runs, 1);
    until("the run to finish", || {
        events(dir.path())
            .iter()
            .any(|e| matches!(e, Event::Finished { .. }))
    })
    .await;
    // The third step never ran; each step saw its own name and index.
    let ran = std::fs::read_to_string(&log).unwrap();
    assert_eq!(ran, "fence 0 0 NoPrimary\npromote 1 0 NoPrimary\n");
    let steps: Vec<(String, Option<RunResult>)> = events(dir.path())
        .into_iter()
        .filter_map(|e| match e {
            Event::StepStarted { step, .. } => Some((step, None)),
            Event::StepFinished { step, result, .. } => Some((step, Some(result))),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("fence".into(), None),
            ("fence".into(), Some(RunResult::Ok)),
            ("promote".into(), None),
            ("promote".into(), Some(RunResult::Failed)),
        ]
    );
    let finished: Vec<_> = events(dir.path())
        .into_iter()
        .filter_map(|e| match e {
            Event::Finished {
                run,
                result,
                exit_code,
                ..
            } => Some((run, result, exit_code)),
            _ => None,
        })
        .collect();
    assert_eq!(finished, [(0, RunResult::Failed, Some(3))]);
}

#[test]
fn replay_shows_the_evidence_and_each_steps_argv_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rule("failover", true, 0);
    r.command = Vec::new();
    r.steps = ["fence", "promote"]
        .map(|name| config::Step {
            name: name.into(),
            command: vec![format!("/opt/{name}"), "--now".into()],
            timeout: Duration::from_secs(5),
        })
        .into();
    let cfg = config(dir.path(), vec![r]);
    let body = body(
        "firing",
        r#"{"alertname":"NoPrimary","cluster":"pg","candidate":"pg2","failed":"pg1"}"#,
        "f1",
        "t0",
    )
    .replace(
        r#""annotations":{}"#,
        r#""annotations":{"description":"pg1 lost by 2 of 3 observers","lag":"0 bytes"}"#,
    );
    let lines = replay(&cfg, body.as_bytes()).unwrap();
    let text = lines.join("\n");
    assert!(lines[0].contains("matched"), "{text}");
    for want in [
        "evidence.candidate=pg2",
        "evidence.failed=pg1",
        "evidence.lag=\"0 bytes\"",
        "evidence.description=\"pg1 lost by 2 of 3 observers\"",
        "cluster=pg",
    ] {
        assert!(lines[0].contains(want), "{want}: {text}");
    }
    let at = |s: &str| lines.iter().position(|l| l == s);
    let fence = at("  would run step 0 fence: /opt/fence --now").expect(&text);
    let promote = at("  would run step 1 promote: /opt/promote --now").expect(&text);
    assert!(fence < promote);
    for want in [
        "CW_STEP=fence",
        "CW_STEP_INDEX=0",
        "CW_LABEL_CANDIDATE=pg2",
        "CW_RUN=0",
    ] {
        assert!(
            lines[fence..promote].contains(&format!("    {want}")),
            "{want}: {text}"
        );
    }
    assert!(
        lines[promote..].contains(&"    CW_STEP_INDEX=1".to_owned()),
        "{text}"
    );
    // Nothing was journaled or run.
    assert!(journal::read(dir.path()).unwrap().is_empty());
}
