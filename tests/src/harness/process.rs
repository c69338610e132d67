//! Processes the harness starts: a guard that logs a child's output to files and stops it on
//! drop, signals sent only to PIDs we started, commands with a timeout, and [`wait_until`],
//! the one polling loop every readiness check uses. It knows nothing about any server.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long a process gets to exit after SIGTERM before it is sent SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How many log lines startup errors quote.
pub const LOG_TAIL_LINES: usize = 40;

/// What one poll of the internal loop decided.
enum Step {
    Done,
    NotYet(Option<anyhow::Error>),
    Abort(anyhow::Error),
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok(true)` or `timeout` passes.
///
/// `Ok(false)` and `Err(_)` both mean "not yet": servers refuse connections while they start,
/// so an error is expected for a while. The last error is kept and becomes the cause of the
/// timeout error, so a failure says what the condition looked like at the end. A check that
/// is itself still running at the deadline is abandoned.
pub async fn wait_until<F>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: AsyncFnMut() -> Result<bool>,
{
    poll(timeout, what, async || match check().await {
        Ok(true) => Step::Done,
        Ok(false) => Step::NotYet(None),
        Err(err) => Step::NotYet(Some(err)),
    })
    .await
}

async fn poll<F>(timeout: Duration, what: &str, mut step: F) -> Result<()>
where
    F: AsyncFnMut() -> Step,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let last = loop {
        let last = match tokio::time::timeout_at(deadline, step()).await {
            Ok(Step::Done) => return Ok(()),
            Ok(Step::Abort(err)) => return Err(err.context(format!("gave up waiting for {what}"))),
            Ok(Step::NotYet(err)) => err,
            Err(_) => break Some(anyhow!("the last check was still running at the deadline")),
        };
        let now = tokio::time::Instant::now();
        if now + POLL_INTERVAL >= deadline {
            // Another check would start too close to the deadline to finish, and would
            // replace a useful last error by "still running".
            break last;
        }
        tokio::time::sleep_until(now + POLL_INTERVAL).await;
    };
    let message = format!("timed out after {timeout:?} waiting for {what}");
    Err(match last {
        Some(err) => err.context(message),
        None => anyhow!(message),
    })
}

/// A spawned server process: stdout and stderr go to log files in a directory the owner
/// chooses, and dropping the guard stops the process (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]).
///
/// The guard keeps its [`Command`] so a stopped or killed process can be started again with
/// the same arguments; the log files are appended to, so they tell the whole story.
pub struct ChildGuard {
    name: String,
    command: Command,
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed and output in `log_dir/<name>.stdout.log` and
    /// `log_dir/<name>.stderr.log`.
    pub fn spawn(name: &str, command: Command, log_dir: &Path) -> Result<Self> {
        let mut guard = ChildGuard {
            name: name.to_owned(),
            command,
            child: None,
            stdout_path: log_dir.join(format!("{name}.stdout.log")),
            stderr_path: log_dir.join(format!("{name}.stderr.log")),
        };
        guard.start()?;
        Ok(guard)
    }

    /// The name the guard was spawned with (used in error messages and log file names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID of the running process, or `None` once it has been stopped or killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again after [`stop`](Self::stop) or [`kill9`](Self::kill9), or after
    /// it exited by itself. Fails if it is still running.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() && self.exit_status()?.is_none() {
            bail!("{} is already running (pid {:?})", self.name, self.pid());
        }
        let stdout = append_to(&self.stdout_path)?;
        let stderr = append_to(&self.stderr_path)?;
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!("could not spawn {}: {}", self.name, describe(&self.command))
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Returns the exit status if the process has exited (reaping it), `None` while it runs.
    /// A guard whose process was stopped through it also reports `None`.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(child) => child
                .try_wait()
                .with_context(|| format!("could not check whether {} is running", self.name)),
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && matches!(self.exit_status(), Ok(None))
    }

    /// Stops the process: SIGCONT (a stopped process would not act on SIGTERM), SIGTERM,
    /// then SIGKILL if it has not exited within [`STOP_GRACE`]. Returns its exit status, or
    /// `None` if it was not running.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let pid = pid_of(&child);
        let _ = kill(pid, Signal::SIGCONT);
        kill(pid, Signal::SIGTERM)
            .with_context(|| format!("could not send SIGTERM to {} (pid {pid})", self.name))?;
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        child
            .kill()
            .with_context(|| format!("could not send SIGKILL to {} (pid {pid})", self.name))?;
        Ok(Some(child.wait()?))
    }

    /// Kills the process with SIGKILL (no chance to clean up, as in a crash) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        if child.try_wait()?.is_none() {
            child
                .kill()
                .with_context(|| format!("could not send SIGKILL to {}", self.name))?;
        }
        child
            .wait()
            .with_context(|| format!("could not reap {}", self.name))?;
        Ok(())
    }

    /// Freezes the process with SIGSTOP: its sockets stay open but nothing answers, like a
    /// hung server.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Lets a [`pause`](Self::pause)d process run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let pid = pid_of(child);
        kill(pid, signal)
            .with_context(|| format!("could not send {signal} to {} (pid {pid})", self.name))
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Stdout followed by stderr. Most servers log to only one of them.
    pub fn logs(&self) -> String {
        let (out, err) = (self.stdout(), self.stderr());
        match (out.is_empty(), err.is_empty()) {
            (_, true) => out,
            (true, false) => err,
            (false, false) => format!("{out}\n--- stderr ---\n{err}"),
        }
    }

    /// The last `lines` lines of [`logs`](Self::logs), for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
    }

    /// Polls `check` like [`wait_until`], but gives up at once if the process exits, and on
    /// failure quotes the tail of its log.
    pub async fn wait_ready<F>(&mut self, timeout: Duration, what: &str, mut check: F) -> Result<()>
    where
        F: AsyncFnMut() -> Result<bool>,
    {
        let name = self.name.clone();
        let result = poll(timeout, what, async || {
            match self.exit_status() {
                Ok(Some(status)) => return Step::Abort(anyhow!("{name} exited with {status}")),
                Ok(None) => {}
                Err(err) => return Step::Abort(err),
            }
            match check().await {
                Ok(true) => Step::Done,
                Ok(false) => Step::NotYet(None),
                Err(err) => Step::NotYet(Some(err)),
            }
        })
        .await;
        result.with_context(|| {
            format!(
                "{name} did not become ready; last {LOG_TAIL_LINES} log lines:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            )
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("harness: could not stop {}: {err:#}", self.name);
        }
    }
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish()
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32)
}

fn append_to(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("could not open log file {}", path.display()))
}

/// Reads a log file as text; a missing or unreadable file reads as empty, because logs are
/// only ever used to explain a failure and must not cause one.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `program arg1 arg2 …` for error messages. Never pass secrets as arguments: they would
/// end up here (the harness passes passwords through the environment instead).
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a short-lived command to completion under `timeout` and returns its stdout.
///
/// Stdout and stderr are read concurrently (a full stderr pipe would block the child), and
/// the error for a non-zero exit carries the exit status and the tail of stderr.
pub async fn run(command: Command, timeout: Duration) -> Result<String> {
    let description = describe(&command);
    let mut command = tokio::process::Command::from(command);
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .map_err(|_| anyhow!("`{description}` did not finish within {timeout:?}"))?
        .with_context(|| format!("could not run `{description}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        bail!(
            "`{description}` failed with {}:\n{}",
            output.status,
            tail(
                if stderr.trim().is_empty() {
                    &stdout
                } else {
                    &stderr
                },
                LOG_TAIL_LINES
            )
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like [`run`], but blocking, for use in `Drop` where no runtime may be available. The
/// command must bound its own run time (e.g. `pg_ctl -t`).
pub fn run_blocking(mut command: Command) -> Result<String> {
    let description = describe(&command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{description}`"))?;
    if !output.status.success() {
        bail!(
            "`{description}` failed with {}:\n{}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), LOG_TAIL_LINES)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether `pid` names a live process. A zombie counts as dead: on machines whose init does
/// not reap orphans (this one's does not), a killed daemon stays a zombie forever.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(proc_state(&stat), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// The resident set size of `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `RssAnon`, …) in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("could not read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()?;
    Ok(kib * 1024)
}

/// The PIDs of the live direct children of `pid`, from `/proc`. Used for servers that fork a
/// process per connection (PostgreSQL), whose children the harness started indirectly.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&candidate| {
            fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .filter(|stat| !matches!(proc_state(stat), Some('Z' | 'X')))
                .and_then(|stat| proc_ppid(&stat))
                == Some(pid)
        })
        .collect()
}

