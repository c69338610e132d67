//! A real Alertmanager for the tests: one instance with gossip disabled, its configuration
//! and storage in a temporary directory, and helpers for the v2 alerts API. Routing itself
//! is Alertmanager's business; tests give it the configuration they want to exercise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use super::http::{self, get_json, is_ready};
use super::ports::free_port;
use super::process::{find_program, ChildGuard};

/// How long Alertmanager gets to answer `/-/ready` after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The configuration used when a test passes none: every alert goes to a receiver that
/// sends nothing.
pub const DEFAULT_CONFIG: &str = "\
route:
  receiver: blackhole
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: blackhole
";

/// A running Alertmanager; dropping it stops the server and removes its directory.
pub struct Alertmanager {
    // Declared before `dir` so the server stops before its directory is removed.
    guard: ChildGuard,
    port: u16,
    client: reqwest::Client,
    dir: TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager with `config_yaml` (or [`DEFAULT_CONFIG`]) and an empty
    /// `--cluster.listen-address` (no gossip, so no second port and no peers to wait for),
    /// returning once `/-/ready` answers 200.
    pub async fn start(config_yaml: Option<&str>) -> Result<Alertmanager> {
        let program = find_program(
            "CLUSTERWATCH_ALERTMANAGER",
            &["prometheus-alertmanager", "alertmanager"],
        )?;
        let dir = super::temp_dir("cw-alertmanager-")?;
        let config_path = dir.path().join("alertmanager.yml");
        std::fs::write(&config_path, config_yaml.unwrap_or(DEFAULT_CONFIG))
            .with_context(|| format!("could not write {}", config_path.display()))?;
        let port = free_port()?;
        let mut command = Command::new(program);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=info");
        let mut guard = ChildGuard::spawn("alertmanager", command, dir.path())?;
        let client = http::client()?;
        let ready_url = format!("http://127.0.0.1:{port}/-/ready");
        guard
            .wait_ready(START_TIMEOUT, "Alertmanager /-/ready", async || {
                is_ready(&client, &ready_url).await
            })
            .await?;
        Ok(Alertmanager {
            guard,
            port,
            client,
            dir,
        })
    }

    /// The port of its web UI and API (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as Prometheus' `alertmanagers` targets want it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("alertmanager.yml")
    }

    /// The temporary directory holding configuration, storage and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `POST /api/v2/alerts` with `alerts`, a JSON array of postable alerts
    /// (`[{"labels": {...}, "annotations": {...}, "startsAt": "...", ...}]`).
    pub async fn post_alerts(&self, alerts: &Value) -> Result<()> {
        if !alerts.is_array() {
            bail!("post_alerts takes a JSON array of alerts, got {alerts}");
        }
        let response = self
            .client
            .post(self.url("/api/v2/alerts"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(alerts.to_string())
            .send()
            .await
            .context("POST /api/v2/alerts to Alertmanager")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("Alertmanager rejected the alerts ({status}): {body}");
        }
        Ok(())
    }

    /// `GET /api/v2/alerts`: the alerts it currently holds.
    pub async fn alerts(&self) -> Result<Value> {
        get_json(&self.client, &self.url("/api/v2/alerts")).await
    }

    /// Everything Alertmanager logged so far.
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The process guard, for pause/resume/kill9 or the PID.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

impl std::fmt::Debug for Alertmanager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alertmanager")
            .field("port", &self.port)
            .field("dir", &self.dir())
            .finish()
    }
}
