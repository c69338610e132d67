//! Benchmarks run by hand (`cargo run --release -p clusterwatch-tests --bin bench -- all`):
//! scrape latency, CPU per scrape and RSS of clusterwatch on its embedded default, and against
//! Debian's prometheus-postgres-exporter and prometheus-redis-exporter on the same real
//! servers, reported as ratios.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clusterwatch_tests::harness::process::ChildGuard;
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

fn proc_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
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
    let rss_before = proc_rss(pid)?;
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
        rss_after: proc_rss(pid)?,
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
    let idle = proc_rss(pid)?;
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
        "  idle RSS after first scrape: {:.1} MiB",
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

/// Starts clusterwatch on `config`, measures it and stops it.
async fn measure_clusterwatch(label: &str, config: &str, scrapes: usize) -> Result<Run> {
    let mut cw = Clusterwatch::start(Some(config), &[]).await?;
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

    let ours = measure_clusterwatch("clusterwatch, 1 PostgreSQL target", &one, scrapes).await?;
    let theirs = measure_other(
        "prometheus-postgres-exporter 0.11 (Debian)",
        start_postgres_exporter(&dsn).await?,
        scrapes,
    )
    .await?;
    let many =
        measure_clusterwatch("clusterwatch, 20 PostgreSQL targets", &twenty, scrapes).await?;

    println!("\n== PostgreSQL primary on loopback: {scrapes} sequential scrapes each ==");
    print(&[&ours, &theirs, &many]);
    compare("postgres_exporter; goal <= 0.5", &ours, &theirs);
    println!("ratios (20 targets / 1 target; goal <= 2):");
    latency_ratios(&many, &ours);
    Ok(())
}

const REDIS_EXPORTER: &str = "/usr/bin/prometheus-redis-exporter";

async fn bench_redis(scrapes: usize) -> Result<()> {
    if !std::path::Path::new(REDIS_EXPORTER).exists() {
        bail!("install the Debian package prometheus-redis-exporter to compare with it");
    }
    let pair = RedisPair::start().await?;
    let address = pair.master.url();
    let config = format!("redis:\n  - {{ name: master, cluster: bench, address: '{address}' }}\n");

    let ours = measure_clusterwatch("clusterwatch, 1 Redis master", &config, scrapes).await?;
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

#[tokio::main]
async fn main() -> Result<()> {
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
        "all" => {
            bench_default(scrapes(1000)).await?;
            bench_postgres(scrapes(500)).await?;
            bench_redis(scrapes(500)).await
        }
        other => bail!("unknown benchmark `{other}`: use default, postgres, redis or all"),
    }
}
