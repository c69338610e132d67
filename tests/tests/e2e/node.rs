//! Node-level checks as an operator meets them: a real supervisord whose programs are killed
//! or crash-loop, the same programs seen by the process collector, and a status file whose
//! role is switched under the exporter.

use std::time::Duration;

use anyhow::{Context, Result};
use clusterwatch_tests::exposition::{scrape, Exposition};
use clusterwatch_tests::harness::{free_port, temp_dir, wait_until, Clusterwatch, Supervisord};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const STATES: &[&str] = &[
    "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN",
];

/// The one state of `program` (on target node1) whose series is 1, checking that every state has a series.
fn program_state(e: &Exposition, program: &str) -> Option<String> {
    let series = e.find(
        "clusterwatch_supervisord_program_state",
        &[("target", "node1"), ("program", program)],
    );
    if series.len() != STATES.len() {
        return None;
    }
    let on: Vec<_> = series.iter().filter(|s| s.value == 1.0).collect();
    (on.len() == 1).then(|| on[0].labels["state"].clone())
}

/// Password of supervisord's HTTP listener; it must never show in clusterwatch's output.
const HTTP_PASSWORD: &str = "s3cret-supervisor-pw";

/// Sections after the harness's own: an HTTP listener with a password, a program that runs
/// and one that crash-loops.
fn supervisord_sections(marker: &str, http_port: u16) -> String {
    format!(
        "[inet_http_server]\nport=127.0.0.1:{http_port}\nusername=monitor\npassword={HTTP_PASSWORD}\n\n\
         [program:steady]\ncommand=/bin/sleep {marker}\nstartsecs=1\nautorestart=false\n\n\
         [program:crashy]\ncommand=/bin/sh -c \"exit 3\"\nstartsecs=1\nstartretries=2\nautorestart=true\n"
    )
}

#[tokio::test]
async fn supervisord_programs_killed_and_crash_looping_and_their_processes() -> Result<()> {
    // A sleep length no other process on the machine uses, so the process collector
    // counts exactly the program this test supervises.
    let marker = format!("3600.{}", std::process::id());
    let http_port = free_port()?;
    let supervisord = Supervisord::start(&supervisord_sections(&marker, http_port)).await?;
    let good = supervisord.dir().join("good.pass");
    let bad = supervisord.dir().join("bad.pass");
    std::fs::write(&good, format!("{HTTP_PASSWORD}\n"))?;
    std::fs::write(&bad, "not-the-password\n")?;

    let cw = Clusterwatch::start(
        Some(&format!(
            "supervisord:\n  - {{ name: node1, url: \"{}\" }}\n  - {{ name: node1-http, url: \"http://127.0.0.1:{http_port}/RPC2\", username: monitor, password_file: {} }}\n  - {{ name: node1-badpw, url: \"http://127.0.0.1:{http_port}\", username: monitor, password_file: {} }}\nprocesses:\n  - {{ name: steady, cmdline: \"^/bin/sleep {marker}$\", min: 1 }}\n",
            supervisord.url(),
            good.display(),
            bad.display()
        )),
        &[],
    )
    .await?;

    // The steady program runs; the crashing one goes through BACKOFF (about a second, so
    // not waited for) to FATAL once its retries are spent.
    let mut pid = 0.0;
    wait_until(
        Duration::from_secs(30),
        "steady RUNNING and crashy FATAL",
        async || {
            let e = scrape(&cw).await?;
            pid = e
                .value(
                    "clusterwatch_supervisord_program_pid",
                    &[("target", "node1"), ("program", "steady")],
                )
                .unwrap_or(0.0);
            let (steady, crashy) = (program_state(&e, "steady"), program_state(&e, "crashy"));
            let count = e.value("clusterwatch_process_count", &[("target", "steady")]);
            anyhow::ensure!(
                steady.as_deref() == Some("RUNNING")
                    && crashy.as_deref() == Some("FATAL")
                    && count == Some(1.0),
                "steady {steady:?}, crashy {crashy:?}, matching processes {count:?}, up {:?}",
                e.find("clusterwatch_target_up", &[])
            );
            Ok(true)
        },
    )
    .await
    .with_context(|| cw.logs())?;
    let e = scrape(&cw).await?;
    // supervisord reports 0 as the exit status of a start that failed; only its presence is
    // certain.
    assert!(e
        .value(
            "clusterwatch_supervisord_program_exit_status",
            &[("target", "node1"), ("program", "crashy")]
        )
        .is_some());
    assert_eq!(
        e.value("clusterwatch_process_min", &[("target", "steady")]),
        Some(1.0)
    );
    assert!(e
        .value(
            "clusterwatch_process_youngest_age_seconds",
            &[("target", "steady")]
        )
        .is_some());

    // Killing the program: the state leaves RUNNING as soon as supervisord has reaped it, and
    // the process collector sees it gone on the same scrape.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    wait_until(
        Duration::from_secs(10),
        "steady no longer RUNNING",
        async || {
            let e = scrape(&cw).await?;
            let state = program_state(&e, "steady");
            Ok(state.is_some()
                && state.as_deref() != Some("RUNNING")
                && e.value(
                    "clusterwatch_supervisord_program_pid",
                    &[("target", "node1"), ("program", "steady")],
                ) == Some(0.0)
                && e.value("clusterwatch_process_count", &[("target", "steady")]) == Some(0.0))
        },
    )
    .await?;
    let e = scrape(&cw).await?;
    assert_eq!(
        e.value(
            "clusterwatch_target_up",
            &[("collector", "supervisord"), ("target", "node1")]
        ),
        Some(1.0)
    );

    // The same supervisord over HTTP with basic auth sees the same programs; a wrong password
    // is a down target with reason `auth`, and the password shows nowhere.
    let up = |e: &Exposition, t: &str| {
        e.value(
            "clusterwatch_target_up",
            &[("collector", "supervisord"), ("target", t)],
        )
    };
    assert_eq!(up(&e, "node1-http"), Some(1.0), "{}", cw.logs());
    assert_eq!(
        e.find(
            "clusterwatch_supervisord_program_state",
            &[
                ("target", "node1-http"),
                ("program", "crashy"),
                ("state", "FATAL")
            ]
        )[0]
        .value,
        1.0
    );
    assert_eq!(up(&e, "node1-badpw"), Some(0.0));
    assert!(e
        .value(
            "clusterwatch_target_scrape_errors_total",
            &[("target", "node1-badpw"), ("reason", "auth")]
        )
        .is_some_and(|n| n >= 1.0));
    let (_, _, body) = cw.get("/metrics").await?;
    let (_, _, landing) = cw.get("/").await?;
    for text in [body.as_str(), landing.as_str(), cw.logs().as_str()] {
        assert!(!text.contains(HTTP_PASSWORD) && !text.contains("not-the-password"));
    }
    Ok(())
}

