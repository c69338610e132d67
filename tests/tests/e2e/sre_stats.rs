//! The SRE stats collector against a file a writer keeps replacing, the way the platform
//! refreshes `counters.csv`: by rename and by truncating in place, while we scrape.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clusterwatch_tests::exposition::scrape;
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
