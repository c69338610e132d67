//! The soak test, run by hand: a fully configured clusterwatch against the lab, scraped 10 times
//! a second while servers are stopped and started, webhooks arrive and reloads are asked for,
//! with its RSS and open file descriptors sampled over time and a pass/fail verdict on growth.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;

use clusterwatch_tests::harness::nginx::Nginx;
use clusterwatch_tests::harness::process::{rss_bytes, status_bytes};
use clusterwatch_tests::harness::webhook::{alert, notification};
use clusterwatch_tests::harness::{temp_dir, wait_until};
use clusterwatch_tests::lab::{ExtraConfig, Lab, LabSettings, PG_HOOK, REDIS_HOOK};

/// How often RSS and descriptors are sampled, and the length of one row of the table.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How often the stats CSVs and the textfile are rewritten.
const REWRITE_EVERY: Duration = Duration::from_secs(10);
/// Scrapes in flight at once; a tick finding none free counts as a failed scrape.
const MAX_IN_FLIGHT: usize = 32;
/// How long a restarted pair gets to replicate again before the soak says so.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// The dry-run hook the soak's alerts match (the other half match no hook at all).
const DRY_RUN_HOOK: &str = "soak-dry-run";

#[derive(Parser)]
#[command(about = "Soak clusterwatch against the lab and report RSS and descriptors over time")]
struct Cli {
    /// How long to run (`30m`, `2m`, `1h`).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop one server this often (PostgreSQL standby, Redis replica, PostgreSQL primary,
    /// Redis master, in turn).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    disrupt_every: Duration,
    /// How long a stopped server stays down.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    down_for: Duration,
    /// Scrapes of `/metrics` per second, evenly paced.
    #[arg(long, default_value_t = 10.0)]
    scrape_rate: f64,
    /// Webhook notifications per second, evenly paced (0: none).
    #[arg(long, default_value_t = 2.0)]
    webhook_rate: f64,
    /// `POST /-/reload` this often.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    reload_every: Duration,
    /// Samples from the first this-long are left out of the growth figure (capped at a
    /// quarter of the run). The default is one round of disruptions (four servers, one a
    /// minute) and a minute more, so every reconnect path has run once before the start window.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of the start and end windows the growth compares (shortened to fit short runs).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Growth of RSS or descriptors, in percent, at which the soak fails.
    #[arg(long, default_value_t = 5.0)]
    max_growth: f64,
    /// Also write the table as CSV to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Scrapes of one sampling interval.
#[derive(Default)]
struct ScrapeWindow {
    ok: u64,
    failed: u64,
    latencies: Vec<Duration>,
    series: Option<usize>,
}

/// One row of the table.
struct Row {
    at: Duration,
    rss: u64,
    /// The anonymous part of `rss` (heap and stacks): file pages of the binary that are
    /// read in as new code paths run (a debug build's are large) are not in it.
    anon: u64,
    fds: u64,
    ok: u64,
    failed: u64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    series: Option<usize>,
    down: String,
}

impl Row {
    const HEADER: &str =
        "   time   RSS MiB  anon MiB   fds   scrapes  failed    p50 ms    p99 ms  series  down";

    fn line(&self) -> String {
        format!(
            "{:>6.0}s {:>9.1} {:>9.1} {:>5} {:>9} {:>7} {:>9} {:>9} {:>7}  {}",
            self.at.as_secs_f64(),
            mib(self.rss),
            mib(self.anon),
            self.fds,
            self.ok,
            self.failed,
            millis(self.p50),
            millis(self.p99),
            self.series.map_or("-".to_owned(), |s| s.to_string()),
            self.down,
        )
    }
}

/// Counters shared by the load tasks.
#[derive(Default)]
struct Totals {
    scrapes_ok: AtomicU64,
    scrapes_failed: AtomicU64,
    webhooks_ok: AtomicU64,
    webhooks_failed: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_unavailable: AtomicU64,
    reloads_failed: AtomicU64,
    stops: AtomicU64,
    starts: AtomicU64,
    disruption_errors: AtomicU64,
}

/// What the load tasks share: where to send, what to count.
struct Shared {
    started: Instant,
    deadline: Instant,
    /// Set on Ctrl-C: every loop ends at once, even one waiting for a long tick.
    stopped: tokio::sync::watch::Sender<bool>,
    totals: Totals,
    window: Mutex<ScrapeWindow>,
    all_latencies: Mutex<Vec<Duration>>,
    /// The server that is down right now, for the table.
    down: Mutex<String>,
}

impl Shared {
    fn running(&self) -> bool {
        Instant::now() < self.deadline && !*self.stopped.borrow()
    }

