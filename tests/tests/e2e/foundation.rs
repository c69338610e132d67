//! The foundation as a user meets it: the embedded default scraped by a real Prometheus, the
//! exposition accepted by an independent OpenMetrics parser, hung targets costing only their
//! deadline, `check-config` pointing at every problem, and no secret anywhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::{scrape, Exposition};
use clusterwatch_tests::harness::clusterwatch::binary;
use clusterwatch_tests::harness::repo_root;
use clusterwatch_tests::harness::{
    wait_until, Blackhole, Clusterwatch, PgNode, Prometheus, PrometheusConfig, ScrapeJob,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A python3 that has `prometheus_client` (Debian's python3-prometheus-client or pip's).
fn python_with_parser() -> Result<PathBuf> {
    let candidates = std::env::var_os("CLUSTERWATCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(["python3", "/usr/bin/python3"].map(PathBuf::from));
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(py);
        }
    }
    bail!("no python3 with prometheus_client: install the Debian package python3-prometheus-client (tests/run.sh does)")
}

/// Runs Python's parser over `body`; `module` picks OpenMetrics or the classic text parser.
fn python_parse(body: &str, openmetrics: bool) -> Result<usize> {
    let script = if openmetrics {
        "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nprint(sum(len(f.samples) for f in p(sys.stdin.read())))"
    } else {
        "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nprint(sum(len(f.samples) for f in p(sys.stdin.read())))"
    };
    let mut child = Command::new(python_with_parser()?)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the parser rejected the exposition: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[tokio::test]
async fn embedded_default_is_scraped_by_prometheus_without_errors() -> Result<()> {
    let cw = Clusterwatch::start(None, &[]).await?;
    // 2 s rather than the harness' 1 s: on a loaded 2-core machine a 1 s scrape timeout
    // measures the machine, not the exporter.
    let mut job = ScrapeJob::new("clusterwatch", &[&cw.addr()]);
    job.scrape_interval = Duration::from_secs(2);
    job.scrape_timeout = Duration::from_secs(2);
    let prometheus = Prometheus::start(&PrometheusConfig {
        jobs: vec![job],
        ..PrometheusConfig::default()
    })
    .await?;
    prometheus
        .wait_for_target_up("clusterwatch", Duration::from_secs(30))
        .await?;
    // Several scrapes in a row, each healthy, with filesystem and system metrics stored.
    wait_until(
        Duration::from_secs(30),
        "three healthy scrapes with fs and system metrics",
        async || {
            let targets = prometheus.targets().await?;
            let target = &targets["activeTargets"][0];
            if target["health"] != "up" || target["lastError"] != "" {
                bail!("target not healthy: {target}");
            }
            let scrapes = prometheus
                .query_f64("count_over_time(up{job=\"clusterwatch\"}[1m])")
                .await?
                .unwrap_or(0.0);
            let fs = prometheus
                .query_f64("count(clusterwatch_fs_size_bytes{mountpoint=\"/\"} > 0)")
                .await?;
            let mem = prometheus
                .query_f64("clusterwatch_system_memory_total_bytes")
                .await?;
            let ups = prometheus.query_f64("min(clusterwatch_target_up)").await?;
            if scrapes >= 3.0 && fs == Some(1.0) && mem.is_some_and(|m| m > 0.0) && ups == Some(1.0)
            {
                return Ok(true);
            }
            bail!("scrapes={scrapes} root_fs={fs:?} memory={mem:?} min_target_up={ups:?}")
        },
    )
    .await
    .with_context(|| format!("prometheus logs:\n{}", prometheus.logs()))?;
    // Prometheus itself found nothing wrong with the exposition.
    let invalid = prometheus
        .query_f64("sum(scrape_samples_post_metric_relabeling{job=\"clusterwatch\"}) - sum(scrape_samples_scraped{job=\"clusterwatch\"})")
        .await?;
    assert_eq!(invalid, Some(0.0));
    assert_eq!(
        prometheus.query_f64("up{job=\"clusterwatch\"}").await?,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test]
async fn exposition_is_accepted_by_an_independent_openmetrics_parser() -> Result<()> {
    let cw = Clusterwatch::start(None, &[]).await?;
    let (status, headers, body) = cw
        .get_with_headers("/metrics", &[("Accept", PROMETHEUS_ACCEPT)])
        .await?;
    assert!(status.is_success());
    assert_eq!(headers["content-type"], OPENMETRICS);
    assert!(body.ends_with("# EOF\n"));
    let om_samples = python_parse(&body, true)?;
    assert!(om_samples > 20, "only {om_samples} samples");

    // Scrapers that do not ask for OpenMetrics get the classic text format.
    let (_, headers, text) = cw.get("/metrics").await?;
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text_samples = python_parse(&text, false)?;
    assert!(text_samples > 20);
    let parsed = Exposition::parse(&text)?;
    assert!(parsed.value("clusterwatch_fs_threshold_ratio", &[("mountpoint", "/")]) == Some(0.75));
    assert!(parsed.value("clusterwatch_exporter_build_info", &[]) == Some(1.0));
    Ok(())
}

#[tokio::test]
async fn hung_and_stopped_targets_cost_only_their_deadline() -> Result<()> {
    let blackhole = Blackhole::start()?;
    let healthy = PgNode::start_primary("healthy").await?;
    let frozen = PgNode::start_primary("frozen").await?;
    let config = format!(
        "global:\n  timeout: 2s\npostgres:\n  - {{ name: healthy, dsn: '{}' }}\n  - {{ name: blackhole, dsn: 'postgresql://monitor:x@{}/postgres' }}\n  - {{ name: frozen, dsn: '{}' }}\nsystem: {{}}\n",
        healthy.monitor_dsn(),
        blackhole.addr(),
        frozen.monitor_dsn(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    // Connected first, so the frozen server is stopped mid-conversation, the hard case.
    let first = scrape(&cw).await?;
    assert_eq!(
        first.value("clusterwatch_target_up", &[("target", "frozen")]),
        Some(1.0)
    );
    frozen.pause()?;

    for _ in 0..2 {
        let started = Instant::now();
        let metrics = scrape(&cw).await?;
        let took = started.elapsed();
        assert!(
            took <= Duration::from_millis(2200),
            "scrape took {took:?}, deadline 2 s"
        );
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "healthy")]),
            Some(1.0)
        );
        assert_eq!(
            metrics.value(
                "clusterwatch_pg_role",
                &[("target", "healthy"), ("role", "primary")]
            ),
            Some(1.0)
        );
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "blackhole")]),
            Some(0.0)
        );
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "frozen")]),
            Some(0.0)
        );
        assert!(metrics.value("clusterwatch_system_load1", &[]).is_some());
        assert!(
            metrics
                .find("clusterwatch_pg_role", &[("target", "frozen")])
                .is_empty(),
            "no stale series of a down target"
        );
        let timeouts = metrics.value(
            "clusterwatch_target_scrape_errors_total",
            &[("target", "frozen"), ("reason", "timeout")],
        );
        assert!(timeouts.is_some_and(|v| v >= 1.0));
    }

    // Prometheus' own, shorter timeout wins: 1 s minus the margin.
    let started = Instant::now();
    let (status, _, _) = cw
        .get_with_headers("/metrics", &[("X-Prometheus-Scrape-Timeout-Seconds", "1")])
        .await?;
    let took = started.elapsed();
    assert!(status.is_success());
    assert!(
        took <= Duration::from_millis(1100),
        "scrape with a 1 s scrape timeout took {took:?}"
    );
    frozen.resume()?;
    wait_until(
        Duration::from_secs(20),
        "the resumed server to be up again",
        async || {
            Ok(scrape(&cw)
                .await?
                .value("clusterwatch_target_up", &[("target", "frozen")])
                == Some(1.0))
        },
    )
    .await?;
    assert!(
        blackhole.accepted() >= 1,
        "the blackhole was never connected to"
    );
    Ok(())
}

