//! Benchmarks run by hand (`cargo run --release -p clusterwatch-tests --bin bench -- all`):
//! scrape latency, CPU per scrape and RSS of clusterwatch on its embedded default; against
//! Debian's prometheus-postgres-exporter and prometheus-redis-exporter on the same real
//! servers, and 100 HTTP probes against Debian's prometheus-blackbox-exporter on the same
//! nginx, reported as ratios; the webhook receiver's sustained notifications per second,
//! acknowledgement latency with the journal fsync'd, and journal records lost to a kill -9;
//! the SRE stats parser on a 1,000,000-line file against a plain read of the same file; and
//! scrapes over plain HTTP, TLS and TLS with bcrypt basic auth.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clusterwatch_tests::harness::nginx::Nginx;
use clusterwatch_tests::harness::process::{rss_bytes, ChildGuard};
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab};
use clusterwatch_tests::harness::{free_port, temp_dir, Clusterwatch, PgNode, RedisPair};

/// Latency distribution and resource use of one exporter over a run.
struct Run {
    label: String,
    scrapes: usize,
    median: Duration,
    p99: Duration,
    cpu_per_scrape: Duration,
    rss_before: u64,
    rss_after: u64,
    samples: usize,
}

/// utime + stime of a process, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

async fn measure(
    label: &str,
    client: &reqwest::Client,
    url: &str,
    pid: u32,
    scrapes: usize,
) -> Result<Run> {
    // Warm up: connections made, caches filled, allocator settled.
    let mut samples = 0;
    for _ in 0..20 {
        let body = client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        samples = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
    }
    let rss_before = rss_bytes(pid)?;
    let cpu_before = proc_cpu(pid)?;
    let mut times = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let started = Instant::now();
        let body = client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        times.push(started.elapsed());
        std::hint::black_box(body);
    }
    let cpu = proc_cpu(pid)? - cpu_before;
    times.sort();
    Ok(Run {
        label: label.to_owned(),
        scrapes,
        median: times[times.len() / 2],
        p99: times[(times.len() * 99 / 100).min(times.len() - 1)],
        cpu_per_scrape: cpu / scrapes as u32,
        rss_before,
        rss_after: rss_bytes(pid)?,
        samples,
    })
}

fn print(runs: &[&Run]) {
    println!(
        "{:<44} {:>7} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8}",
        "exporter", "scrapes", "median", "p99", "cpu/scrape", "rss idle", "rss after", "samples"
    );
    for r in runs {
        println!(
            "{:<44} {:>7} {:>8.2}ms {:>8.2}ms {:>10.3}ms {:>8.1}MiB {:>8.1}MiB {:>8}",
            r.label,
            r.scrapes,
            r.median.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.cpu_per_scrape.as_secs_f64() * 1e3,
            r.rss_before as f64 / 1048576.0,
            r.rss_after as f64 / 1048576.0,
            r.samples
        );
    }
}

fn ratio(name: &str, ours: f64, theirs: f64) {
    println!("  {name:<36} {:.2}x", ours / theirs);
}

/// Prints the median and p99 latency of `a` over those of `b`.
fn latency_ratios(a: &Run, b: &Run) {
    ratio(
        "median latency",
        a.median.as_secs_f64(),
        b.median.as_secs_f64(),
    );
    ratio("p99 latency", a.p99.as_secs_f64(), b.p99.as_secs_f64());
}

/// Prints clusterwatch's numbers over the other exporter's.
fn compare(other: &str, ours: &Run, theirs: &Run) {
    println!("ratios (clusterwatch / {other}):");
    latency_ratios(ours, theirs);
    ratio(
        "RSS after the run",
        ours.rss_after as f64,
        theirs.rss_after as f64,
    );
    ratio(
        "CPU per scrape",
        ours.cpu_per_scrape.as_secs_f64(),
        theirs.cpu_per_scrape.as_secs_f64(),
    );
}

async fn bench_default(scrapes: usize) -> Result<()> {
    let mut cw = Clusterwatch::start(None, &[]).await?;
    let pid = cw.process().pid().context("clusterwatch has no pid")?;
    let client = cw.client().clone();
    // Idle: started, one scrape done, then left alone for a moment.
    client
        .get(cw.url("/metrics"))
        .send()
        .await?
        .error_for_status()?;
    let first = rss_bytes(pid)?;
    // Then idle a moment: clusterwatch drops the code pages only the first scrape needed
    // half a second after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_bytes(pid)?;
    let run = measure(
        "clusterwatch (embedded default)",
        &client,
        &cw.url("/metrics"),
        pid,
        scrapes,
    )
    .await?;
    println!("\n== embedded default: {scrapes} sequential scrapes ==");
    print(&[&run]);
    println!(
        "  RSS right after the first scrape: {:.1} MiB; idle 2 s later: {:.1} MiB",
        first as f64 / 1048576.0,
        idle as f64 / 1048576.0
    );
    Ok(())
}

