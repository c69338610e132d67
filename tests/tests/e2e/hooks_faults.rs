//! The hook runner under faults, against the real binary: a full disk under the journal, a
//! journal damaged the way a crash leaves it, kill -9 with runs still queued, and small
//! defects (a short body, a huge label set). A disruptive hook must never run twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::scrape;
use clusterwatch_tests::harness::http::is_ready;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{wait_until, Clusterwatch};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    wait_until(WAIT, what, async || Ok(check())).await
}

/// A one-alert `NoPrimary` notification for incident `fp`.
fn incident(fp: &str) -> String {
    let a = alert(
        "firing",
        json!({"alertname": "NoPrimary", "cluster": "db"}),
        fp,
        "2026-01-01T00:00:00Z",
    );
    notification("firing", fp, vec![a]).to_string()
}

/// Starts the stopped process again and waits for `/-/ready`.
async fn restart(cw: &mut Clusterwatch) -> Result<()> {
    let client = clusterwatch_tests::harness::http::client()?;
    cw.process().start()?;
    let ready = cw.url("/-/ready");
    cw.process()
        .wait_ready(WAIT, "clusterwatch after a restart", async || {
            is_ready(&client, &ready).await
        })
        .await
}

/// `clusterwatch --config.file CONFIG ARGS…`: (success, stdout + stderr).
fn cli(config: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
        .arg("--config.file")
        .arg(config)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The fingerprint each run was for, from its `matched` record.
fn run_of(lab: &HookLab, fp: &str) -> Option<Value> {
    lab.events("matched")
        .into_iter()
        .find(|r| r["alert"]["fingerprint"] == fp)
        .map(|r| r["run"].clone())
}

/// How many times the recorder `name` ran for incident `fp`.
fn runs_for(lab: &HookLab, name: &str, fp: &str) -> usize {
    lab.invocations(name)
        .iter()
        .filter(|l| l.split(' ').nth(2) == Some(fp))
        .count()
}

/// A tmpfs mounted on a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with the reason printed) where tmpfs cannot be mounted (no privilege).
    fn mount(dir: &Path, size: &str) -> Result<Option<Tmpfs>> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here ({}); the disk-full trial needs it",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Ok(None);
        }
        Ok(Some(Tmpfs(dir.to_owned())))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill(path: &Path) -> Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
            Err(e) => bail!("filling {}: {e}", path.display()),
        }
    }
    Ok(written)
}

#[tokio::test]
async fn disk_full_under_the_journal_then_kill_9_never_runs_a_disruptive_hook_twice() -> Result<()>
{
    let lab = HookLab::new()?;
    let Some(_tmpfs) = Tmpfs::mount(&lab.state_dir(), "256k")? else {
        return Ok(());
    };
    let d = lab.dir().display();
    // The validation waits for the test's go-ahead, so the disk fills while it runs.
    let validate = lab.script(
        "validate",
        &format!("touch {d}/validating\nfor i in $(seq 300); do [ -e {d}/go ] && exit 0; sleep 0.1; done\nexit 3"),
    )?;
    let promote = lab.recorder("promote", "sleep 60")?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: NoPrimary }}, validate: [{}], command: [{}], disruptive: true, timeout: 120s }}\n",
        validate.display(),
        promote.display()
    );
    let mut cw = Clusterwatch::start(Some(&lab.config("", &rules)), &[]).await?;
    assert_eq!(lab.post(incident("full1")).await?, 200);
    wait_for("the validation to run", || {
        lab.dir().join("validating").exists()
    })
    .await?;

    // The disk fills up; a notification that matches nothing still needs its `received`
    // record, bigger than what is left: the append fails part-way.
    let filler = lab.state_dir().join("filler");
    let filled = fill(&filler)?;
    let big = notification(
        "firing",
        &"g".repeat(16 << 10),
        vec![alert(
            "firing",
            json!({"alertname": "Unrelated"}),
            "other",
            "2026-01-01T00:00:00Z",
        )],
    );
    let status = lab.post(big.to_string()).await?;
    assert_eq!(status, 500, "a notification that could not be journaled");
    // Cut back: the journal ends in a whole record.
    let bytes = std::fs::read(lab.state_dir().join("journal.jsonl"))?;
    assert_eq!(bytes.last(), Some(&b'\n'), "the journal ends in a fragment");
    assert_eq!(
        lab.journal().len(),
        bytes.iter().filter(|b| **b == b'\n').count(),
        "an unreadable line"
    );

    // Space again; the validation passes; the hook starts; the process is killed.
    std::fs::remove_file(&filler)?;
    // Alertmanager's retry of the refused notification is stored now.
    assert_eq!(lab.post(big.to_string()).await?, 200);
    std::fs::write(lab.dir().join("go"), "")?;
    wait_for("the disruptive hook to start", || {
        lab.invocations("promote").len() == 1
    })
    .await?;
    let hook_pid: i32 = String::from_utf8(lab.read("promote.pid")?)?
        .trim()
        .parse()?;
    cw.process().kill9()?;
    restart(&mut cw).await?;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(hook_pid),
        nix::sys::signal::Signal::SIGKILL,
    );

    let run = run_of(&lab, "full1").context("matched record")?;
    assert!(
        lab.events("unknown").iter().any(|r| r["run"] == run),
        "the run that started is unknown after the restart: {:?}",
        lab.journal()
    );
    for _ in 0..3 {
        assert_eq!(lab.post(incident("full1")).await?, 200);
    }
    let runs = runs_for(&lab, "promote", "full1");
    eprintln!("disk-full trial: filler {filled} bytes, the disruptive hook ran {runs} time(s)");
    assert_eq!(runs, 1, "{:?}", lab.journal());
    Ok(())
}

