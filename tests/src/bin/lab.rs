//! The local lab for people: `up` starts PostgreSQL and Redis pairs, clusterwatch with hooks,
//! Prometheus with the rules pack and Alertmanager in the background and prints their URLs;
//! `drill pg|redis` kills a primary and reports the failover's timeline; `down` removes it all.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use serde_json::Value;

use clusterwatch_tests::harness::process::{pid_alive, signal_tree};
use clusterwatch_tests::lab::drill::{drill, System};
use clusterwatch_tests::lab::{Lab, LabInfo, LabSettings};

/// How long `up` waits for the lab (initdb, base backup, every server ready).
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `down` lets the lab stop before it gives up.
const DOWN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(about = "clusterwatch's local lab: real servers on loopback, and failover drills")]
struct Cli {
    /// Where the lab keeps its state, servers' data and logs.
    #[arg(long, global = true, default_value_os_t = default_dir())]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the lab in the background and print its URLs.
    Up {
        /// Prometheus' scrape and rule evaluation interval, in seconds.
        #[arg(long, default_value_t = 2)]
        scrape_interval: u64,
    },
    /// Print the URLs of the running lab.
    Status,
    /// Kill a primary (`pg` or `redis`) and report the failover's timeline.
    Drill {
        /// `pg` or `redis`.
        system: String,
        /// Give up watching after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Stop every server of the lab and remove its directory.
    Down,
    /// Run the lab in the foreground until SIGTERM or Ctrl-C (what `up` starts).
    Run {
        /// Prometheus' scrape and rule evaluation interval, in seconds.
        #[arg(long, default_value_t = 2)]
        scrape_interval: u64,
    },
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("clusterwatch-lab")
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up { scrape_interval } => up(&cli.dir, scrape_interval).await,
        Cmd::Status => read_info(&cli.dir).map(|info| println!("{}", info.describe())),
        Cmd::Drill { system, timeout } => run_drill(&cli.dir, &system, timeout).await,
        Cmd::Down => down(&cli.dir),
        Cmd::Run { scrape_interval } => run(&cli.dir, scrape_interval).await,
    };
    if let Err(err) = result {
        eprintln!("lab: {err:#}");
        std::process::exit(1);
    }
}

fn info_path(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

fn pid_path(dir: &Path) -> PathBuf {
    dir.join("lab.pid")
}

fn read_info(dir: &Path) -> Result<LabInfo> {
    let path = info_path(dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no lab running in {} (run `lab up`)", dir.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    LabInfo::from_json(&value)
}

fn running_supervisor(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_path(dir))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid_alive(pid))
}

async fn up(dir: &Path, scrape_interval: u64) -> Result<()> {
    if let Some(pid) = running_supervisor(dir) {
        bail!(
            "a lab is already running in {} (pid {pid}); `lab down` first",
            dir.display()
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("could not clear {}", dir.display()))?;
    }
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("could not create {}", tmp.display()))?;
    // The PostgreSQL servers run as `postgres`, which must be able to reach their directories.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let log_path = dir.join("lab.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("--dir")
        .arg(dir)
        .args(["run", "--scrape-interval", &scrape_interval.to_string()])
        // Every server's directory lands inside the lab's, so `down` removes them all.
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own session: closing the terminal that ran `up` leaves the lab running.
        .process_group(0);
    let mut child = command
        .spawn()
        .context("could not start the lab in the background")?;
    std::fs::write(pid_path(dir), child.id().to_string())?;
    println!(
        "starting the lab in {} (log: {}) ...",
        dir.display(),
        log_path.display()
    );

    let started = Instant::now();
    while started.elapsed() < UP_TIMEOUT {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "the lab exited ({status}) while starting:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(info) = read_info(dir) {
            println!("{}", info.describe());
            println!("drill: lab drill pg | lab drill redis; stop: lab down");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "the lab was not up after {UP_TIMEOUT:?}; see {} and run `lab down`",
        log_path.display()
    )
}

async fn run(dir: &Path, scrape_interval: u64) -> Result<()> {
    let settings = LabSettings {
        scrape_interval: Duration::from_secs(scrape_interval.max(1)),
        ..LabSettings::default()
    };
    let lab = Lab::up(settings).await?;
    let info = lab.info()?;
    let path = info_path(dir);
    let partial = dir.join("lab.json.tmp");
    std::fs::write(&partial, serde_json::to_string_pretty(&info.to_json())?)?;
    std::fs::rename(&partial, &path)?;
    eprintln!("lab up:\n{}", info.describe());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("lab: stopping");
    let _ = std::fs::remove_file(&path);
    drop(lab);
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    if let Some(pid) = running_supervisor(dir) {
        signal_tree(pid, Signal::SIGTERM)
            .with_context(|| format!("could not stop the lab (pid {pid})"))?;
        let started = Instant::now();
        while pid_alive(pid) {
            if started.elapsed() > DOWN_TIMEOUT {
                bail!("the lab (pid {pid}) did not stop within {DOWN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A lab killed without a chance to clean up leaves PostgreSQL running (pg_ctl detaches it).
    stop_leftover_postmasters(&dir.join("tmp"));
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("could not remove {}", dir.display()))?;
    }
    println!("lab removed");
    Ok(())
}

fn stop_leftover_postmasters(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let pid = std::fs::read_to_string(entry.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&pid| pid_alive(pid)) {
            let _ = signal_tree(pid, Signal::SIGKILL);
        }
    }
}

async fn run_drill(dir: &Path, system: &str, timeout: u64) -> Result<()> {
    let system = System::parse(system)?;
    let info = read_info(dir)?;
    let timeline = drill(&info, system, Duration::from_secs(timeout)).await?;
    println!("{timeline}");
    if !timeline.complete() {
        bail!(
            "the failover did not complete; see {}/lab.log",
            dir.display()
        );
    }
    Ok(())
}