/// Starts another exporter (`command`, already told where to listen) and waits until `url`
/// answers; the guard stops it and the directory holds its output.
async fn start_other_exporter(
    name: &str,
    command: Command,
    dir: tempfile::TempDir,
    url: String,
) -> Result<(ChildGuard, String, tempfile::TempDir)> {
    let mut guard = ChildGuard::spawn(name, command, dir.path())?;
    let client = reqwest::Client::new();
    guard
        .wait_ready(
            Duration::from_secs(30),
            &format!("{name} /metrics"),
            async || Ok(client.get(&url).send().await?.status().is_success()),
        )
        .await?;
    Ok((guard, url, dir))
}

async fn start_postgres_exporter(dsn: &str) -> Result<(ChildGuard, String, tempfile::TempDir)> {
    let dir = temp_dir("cw-pge-")?;
    let port = free_port()?;
    let mut command = Command::new("/usr/bin/prometheus-postgres-exporter");
    command
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .env("DATA_SOURCE_NAME", format!("{dsn}?sslmode=disable"));
    let url = format!("http://127.0.0.1:{port}/metrics");
    start_other_exporter("postgres_exporter", command, dir, url).await
}

async fn start_redis_exporter(address: &str) -> Result<(ChildGuard, String, tempfile::TempDir)> {
    let dir = temp_dir("cw-rde-")?;
    let port = free_port()?;
    let mut command = Command::new(REDIS_EXPORTER);
    command
        .arg(format!("-web.listen-address=127.0.0.1:{port}"))
        .arg(format!("-redis.addr={address}"));
    let url = format!("http://127.0.0.1:{port}/metrics");
    start_other_exporter("redis_exporter", command, dir, url).await
}

/// Starts clusterwatch on `config` (the embedded default if `None`), measures it and stops it.
async fn measure_clusterwatch(label: &str, config: Option<&str>, scrapes: usize) -> Result<Run> {
    let mut cw = Clusterwatch::start(config, &[]).await?;
    let pid = cw.process().pid().context("clusterwatch has no pid")?;
    let client = cw.client().clone();
    measure(label, &client, &cw.url("/metrics"), pid, scrapes).await
}

/// Measures another exporter as [`start_other_exporter`] returned it, then stops it.
async fn measure_other(
    label: &str,
    started: (ChildGuard, String, tempfile::TempDir),
    scrapes: usize,
) -> Result<Run> {
    let (mut guard, url, _dir) = started;
    let pid = guard.pid().context("no pid")?;
    let run = measure(label, &reqwest::Client::new(), &url, pid, scrapes).await?;
    guard.stop()?;
    Ok(run)
}

async fn bench_postgres(scrapes: usize) -> Result<()> {
    if !std::path::Path::new("/usr/bin/prometheus-postgres-exporter").exists() {
        bail!("install the Debian package prometheus-postgres-exporter to compare with it");
    }
    let primary = PgNode::start_primary("bench").await?;
    let dsn = primary.monitor_dsn();
    let one = format!("postgres:\n  - {{ name: db, cluster: bench, dsn: '{dsn}' }}\n");
    let twenty: String = std::iter::once("postgres:\n".to_owned())
        .chain((0..20).map(|i| format!("  - {{ name: db{i}, cluster: bench, dsn: '{dsn}' }}\n")))
        .collect();

    let ours =
        measure_clusterwatch("clusterwatch, 1 PostgreSQL target", Some(&one), scrapes).await?;
    let theirs = measure_other(
        "prometheus-postgres-exporter 0.11 (Debian)",
        start_postgres_exporter(&dsn).await?,
        scrapes,
    )
    .await?;
    let many = measure_clusterwatch(
        "clusterwatch, 20 PostgreSQL targets",
        Some(&twenty),
        scrapes,
    )
    .await?;

    println!("\n== PostgreSQL primary on loopback: {scrapes} sequential scrapes each ==");
    print(&[&ours, &theirs, &many]);
    compare("postgres_exporter; goal <= 0.5", &ours, &theirs);
    println!("ratios (20 targets / 1 target; goal <= 2):");
    latency_ratios(&many, &ours);
    Ok(())
}

