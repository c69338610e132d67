//! A real Prometheus server for the tests: generated configuration (scrape jobs, rule files,
//! Alertmanagers), TSDB in a temporary directory, HTTP API helpers for queries, targets and
//! alerts. It does not check rules itself; `promtool test rules` does that in `rules/`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::http::{self, get_json};
use super::ports::free_port;
use super::process::{find_program, wait_until};
use super::served::HttpServer;

/// How long Prometheus gets to answer `/-/ready` after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One scrape job of a generated configuration.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    /// `job_name`, and so the `job` label.
    pub name: String,
    /// `host:port` targets of its static config.
    pub targets: Vec<String>,
    /// Defaults to `/metrics`.
    pub metrics_path: String,
    /// Defaults to 1 s so tests see samples quickly.
    pub scrape_interval: Duration,
    /// Defaults to 1 s; must not exceed `scrape_interval`. Prometheus sends it to the
    /// target as `X-Prometheus-Scrape-Timeout-Seconds`.
    pub scrape_timeout: Duration,
}

impl ScrapeJob {
    /// A job scraping `targets` every second at `/metrics`.
    pub fn new(name: &str, targets: &[&str]) -> ScrapeJob {
        ScrapeJob {
            name: name.to_owned(),
            targets: targets.iter().map(|target| (*target).to_owned()).collect(),
            metrics_path: "/metrics".to_owned(),
            scrape_interval: Duration::from_secs(1),
            scrape_timeout: Duration::from_secs(1),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "job_name": self.name,
            "metrics_path": self.metrics_path,
            "scrape_interval": duration(self.scrape_interval),
            "scrape_timeout": duration(self.scrape_timeout),
            "static_configs": [{ "targets": self.targets }],
        })
    }
}

/// What goes into the generated `prometheus.yml`.
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Scrape jobs; none is a valid, empty configuration.
    pub jobs: Vec<ScrapeJob>,
    /// Rule files, loaded as given (use absolute paths).
    pub rule_files: Vec<PathBuf>,
    /// `host:port` of Alertmanagers to send alerts to.
    pub alertmanagers: Vec<String>,
    /// Global `evaluation_interval` for rules; defaults to 1 s.
    pub evaluation_interval: Duration,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            jobs: Vec::new(),
            rule_files: Vec::new(),
            alertmanagers: Vec::new(),
            evaluation_interval: Duration::from_secs(1),
        }
    }
}

impl PrometheusConfig {
    /// The configuration file's text. It is JSON, which is valid YAML, so no YAML writer
    /// is needed.
    pub fn render(&self) -> String {
        let mut config = json!({
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": duration(self.evaluation_interval),
            },
            "scrape_configs": self.jobs.iter().map(ScrapeJob::to_json).collect::<Vec<_>>(),
            "rule_files": self.rule_files,
        });
        if !self.alertmanagers.is_empty() {
            config["alerting"] = json!({
                "alertmanagers": [{ "static_configs": [{ "targets": self.alertmanagers }] }],
            });
        }
        serde_json::to_string_pretty(&config).expect("a JSON value always serializes")
    }
}

/// `"1500ms"`: Prometheus durations accept milliseconds, which covers every `Duration` a
/// test would use.
fn duration(value: Duration) -> String {
    format!("{}ms", value.as_millis())
}

/// A running Prometheus; dropping it stops the server and removes its directory. The shared
/// accessors (`port`, `addr`, `url`, `dir`, `client`, `logs`, `process`) come from
/// [`HttpServer`].
#[derive(Debug)]
pub struct Prometheus {
    server: HttpServer,
}

