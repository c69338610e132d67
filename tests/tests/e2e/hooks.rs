//! The webhook receiver and hook runner as Alertmanager and an attacker meet it: one run per
//! incident through a real Alertmanager (re-sends, a 5xx and its retry, resolved hooks), a
//! kill -9 during a disruptive hook, hostile payloads, and a timeout that kills the group.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::scrape;
use clusterwatch_tests::harness::http::is_ready;
use clusterwatch_tests::harness::process::pid_alive;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{wait_until, Alertmanager, Clusterwatch};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);

/// The PATH every hook gets, whatever the labels say.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A proxy in front of the receiver that forwards every request and answers the first
/// `failures` with 500, as a receiver that stored a notification but failed to say so.
struct FlakyProxy {
    port: u16,
    seen: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn flaky_proxy(target: String, failures: usize) -> Result<FlakyProxy> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let client = clusterwatch_tests::harness::http::client()?;
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (client, target, counter) = (client.clone(), target.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok((auth, body)) = read_request(&mut sock).await else {
                    return;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let forwarded = client
                    .post(&target)
                    .header("authorization", auth)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let status = match forwarded {
                    Ok(r) if n > failures => r.status().as_u16(),
                    _ => 500,
                };
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    Ok(FlakyProxy { port, seen, task })
}

/// Reads one HTTP/1.1 request with a Content-Length body: (Authorization, body).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the headers");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((header("authorization"), body))
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    wait_until(WAIT, what, async || Ok(check())).await
}

#[tokio::test]
async fn alertmanager_notification_runs_its_hook_once_despite_resends_and_a_5xx() -> Result<()> {
    let lab = HookLab::new()?;
    let promote = lab.recorder("promote", "exit 0")?;
    let resolved = lab.recorder("resolved", "exit 0")?;
    let other = lab.recorder("other", "exit 0")?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: TestNoPrimary }}, command: [{}], disruptive: true }}\n\
         \x20   - {{ name: tell-resolved, on: resolved, match: {{ alertname: TestNoPrimary }}, command: [{}] }}\n\
         \x20   - {{ name: other, match: {{ alertname: SomethingElse }}, command: [{}] }}\n",
        promote.display(),
        resolved.display(),
        other.display()
    );
    let cw = Clusterwatch::start(Some(&lab.config("", &rules)), &[]).await?;
    // The first delivery is stored and runs the hook, but Alertmanager is told 500.
    let proxy = flaky_proxy(lab.url(), 1).await?;
    let am_config = format!(
        "route:\n  receiver: hooks\n  group_by: [alertname]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 2s\n\
         receivers:\n  - name: hooks\n    webhook_configs:\n      - url: http://127.0.0.1:{}/hooks/alertmanager\n        send_resolved: true\n\
         \x20       http_config:\n          authorization:\n            type: Bearer\n            credentials_file: {}/token\n",
        proxy.port,
        lab.dir().display()
    );
    let am = Alertmanager::start(Some(&am_config)).await?;
    let starts = "2026-01-01T00:00:00Z";
    let firing = json!([{ "labels": { "alertname": "TestNoPrimary", "cluster": "db" }, "startsAt": starts }]);
    am.post_alerts(&firing).await?;

    // The 500, Alertmanager's retry, then repeats every repeat_interval: all one incident.
    wait_for("five deliveries through the proxy", || {
        proxy.seen.load(Ordering::SeqCst) >= 5
    })
    .await?;
    wait_for("the promote hook to finish", || {
        !lab.events("finished").is_empty()
    })
    .await?;
    assert_eq!(lab.invocations("promote").len(), 1, "{:?}", lab.journal());
    assert!(lab.events("deduped").len() >= 3, "{:?}", lab.journal());
    assert!(lab.invocations("resolved").is_empty());

    // Resolving the alert runs only the hook configured for resolved alerts.
    let resolve = json!([{ "labels": { "alertname": "TestNoPrimary", "cluster": "db" }, "startsAt": starts,
                            "endsAt": "2026-01-01T00:00:01Z" }]);
    am.post_alerts(&resolve).await?;
    wait_for("the resolved hook", || {
        lab.invocations("resolved").len() == 1
    })
    .await?;
    wait_for("the resolved hook to finish", || {
        lab.events("finished")
            .iter()
            .any(|r| r["hook"] == "tell-resolved")
    })
    .await?;
    assert_eq!(lab.invocations("promote").len(), 1);
    assert_eq!(lab.invocations("resolved").len(), 1);
    assert!(lab.invocations("resolved")[0].contains(" resolved "));
    assert!(lab.invocations("other").is_empty());

    let m = scrape(&cw).await?;
    assert_eq!(
        m.value(
            "clusterwatch_hook_runs_total",
            &[("hook", "promote"), ("result", "ok")]
        ),
        Some(1.0)
    );
    assert!(
        m.value(
            "clusterwatch_hook_skips_total",
            &[("hook", "promote"), ("reason", "deduped")]
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    assert!(m
        .value(
            "clusterwatch_hook_last_success_timestamp_seconds",
            &[("hook", "promote")]
        )
        .is_some());
    assert_eq!(
        m.value("clusterwatch_hook_unmatched_alerts_total", &[]),
        Some(0.0),
        "matched and resolved alerts are not unmatched"
    );

    // An alert whose name no rule matches (a typo in the rule or the alert) runs nothing,
    // and says so: in the journal by name, and in a counter an alert can watch.
    let typo =
        json!([{ "labels": { "alertname": "TestNoPrimry", "cluster": "db" }, "startsAt": starts }]);
    am.post_alerts(&typo).await?;
    wait_for("the unmatched alert to be journaled", || {
        lab.events("unmatched")
            .iter()
            .any(|r| r["alertnames"] == json!(["TestNoPrimry"]) && r["alerts"] == 1)
    })
    .await?;
    let m = scrape(&cw).await?;
    assert!(
        m.value("clusterwatch_hook_unmatched_alerts_total", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(lab.invocations("promote").len(), 1);
    assert!(lab.invocations("other").is_empty());
    Ok(())
}

#[tokio::test]
async fn kill_9_during_a_disruptive_hook_leaves_it_unknown_and_never_rerun() -> Result<()> {
    const TRIALS: usize = 20;
    let lab = HookLab::new()?;
    let hook = lab.recorder("promote", "sleep 30")?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}], disruptive: true, timeout: 60s }}\n",
        hook.display()
    );
    let mut cw = Clusterwatch::start(
        Some(&lab.config("  max_disruptive_per_hour: 100\n", &rules)),
        &[],
    )
    .await?;
    let client = clusterwatch_tests::harness::http::client()?;
    for trial in 0..TRIALS {
        let fp = format!("fp{trial:02}");
        let body = notification(
            "firing",
            &fp,
            vec![alert(
                "firing",
                json!({"alertname": "NoPrimary"}),
                &fp,
                "2026-01-01T00:00:00Z",
            )],
        )
        .to_string();
        assert_eq!(lab.post(body.clone()).await?, 200);
        wait_for("the hook to start", || {
            lab.invocations("promote").len() == trial + 1
        })
        .await?;
        let hook_pid: i32 = String::from_utf8(lab.read("promote.pid")?)?
            .trim()
            .parse()?;

        cw.process().kill9()?;
        cw.process().start()?;
        let ready = cw.url("/-/ready");
        cw.process()
            .wait_ready(WAIT, "clusterwatch after kill -9", async || {
                is_ready(&client, &ready).await
            })
            .await?;
        // The hook outlives the crash (it has its own process group); end it for the next trial.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(hook_pid),
            nix::sys::signal::Signal::SIGKILL,
        );

        let run = lab
            .events("matched")
            .into_iter()
            .find(|r| r["alert"]["fingerprint"] == fp.as_str())
            .context("matched record")?["run"]
            .clone();
        let unknown = lab.events("unknown");
        assert!(
            unknown.iter().any(|r| r["run"] == run),
            "trial {trial}: no unknown record for run {run}"
        );
        assert!(lab.events("finished").iter().all(|r| r["run"] != run));

        // Alertmanager re-sends after the restart: the incident is already handled.
        assert_eq!(lab.post(body).await?, 200);
        let deduped = lab.events("deduped");
        assert!(
            deduped
                .iter()
                .any(|r| r["alert"]["fingerprint"] == fp.as_str()),
            "trial {trial}"
        );
        assert_eq!(
            lab.invocations("promote").len(),
            trial + 1,
            "trial {trial}: hook re-run"
        );
    }
    let m = scrape(&cw).await?;
    assert_eq!(
        m.value(
            "clusterwatch_hook_journal_unknown_runs",
            &[("hook", "promote")]
        ),
        Some(TRIALS as f64)
    );

    // The offline tools read the same journal: `replay` shows the incident as handled and
    // journals nothing; `journal` lists the unknown runs.
    let payload = lab.dir().join("payload.json");
    let fp = "fp00";
    let alerts = vec![alert(
        "firing",
        json!({"alertname": "NoPrimary"}),
        fp,
        "2026-01-01T00:00:00Z",
    )];
    std::fs::write(&payload, notification("firing", fp, alerts).to_string())?;
    let config = cw.config_path().context("config path")?.to_owned();
    let records = lab.journal().len();
    let cli = |args: &[&std::ffi::OsStr]| -> Result<String> {
        let out = std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
            .arg("--config.file")
            .arg(&config)
            .args(args)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let replayed = cli(&["hooks".as_ref(), "replay".as_ref(), payload.as_os_str()])?;
    assert!(
        replayed.contains("deduped") && replayed.contains("fingerprint=fp00"),
        "{replayed}"
    );
    assert_eq!(lab.journal().len(), records, "replay wrote to the journal");
    let journal = cli(&["hooks".as_ref(), "journal".as_ref()])?;
    assert_eq!(
        journal.lines().filter(|l| l.contains(" unknown ")).count(),
        TRIALS,
        "{journal}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_requests_get_4xx_or_no_run_and_labels_cannot_reach_the_environment() -> Result<()>
{
    let lab = HookLab::new()?;
    let hook = lab.recorder("evil", "exit 0")?;
    let bulk = lab.recorder("bulk", "exit 0")?;
    let rules = format!(
        "    - {{ name: evil, match_re: {{ alertname: 'Evil|Valid' }}, command: [{}] }}\n\
         \x20   - {{ name: bulk, match: {{ alertname: Bulk }}, command: [{}], dry_run: true }}\n",
        hook.display(),
        bulk.display()
    );
    let mut cw = Clusterwatch::start(Some(&lab.config("", &rules)), &[]).await?;
    let valid = |fp: &str| {
        notification(
            "firing",
            "g",
            vec![alert(
                "firing",
                json!({"alertname": "Valid"}),
                fp,
                "2026-01-01T00:00:00Z",
            )],
        )
        .to_string()
    };

    // Authentication: nothing is read or run without the token.
    assert_eq!(
        lab.post_with(None, valid("a1")).await.context("no auth")?,
        401
    );
    assert_eq!(lab.post_with(Some("Bearer wrong"), valid("a2")).await?, 401);
    assert_eq!(
        lab.post_with(Some(&format!("Bearer {TOKEN}x")), valid("a3"))
            .await?,
        401
    );
    assert_eq!(
        lab.post_with(Some("Basic dXNlcjpwYXNz"), valid("a4"))
            .await?,
        401
    );

    // Shapes that are not webhook v4 notifications.
    let mut wrong_version: Value = serde_json::from_str(&valid("b1"))?;
    wrong_version["version"] = json!("3");
    let mut no_fingerprint: Value = serde_json::from_str(&valid("b2"))?;
    no_fingerprint["alerts"][0]
        .as_object_mut()
        .unwrap()
        .remove("fingerprint");
    let mut no_alerts: Value = serde_json::from_str(&valid("b3"))?;
    no_alerts.as_object_mut().unwrap().remove("alerts");
    let mut labels_not_strings: Value = serde_json::from_str(&valid("b4"))?;
    labels_not_strings["alerts"][0]["labels"] = json!({"alertname": ["Valid"]});
    for (what, body) in [
        (
            "malformed JSON",
            "{\"version\": \"4\", \"alerts\": [".to_owned(),
        ),
        ("empty body", String::new()),
        ("a JSON array", "[]".to_owned()),
        ("wrong version", wrong_version.to_string()),
        ("missing fingerprint", no_fingerprint.to_string()),
        ("missing alerts", no_alerts.to_string()),
        (
            "labels that are not strings",
            labels_not_strings.to_string(),
        ),
    ] {
        assert_eq!(lab.post(body).await.context(what)?, 400, "{what}");
    }

    // 10 MB: refused without being read whole (the client may see the connection close).
    // Its own client: the receiver closes that connection, and a pooled one could be reused
    // by the next request just as it closes.
    let huge = format!("{{\"version\":\"4\",\"pad\":\"{}\"}}", "x".repeat(10 << 20));
    let once = clusterwatch_tests::harness::http::client()?
        .post(lab.url())
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(huge)
        .send()
        .await;
    match once.map(|r| r.status()) {
        Ok(status) => assert_eq!(status, 413),
        Err(e) => eprintln!("10 MB body: connection closed by the receiver ({e:#})"),
    }

    // 10,000 alerts in one notification, all matching a dry-run hook: accepted, nothing runs.
    let alerts: Vec<Value> = (0..10_000)
        .map(|i| {
            alert(
                "firing",
                json!({"alertname": "Bulk", "i": i.to_string()}),
                &format!("bulk{i}"),
                "2026-01-01T00:00:00Z",
            )
        })
        .collect();
    assert_eq!(
        lab.post(notification("firing", "bulk", alerts).to_string())
            .await?,
        200
    );
    assert_eq!(lab.events("dry_run").len(), 10_000);

    // Label values and names built to break a shell or the environment.
    let evil_labels = json!({
        "alertname": "Evil",
        "subst": format!("$(touch {}/pwned)", lab.dir().display()),
        "semi": format!("x; touch {}/pwned2", lab.dir().display()),
        "newline": "line1\nline2",
        "nul": "before\u{0}after",
        "big": "y".repeat(64 << 10),
        "PATH": "/tmp/evil",
        "LD_PRELOAD": "/tmp/evil.so",
        "IFS": "x",
        "we-ird.name": "ok",
    });
    let evil = notification(
        "firing",
        "evil",
        vec![alert(
            "firing",
            evil_labels,
            "evil1",
            "2026-01-01T00:00:00Z",
        )],
    )
    .to_string();
    assert_eq!(lab.post(evil.clone()).await.context("evil labels")?, 200);
    wait_for("the evil hook to finish", || {
        lab.events("finished").iter().any(|r| r["hook"] == "evil")
    })
    .await?;
    assert_eq!(lab.invocations("evil").len(), 1);
    assert!(lab.invocations("bulk").is_empty());
    assert!(!lab.dir().join("pwned").exists() && !lab.dir().join("pwned2").exists());

    let run = lab
        .events("started")
        .iter()
        .find(|r| r["hook"] == "evil")
        .context("started")?["run"]
        .clone();
    let env_raw = lab.read(&format!("evil.env.{run}"))?;
    let env: Vec<(String, String)> = String::from_utf8_lossy(&env_raw)
        .split('\0')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("PATH"), Some(HOOK_PATH));
    assert_eq!(get("LD_PRELOAD"), None);
    assert_eq!(get("IFS"), None);
    assert_eq!(get("CW_LABEL_PATH"), Some("/tmp/evil"));
    assert_eq!(get("CW_LABEL_LD_PRELOAD"), Some("/tmp/evil.so"));
    assert_eq!(get("CW_LABEL_NEWLINE"), Some("line1\nline2"));
    assert_eq!(get("CW_LABEL_NUL"), Some("beforeafter"));
    assert_eq!(get("CW_LABEL_WE_IRD_NAME"), Some("ok"));
    assert!(get("CW_LABEL_BIG").is_some_and(|v| !v.is_empty() && v.len() <= 8192));
    assert!(
        env.iter().all(|(k, _)| k.starts_with("CW_")
            || ["PATH", "LANG", "PWD", "SHLVL", "_"].contains(&k.as_str())),
        "{:?}",
        env.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    // The whole payload arrives on stdin, byte for byte.
    assert_eq!(lab.read(&format!("evil.stdin.{run}"))?, evil.as_bytes());

    // Still alive and counting.
    assert!(cw.process().is_running());
    let m = scrape(&cw).await?;
    assert_eq!(
        m.value(
            "clusterwatch_hook_notifications_total",
            &[("status", "unauthorized")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_hook_notifications_total",
            &[("status", "bad_request")]
        ),
        Some(7.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_hook_notifications_total",
            &[("status", "too_large")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_hook_notifications_total",
            &[("status", "accepted")]
        ),
        Some(2.0)
    );
    assert!(!m.mentions(TOKEN));
    assert!(
        !String::from_utf8_lossy(&std::fs::read(lab.state_dir().join("journal.jsonl"))?)
            .contains(TOKEN)
    );
    assert!(!cw.logs().contains(TOKEN));
    Ok(())
}

#[tokio::test]
async fn timeout_kills_the_hooks_whole_process_group_on_the_main_listener() -> Result<()> {
    let lab = HookLab::new()?;
    let d = lab.dir().display().to_string();
    let slow = lab.script(
        "slow",
        &format!("sleep 300 &\necho $! > {d}/child.pid\necho $$ > {d}/leader.pid\nwait"),
    )?;
    let rules = format!(
        "    - {{ name: slow, match: {{ alertname: Slow }}, command: [{}], timeout: 1s }}\n",
        slow.display()
    );
    // This one serves the webhook on the main listener, next to /metrics.
    let config = lab
        .config("  kill_grace: 500ms\n", &rules)
        .replace(&format!("listen: 127.0.0.1:{}", lab.port), "listen: main");
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let body = notification(
        "firing",
        "g",
        vec![alert(
            "firing",
            json!({"alertname": "Slow"}),
            "s1",
            "2026-01-01T00:00:00Z",
        )],
    );
    let status = cw
        .client()
        .post(cw.url("/hooks/alertmanager"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body.to_string())
        .send()
        .await?
        .status();
    assert_eq!(status, 200);
    wait_for("the timed-out run", || !lab.events("finished").is_empty()).await?;
    let finished = &lab.events("finished")[0];
    assert_eq!(finished["result"], "timeout", "{finished}");
    for file in ["leader.pid", "child.pid"] {
        let pid: i32 = String::from_utf8(lab.read(file)?)?.trim().parse()?;
        wait_until(
            Duration::from_secs(10),
            &format!("{file} {pid} to be gone"),
            async || Ok(!pid_alive(pid)),
        )
        .await?;
    }
    let m = scrape(&cw).await?;
    assert_eq!(
        m.value(
            "clusterwatch_hook_runs_total",
            &[("hook", "slow"), ("result", "timeout")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_hook_runs_in_flight", &[("hook", "slow")]),
        Some(0.0)
    );
    Ok(())
}

/// Starts clusterwatch with one example script from `alertmanager/hooks/` as a disruptive
/// hook on `alertname` (`--check` as its validation, `env` as YAML flow mapping).
async fn example_hook(
    lab: &HookLab,
    script: &str,
    alertname: &str,
    env: &str,
) -> Result<Clusterwatch> {
    let script = clusterwatch_tests::harness::repo_root()
        .join("alertmanager/hooks")
        .join(script);
    let rules = format!(
        "    - name: promote\n      match: {{ alertname: {alertname} }}\n      validate: [{s}, --check]\n      command: [{s}]\n      disruptive: true\n      env: {env}\n",
        s = script.display(),
    );
    Clusterwatch::start(
        Some(&lab.config("  max_disruptive_per_hour: 10\n", &rules)),
        &[],
    )
    .await
}

/// Posts a firing `alertname` alert with fingerprint `fp`; returns the run's last record
/// (`validate_failed` or `finished`).
async fn fire_and_wait(lab: &HookLab, alertname: &str, fp: &str) -> Result<Value> {
    let body = notification(
        "firing",
        fp,
        vec![alert(
            "firing",
            json!({"alertname": alertname}),
            fp,
            "2026-01-01T00:00:00Z",
        )],
    );
    assert_eq!(lab.post(body.to_string()).await?, 200);
    let run = lab
        .events("matched")
        .into_iter()
        .find(|r| r["alert"]["fingerprint"] == fp)
        .context("no matched record")?["run"]
        .clone();
    let end = || {
        lab.journal().into_iter().find(|r| {
            r["run"] == run && (r["event"] == "validate_failed" || r["event"] == "finished")
        })
    };
    wait_for("the run to end", || end().is_some()).await?;
    end().context("vanished")
}

#[tokio::test]
async fn pg_promote_example_refuses_while_the_primary_answers_then_promotes() -> Result<()> {
    let pair = clusterwatch_tests::harness::PgCluster::start_pair().await?;
    let lab = HookLab::new()?;
    let env = format!(
        "{{ PGHOST: 127.0.0.1, PGPORT: \"{}\", PGUSER: postgres, OLD_PRIMARY_HOST: 127.0.0.1, OLD_PRIMARY_PORT: \"{}\" }}",
        pair.standby.port(),
        pair.primary.port()
    );
    let _cw = example_hook(&lab, "pg-promote", "PostgresNoPrimary", &env).await?;

    let refused = fire_and_wait(&lab, "PostgresNoPrimary", "p1").await?;
    assert_eq!(refused["event"], "validate_failed", "{refused}");
    assert_eq!(refused["outcome"], "exit 4", "{refused}");
    assert_eq!(pair.standby.psql("SELECT pg_is_in_recovery()").await?, "t");

    pair.primary.stop().await?;
    let done = fire_and_wait(&lab, "PostgresNoPrimary", "p2").await?;
    assert_eq!(done["result"], "ok", "{done}");
    assert_eq!(pair.standby.psql("SELECT pg_is_in_recovery()").await?, "f");
    Ok(())
}

#[tokio::test]
async fn redis_promote_example_acts_only_once_the_master_is_gone() -> Result<()> {
    let mut pair = clusterwatch_tests::harness::RedisPair::start().await?;
    let lab = HookLab::new()?;
    let env = format!(
        "{{ REDIS_HOST: 127.0.0.1, REDIS_PORT: \"{}\", MAX_DOWN_SECONDS_MIN: \"0\" }}",
        pair.replica.port()
    );
    let _cw = example_hook(&lab, "redis-promote", "RedisNoMaster", &env).await?;
    let role = async |node: &clusterwatch_tests::harness::RedisNode| -> Result<Option<String>> {
        Ok(node.info("replication").await?.get("role").cloned())
    };

    // The master is fine: the check refuses, nothing is changed, the incident stays open.
    let refused = fire_and_wait(&lab, "RedisNoMaster", "r1").await?;
    assert_eq!(refused["outcome"], "exit 3", "{refused}");
    assert!(refused["stderr_tail"]
        .as_str()
        .unwrap_or("")
        .contains("link to the master is up"));
    assert_eq!(role(&pair.replica).await?.as_deref(), Some("slave"));
    assert!(lab.events("started").is_empty());

    // The master goes away: the same script promotes the replica.
    pair.master.stop()?;
    wait_until(WAIT, "the replica to see its master gone", async || {
        Ok(pair
            .replica
            .info("replication")
            .await?
            .get("master_link_status")
            .map(String::as_str)
            == Some("down"))
    })
    .await?;
    let done = fire_and_wait(&lab, "RedisNoMaster", "r2").await?;
    assert_eq!(done["result"], "ok", "{done}");
    assert_eq!(role(&pair.replica).await?.as_deref(), Some("master"));
    Ok(())
}

#[tokio::test]
async fn ordered_steps_stop_at_the_failed_step_and_journal_each() -> Result<()> {
    let lab = HookLab::new()?;
    let d = lab.dir().display().to_string();
    // Each step appends its name, index and fencing-relevant facts; `promote` fails.
    let step = |name: &str, exit: u8| -> Result<std::path::PathBuf> {
        lab.script(
            name,
            &format!(
                "echo \"$CW_STEP $CW_STEP_INDEX $CW_RUN $CW_LABEL_CLUSTER\" >> {d}/steps.log\nexit {exit}"
            ),
        )
    };
    let (fence, promote, repoint) = (step("fence", 0)?, step("promote", 2)?, step("repoint", 0)?);
    let rules = format!(
        "    - name: failover\n      match: {{ alertname: PostgresFailoverNeeded }}\n      disruptive: true\n      steps:\n        - {{ name: fence, command: [{}] }}\n        - {{ name: promote, command: [{}] }}\n        - {{ name: repoint, command: [{}] }}\n",
        fence.display(),
        promote.display(),
        repoint.display()
    );
    let _cw = Clusterwatch::start(Some(&lab.config("", &rules)), &[]).await?;
    let body = notification(
        "firing",
        "g",
        vec![alert(
            "firing",
            json!({"alertname": "PostgresFailoverNeeded", "cluster": "pg-main"}),
            "st1",
            "2026-01-01T00:00:00Z",
        )],
    );
    assert_eq!(lab.post(body.to_string()).await?, 200);
    // A re-send of the same incident is a repeat, not a second run.
    assert_eq!(lab.post(body.to_string()).await?, 200);
    wait_for("the run to finish", || !lab.events("finished").is_empty()).await?;
    let log = String::from_utf8(lab.read("steps.log")?)?;
    assert_eq!(log, "fence 0 0 pg-main\npromote 1 0 pg-main\n");
    let steps: Vec<(String, String)> = lab
        .journal()
        .into_iter()
        .filter(|r| r["event"] == "step_started" || r["event"] == "step_finished")
        .map(|r| {
            let what = r["result"].as_str().unwrap_or("started").to_owned();
            (r["step"].as_str().unwrap_or_default().to_owned(), what)
        })
        .collect();
    let expected = [
        ("fence", "started"),
        ("fence", "ok"),
        ("promote", "started"),
        ("promote", "failed"),
    ]
    .map(|(s, r)| (s.to_owned(), r.to_owned()));
    assert_eq!(steps, expected);
    let matched = lab.events("matched");
    assert_eq!(matched.len(), 1, "{matched:?}");
    assert_eq!(matched[0]["cluster"], "pg-main");
    let finished = lab.events("finished");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["result"], "failed");
    assert_eq!(finished[0]["exit_code"], 2);
    Ok(())
}