    /// Waits for the next tick; `false` if the soak was stopped meanwhile.
    async fn tick(&self, interval: &mut tokio::time::Interval) -> bool {
        let mut stopped = self.stopped.subscribe();
        tokio::select! {
            _ = interval.tick() => true,
            _ = stopped.wait_for(|stopped| *stopped) => false,
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match soak(cli).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(err) => {
            eprintln!("soak: {err:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the soak; `Ok(false)` is a run that completed with a failing verdict.
async fn soak(cli: Cli) -> Result<bool> {
    let binary = clusterwatch_tests::harness::clusterwatch::binary()?;
    let build = if binary.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else {
        "debug"
    };
    println!(
        "clusterwatch binary: {} (a {build} build)",
        binary.display()
    );

    let work = temp_dir("cw-soak-")?;
    let files = SoakFiles::create(work.path())?;
    files.rewrite(0)?;
    let nginx = Nginx::start(&[]).await.context("starting nginx to probe")?;
    let extra = soak_config(&files, nginx.http_base());
    println!("starting the lab (PostgreSQL pair, Redis pair, clusterwatch, Prometheus, Alertmanager) ...");
    let mut lab = Lab::up(LabSettings {
        extra_config: Some(extra),
        ..LabSettings::default()
    })
    .await?;
    let info = lab.info()?;
    let pid = lab
        .clusterwatch
        .pid()
        .context("clusterwatch is not running")?;
    let token = std::fs::read_to_string(lab.hook_token_file())?
        .trim()
        .to_owned();
    println!("{}", info.describe());
    println!(
        "clusterwatch pid {pid}; soaking for {} ...",
        humantime::format_duration(cli.duration)
    );

    let started = Instant::now();
    let shared = Arc::new(Shared {
        started,
        deadline: started + cli.duration,
        stopped: tokio::sync::watch::Sender::new(false),
        totals: Totals::default(),
        window: Mutex::default(),
        all_latencies: Mutex::default(),
        down: Mutex::new(String::new()),
    });
    let client = clusterwatch_tests::harness::http::client()?;
    let tasks = vec![
        tokio::spawn(scrape_loop(
            shared.clone(),
            client.clone(),
            lab.clusterwatch.url("/metrics"),
            cli.scrape_rate,
        )),
        tokio::spawn(webhook_loop(
            shared.clone(),
            client.clone(),
            info.hooks.clone(),
            token,
            cli.webhook_rate,
        )),
        tokio::spawn(reload_loop(
            shared.clone(),
            client.clone(),
            lab.clusterwatch.url("/-/reload"),
            cli.reload_every,
        )),
        tokio::spawn(rewrite_loop(shared.clone(), files)),
    ];
    let sampler = tokio::spawn(sample_loop(shared.clone(), pid));

    let interrupted = tokio::select! {
        _ = disrupt_loop(&shared, &mut lab, cli.disrupt_every, cli.down_for) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        println!("interrupted: reporting what was measured so far");
        shared.stopped.send_replace(true);
    }
    for task in tasks {
        let _ = task.await;
    }
    let rows = sampler.await.unwrap_or_default();
    // An interrupted disruption may have left a server down: nothing to check then.
    let targets_down = if interrupted {
        Vec::new()
    } else {
        targets_still_down(&client, &lab.clusterwatch.url("/metrics")).await
    };
    let journal = journal_counts(&info.hook_state_dir.join("journal.jsonl"));
    drop(lab);
    drop(nginx);

    let report = Report {
        cli: &cli,
        build,
        rows: &rows,
        shared: &shared,
        journal,
        targets_down,
    };
    report.print();
    if let Some(out) = &cli.out {
        write_csv(out, &rows)?;
        println!("CSV written to {}", out.display());
    }
    Ok(report.verdict())
}

/// The files the soak's extra sections watch, rewritten while it runs.
struct SoakFiles {
    counters: PathBuf,
    samples: PathBuf,
    textfile_dir: PathBuf,
    status: PathBuf,
}

impl SoakFiles {
    fn create(dir: &Path) -> Result<SoakFiles> {
        let textfile_dir = dir.join("textfile");
        std::fs::create_dir_all(&textfile_dir)?;
        Ok(SoakFiles {
            counters: dir.join("counters.csv"),
            samples: dir.join("samples.csv"),
            textfile_dir,
            status: dir.join("node.status"),
        })
    }

    /// Writes round `round` of every file, each under a temporary name then renamed, as the
    /// SRE platform and cron jobs do.
    fn rewrite(&self, round: u64) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs();
        let minute = now - now % 60;
        let human =
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(minute));
        let mut counters = String::new();
        let mut samples = String::new();
        for host in ["cp1", "cp2", "cp3"] {
            for stat in 0..20 {
                // Fifteen values, newest first, changing every round.
                let values: Vec<String> = (0..15)
                    .map(|i| ((round + stat + i) * 7 % 1000).to_string())
                    .collect();
                let line = format!("{host},stat_{stat},{human},{minute},{}\n", values.join(","));
                counters.push_str(&line);
                samples.push_str(&line.replace(",stat_", ",avg_"));
            }
        }
        replace(&self.counters, &counters)?;
        replace(&self.samples, &samples)?;
        replace(
            &self.textfile_dir.join("soak.prom"),
            &format!(
                "# HELP soak_round Rewrites of this file by the soak.\n# TYPE soak_round gauge\nsoak_round {round}\n"
            ),
        )?;
        replace(
            &self.status,
            if round.is_multiple_of(2) {
                "production\n"
            } else {
                "standby\n"
            },
        )?;
        Ok(())
    }
}

fn replace(path: &Path, contents: &str) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents)
        .with_context(|| format!("could not write {}", partial.display()))?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("could not rename onto {}", path.display()))?;
    Ok(())
}

/// Every section the harness makes cheap, on top of the lab's pairs and hooks.
fn soak_config(files: &SoakFiles, nginx: String) -> ExtraConfig {
    let counters = files.counters.clone();
    let samples = files.samples.clone();
    let textfile_dir = files.textfile_dir.clone();
    let status = files.status.clone();
    ExtraConfig(Arc::new(move |pg, redis| {
        json!({
            "system": {},
            "filesystems": {},
            "sre_stats": { "counters": counters, "samples": samples, "cluster": "soak" },
            "textfile": { "directory": textfile_dir },
            "directories": [{ "name": "soak-textfile", "path": textfile_dir }],
            "files": [{
                "name": "soak-status",
                "path": status,
                "states": ["down", "production", "standby"],
            }],
            "processes": [
                { "name": "redis", "process_name": "^redis-server$", "min": 2 },
                { "name": "postgres", "process_name": "^postgres$", "min": 2 },
            ],
            "probes": [
                { "name": "soak-nginx", "http": { "url": format!("{nginx}/"), "expect_body": "all good" } },
                { "name": "soak-redis", "tcp": {
                    "address": redis.master.addr(), "send": "PING\r\n", "expect": "^\\+PONG" } },
                { "name": "soak-pg", "tcp": { "address": format!("127.0.0.1:{}", pg.primary.port()) } },
            ],
            "hooks": { "rules": [{
                "name": DRY_RUN_HOOK,
                "match": { "alertname": "SoakDryRun" },
                "on": "both",
                "command": ["/bin/true"],
                "dry_run": true,
            }] },
        })
    }))
}

/// Scrapes `/metrics` at `rate` per second, open loop: a slow answer does not delay the next.
async fn scrape_loop(shared: Arc<Shared>, client: reqwest::Client, url: String, rate: f64) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut inflight = tokio::task::JoinSet::new();
    while shared.running() && shared.tick(&mut tick).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            record_scrape(&shared, None);
            continue;
        };
        let (shared, client, url) = (shared.clone(), client.clone(), url.clone());
        inflight.spawn(async move {
            let began = Instant::now();
            let answer = async {
                let response = client.get(&url).send().await?;
                let status = response.status();
                let body = response.text().await?;
                anyhow::Ok((status, body))
            }
            .await;
            let outcome = match answer {
                Ok((status, body)) if status.is_success() => Some((
                    began.elapsed(),
                    body.lines()
                        .filter(|line| !line.is_empty() && !line.starts_with('#'))
                        .count(),
                )),
                _ => None,
            };
            record_scrape(&shared, outcome);
            drop(slot);
        });
        // Reap finished scrapes so the set stays small over a long run.
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

