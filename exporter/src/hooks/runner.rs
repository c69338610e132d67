//! Process control for hooks: exec an argv (never a shell) in its own process group with a
//! clean environment, the payload on stdin, stdout and stderr read concurrently into capped
//! tails, and a timeout that sends SIGTERM to the group, waits, then SIGKILL. It decides
//! nothing about whether to run; `policy` does.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Bytes of stdout and stderr kept for the journal.
pub const TAIL_BYTES: usize = 4096;

/// What to run.
pub struct Spec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Written to stdin, then stdin is closed.
    pub stdin: Arc<Vec<u8>>,
    /// Until SIGTERM.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it (not ours).
    Signal(i32),
    /// It ran past its timeout and its group was killed.
    Timeout,
    /// It could not be started.
    SpawnFailed(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::Timeout => f.write_str("timeout"),
            Exit::SpawnFailed(e) => write!(f, "could not start: {e}"),
        }
    }
}

/// The result of one process run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Wall-clock time.
    pub duration: Duration,
    /// Last [`TAIL_BYTES`] of stdout.
    pub stdout_tail: String,
    /// Last [`TAIL_BYTES`] of stderr.
    pub stderr_tail: String,
}

/// Runs the process to its end or its timeout. Never panics on a bad command: a process
/// that cannot start is an [`Exit::SpawnFailed`] outcome.
pub async fn run(spec: Spec<'_>) -> Outcome {
    let started = Instant::now();
    let fail = |e: String| Outcome {
        exit: Exit::SpawnFailed(e),
        duration: started.elapsed(),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
    };
    let Some((program, args)) = spec.argv.split_first() else {
        return fail("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout reaches every process the hook started.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));

    // A hook that does not read stdin must not block us: write from its own task.
    if let Some(mut stdin) = child.stdin.take() {
        let payload = spec.stdin.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
        });
    }
    let out = tokio::spawn(tail(child.stdout.take()));
    let err = tokio::spawn(tail(child.stderr.take()));

    let exit = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(Ok(status)) => exit_of(status),
        Ok(Err(e)) => Exit::SpawnFailed(e.to_string()),
        Err(_) => {
            if let Some(pg) = pgid {
                let _ = killpg(pg, Signal::SIGTERM);
                let _ = tokio::time::timeout(spec.grace, child.wait()).await;
                // Whatever is left in the group (children that ignored SIGTERM or outlived
                // the leader) goes now.
                let _ = killpg(pg, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Exit::Timeout
        }
    };
    // A background child may hold the pipes open; do not wait for it forever.
    let grab = |h: tokio::task::JoinHandle<String>| async move {
        tokio::time::timeout(Duration::from_secs(1), h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    Outcome {
        exit,
        duration: started.elapsed(),
        stdout_tail: grab(out).await,
        stderr_tail: grab(err).await,
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    }
}

/// Reads a pipe to its end, keeping the last [`TAIL_BYTES`].
async fn tail(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * TAIL_BYTES {
                    kept.drain(..kept.len() - TAIL_BYTES);
                }
            }
        }
    }
    if kept.len() > TAIL_BYTES {
        kept.drain(..kept.len() - TAIL_BYTES);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(argv: &'a [String], timeout_ms: u64) -> Spec<'a> {
        Spec {
            argv,
            env: vec![("PATH".into(), crate::hooks::env::HOOK_PATH.into())],
            stdin: Arc::new(b"{\"x\":1}".to_vec()),
            timeout: Duration::from_millis(timeout_ms),
            grace: Duration::from_millis(200),
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_code_stdin_and_tails() {
        let argv = sh("cat; echo err >&2; exit 3");
        let o = run(spec(&argv, 5000)).await;
        assert_eq!(o.exit, Exit::Code(3));
        assert_eq!(o.stdout_tail, "{\"x\":1}");
        assert_eq!(o.stderr_tail, "err\n");
        let o = run(spec(&["/nonexistent/hook".into()], 5000)).await;
        assert!(matches!(o.exit, Exit::SpawnFailed(_)));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let argv = sh(&format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let o = run(spec(&argv, 500)).await;
        assert_eq!(o.exit, Exit::Timeout);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Reaped by init or a zombie at worst: never a running `sleep`.
        if let Err(stat) = crate::test_support::wait_gone(pid) {
            panic!("child {pid} survived: {stat}");
        }
    }
}