/// Runs `clusterwatch check-config FILE` and returns (exit code, stderr + stdout).
fn check_config(path: &Path) -> Result<(i32, String)> {
    let out = Command::new(binary()?)
        .arg("check-config")
        .arg(path)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[tokio::test]
async fn check_config_points_at_every_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let unreadable = dir.path().join("no-such.pass");
    // (file content, the lines each problem must be reported on)
    let cases: Vec<(&str, String, Vec<u32>)> = vec![
        ("unknown-key", "filesystems:\n  default_threshold: 0.8\n  mounts:\n    - { path: /, treshold: 0.7 }\n".into(), vec![4]),
        ("wrong-type", "global:\n  timeout: 5s\nfilesystems:\n  default_threshold: high\n".into(), vec![4]),
        ("bad-duration", "global:\n  timeout: 5 fortnights\n".into(), vec![2]),
        (
            "duplicate-target",
            "postgres:\n  - { name: db1, dsn: 'host=127.0.0.1 user=m' }\n  - { name: db1, dsn: 'host=127.0.0.2 user=m' }\n".into(),
            vec![3],
        ),
        (
            "unreadable-password",
            format!("postgres:\n  - name: db1\n    dsn: 'host=127.0.0.1 user=m'\n    password_file: {}\n", unreadable.display()),
            vec![4],
        ),
        ("yaml-syntax", "global:\n  timeout: [5s\nsystem: {}\n".into(), vec![2, 3]),
        ("unknown-section", "sytem: {}\nfilesystems: {}\n".into(), vec![1]),
        (
            "several-at-once",
            "global:\n  timeout: soon\nfilesystems:\n  mounts:\n    - { path: relative }\n    - { path: /, threshold: 75 }\npostgres:\n  - { name: '', dsn: 'host=x' }\n".into(),
            vec![2, 5, 6, 8],
        ),
    ];
    for (name, content, lines) in &cases {
        let path = dir.path().join(format!("{name}.yml"));
        std::fs::write(&path, content)?;
        let (code, text) = check_config(&path)?;
        assert_eq!(code, 1, "{name}: exit code {code}\n{text}");
        let problem_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&*path.to_string_lossy()))
            .collect();
        for line in lines {
            let prefix = format!("{}:{line}:", path.display());
            // A YAML syntax error is reported once, at the line the parser noticed it.
            if *name == "yaml-syntax" {
                continue;
            }
            assert!(
                problem_lines.iter().any(|l| l.starts_with(&prefix)),
                "{name}: no problem reported at line {line}:\n{text}"
            );
        }
        if *name == "yaml-syntax" {
            assert!(
                lines
                    .iter()
                    .any(|l| text.contains(&format!("{}:{l}:", path.display()))),
                "{name}: no line number:\n{text}"
            );
        }
        if *name == "several-at-once" {
            assert!(problem_lines.len() >= 4, "every problem at once:\n{text}");
        }
        assert!(
            text.contains("hint") || *name == "wrong-type" || *name == "bad-duration",
            "{name}: no hint:\n{text}"
        );
    }

    // The example shipped in the repository passes.
    let (code, text) = check_config(&repo_root().join("examples/clusterwatch.yml"))?;
    assert_eq!(code, 0, "{text}");

    // `serve` refuses to start on a broken file, with the same report.
    let broken = dir.path().join("several-at-once.yml");
    let out = Command::new(binary()?)
        .args(["--web.listen-address", "127.0.0.1:0", "--config.file"])
        .arg(&broken)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{}:2:", broken.display())));
    Ok(())
}