/// How a journal gets damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// The `started` line replaced by garbage.
    GarbageStarted,
    /// 4 KiB of NUL bytes before the `started` line (a block ext4 never wrote).
    NulsBeforeStarted,
    /// One changed byte in the `matched` line (still valid JSON).
    ChangedMatched,
}

/// Damages the journal in `dir`; returns the damaged line (1-based).
fn damage(dir: &Path, how: Damage) -> Result<usize> {
    let path = dir.join("journal.jsonl");
    let text = std::fs::read(&path)?;
    let mut lines: Vec<Vec<u8>> = text
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    let find = |event: &str| {
        let needle = format!("\"event\":\"{event}\"");
        lines
            .iter()
            .position(|l| String::from_utf8_lossy(l).contains(&needle))
            .with_context(|| format!("no {event} line"))
    };
    let at = match how {
        Damage::GarbageStarted => {
            let at = find("started")?;
            lines[at] = b"#&%garbage that is not a record\n".to_vec();
            at
        }
        Damage::NulsBeforeStarted => {
            let at = find("started")?;
            let mut l = vec![0u8; 4096];
            l.extend_from_slice(&lines[at]);
            lines[at] = l;
            at
        }
        Damage::ChangedMatched => {
            let at = find("matched")?;
            let l = String::from_utf8(lines[at].clone())?;
            lines[at] = l
                .replacen("\"fingerprint\":\"done", "\"fingerprint\":\"dome", 1)
                .into_bytes();
            assert_ne!(lines[at], l.as_bytes(), "nothing changed");
            at
        }
    };
    std::fs::write(&path, lines.concat())?;
    Ok(at + 1)
}

#[tokio::test]
async fn a_damaged_journal_stops_the_start_naming_the_line_and_no_handled_incident_runs_again(
) -> Result<()> {
    for how in [
        Damage::GarbageStarted,
        Damage::NulsBeforeStarted,
        Damage::ChangedMatched,
    ] {
        let lab = HookLab::new()?;
        let promote = lab.recorder("promote", "exit 0")?;
        let rules = format!(
            "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}], disruptive: true }}\n",
            promote.display()
        );
        let mut cw = Clusterwatch::start(
            Some(&lab.config("  max_disruptive_per_hour: 10\n", &rules)),
            &[],
        )
        .await?;
        let config = cw.config_path().context("config")?.to_owned();
        assert_eq!(lab.post(incident("done")).await?, 200);
        wait_for("the run to finish", || !lab.events("finished").is_empty()).await?;
        cw.process().stop()?;

        let line = damage(&lab.state_dir(), how)?;
        // The start is refused, naming the line.
        cw.process().start()?;
        wait_until(WAIT, "clusterwatch to refuse the journal", async || {
            Ok(cw.process().exit_status()?.is_some())
        })
        .await?;
        let logs = cw.logs();
        let named = format!("damaged at line {line} ");
        assert!(logs.contains(&named), "{how:?}: {named:?} not in\n{logs}");
        assert!(logs.contains("hooks journal --check"), "{logs}");

        // The plain listing marks it in place; --check names it too and fails;
        // --accept-damage keeps what is readable.
        let (ok, out) = cli(&config, &["hooks", "journal"])?;
        assert!(
            ok && out.contains(&format!("!! damaged line {line} ")),
            "{how:?}: {out}"
        );
        let (ok, out) = cli(&config, &["hooks", "journal", "--check"])?;
        assert!(
            !ok && out.contains(&format!("damaged line {line} ")),
            "{how:?}: {out}"
        );
        let (ok, out) = cli(&config, &["hooks", "journal", "--accept-damage"])?;
        assert!(
            ok && out.contains(&format!("dropped line {line} ")),
            "{how:?}: {out}"
        );
        let (ok, out) = cli(&config, &["hooks", "journal", "--check"])?;
        assert!(ok, "{how:?}: {out}");

        // Started again, the handled incident is re-sent: it does not run again.
        restart(&mut cw).await?;
        for _ in 0..2 {
            assert_eq!(lab.post(incident("done")).await?, 200);
        }
        assert_eq!(
            runs_for(&lab, "promote", "done"),
            1,
            "{how:?}: {:?}",
            lab.journal()
        );
        let skipped = lab.events("deduped").len() + lab.events("journal_damaged").len();
        assert_eq!(skipped, 2, "{how:?}: {:?}", lab.journal());
        // A new incident still runs.
        let fresh = incident_now("fresh");
        assert_eq!(lab.post(fresh).await?, 200);
        wait_for("a new incident to run", || {
            runs_for(&lab, "promote", "fresh") == 1
        })
        .await?;
        cw.process().stop()?;
    }
    Ok(())
}