/// Scrapes clusterwatch alone, the workload `packaging/build-pgo` lays the executable out by:
/// the embedded default, a PostgreSQL primary with its streaming standby, a Redis master with
/// its replica, then the `web` runs (TLS, basic auth). Needs no other exporter.
async fn bench_train(scrapes: usize) -> Result<()> {
    let primary = PgNode::start_primary("train").await?;
    let standby = PgNode::start_standby("train-standby", &primary, "train_standby").await?;
    primary
        .wait_standby_streaming("train_standby", Duration::from_secs(60))
        .await?;
    let pair = RedisPair::start().await?;
    let postgres = format!(
        "postgres:\n  - {{ name: primary, cluster: train, dsn: '{}' }}\n  - {{ name: standby, cluster: train, dsn: '{}' }}\n",
        primary.monitor_dsn(),
        standby.monitor_dsn()
    );
    let redis = format!(
        "redis:\n  - {{ name: master, cluster: train, address: '{}' }}\n  - {{ name: replica, cluster: train, address: '{}' }}\n",
        pair.master.url(),
        pair.replica.url()
    );
    let runs = [
        measure_clusterwatch("embedded default", None, scrapes).await?,
        measure_clusterwatch("PostgreSQL primary and standby", Some(&postgres), scrapes).await?,
        measure_clusterwatch("Redis master and replica", Some(&redis), scrapes).await?,
    ];
    println!("\n== training: {scrapes} sequential scrapes each ==");
    print(&runs.iter().collect::<Vec<_>>());
    bench_web(scrapes).await
}

const REDIS_EXPORTER: &str = "/usr/bin/prometheus-redis-exporter";

async fn bench_redis(scrapes: usize) -> Result<()> {
    if !std::path::Path::new(REDIS_EXPORTER).exists() {
        bail!("install the Debian package prometheus-redis-exporter to compare with it");
    }
    let pair = RedisPair::start().await?;
    let address = pair.master.url();
    let config = format!("redis:\n  - {{ name: master, cluster: bench, address: '{address}' }}\n");

    let ours = measure_clusterwatch("clusterwatch, 1 Redis master", Some(&config), scrapes).await?;
    let theirs = measure_other(
        "prometheus-redis-exporter 1.45 (Debian)",
        start_redis_exporter(&address).await?,
        scrapes,
    )
    .await?;

    println!(
        "\n== Redis master with one replica on loopback: {scrapes} sequential scrapes each =="
    );
    print(&[&ours, &theirs]);
    compare(
        "redis_exporter; goal <= 1.0 latency, <= 0.5 RSS",
        &ours,
        &theirs,
    );
    Ok(())
}

