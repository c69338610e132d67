//! The SRE stats collector against a file a writer keeps replacing, the way the platform
//! refreshes `counters.csv`: by rename and by truncating in place, while we scrape.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::exposition::{scrape, Exposition};
use clusterwatch_tests::harness::{temp_dir, wait_until, Clusterwatch};

const STATS: usize = 200;

/// Version `k` of the file: every stat's newest value is `k`, so a scrape that mixes two
/// versions (a torn read) shows two different values.
fn version(k: u64) -> String {
    let minute = 1_652_193_060 + 60 * k;
    let mut s = String::new();
    for i in 0..STATS {
        let host = if i % 2 == 0 { "cp1" } else { "cp2" };
        s.push_str(&format!(
            "{host},profiling.cp.stat {i},2022-05-10T16:31:00,{minute},{k},7,7,7,7,7,7,7,7,7,7,7,7,7,7\r\n"
        ));
    }
    s
}

/// Rewrites `path` every `period` until `stop`: odd versions by writing a temporary file
/// and renaming it over, even ones by truncating and rewriting in place.
fn writer(path: PathBuf, period: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut k = 1;
        while !stop.load(Ordering::Relaxed) {
            k += 1;
            let text = version(k);
            if k % 2 == 1 {
                let tmp = path.with_extension("csv.tmp");
                std::fs::write(&tmp, &text).expect("write temporary file");
                std::fs::rename(&tmp, &path).expect("rename over the stats file");
            } else {
                use std::io::Write;
                let mut f = std::fs::File::options()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .expect("open for truncation");
                // Two writes, as a buffered writer flushing mid-file would do.
                let (a, b) = text.as_bytes().split_at(text.len() / 2);
                f.write_all(a).expect("write first half");
                f.write_all(b).expect("write second half");
            }
            std::thread::sleep(period);
        }
        k
    })
}

fn config(path: &Path) -> String {
    format!(
        "sre_stats:\n  files:\n    - {{ name: cp-counters, path: {}, kind: events }}\n",
        path.display()
    )
}

