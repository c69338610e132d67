//! HAProxy for the tests (Debian's `haproxy`, `-db` in the foreground): the test writes the
//! proxies, the harness adds a stats page on a free port and a stats socket, and waits until
//! the CSV statistics answer. [`redis_backend`] writes the seed's Redis layout.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

use super::http;
use super::ports::free_port;
use super::process::{find_program, ChildGuard};
use super::redis::RedisNode;

/// How long HAProxy gets to serve its stats page.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one runtime API command may take.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(10);

/// A running HAProxy; dropping it stops the process and removes its directory.
pub struct Haproxy {
    guard: ChildGuard,
    stats_port: u16,
    socket: PathBuf,
    dir: TempDir,
}

impl Haproxy {
    /// Starts HAProxy with `proxies` (frontend/backend sections) after a `global`/`defaults`
    /// header, a stats page and a stats socket, and waits until the stats CSV answers.
    pub async fn start(proxies: &str) -> Result<Haproxy> {
        let haproxy = find_program("CLUSTERWATCH_HAPROXY", &["haproxy"])?;
        let dir = super::temp_dir("cw-haproxy-")?;
        let stats_port = free_port()?;
        let socket = dir.path().join("admin.sock");
        let config = format!(
            "global\n  maxconn 200\n  stats socket {socket} mode 600 level admin\n\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  timeout check 1s\n\n\
             frontend stats\n  mode http\n  bind 127.0.0.1:{stats_port}\n  stats enable\n  stats uri /stats\n\n\
             {proxies}\n",
            socket = socket.display(),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &config)
            .with_context(|| format!("could not write {}", path.display()))?;
        let mut command = Command::new(haproxy);
        command.arg("-db").arg("-f").arg(&path);
        let mut guard = ChildGuard::spawn("haproxy", command, dir.path())?;
        let client = http::client()?;
        let url = format!("http://127.0.0.1:{stats_port}/stats;csv");
        guard
            .wait_ready(START_TIMEOUT, "HAProxy stats CSV", async || {
                http::is_ready(&client, &url).await
            })
            .await?;
        Ok(Haproxy {
            guard,
            stats_port,
            socket,
            dir,
        })
    }

    /// The stats page, `http://127.0.0.1:PORT/stats`.
    pub fn stats_url(&self) -> String {
        format!("http://127.0.0.1:{}/stats", self.stats_port)
    }

    /// The stats socket's path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Sends one command to the runtime API (the stats socket, through `socat`) and returns
    /// the answer.
    pub async fn runtime(&self, command: &str) -> Result<String> {
        let mut socat =
            tokio::process::Command::new(find_program("CLUSTERWATCH_SOCAT", &["socat"])?);
        socat
            .arg("-t2")
            .arg("-")
            .arg(format!("UNIX-CONNECT:{}", self.socket.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = socat.spawn().context("could not start socat")?;
        let mut stdin = child.stdin.take().context("socat without stdin")?;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        drop(stdin);
        let out = tokio::time::timeout(RUNTIME_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("HAProxy's runtime API did not answer `{command}`"))??;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The status (`UP`, `DOWN`, `MAINT`, ...) the runtime API's `show stat` gives
    /// `backend/server`.
    pub async fn server_status(&self, backend: &str, server: &str) -> Result<String> {
        let csv = self.runtime("show stat").await?;
        csv.lines()
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|fields| fields.len() > 17 && fields[0] == backend && fields[1] == server)
            .map(|fields| fields[17].to_owned())
            .with_context(|| format!("no {backend}/{server} in HAProxy's stats:\n{csv}"))
    }

    /// HAProxy's output so far.
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The directory with the configuration, socket and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for Haproxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Haproxy")
            .field("stats", &self.stats_url())
            .finish()
    }
}

/// A frontend on `listen_port` and a backend `name` that sends traffic to whichever of
/// `servers` is the Redis master: each server is checked with `PING` and `INFO replication`
/// expecting `role:master`, every 500 ms, so a replica or a stopped node is DOWN.
pub fn redis_backend(name: &str, listen_port: u16, servers: &[&RedisNode]) -> String {
    let mut text = format!(
        "frontend {name}_front\n  bind 127.0.0.1:{listen_port}\n  default_backend {name}\n\n\
         backend {name}\n  option tcp-check\n  tcp-check connect\n\
         \x20 tcp-check send PING\\r\\n\n  tcp-check expect string +PONG\n\
         \x20 tcp-check send info\\ replication\\r\\n\n  tcp-check expect string role:master\n\
         \x20 tcp-check send QUIT\\r\\n\n  tcp-check expect string +OK\n"
    );
    for server in servers {
        text.push_str(&format!(
            "  server {} {} check inter 500ms fall 2 rise 2\n",
            server.name(),
            server.addr()
        ));
    }
    text
}
