//! The HTTP client the harness uses to talk to the servers it started (readiness probes,
//! Prometheus and Alertmanager APIs, the exporter's endpoints). Loopback only: it ignores
//! proxy settings and bounds every request with a timeout.

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Upper bound on one request, so a paused server cannot hang a test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for loopback servers: no proxy (an `http_proxy` in the environment must not
/// reroute 127.0.0.1), short connect timeout, [`REQUEST_TIMEOUT`] per request.
///
/// Create one per server guard rather than sharing a global one: pooled connections belong
/// to the tokio runtime that opened them, and every `#[tokio::test]` has its own runtime.
pub fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("could not build an HTTP client")
}

/// `Ok(true)` if `GET url` answers 200; an error describing the answer (status and the start
/// of the body) or the connection failure otherwise. Made for [`super::wait_until`].
pub async fn is_ready(client: &reqwest::Client, url: &str) -> Result<bool> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok(true);
    }
    let body = response.text().await.unwrap_or_default();
    bail!(
        "GET {url} answered {status}: {}",
        body.chars().take(200).collect::<String>()
    )
}

/// `GET url` and parse the body as JSON; fails on a non-2xx status (quoting the body) or a
/// body that is not JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Result<serde_json::Value> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    json_body(response, url).await
}

/// Reads a response body as JSON, failing with status and body on a non-2xx answer.
pub async fn json_body(response: reqwest::Response, what: &str) -> Result<serde_json::Value> {
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("could not read the body of {what}"))?;
    if !status.is_success() {
        bail!("{what} answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what} did not answer JSON: {body}"))
}