/// A `NoPrimary` incident that begins now.
fn incident_now(fp: &str) -> String {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let a = alert(
        "firing",
        json!({"alertname": "NoPrimary", "cluster": "db"}),
        fp,
        &now,
    );
    notification("firing", fp, vec![a]).to_string()
}

/// Where a run ended, from the journal: `finished`, `unknown`, `abandoned`, or "" (open).
fn end_of(journal: &[Value], run: &Value) -> &'static str {
    let mut end = "";
    for r in journal.iter().filter(|r| r["run"] == *run) {
        match r["event"].as_str() {
            Some("finished") if r["result"] != "retry" => end = "finished",
            Some("unknown") => end = "unknown",
            Some("abandoned") => end = "abandoned",
            _ => {}
        }
    }
    end
}

#[tokio::test]
async fn runs_queued_at_a_kill_9_start_once_after_it_and_stale_ones_are_abandoned() -> Result<()> {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 3;
    let lab = HookLab::new()?;
    let promote = lab.recorder("promote", "sleep 0.5")?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}], disruptive: true }}\n",
        promote.display()
    );
    // One run at a time: the others of a round wait, accepted but not started.
    let settings = "  max_disruptive_per_hour: 1000\n  max_concurrent_runs: 1\n";
    let mut cw = Clusterwatch::start(Some(&lab.config(settings, &rules)), &[]).await?;
    let mut accepted: Vec<String> = Vec::new();
    let mut rng = fastrand_seed();
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let fp = format!("q{round:02}-{i}");
            assert_eq!(lab.post(incident(&fp)).await?, 200);
            accepted.push(fp);
        }
        // Somewhere between "all queued" and "all done".
        let delay = rng.next() % 1600;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        cw.process().kill9()?;
        restart(&mut cw).await?;
        wait_for("every run of the round to end", || {
            let journal = lab.journal();
            accepted
                .iter()
                .all(|fp| run_of(&lab, fp).is_some_and(|run| !end_of(&journal, &run).is_empty()))
        })
        .await?;
    }
    let journal = lab.journal();
    let (mut double, mut lost, mut unknown) = (0, 0, 0);
    for fp in &accepted {
        let runs = runs_for(&lab, "promote", fp);
        let end = end_of(&journal, &run_of(&lab, fp).context("matched")?);
        double += usize::from(runs > 1);
        lost += usize::from(end == "abandoned");
        unknown += usize::from(end == "unknown");
    }
    let resumed = lab.events("resumed").len();
    eprintln!(
        "queued runs over {ROUNDS} kill -9 rounds: {} accepted, {resumed} resumed after a restart, {unknown} unknown (killed while running), {double} double runs, {lost} fresh runs lost",
        accepted.len()
    );
    assert_eq!(double, 0, "double runs");
    assert_eq!(lost, 0, "fresh accepted runs lost");
    assert!(resumed > 0, "no round left a run queued");
    // Not one `started` run ran again: each run has at most one `started` per attempt 1.
    for run in lab.events("matched").iter().map(|r| r["run"].clone()) {
        let starts = journal
            .iter()
            .filter(|r| r["event"] == "started" && r["run"] == run)
            .count();
        assert!(starts <= 1, "run {run} started {starts} times");
    }

    // Stale: queued runs older than resume_max_age when clusterwatch comes back.
    let stale: Vec<String> = (0..PER_ROUND).map(|i| format!("stale-{i}")).collect();
    for fp in &stale {
        assert_eq!(lab.post(incident(fp)).await?, 200);
    }
    cw.process().kill9()?;
    let config = cw.config_path().context("config")?.to_owned();
    std::fs::write(
        &config,
        lab.config(&format!("{settings}  resume_max_age: 1s\n"), &rules),
    )?;
    // Let them age past the 1 s limit (a wait for time to pass, not for an event).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    restart(&mut cw).await?;
    let journal = lab.journal();
    let ends: Vec<&str> = stale
        .iter()
        .map(|fp| end_of(&journal, &run_of(&lab, fp).unwrap_or_default()))
        .collect();
    // The first may have started before the kill; the rest were still queued.
    assert!(ends[1..].iter().all(|e| *e == "abandoned"), "{ends:?}");
    for fp in &stale[1..] {
        assert_eq!(runs_for(&lab, "promote", fp), 0);
    }
    Ok(())
}