fn record_scrape(shared: &Shared, outcome: Option<(Duration, usize)>) {
    let mut window = shared.window.lock().expect("scrape window lock");
    match outcome {
        Some((latency, series)) => {
            window.ok += 1;
            window.latencies.push(latency);
            window.series = Some(series);
            shared.totals.scrapes_ok.fetch_add(1, Ordering::Relaxed);
            shared
                .all_latencies
                .lock()
                .expect("latency lock")
                .push(latency);
        }
        None => {
            window.failed += 1;
            shared.totals.scrapes_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Posts notifications at `rate` per second: new incidents, re-sends of open ones and
/// resolutions, half matching the dry-run hook and half no hook, so nothing is promoted while
/// the receiver's dedupe state grows as it would in production.
async fn webhook_loop(
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: String,
    token: String,
    rate: f64,
) {
    // 0 turns webhooks off, to tell their share of memory growth from the scrapes'.
    if rate <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut incidents = Incidents::new();
    while shared.running() && shared.tick(&mut tick).await {
        let body = incidents.next_notification();
        let status = client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map(|response| response.status());
        let counter = match status {
            Ok(status) if status.is_success() => &shared.totals.webhooks_ok,
            _ => &shared.totals.webhooks_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The soak's alerts: a rolling set of open incidents, each with its own fingerprint.
struct Incidents {
    sent: u64,
    next_id: u64,
    open: VecDeque<(u64, String)>,
    rng: u64,
}

/// Incidents open at once before the oldest is resolved.
const OPEN_INCIDENTS: usize = 20;

impl Incidents {
    fn new() -> Incidents {
        Incidents {
            sent: 0,
            next_id: 0,
            open: VecDeque::new(),
            rng: 0x2545_f491_4f6c_dd1d,
        }
    }

    /// Every fourth notification opens an incident; once enough are open, another resolves
    /// the oldest; the rest re-send an open one, as Alertmanager does while alerts fire.
    fn next_notification(&mut self) -> Value {
        self.sent += 1;
        // xorshift: a fixed sequence is enough to vary which incident is re-sent.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        if self.sent.is_multiple_of(4) || self.open.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            let starts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            self.open.push_back((id, starts.clone()));
            return Self::notification("firing", &[(id, starts)]);
        }
        if self.sent % 4 == 2 && self.open.len() >= OPEN_INCIDENTS {
            let oldest = self.open.pop_front().expect("not empty");
            return Self::notification("resolved", &[oldest]);
        }
        let i = (self.rng % self.open.len() as u64) as usize;
        Self::notification("firing", &[self.open[i].clone()])
    }

    fn notification(status: &str, incidents: &[(u64, String)]) -> Value {
        let alerts = incidents
            .iter()
            .map(|(id, starts)| {
                let name = if id % 2 == 0 { "SoakDryRun" } else { "SoakNoHook" };
                alert(
                    status,
                    json!({ "alertname": name, "cluster": "soak", "instance": format!("soak-{id}") }),
                    &format!("{id:016x}"),
                    starts,
                )
            })
            .collect();
        notification(status, &format!("{{}}:{{soak=\"{status}\"}}"), alerts)
    }
}

/// Asks for a reload every `every`; 404 and 405 mean this build has no reload endpoint.
async fn reload_loop(shared: Arc<Shared>, client: reqwest::Client, url: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    while shared.tick(&mut tick).await && shared.running() {
        let counter = match client.post(&url).send().await.map(|r| r.status().as_u16()) {
            Ok(200..=299) => &shared.totals.reloads_ok,
            Ok(404 | 405) => &shared.totals.reloads_unavailable,
            _ => &shared.totals.reloads_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

async fn rewrite_loop(shared: Arc<Shared>, files: SoakFiles) {
    let mut tick = tokio::time::interval(REWRITE_EVERY);
    tick.tick().await;
    let mut round = 1;
    while shared.running() && shared.tick(&mut tick).await {
        if let Err(err) = files.rewrite(round) {
            eprintln!("soak: {err:#}");
        }
        round += 1;
    }
}

/// Stops one server after another (standby, replica, primary, master), each for `down_for`,
/// then waits for its pair to replicate again, until the deadline.
async fn disrupt_loop(shared: &Shared, lab: &mut Lab, every: Duration, down_for: Duration) {
    let order = ["pg-standby", "redis-replica", "pg-primary", "redis-master"];
    let mut next = 0;
    loop {
        let at = shared.started + every * (next as u32 + 1);
        if at + down_for >= shared.deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let which = order[next % order.len()];
        next += 1;
        if let Err(err) = disrupt(shared, lab, which, down_for).await {
            shared
                .totals
                .disruption_errors
                .fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: stopping and starting {which}: {err:#}");
        }
        shared.down.lock().expect("down lock").clear();
    }
    tokio::time::sleep_until(shared.deadline.into()).await;
}

async fn disrupt(shared: &Shared, lab: &mut Lab, which: &str, down_for: Duration) -> Result<()> {
    *shared.down.lock().expect("down lock") = which.to_owned();
    match which {
        "pg-standby" => lab.pg.standby.stop().await?,
        "pg-primary" => lab.pg.primary.stop().await?,
        "redis-replica" => lab.redis.replica.stop()?,
        _ => lab.redis.master.stop()?,
    }
    shared.totals.stops.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(down_for).await;
    match which {
        "pg-standby" => lab.pg.standby.start().await?,
        "pg-primary" => lab.pg.primary.start().await?,
        "redis-replica" => lab.redis.replica.start().await?,
        _ => lab.redis.master.start().await?,
    }
    shared.totals.starts.fetch_add(1, Ordering::Relaxed);
    if which.starts_with("pg") {
        lab.pg.wait_streaming(RECOVERY_TIMEOUT).await
    } else {
        lab.redis.wait_replication_up(RECOVERY_TIMEOUT).await
    }
}

/// Every [`SAMPLE_EVERY`]: clusterwatch's RSS and descriptors, and the scrapes since the last.
async fn sample_loop(shared: Arc<Shared>, pid: u32) -> Vec<Row> {
    let mut rows = Vec::new();
    println!("{}", Row::HEADER);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    while shared.running() && shared.tick(&mut tick).await {
        let window = std::mem::take(&mut *shared.window.lock().expect("scrape window lock"));
        let sample = (|| {
            anyhow::Ok((
                rss_bytes(pid)?,
                status_bytes(pid, "RssAnon")?,
                fd_count(pid)?,
            ))
        })();
        let (rss, anon, fds) = match sample {
            Ok(sample) => sample,
            Err(err) => {
                eprintln!("soak: could not sample clusterwatch (pid {pid}): {err:#}");
                break;
            }
        };
        let mut latencies = window.latencies;
        latencies.sort();
        let row = Row {
            at: shared.started.elapsed(),
            rss,
            anon,
            fds,
            ok: window.ok,
            failed: window.failed,
            p50: percentile(&latencies, 50),
            p99: percentile(&latencies, 99),
            series: window.series,
            down: shared.down.lock().expect("down lock").clone(),
        };
        // Live, so a long run can be watched (or its log tailed) while it goes.
        println!("{}", row.line());
        rows.push(row);
    }
    rows
}

fn fd_count(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The nearest-rank percentile of sorted `values`.
fn percentile(values: &[Duration], p: usize) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = (values.len() * p).div_ceil(100).max(1);
    Some(values[rank - 1])
}

/// Every target must come back once its server is back: polls `/metrics` until no
/// `clusterwatch_target_up` is 0, and returns those still down at the deadline.
async fn targets_still_down(client: &reqwest::Client, url: &str) -> Vec<String> {
    let mut down = vec!["no scrape answered".to_owned()];
    let _ = wait_until(RECOVERY_TIMEOUT, "every target up", async || {
        let body = client.get(url).send().await?.text().await?;
        down = body
            .lines()
            .filter(|line| line.starts_with("clusterwatch_target_up{") && line.ends_with(" 0"))
            .map(|line| line.trim_end_matches(" 0").to_owned())
            .collect();
        Ok(down.is_empty())
    })
    .await;
    down
}

/// What the hook journal says the soak's notifications caused.
#[derive(Debug, Default)]
struct JournalCounts {
    received: u64,
    dry_runs: u64,
    /// Runs of the lab's real (promoting) hooks: must stay 0.
    real_runs: u64,
}

fn journal_counts(path: &Path) -> JournalCounts {
    let mut counts = JournalCounts::default();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for record in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        match record["event"].as_str() {
            Some("received") => counts.received += 1,
            Some("dry_run") => counts.dry_runs += 1,
            Some("started") if record["hook"] == PG_HOOK || record["hook"] == REDIS_HOOK => {
                counts.real_runs += 1
            }
            _ => {}
        }
    }
    counts
}

struct Report<'a> {
    /// Targets clusterwatch still reported down after the last restart had time to heal.
    targets_down: Vec<String>,
    cli: &'a Cli,
    build: &'a str,
    rows: &'a [Row],
    shared: &'a Shared,
    journal: JournalCounts,
}

/// Mean of the start window and of the end window, and the growth between them in percent.
struct Growth {
    start: f64,
    end: f64,
    percent: f64,
}

impl Report<'_> {
    /// The warm-up and window lengths actually used, fitted to the run's length.
    fn windows(&self) -> (Duration, Duration) {
        let ran = self.rows.last().map_or(Duration::ZERO, |row| row.at);
        let whole = |d: Duration| Duration::from_secs(d.as_secs());
        let warmup = whole(self.cli.warmup.min(ran / 4));
        let window = whole(self.cli.window.min((ran - warmup) / 2));
        (warmup, window)
    }

    fn growth(&self, value: impl Fn(&Row) -> f64) -> Option<Growth> {
        let (warmup, window) = self.windows();
        let ran = self.rows.last()?.at;
        let mean = |from: Duration, to: Duration| {
            let values: Vec<f64> = self
                .rows
                .iter()
                .filter(|row| row.at > from && row.at <= to)
                .map(&value)
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let start = mean(warmup, warmup + window)?;
        let end = mean(ran - window, ran)?;
        Some(Growth {
            start,
            end,
            percent: (end - start) / start * 100.0,
        })
    }

    fn print(&self) {
        println!();
        println!("{}", Row::HEADER);
        for row in self.rows {
            println!("{}", row.line());
        }
        let totals = &self.shared.totals;
        let mut all = self
            .shared
            .all_latencies
            .lock()
            .expect("latency lock")
            .clone();
        all.sort();
        let (warmup, window) = self.windows();
        println!();
        println!("clusterwatch: a {} build", self.build);
        println!(
            "scrapes: {} ok, {} failed; latency p50 {} ms, p99 {} ms over the whole run",
            load(&totals.scrapes_ok),
            load(&totals.scrapes_failed),
            millis(percentile(&all, 50)),
            millis(percentile(&all, 99)),
        );
        println!(
            "webhooks: {} acknowledged, {} failed; journal: {} received, {} dry runs, {} runs of a real hook",
            load(&totals.webhooks_ok),
            load(&totals.webhooks_failed),
            self.journal.received,
            self.journal.dry_runs,
            self.journal.real_runs,
        );
        println!(
            "reloads: {} ok, {} not available (404/405), {} failed",
            load(&totals.reloads_ok),
            load(&totals.reloads_unavailable),
            load(&totals.reloads_failed),
        );
        println!(
            "servers: {} stopped, {} started again, {} disruptions with errors",
            load(&totals.stops),
            load(&totals.starts),
            load(&totals.disruption_errors),
        );
        if self.targets_down.is_empty() {
            println!("targets: every target up again at the end");
        } else {
            println!(
                "targets still down at the end: {}",
                self.targets_down.join(", ")
            );
        }
        println!(
            "growth = (mean of the samples in the last {w} - mean of the samples in the {w} after \
             a {wu} warm-up) / the latter x 100; samples every {s}s",
            w = humantime::format_duration(window),
            wu = humantime::format_duration(warmup),
            s = SAMPLE_EVERY.as_secs(),
        );
        for (name, growth) in [
            ("RSS MiB", self.growth(|row| mib(row.rss))),
            ("anon MiB", self.growth(|row| mib(row.anon))),
            ("fds", self.growth(|row| row.fds as f64)),
        ] {
            match growth {
                Some(g) => println!(
                    "{name}: start {:.1}, end {:.1}, growth {:+.1}% (limit {}%)",
                    g.start, g.end, g.percent, self.cli.max_growth
                ),
                None => println!("{name}: too few samples to compute growth"),
            }
        }
        println!("verdict: {}", if self.verdict() { "PASS" } else { "FAIL" });
    }

    /// Pass: RSS and descriptors grew less than the limit, every scrape answered, every
    /// target came back, and no real hook ran.
    fn verdict(&self) -> bool {
        let under =
            |growth: Option<Growth>| growth.is_some_and(|g| g.percent < self.cli.max_growth);
        under(self.growth(|row| row.rss as f64))
            && under(self.growth(|row| row.fds as f64))
            && load(&self.shared.totals.scrapes_failed) == 0
            && self.journal.real_runs == 0
            && self.targets_down.is_empty()
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn millis(value: Option<Duration>) -> String {
    value.map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut out = csv::Writer::from_path(path)
        .with_context(|| format!("could not create {}", path.display()))?;
    out.write_record([
        "seconds",
        "rss_bytes",
        "anon_bytes",
        "fds",
        "scrapes_ok",
        "scrapes_failed",
        "p50_ms",
        "p99_ms",
        "series",
        "down",
    ])?;
    for row in rows {
        out.write_record([
            format!("{:.0}", row.at.as_secs_f64()),
            row.rss.to_string(),
            row.anon.to_string(),
            row.fds.to_string(),
            row.ok.to_string(),
            row.failed.to_string(),
            millis(row.p50),
            millis(row.p99),
            row.series.map_or(String::new(), |s| s.to_string()),
            row.down.clone(),
        ])?;
    }
    out.flush()?;
    Ok(())
}
