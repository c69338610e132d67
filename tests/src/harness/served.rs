//! A server process with an HTTP API on 127.0.0.1, shared by Prometheus, Alertmanager and the
//! exporter: spawned with its logs in its own temporary directory, ready once `/-/ready`
//! answers 200, stopped before that directory is removed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use super::http::{self, is_ready};
use super::process::ChildGuard;

/// A running HTTP server process; dropping it stops the process and removes its directory.
pub struct HttpServer {
    // Declared before `dir` so the process stops before its directory is removed.
    guard: ChildGuard,
    port: u16,
    client: reqwest::Client,
    dir: TempDir,
}

impl HttpServer {
    /// Spawns `command` (which must listen on 127.0.0.1:`port`), logging into `dir`, and
    /// returns once `GET /-/ready` answers 200. A process that exits or does not become ready
    /// within `timeout` is an error quoting its log tail.
    pub async fn spawn(
        name: &str,
        command: Command,
        port: u16,
        dir: TempDir,
        timeout: Duration,
    ) -> Result<HttpServer> {
        let mut guard = ChildGuard::spawn(name, command, dir.path())?;
        let client = http::client()?;
        let ready_url = format!("http://127.0.0.1:{port}/-/ready");
        guard
            .wait_ready(timeout, &format!("{name} /-/ready"), async || {
                is_ready(&client, &ready_url).await
            })
            .await?;
        Ok(HttpServer {
            guard,
            port,
            client,
            dir,
        })
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a scrape or `alertmanagers` target.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The PID of its process, or `None` once it has been stopped.
    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }

    /// The temporary directory holding its configuration, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The HTTP client it was checked with (no proxy, bounded timeouts), for other requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The process guard, for pause/resume/kill9/stop or the PID.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("port", &self.port)
            .field("pid", &self.guard.pid())
            .field("dir", &self.dir())
            .finish()
    }
}