/// Sends `signal` to `pid` and, recursively, to every descendant found in `/proc`, and
/// returns the PIDs signalled. Each process's children are listed before it is signalled,
/// because a killed parent's children are at once re-parented and would be missed; a stopped
/// parent cannot fork new ones.
pub fn signal_tree(pid: i32, signal: Signal) -> Result<Vec<i32>> {
    let mut signalled = Vec::new();
    let mut pending = vec![pid];
    while let Some(next) = pending.pop() {
        if signalled.contains(&next) {
            continue;
        }
        let children = children_of(next);
        match kill(Pid::from_raw(next), signal) {
            Ok(()) => signalled.push(next),
            Err(err) if next == pid => {
                return Err(err).with_context(|| format!("could not send {signal} to pid {pid}"))
            }
            // A child may exit between the /proc scan and the signal.
            Err(_) => {}
        }
        pending.extend(children);
    }
    Ok(signalled)
}

/// The state letter of a `/proc/PID/stat` line. The command name in parentheses may contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn proc_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn proc_ppid(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Finds an executable: the path in environment variable `env_var` if set, else the first of
/// `names` on `PATH`.
pub fn find_program(env_var: &str, names: &[&str]) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env_var}={} is not a file", path.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "none of {names:?} is on PATH (set {env_var} to the program's path, or install it: \
         the Debian packages are listed in .ci/run)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_survive_odd_command_names() {
        let stat = "42 (a) b (c)) S 7 42 42 0 -1";
        assert_eq!(proc_state(stat), Some('S'));
        assert_eq!(proc_ppid(stat), Some(7));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