/// Posts distinct notifications from `concurrency` tasks until `stop` is set, each task as
/// fast as it can or, with `every`, one request per interval; returns each acknowledged (200)
/// request's group key and latency.
async fn hook_load(
    lab: Arc<HookLab>,
    concurrency: usize,
    every: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> Vec<(String, Duration)> {
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (lab, stop) = (lab.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            let mut tick = every.map(tokio::time::interval);
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let key = format!("w{worker}-{i}");
                i += 1;
                let body = notification(
                    "firing",
                    &key,
                    vec![alert(
                        "firing",
                        serde_json::json!({"alertname": "Bench", "n": key}),
                        &key,
                        "2026-01-01T00:00:00Z",
                    )],
                )
                .to_string();
                let t = Instant::now();
                match lab.post(body).await {
                    Ok(s) if s == 200 => acked.push((key, t.elapsed())),
                    // The server was killed: stop this worker.
                    _ => break,
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

async fn bench_hooks(seconds: usize) -> Result<()> {
    const CONCURRENCY: usize = 32;
    let lab = Arc::new(HookLab::new()?);
    let rules =
        "    - { name: bench, match: { alertname: Bench }, command: [/bin/true], dry_run: true }\n";
    let mut cw = Clusterwatch::start(Some(&lab.config("", rules)), &[]).await?;

    // The floor for any acknowledgement that waits for fsync: the disk's own latency.
    let mut syncs = Vec::new();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(lab.dir().join("fsync-probe"))?;
        for _ in 0..200 {
            let t = Instant::now();
            f.write_all(&[b'x'; 200])?;
            f.sync_data()?;
            syncs.push(t.elapsed());
        }
    }
    syncs.sort();
    println!(
        "hooks: this disk's fdatasync alone: median {:.2} ms, p99 {:.2} ms",
        syncs[100].as_secs_f64() * 1e3,
        syncs[197].as_secs_f64() * 1e3
    );

    // Saturation: as many as 32 clients get through; then 1,000/s paced (10 clients, one
    // request every 10 ms each) for the acknowledgement latency at the goal rate.
    for (what, clients, every) in [
        ("saturated", CONCURRENCY, None),
        ("paced 1000/s", 10, Some(Duration::from_millis(10))),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let load = tokio::spawn(hook_load(lab.clone(), clients, every, stop.clone()));
        tokio::time::sleep(Duration::from_secs(seconds as u64)).await;
        stop.store(true, Ordering::Relaxed);
        let acked = load.await?;
        let elapsed = started.elapsed();
        let mut latencies: Vec<Duration> = acked.iter().map(|(_, d)| *d).collect();
        latencies.sort();
        let pct = |p: f64| {
            let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
            latencies.get(i).copied().unwrap_or_default().as_secs_f64() * 1e3
        };
        println!(
            "hooks {what}: {} notifications in {:.1} s from {clients} clients = {:.0}/s; ack median {:.2} ms, p99 {:.2} ms (journal fsync'd)",
            acked.len(),
            elapsed.as_secs_f64(),
            acked.len() as f64 / elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99),
        );
    }

    // kill -9 in the middle of the same load: every acknowledged notification must be in the
    // journal afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(hook_load(lab.clone(), CONCURRENCY, None, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cw.process().kill9()?;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await?;
    let journaled: HashSet<String> = lab
        .events("received")
        .iter()
        .filter_map(|r| r["group_key"].as_str().map(str::to_owned))
        .collect();
    let lost = acked.iter().filter(|(k, _)| !journaled.contains(k)).count();
    println!(
        "hooks: kill -9 under load: {} acknowledged, {lost} missing from the journal",
        acked.len()
    );
    if lost > 0 {
        bail!("{lost} acknowledged notifications were lost");
    }
    Ok(())
}

/// Probes per scrape in the `probes` benchmark.
const PROBES: usize = 100;

async fn start_blackbox() -> Result<(ChildGuard, u16, tempfile::TempDir)> {
    let binary = "/usr/bin/prometheus-blackbox-exporter";
    if !std::path::Path::new(binary).exists() {
        bail!("install the Debian package prometheus-blackbox-exporter to compare with it");
    }
    let dir = temp_dir("cw-blackbox-")?;
    let config = dir.path().join("blackbox.yml");
    std::fs::write(
        &config,
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n",
    )?;
    let port = free_port()?;
    let mut command = Command::new(binary);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut guard = ChildGuard::spawn("blackbox_exporter", command, dir.path())?;
    let url = format!("http://127.0.0.1:{port}/-/healthy");
    let client = reqwest::Client::new();
    guard
        .wait_ready(Duration::from_secs(30), "blackbox_exporter", async || {
            Ok(client.get(&url).send().await?.status().is_success())
        })
        .await?;
    Ok((guard, port, dir))
}

/// One "scrape" of the blackbox exporter = one `/probe` request per target, all at once
/// (`concurrent`, as Prometheus with 100 scrape jobs does) or one after another.
async fn measure_blackbox(
    label: &str,
    client: &reqwest::Client,
    urls: &[String],
    pid: u32,
    rounds: usize,
    concurrent: bool,
) -> Result<Run> {
    let round = async || -> Result<usize> {
        let mut ok = 0;
        if concurrent {
            let bodies = futures::future::join_all(urls.iter().map(|u| async move {
                client.get(u).send().await?.error_for_status()?.text().await
            }))
            .await;
            for b in bodies {
                ok += b?.contains("probe_success 1") as usize;
            }
        } else {
            for u in urls {
                let b = client
                    .get(u)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                ok += b.contains("probe_success 1") as usize;
            }
        }
        Ok(ok)
    };
    for _ in 0..3 {
        let ok = round().await?;
        if ok != urls.len() {
            bail!("{label}: only {ok} of {} probes succeeded", urls.len());
        }
    }
    let rss_before = rss_bytes(pid)?;
    let cpu_before = proc_cpu(pid)?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        round().await?;
        times.push(started.elapsed());
    }
    let cpu = proc_cpu(pid)? - cpu_before;
    times.sort();
    Ok(Run {
        label: label.to_owned(),
        scrapes: rounds,
        median: times[times.len() / 2],
        p99: times[(times.len() * 99 / 100).min(times.len() - 1)],
        cpu_per_scrape: cpu / rounds as u32,
        rss_before,
        rss_after: rss_bytes(pid)?,
        samples: urls.len(),
    })
}

async fn bench_probes(scrapes: usize) -> Result<()> {
    let nginx = Nginx::start(&[]).await?;
    let target = |i: usize| format!("{}/?n={i}", nginx.http_base());
    let one = format!(
        "probes:\n  - {{ name: web, interval: 0s, http: {{ url: '{}' }} }}\n",
        target(0)
    );
    let hundred: String = std::iter::once("probes:\n".to_owned())
        .chain((0..PROBES).map(|i| {
            format!(
                "  - {{ name: web{i}, interval: 0s, http: {{ url: '{}' }} }}\n",
                target(i)
            )
        }))
        .collect();

    let mut cw = Clusterwatch::start(Some(&one), &[]).await?;
    let pid = cw.process().pid().context("no pid")?;
    let client = cw.client().clone();
    let single = measure(
        "clusterwatch, 1 http probe",
        &client,
        &cw.url("/metrics"),
        pid,
        scrapes,
    )
    .await?;
    drop(cw);

    let mut cw = Clusterwatch::start(Some(&hundred), &[]).await?;
    let pid = cw.process().pid().context("no pid")?;
    let scrape = cw.url("/metrics");
    let body = client.get(&scrape).send().await?.text().await?;
    let ok = body
        .lines()
        .filter(|l| l.starts_with("clusterwatch_probe_success{") && l.ends_with(" 1"))
        .count();
    if ok != PROBES {
        bail!("only {ok} of {PROBES} clusterwatch probes succeeded");
    }
    let many = measure(
        "clusterwatch, 100 http probes",
        &client,
        &scrape,
        pid,
        scrapes,
    )
    .await?;
    drop(cw);

    let (mut bb, port, _bb_dir) = start_blackbox().await?;
    let bb_pid = bb.pid().context("no pid")?;
    let urls: Vec<String> = (0..PROBES)
        .map(|i| {
            format!(
                "http://127.0.0.1:{port}/probe?module=http_2xx&target={}",
                target(i).replace('?', "%3F").replace('=', "%3D")
            )
        })
        .collect();
    let bb_client = reqwest::Client::builder()
        .pool_max_idle_per_host(PROBES)
        .build()?;
    let rounds = scrapes.min(100);
    let bb_conc = measure_blackbox(
        "blackbox, 100 /probe requests concurrently",
        &bb_client,
        &urls,
        bb_pid,
        rounds,
        true,
    )
    .await?;
    let bb_seq = measure_blackbox(
        "blackbox, 100 /probe requests in sequence",
        &bb_client,
        &urls,
        bb_pid,
        rounds,
        false,
    )
    .await?;
    bb.stop()?;

    println!("\n== {PROBES} HTTP probes of one local nginx per scrape ==");
    print(&[&single, &many, &bb_conc, &bb_seq]);
    println!("ratios (100 probes / 1 probe; goal <= 3):");
    ratio(
        "median latency",
        many.median.as_secs_f64(),
        single.median.as_secs_f64(),
    );
    ratio(
        "p99 latency",
        many.p99.as_secs_f64(),
        single.p99.as_secs_f64(),
    );
    println!("ratios (clusterwatch 100 probes / blackbox 100 concurrent /probe):");
    ratio(
        "median latency",
        many.median.as_secs_f64(),
        bb_conc.median.as_secs_f64(),
    );
    ratio(
        "CPU per scrape",
        many.cpu_per_scrape.as_secs_f64(),
        bb_conc.cpu_per_scrape.as_secs_f64(),
    );
    ratio(
        "RSS after the run",
        many.rss_after as f64,
        bb_conc.rss_after as f64,
    );
    println!("ratios (clusterwatch 100 probes / blackbox 100 sequential /probe):");
    ratio(
        "median latency",
        many.median.as_secs_f64(),
        bb_seq.median.as_secs_f64(),
    );
    Ok(())
}

/// Peak and current resident memory of this process, from /proc/self/status.
fn self_memory() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .with_context(|| format!("no {name}"))?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Writes `lines` lines of counters.csv over `distinct` (host, stat) pairs (repeating pairs
/// are duplicates, the last one wins), 15 values each, CRLF like the platform's writer.
fn write_counters(path: &std::path::Path, lines: usize, distinct: usize) -> Result<u64> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    for i in 0..lines {
        let pair = i % distinct;
        writeln!(
            out,
            "sre32-cp{}-testbed,profiling.cp.CAC test.stat {:06},2022-05-10T16:31:00,1652193060,{},11,13,12,12,12,12,12,12,12,12,12,12,12,12\r",
            pair % 10,
            pair / 10,
            i % 97
        )?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// CPU time this thread has used, from /proc/thread-self/schedstat (nanoseconds on a CPU):
/// wall time means little on a machine other builds share.
fn thread_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

/// Best of three plain sequential reads of `path` (256 KiB buffer), in bytes per second.
fn raw_read_throughput(path: &std::path::Path) -> Result<f64> {
    use std::io::Read;
    let mut best = f64::MAX;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    for _ in 0..3 {
        let started = thread_cpu()?;
        let mut f = std::fs::File::open(path)?;
        total = 0;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        best = best.min((thread_cpu()? - started).as_secs_f64());
    }
    Ok(total as f64 / best)
}

async fn bench_sre() -> Result<()> {
    const LINES: usize = 1_000_000;
    let dir = temp_dir("cw-bench-sre-")?;
    let big = dir.path().join("counters.csv");
    let bytes = write_counters(&big, LINES, LINES)?;
    let raw = raw_read_throughput(&big)?;

    // The parser itself, in this process: throughput and the memory its result needs.
    let (_, rss_before) = self_memory()?;
    let mut best = f64::MAX;
    let mut stats = 0;
    let mut wall = f64::MAX;
    for _ in 0..3 {
        let (started, cpu) = (Instant::now(), thread_cpu()?);
        let parsed = clusterwatch::sre_csv::parse(std::fs::File::open(&big)?, true, "bench");
        best = best.min((thread_cpu()? - cpu).as_secs_f64());
        wall = wall.min(started.elapsed().as_secs_f64());
        stats = parsed.stats.len();
        assert_eq!(
            parsed.accepted as usize, LINES,
            "every generated line parses"
        );
    }
    let (peak, _) = self_memory()?;
    let parse = bytes as f64 / best;

    // The csv crate alone, splitting records and nothing else: the ceiling for any parser
    // built on it.
    let mut split_best = f64::MAX;
    for _ in 0..3 {
        let cpu = thread_cpu()?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .from_reader(std::fs::File::open(&big)?);
        let mut record = csv::ByteRecord::new();
        let mut n = 0usize;
        while reader.read_byte_record(&mut record)? {
            n += 1;
        }
        assert_eq!(n, LINES);
        split_best = split_best.min((thread_cpu()? - cpu).as_secs_f64());
    }
    let split = bytes as f64 / split_best;

    // The same number of lines over 1,000 (host, stat) pairs, as a real file repeats them:
    // what a parse costs when it is not building a million map entries.
    let a = dir.path().join("a.csv");
    let a_bytes = write_counters(&a, LINES, 1000)?;
    let mut dup_best = f64::MAX;
    for _ in 0..3 {
        let cpu = thread_cpu()?;
        let parsed = clusterwatch::sre_csv::parse(std::fs::File::open(&a)?, true, "bench");
        dup_best = dup_best.min((thread_cpu()? - cpu).as_secs_f64());
        assert_eq!(parsed.stats.len(), 1000);
    }
    let dup = a_bytes as f64 / dup_best;

    // Scrapes while the exporter re-parses: a file of the same size whose 1,000,000 lines
    // repeat 1,000 (host, stat) pairs, so a scrape stays small and only the parse is big.
    let b = dir.path().join("b.csv");
    std::fs::copy(&a, &b)?;
    let watched = dir.path().join("watched.csv");
    std::fs::copy(&a, &watched)?;
    let config = format!(
        "sre_stats:\n  files:\n    - {{ name: big, path: {}, kind: events }}\n",
        watched.display()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let client = cw.client().clone();
    let url = cw.url("/metrics");
    let metric = |body: &str, name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let scrape = |client: reqwest::Client, url: String| async move {
        let started = Instant::now();
        let body = client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        anyhow::Ok((started.elapsed(), body))
    };
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(scrape(client.clone(), url.clone()).await?.0);
    }
    let (_, body) = scrape(client.clone(), url.clone()).await?;
    let parses_before = metric(&body, "clusterwatch_sre_file_parses_total").unwrap_or(0.0);

    // Replace the file every 1.5 s (alternating two inodes, as a writer renaming a new
    // version into place does) and scrape back to back for 12 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, a, b, watched) = (stop.clone(), a.clone(), b.clone(), watched.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let src = if n % 2 == 0 { &b } else { &a };
                let tmp = watched.with_extension("tmp");
                let _ = std::fs::remove_file(&tmp);
                std::fs::hard_link(src, &tmp)?;
                std::fs::rename(&tmp, &watched)?;
                n += 1;
                std::thread::sleep(Duration::from_millis(1500));
            }
            Ok(())
        })
    };
    let mut busy = Vec::new();
    let mut parse_durations = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let (took, body) = scrape(client.clone(), url.clone()).await?;
        busy.push(took);
        if let Some(d) = metric(&body, "clusterwatch_sre_file_parse_duration_seconds") {
            parse_durations.push(d);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    let (_, body) = scrape(client.clone(), url.clone()).await?;
    let parses = metric(&body, "clusterwatch_sre_file_parses_total").unwrap_or(0.0) - parses_before;
    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3
    };
    let parse_ms = parse_durations.iter().copied().fold(0.0, f64::max) * 1e3;

    println!(
        "\n== SRE stats parser: counters.csv, {LINES} lines, {:.1} MB ==",
        bytes as f64 / 1e6
    );
    println!(
        "  (throughputs are per CPU second of the reading thread; load average {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("?")
    );
    println!("  raw read (best of 3)          {:>8.1} MB/s", raw / 1e6);
    println!(
        "  parse (best of 3)             {:>8.1} MB/s  ({:.0}% of raw read; goal >= 50%)",
        parse / 1e6,
        100.0 * parse / raw
    );
    println!(
        "  lines per CPU second          {:>8.2} M  (best wall time {wall:.2} s)",
        LINES as f64 / best / 1e6
    );
    println!(
        "  peak RSS growth while parsing {:>8.1} MiB for {stats} (host, stat) entries",
        peak.saturating_sub(rss_before) as f64 / 1048576.0
    );
    println!(
        "  csv crate, records only       {:>8.1} MB/s  ({:.0}% of raw read)",
        split / 1e6,
        100.0 * split / raw
    );
    println!(
        "  parse, 1,000 distinct pairs   {:>8.1} MB/s  ({:.0}% of raw read)",
        dup / 1e6,
        100.0 * dup / raw
    );
    println!("== scrapes while the exporter re-parses a 1,000,000-line file (1,000 series) ==");
    println!("  re-parses during the run      {parses:>8.0}  (slowest {parse_ms:.0} ms)");
    println!(
        "  idle scrapes                  median {:>7.2} ms  p99 {:>7.2} ms",
        pct(&mut idle, 0.5),
        pct(&mut idle, 0.99)
    );
    println!("  scrapes during re-parses      median {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} scrapes)", pct(&mut busy, 0.5), pct(&mut busy, 0.99), pct(&mut busy, 1.0), busy.len());
    Ok(())
}

