//! Benchmarks run by hand (`cargo run --release -p clusterwatch-tests --bin bench -- all`):
//! scrape latency, CPU per scrape and RSS of clusterwatch on its embedded default, and against
//! Debian's prometheus-postgres-exporter on the same real primary, reported as ratios; and the
//! SRE stats parser on a 1,000,000-line file against a plain read of the same file.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clusterwatch_tests::harness::process::ChildGuard;
use clusterwatch_tests::harness::{free_port, temp_dir, Clusterwatch, PgNode};

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

async fn start_postgres_exporter(dsn: &str) -> Result<(ChildGuard, String, tempfile::TempDir)> {
    let dir = temp_dir("cw-pge-")?;
    let port = free_port()?;
    let mut command = Command::new("/usr/bin/prometheus-postgres-exporter");
    command
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .env("DATA_SOURCE_NAME", format!("{dsn}?sslmode=disable"));
    let mut guard = ChildGuard::spawn("postgres_exporter", command, dir.path())?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let client = reqwest::Client::new();
    guard
        .wait_ready(
            Duration::from_secs(30),
            "postgres_exporter /metrics",
            async || Ok(client.get(&url).send().await?.status().is_success()),
        )
        .await?;
    Ok((guard, url, dir))
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

    let mut cw = Clusterwatch::start(Some(&one), &[]).await?;
    let cw_pid = cw.process().pid().context("no pid")?;
    let client = cw.client().clone();
    let ours = measure(
        "clusterwatch, 1 PostgreSQL target",
        &client,
        &cw.url("/metrics"),
        cw_pid,
        scrapes,
    )
    .await?;
    drop(cw);

    let (mut pge, pge_url, _pge_dir) = start_postgres_exporter(&dsn).await?;
    let pge_pid = pge.pid().context("no pid")?;
    let theirs = measure(
        "prometheus-postgres-exporter 0.11 (Debian)",
        &client,
        &pge_url,
        pge_pid,
        scrapes,
    )
    .await?;
    pge.stop()?;

    let mut cw20 = Clusterwatch::start(Some(&twenty), &[]).await?;
    let pid20 = cw20.process().pid().context("no pid")?;
    let many = measure(
        "clusterwatch, 20 PostgreSQL targets",
        &client,
        &cw20.url("/metrics"),
        pid20,
        scrapes,
    )
    .await?;
    drop(cw20);

    println!("\n== PostgreSQL primary on loopback: {scrapes} sequential scrapes each ==");
    print(&[&ours, &theirs, &many]);
    println!("ratios (clusterwatch / postgres_exporter; goal <= 0.5):");
    ratio(
        "median latency",
        ours.median.as_secs_f64(),
        theirs.median.as_secs_f64(),
    );
    ratio(
        "p99 latency",
        ours.p99.as_secs_f64(),
        theirs.p99.as_secs_f64(),
    );
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
    println!("ratios (20 targets / 1 target; goal <= 2):");
    ratio(
        "median latency",
        many.median.as_secs_f64(),
        ours.median.as_secs_f64(),
    );
    ratio(
        "p99 latency",
        many.p99.as_secs_f64(),
        ours.p99.as_secs_f64(),
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
        "sre" => bench_sre().await,
        "all" => {
            bench_default(scrapes(1000)).await?;
            bench_postgres(scrapes(500)).await?;
            bench_sre().await
        }
        other => bail!("unknown benchmark `{other}`: use default, postgres, sre or all"),
    }
}