/// A small xorshift generator seeded from the clock: random kill points, printed so a
/// failing round can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fastrand_seed() -> XorShift {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("kill-point seed: {seed}");
    XorShift(seed)
}

#[tokio::test]
async fn a_short_body_is_400_and_a_huge_label_set_still_runs_the_hook() -> Result<()> {
    let lab = HookLab::new()?;
    let promote = lab.recorder("promote", "exit 0")?;
    let rules = format!(
        "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}] }}\n",
        promote.display()
    );
    let cw = Clusterwatch::start(
        Some(&lab.config("  max_body_bytes: 16777216\n", &rules)),
        &[],
    )
    .await?;

    // Fewer bytes than Content-Length, then the client closes its side.
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", lab.port)).await?;
    let head = format!(
        "POST /hooks/alertmanager HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"version\""
    );
    sock.write_all(head.as_bytes()).await?;
    sock.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, sock.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // 500 labels of 8 KiB: 4 MiB of environment, twice what the kernel allows an exec.
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), json!("NoPrimary"));
    for i in 0..500 {
        labels.insert(format!("l{i:03}"), json!("v".repeat(8192)));
    }
    let a = alert(
        "firing",
        Value::Object(labels),
        "huge",
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(
        lab.post(notification("firing", "huge", vec![a]).to_string())
            .await?,
        200
    );
    first_run_ok(&lab).await?;
    let env = lab.read("promote.env.0")?;
    assert!(env.len() < 256 << 10, "environment of {} bytes", env.len());
    let m = scrape(&cw).await?;
    let dropped = m
        .value(
            "clusterwatch_hook_env_labels_dropped_total",
            &[("hook", "promote")],
        )
        .unwrap_or(0.0);
    assert!(dropped > 400.0, "dropped {dropped}");
    Ok(())
}

/// Waits for the first run to finish and checks it ended `ok`.
async fn first_run_ok(lab: &HookLab) -> Result<()> {
    wait_for("the hook to finish", || !lab.events("finished").is_empty()).await?;
    let result = lab.events("finished")[0]["result"].clone();
    anyhow::ensure!(result == "ok", "result {result}: {:?}", lab.journal());
    Ok(())
}

/// Kills the child when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_relative_config_file_runs_a_relative_command_with_an_absolute_payload_file() -> Result<()>
{
    let lab = HookLab::new()?;
    let seen = lab.dir().join("payload.seen");
    lab.recorder(
        "promote",
        &format!("cat \"$CW_PAYLOAD_FILE\" > {}", seen.display()),
    )?;
    // Relative to the configuration file, which is given relative to the working directory.
    let rules = "    - { name: promote, match: { alertname: NoPrimary }, command: [./promote] }\n";
    let yaml = lab
        .config("", rules)
        .replace(&format!("{}/state", lab.dir().display()), "state");
    std::fs::create_dir_all(lab.dir().join("etc"))?;
    std::fs::write(lab.dir().join("clusterwatch.yml"), yaml)?;
    let port = clusterwatch_tests::harness::ports::free_port()?;
    let (ok, out) = {
        let out = std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
            .current_dir(lab.dir().join("etc"))
            .args(["check-config", "../clusterwatch.yml"])
            .output()?;
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(ok, "{out}");
    let _cw = Killed(
        std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
            .current_dir(lab.dir().join("etc"))
            .args(["--config.file", "../clusterwatch.yml"])
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    wait_until(WAIT, "the webhook listener", async || {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", lab.port))
            .await
            .is_ok())
    })
    .await?;
    let body = incident("rel");
    assert_eq!(lab.post(body.clone()).await?, 200);
    first_run_ok(&lab).await?;
    let env = String::from_utf8(lab.read("promote.env.0")?)?;
    let payload = env
        .split('\0')
        .find_map(|v| v.strip_prefix("CW_PAYLOAD_FILE="))
        .context("CW_PAYLOAD_FILE")?;
    assert!(Path::new(payload).is_absolute(), "{payload}");
    // The hook runs in `/`: it read the file by that absolute name.
    assert_eq!(std::fs::read_to_string(&seen)?, body);
    Ok(())
}