/// Starts clusterwatch on its embedded default with `--web.config.file web` (if any) and
/// waits until `client` gets 200 from `/-/ready`; returns the guard, the PID and the base URL.
async fn start_web(
    web: Option<&std::path::Path>,
    scheme: &str,
    client: &reqwest::Client,
    logs: &std::path::Path,
) -> Result<(ChildGuard, u32, String)> {
    let port = free_port()?;
    let mut command = Command::new(clusterwatch_tests::harness::clusterwatch::binary()?);
    command.args(["--web.listen-address", &format!("127.0.0.1:{port}")]);
    if let Some(web) = web {
        command.arg("--web.config.file").arg(web);
    }
    let mut guard = ChildGuard::spawn("clusterwatch", command, logs)?;
    let base = format!("{scheme}://127.0.0.1:{port}");
    let ready = format!("{base}/-/ready");
    guard
        .wait_ready(
            Duration::from_secs(30),
            "clusterwatch /-/ready",
            async || Ok(client.get(&ready).send().await?.status() == reqwest::StatusCode::OK),
        )
        .await?;
    let pid = guard.pid().context("clusterwatch has no pid")?;
    Ok((guard, pid, base))
}

/// Scrapes of the embedded default over plain HTTP, TLS on a kept connection (as Prometheus
/// scrapes), TLS with a new connection each time, and TLS with basic auth (the check cached
/// after the first); then the time of a refused password, which always costs one bcrypt check.
async fn bench_web(scrapes: usize) -> Result<()> {
    use base64::Engine as _;
    const PASSWORD: &str = "bench-password";
    let dir = temp_dir("cw-bench-web-")?;
    let ca = clusterwatch_tests::harness::certs::Ca::create(dir.path())?;
    ca.leaf(dir.path(), "server", 86_400)?;
    let mut hasher =
        std::process::Command::new(clusterwatch_tests::harness::clusterwatch::binary()?)
            .arg("hash-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
    std::io::Write::write_all(
        &mut hasher.stdin.take().context("stdin")?,
        format!("{PASSWORD}\n").as_bytes(),
    )?;
    let hash = String::from_utf8(hasher.wait_with_output()?.stdout)?;
    let tls = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";
    std::fs::write(dir.path().join("tls.yml"), tls)?;
    std::fs::write(
        dir.path().join("auth.yml"),
        format!("{tls}basic_auth_users:\n  bench: '{}'\n", hash.trim()),
    )?;
    let https = |pool: bool, auth: Option<&str>| -> Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
                ca.cert_path(),
            )?)?);
        if !pool {
            b = b.pool_max_idle_per_host(0);
        }
        if let Some(password) = auth {
            let value =
                base64::engine::general_purpose::STANDARD.encode(format!("bench:{password}"));
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Basic {value}").parse()?,
            );
            b = b.default_headers(headers);
        }
        Ok(b.build()?)
    };
    let plain = clusterwatch_tests::harness::http::client()?;
    let cases: [(&str, Option<&str>, &str, reqwest::Client); 4] = [
        ("plain HTTP", None, "http", plain),
        (
            "TLS, kept connection",
            Some("tls.yml"),
            "https",
            https(true, None)?,
        ),
        (
            "TLS, new connection per scrape",
            Some("tls.yml"),
            "https",
            https(false, None)?,
        ),
        (
            "TLS + basic auth, kept connection",
            Some("auth.yml"),
            "https",
            https(true, Some(PASSWORD))?,
        ),
    ];
    let mut runs = Vec::new();
    for (label, web, scheme, client) in &cases {
        let web = web.map(|w| dir.path().join(w));
        let (guard, pid, base) = start_web(web.as_deref(), scheme, client, dir.path()).await?;
        runs.push(measure(label, client, &format!("{base}/metrics"), pid, scrapes).await?);
        drop(guard);
    }
    println!("\n== web security: {scrapes} sequential scrapes of the embedded default ==");
    print(&runs.iter().collect::<Vec<_>>());

    let client = https(true, Some("wrong-password"))?;
    let (_guard, _pid, base) = start_web(
        Some(&dir.path().join("auth.yml")),
        "https",
        &https(true, Some(PASSWORD))?,
        dir.path(),
    )
    .await?;
    let mut refused = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let status = client
            .get(format!("{base}/-/healthy"))
            .send()
            .await?
            .status();
        refused.push(started.elapsed());
        if status != reqwest::StatusCode::UNAUTHORIZED {
            bail!("a wrong password got {status}");
        }
    }
    refused.sort();
    println!(
        "  wrong password (one bcrypt check at cost 10, never cached): median {:.1} ms over 20",
        refused[10].as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() -> Result<()> {
    // The SRE parse is measured in this process: with clusterwatch's allocator settings,
    // set before the runtime's threads exist.
    clusterwatch::memory::tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let scrapes = |default: usize| -> usize {
        args.iter()
            .position(|a| a == "--scrapes")
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: built without --release; numbers will not mean much");
    }
    match what {
        "default" => bench_default(scrapes(1000)).await,
        "postgres" => bench_postgres(scrapes(500)).await,
        "redis" => bench_redis(scrapes(500)).await,
        "probes" => bench_probes(scrapes(300)).await,
        "hooks" => bench_hooks(10).await,
        "sre" => bench_sre().await,
        "web" => bench_web(scrapes(500)).await,
        "train" => bench_train(scrapes(300)).await,
        "all" => {
            bench_default(scrapes(1000)).await?;
            bench_postgres(scrapes(500)).await?;
            bench_redis(scrapes(500)).await?;
            bench_probes(scrapes(300)).await?;
            bench_hooks(10).await?;
            bench_sre().await?;
            bench_web(scrapes(500)).await
        }
        other => bail!(
            "unknown benchmark `{other}`: use default, postgres, redis, probes, hooks, sre, web, train or all"
        ),
    }
}