#[tokio::test]
async fn a_file_rewritten_every_second_is_never_seen_torn() -> Result<()> {
    let dir = temp_dir("cw-sre-")?;
    let path = dir.path().join("counters.csv");
    std::fs::write(&path, version(1))?;
    let cw = Clusterwatch::start(Some(&config(&path)), &[]).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let handle = writer(path.clone(), Duration::from_millis(700), Arc::clone(&stop));

    let started = Instant::now();
    let mut versions = Vec::new();
    let mut scrapes = 0;
    let outcome: Result<()> = async {
        while started.elapsed() < Duration::from_secs(8) {
            let e = scrape(&cw).await?;
            scrapes += 1;
            let target = [("target", "cp-counters")];
            ensure!(
                e.value(
                    "clusterwatch_target_up",
                    &[("target", "cp-counters"), ("collector", "sre")]
                ) == Some(1.0),
                "target down during rewrites"
            );
            ensure!(e.value("clusterwatch_sre_file_present", &target) == Some(1.0));
            for reason in ["too_few_fields", "bad_value", "partial_line", "malformed"] {
                let n = e.value(
                    "clusterwatch_sre_file_lines_rejected",
                    &[("target", "cp-counters"), ("reason", reason)],
                );
                ensure!(n == Some(0.0), "lines rejected for {reason}: {n:?}");
            }
            let values: Vec<f64> = e
                .find("clusterwatch_sre_counter_events", &target)
                .iter()
                .map(|s| s.value)
                .collect();
            ensure!(
                values.len() == STATS,
                "{} series instead of {STATS}",
                values.len()
            );
            ensure!(
                values.iter().all(|v| *v == values[0]),
                "a torn result: values from several versions {values:?}"
            );
            let minute = e.find("clusterwatch_sre_stat_minute_timestamp_seconds", &target)[0].value;
            ensure!(
                minute == 1_652_193_060.0 + 60.0 * values[0],
                "minute {minute} does not match version {}",
                values[0]
            );
            if versions.last() != Some(&values[0]) {
                versions.push(values[0]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let last = handle.join().expect("writer thread");
    outcome.map_err(|e| e.context(format!("after {scrapes} scrapes; logs:\n{}", cw.logs())))?;
    // Both ways of rewriting were seen, in order, and the scrapes kept up with the writer.
    ensure!(
        versions.len() >= 6,
        "only versions {versions:?} seen of {last}"
    );
    ensure!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions went backwards: {versions:?}"
    );

    // The file vanishing is a metric, not a failed target; it coming back is picked up.
    std::fs::remove_file(&path)?;
    wait_until(Duration::from_secs(10), "file_present 0", async || {
        let e = scrape(&cw).await?;
        Ok(e.value(
            "clusterwatch_sre_file_present",
            &[("target", "cp-counters")],
        ) == Some(0.0)
            && e.value(
                "clusterwatch_target_up",
                &[("target", "cp-counters"), ("collector", "sre")],
            ) == Some(1.0)
            && e.find("clusterwatch_sre_counter_events", &[]).is_empty())
    })
    .await?;
    std::fs::write(&path, version(99))?;
    wait_until(
        Duration::from_secs(10),
        "the recreated file parsed",
        async || {
            let e = scrape(&cw).await?;
            Ok(
                e.find("clusterwatch_sre_counter_events", &[]).len() == STATS
                    && e.find("clusterwatch_sre_counter_events", &[])[0].value == 99.0,
            )
        },
    )
    .await?;
    Ok(())
}

/// Samples Python's OpenMetrics parser (prometheus_client, an implementation independent of
/// ours) reads from `body`; an error when it rejects it.
fn openmetrics_samples(body: &str) -> Result<usize> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    // Debian's python3-prometheus-client lives in the system interpreter, which need not be
    // the first python3 on PATH.
    let python = std::env::var_os("CLUSTERWATCH_PYTHON")
        .into_iter()
        .chain(["python3".into(), "/usr/bin/python3".into()])
        .find(|py| {
            Command::new(py)
                .args(["-c", "import prometheus_client.openmetrics.parser"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no python3 with prometheus_client (Debian: python3-prometheus-client)")?;
    let mut child = Command::new(python)
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as f\nprint(sum(len(m.samples) for m in f(sys.stdin.read())))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the OpenMetrics parser rejects the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[tokio::test]
async fn stats_with_odd_names_and_textfiles_make_valid_openmetrics() -> Result<()> {
    let dir = temp_dir("cw-sre-om-")?;
    let counters = dir.path().join("counters.csv");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(
        b"sre32-cp2-testbed,profiling.cp.CAC test.Extract Contacts,2022-05-10T16:31:00,1652193060,12,11\r\n\
          sre32-cp2-testbed,quote\"and\\backslash,2022-05-10T16:31:00,1652193060,3\r\n\
          sre32-cp2-testbed,caf\xE9,2022-05-10T16:31:00,1652193060,4\r\n\
          sre32-cp2-testbed,response.503,2022-05-10T16:31:00,1652193060,,,\r\n",
    );
    std::fs::write(&counters, bytes)?;
    let textfiles = dir.path().join("textfile");
    std::fs::create_dir(&textfiles)?;
    std::fs::write(
        textfiles.join("jobs.prom"),
        "# TYPE rsync_runs counter\nrsync_runs_total{module=\"sounz data\"} 12\nnightly_dump_ok 1\n",
    )?;
    let cw = Clusterwatch::start(
        Some(&format!(
            "sre_stats:\n  counters: {}\ntextfile:\n  directory: {}\n",
            counters.display(),
            textfiles.display()
        )),
        &[],
    )
    .await?;
    let e = scrape(&cw).await?;
    assert_eq!(
        e.value(
            "clusterwatch_sre_counter_events",
            &[("stat", "profiling.cp.CAC test.Extract Contacts")]
        ),
        Some(12.0)
    );
    assert_eq!(
        e.value(
            "clusterwatch_sre_counter_events",
            &[("stat", "quote\"and\\backslash")]
        ),
        Some(3.0)
    );
    assert_eq!(
        e.value(
            "clusterwatch_sre_counter_events",
            &[("stat", "caf\u{FFFD}")]
        ),
        Some(4.0)
    );
    assert_eq!(
        e.value(
            "clusterwatch_sre_counter_events",
            &[("stat", "response.503")]
        ),
        Some(0.0)
    );
    let (_, headers, body) = cw
        .get_with_headers(
            "/metrics",
            &[("Accept", "application/openmetrics-text;version=1.0.0")],
        )
        .await?;
    assert!(headers["content-type"]
        .to_str()?
        .starts_with("application/openmetrics-text"));
    let theirs = openmetrics_samples(&body)?;
    let ours = Exposition::parse(&body)?.samples.len();
    assert_eq!(theirs, ours, "both parsers read the same samples");
    Ok(())
}