#[tokio::test]
async fn status_file_switch_is_followed_by_the_state_set() -> Result<()> {
    let dir = temp_dir("cw-status-")?;
    let status = dir.path().join("sounz.status");
    let flag = dir.path().join("cp.oos");
    std::fs::write(&status, "standby\n")?;
    let cw = Clusterwatch::start(
        Some(&format!(
            "files:\n  - name: sounz-status\n    cluster: sounz\n    path: {}\n    states: [down, production, standby, production_alone, standby_as_production, production_as_standby]\n  - {{ name: cp-out-of-service, path: {} }}\n",
            status.display(),
            flag.display()
        )),
        &[],
    )
    .await?;
    let role = |e: &Exposition| -> Vec<String> {
        e.find("clusterwatch_file_state", &[("target", "sounz-status")])
            .iter()
            .filter(|s| s.value == 1.0)
            .map(|s| s.labels["state"].clone())
            .collect()
    };
    let e = scrape(&cw).await?;
    assert_eq!(role(&e), ["standby"]);
    assert_eq!(
        e.find("clusterwatch_file_state", &[("cluster", "sounz")])
            .len(),
        6
    );
    assert_eq!(
        e.value(
            "clusterwatch_file_present",
            &[("target", "cp-out-of-service")]
        ),
        Some(0.0)
    );

    // The switch is written the way an operator's script does it: in place.
    std::fs::write(&status, "production_alone\n")?;
    std::fs::write(&flag, "")?;
    let e = scrape(&cw).await?;
    assert_eq!(role(&e), ["production_alone"]);
    assert_eq!(
        e.value(
            "clusterwatch_file_state_unknown",
            &[("target", "sounz-status")]
        ),
        Some(0.0)
    );
    assert_eq!(
        e.value(
            "clusterwatch_file_present",
            &[("target", "cp-out-of-service")]
        ),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test]
async fn textfiles_are_merged_and_a_bad_one_is_reported_not_fatal() -> Result<()> {
    let dir = temp_dir("cw-textfile-")?;
    std::fs::write(
        dir.path().join("nightly_dump.prom"),
        "# HELP nightly_dump_last_success_timestamp_seconds Last good dump.\n# TYPE nightly_dump_last_success_timestamp_seconds gauge\nnightly_dump_last_success_timestamp_seconds{db=\"sounz\"} 1700000000\n",
    )?;
    std::fs::write(dir.path().join("rsync.prom"), "rsync_ok{ 1\n")?;
    let cw = Clusterwatch::start(
        Some(&format!(
            "textfile:\n  directory: {}\n",
            dir.path().display()
        )),
        &[],
    )
    .await?;
    let e = scrape(&cw).await?;
    assert_eq!(
        e.value(
            "nightly_dump_last_success_timestamp_seconds",
            &[("db", "sounz"), ("target", "textfile")]
        ),
        Some(1.7e9)
    );
    assert_eq!(
        e.value(
            "clusterwatch_textfile_file_error",
            &[("file", "rsync.prom")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.value(
            "clusterwatch_textfile_file_error",
            &[("file", "nightly_dump.prom")]
        ),
        Some(0.0)
    );
    assert!(e
        .value(
            "clusterwatch_textfile_file_mtime_seconds",
            &[("file", "rsync.prom")]
        )
        .is_some());
    assert_eq!(
        e.value("clusterwatch_target_up", &[("collector", "textfile")]),
        Some(1.0)
    );

    // Fixing the file is picked up on the next scrape.
    std::fs::write(dir.path().join("rsync.prom"), "rsync_ok 1\n")?;
    let e = scrape(&cw).await?;
    assert_eq!(e.value("rsync_ok", &[]), Some(1.0));
    assert_eq!(
        e.value(
            "clusterwatch_textfile_file_error",
            &[("file", "rsync.prom")]
        ),
        Some(0.0)
    );
    Ok(())
}
