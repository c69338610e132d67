//! A real Alertmanager for the tests: one instance with gossip disabled, its configuration
//! and storage in a temporary directory, and helpers for the v2 alerts API. Routing itself
//! is Alertmanager's business; tests give it the configuration they want to exercise.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::http::get_json;
use super::ports::free_port;
use super::process::find_program;
use super::served::HttpServer;

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

/// A running Alertmanager; dropping it stops the server and removes its directory. The
/// shared accessors (`port`, `addr`, `url`, `dir`, `client`, `logs`, `process`) come from
/// [`HttpServer`].
#[derive(Debug)]
pub struct Alertmanager {
    server: HttpServer,
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
        let server = HttpServer::spawn("Alertmanager", command, port, dir, START_TIMEOUT).await?;
        Ok(Alertmanager { server })
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("alertmanager.yml")
    }

    /// `POST /api/v2/alerts` with `alerts`, a JSON array of postable alerts
    /// (`[{"labels": {...}, "annotations": {...}, "startsAt": "...", ...}]`).
    pub async fn post_alerts(&self, alerts: &Value) -> Result<()> {
        if !alerts.is_array() {
            bail!("post_alerts takes a JSON array of alerts, got {alerts}");
        }
        let response = self
            .client()
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
        get_json(self.client(), &self.url("/api/v2/alerts")).await
    }
}

impl std::ops::Deref for Alertmanager {
    type Target = HttpServer;
    fn deref(&self) -> &HttpServer {
        &self.server
    }
}

impl std::ops::DerefMut for Alertmanager {
    fn deref_mut(&mut self) -> &mut HttpServer {
        &mut self.server
    }
}