#[tokio::test]
async fn secrets_never_appear_in_metrics_landing_page_or_logs() -> Result<()> {
    const SECRET: &str = "Sup3r-S3cret-Pw";
    const WRONG: &str = "Wr0ng-S3cret-Pw";
    let node = PgNode::start_primary("secrets").await?;
    node.psql(&format!("ALTER ROLE monitor PASSWORD '{SECRET}'"))
        .await?;
    let dir = tempfile::tempdir()?;
    let pass_file = dir.path().join("pg.pass");
    std::fs::write(&pass_file, format!("{SECRET}\n"))?;
    let config = format!(
        "postgres:\n  - {{ name: in-dsn, cluster: c1, dsn: '{}' }}\n  - {{ name: wrong, dsn: '{}' }}\n  - {{ name: from-file, dsn: 'postgresql://monitor@127.0.0.1:{}/postgres', password_file: '{}' }}\n",
        node.dsn_for("monitor", SECRET),
        node.dsn_for("monitor", WRONG),
        node.port(),
        pass_file.display(),
    );
    let cw = Clusterwatch::start(Some(&config), &["--log.level", "debug"]).await?;
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let metrics = scrape(&cw).await?;
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "in-dsn")]),
            Some(1.0)
        );
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "from-file")]),
            Some(1.0)
        );
        assert_eq!(
            metrics.value("clusterwatch_target_up", &[("target", "wrong")]),
            Some(0.0)
        );
        assert!(metrics
            .value(
                "clusterwatch_target_scrape_errors_total",
                &[("target", "wrong"), ("reason", "auth")]
            )
            .is_some());
        bodies.push(cw.get("/metrics").await?.2);
        bodies.push(
            cw.get_with_headers("/metrics", &[("Accept", PROMETHEUS_ACCEPT)])
                .await?
                .2,
        );
    }
    let (_, _, landing) = cw.get("/").await?;
    assert!(landing.contains("in-dsn") && landing.contains("from-file"));
    bodies.push(landing);
    bodies.push(cw.logs());
    assert!(
        cw.logs().contains("auth"),
        "the auth failure is logged:\n{}",
        cw.logs()
    );
    for body in &bodies {
        for secret in [SECRET, WRONG, "monitor:"] {
            assert!(!body.contains(secret), "`{secret}` leaked into:\n{body}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() -> Result<()> {
    let mut cw = Clusterwatch::start(None, &[]).await?;
    assert!(
        scrape(&cw)
            .await?
            .value("clusterwatch_target_up", &[("collector", "fs")])
            == Some(1.0)
    );
    let status = cw.process().stop()?;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "logs:\n{}",
        cw.logs()
    );
    assert!(cw.logs().contains("SIGTERM received"));
    Ok(())
}