impl Prometheus {
    /// Writes `config` to `prometheus.yml` in a fresh temporary directory and starts
    /// Prometheus on it (`--web.enable-lifecycle`, TSDB in the same directory), returning
    /// once `/-/ready` answers 200.
    pub async fn start(config: &PrometheusConfig) -> Result<Prometheus> {
        let program = find_program("CLUSTERWATCH_PROMETHEUS", &["prometheus"])?;
        let dir = super::temp_dir("cw-prometheus-")?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.render())
            .with_context(|| format!("could not write {}", config_path.display()))?;
        let port = free_port()?;
        let mut command = Command::new(program);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(["--web.enable-lifecycle", "--log.level=info"]);
        let server = HttpServer::spawn("Prometheus", command, port, dir, START_TIMEOUT).await?;
        Ok(Prometheus { server })
    }

    /// The generated configuration file; rewrite it and call [`reload`](Self::reload) to
    /// change scrape jobs during a test.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("prometheus.yml")
    }

    /// Writes a new configuration and reloads it.
    pub async fn reconfigure(&self, config: &PrometheusConfig) -> Result<()> {
        std::fs::write(self.config_path(), config.render())
            .context("could not rewrite prometheus.yml")?;
        self.reload().await
    }

    /// `POST /-/reload`: re-reads the configuration and rule files.
    pub async fn reload(&self) -> Result<()> {
        let response = self
            .client()
            .post(self.url("/-/reload"))
            .send()
            .await
            .context("POST /-/reload to Prometheus")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("Prometheus refused to reload ({status}): {body}");
        }
        Ok(())
    }

    /// An instant query (`/api/v1/query`); returns the response's `data` member
    /// (`{"resultType": …, "result": …}`).
    pub async fn query(&self, promql: &str) -> Result<Value> {
        let response = self
            .client()
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .with_context(|| format!("Prometheus query `{promql}`"))?;
        let body = http::json_body(response, &format!("Prometheus query `{promql}`")).await?;
        api_data(body, promql)
    }

    /// The value of a query whose answer is a scalar or a vector of exactly one sample;
    /// `None` for an empty vector.
    pub async fn query_f64(&self, promql: &str) -> Result<Option<f64>> {
        let data = self.query(promql).await?;
        let value = match data["resultType"].as_str() {
            Some("scalar") => &data["result"][1],
            Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
                Some([]) => return Ok(None),
                Some([sample]) => &sample["value"][1],
                _ => bail!("`{promql}` returned several samples: {}", data["result"]),
            },
            _ => bail!("`{promql}` returned neither a scalar nor a vector: {data}"),
        };
        let text = value
            .as_str()
            .with_context(|| format!("`{promql}` returned a sample without a value: {data}"))?;
        // Prometheus spells special values the way Go does; Rust parses these same spellings.
        text.parse::<f64>()
            .map(Some)
            .with_context(|| format!("`{promql}` returned a value that is not a number: {text}"))
    }

    /// `/api/v1/targets`' `data` member (`activeTargets`, `droppedTargets`).
    pub async fn targets(&self) -> Result<Value> {
        let body = get_json(self.client(), &self.url("/api/v1/targets")).await?;
        api_data(body, "targets")
    }

    /// `/api/v1/alerts`' `data.alerts`: every pending and firing alert.
    pub async fn alerts(&self) -> Result<Value> {
        let body = get_json(self.client(), &self.url("/api/v1/alerts")).await?;
        Ok(api_data(body, "alerts")?["alerts"].take())
    }

    /// Waits until every target of `job` has been scraped successfully (health `up`). On
    /// timeout the error quotes each target's health and `lastError`.
    pub async fn wait_for_target_up(&self, job: &str, timeout: Duration) -> Result<()> {
        wait_until(
            timeout,
            &format!("Prometheus targets of job `{job}` to be up"),
            async || {
                let targets = self.targets().await?;
                let of_job: Vec<&Value> = targets["activeTargets"]
                    .as_array()
                    .map(|all| all.iter().filter(|t| t["labels"]["job"] == job).collect())
                    .unwrap_or_default();
                if of_job.is_empty() {
                    bail!("no active target has job=\"{job}\" yet");
                }
                let down: Vec<String> = of_job
                    .iter()
                    .filter(|t| t["health"] != "up")
                    .map(|t| {
                        format!(
                            "{} health={} lastError={}",
                            t["scrapeUrl"], t["health"], t["lastError"]
                        )
                    })
                    .collect();
                if down.is_empty() {
                    Ok(true)
                } else {
                    bail!("{}", down.join("; "))
                }
            },
        )
        .await
    }
}

/// The `data` member of a Prometheus API answer, or an error with its `error` member.
fn api_data(mut body: Value, what: &str) -> Result<Value> {
    if body["status"] != "success" {
        bail!(
            "Prometheus API call for {what} failed: {} {}",
            body["errorType"],
            body["error"]
        );
    }
    Ok(body["data"].take())
}

impl std::ops::Deref for Prometheus {
    type Target = HttpServer;
    fn deref(&self) -> &HttpServer {
        &self.server
    }
}

impl std::ops::DerefMut for Prometheus {
    fn deref_mut(&mut self) -> &mut HttpServer {
        &mut self.server
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_config_is_valid_json_with_the_jobs() {
        let config = PrometheusConfig {
            jobs: vec![ScrapeJob::new("clusterwatch", &["127.0.0.1:1234"])],
            alertmanagers: vec!["127.0.0.1:9999".to_owned()],
            ..PrometheusConfig::default()
        };
        let parsed: Value = serde_json::from_str(&config.render()).unwrap();
        assert_eq!(parsed["scrape_configs"][0]["job_name"], "clusterwatch");
        assert_eq!(parsed["scrape_configs"][0]["scrape_interval"], "1000ms");
        assert_eq!(
            parsed["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
            "127.0.0.1:9999"
        );
    }
}
