//! The HTTP surface: `/metrics`, `/-/healthy`, `/-/ready`, `/-/reload` and a landing page.
//! Handlers are thin: extract, call the engine, map the result. State lives in one
//! [`AppState`]; `app()` is apart from `main` so tests drive the router directly.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::collector::Engine;
use crate::hooks::config::Listen;
use crate::hooks::Hooks;
use crate::reload::Reloader;
use crate::snapshot::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// Everything the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// The scrape engine built from the checked configuration.
    pub engine: Arc<Engine>,
    /// Path `/metrics` is served on (`--web.telemetry-path`).
    pub telemetry_path: String,
    /// Where the configuration came from, for the landing page.
    pub config_origin: String,
    /// The webhook receiver and hook runner, when configured; its metrics join `/metrics`.
    pub hooks: Option<Arc<Hooks>>,
    /// Reloads the configuration on `POST /-/reload` (and SIGHUP); its metrics join `/metrics`.
    pub reloader: Arc<Reloader>,
    /// Every listener's connections; their counters join `/metrics`.
    pub listeners: Vec<Arc<crate::web::Connections>>,
}

/// The router with every route.
pub fn app(state: AppState) -> Router {
    let telemetry_path = state.telemetry_path.clone();
    let webhook = state
        .hooks
        .clone()
        .filter(|h| h.config().listen == Listen::Main);
    let router = Router::new()
        .route(&telemetry_path, get(metrics))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/reload", post(reload))
        .route("/", get(landing))
        .with_state(state);
    match webhook {
        Some(hooks) => router.merge(crate::hooks::receiver::routes(hooks)),
        None => router,
    }
}

/// Prometheus' own scrape timeout, sent with every scrape.
fn scrape_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get("x-prometheus-scrape-timeout-seconds")?
        .to_str()
        .ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// OpenMetrics only when the scraper asks for it; curl and older scrapers get text 0.0.4.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut buffer = state.engine.scrape(scrape_timeout(&headers)).await;
    crate::status::observe(&buffer);
    if let Some(hooks) = &state.hooks {
        hooks.write_metrics(&mut buffer);
    }
    state.reloader.write_metrics(&mut buffer);
    for l in &state.listeners {
        l.write_metrics(&mut buffer);
    }
    let snapshot = buffer.into_snapshot();
    crate::memory::scraped();
    if wants_openmetrics(&headers) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            snapshot.encode_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
            snapshot.encode_text(),
        )
            .into_response()
    }
}

async fn healthy() -> &'static str {
    "clusterwatch is healthy.\n"
}

async fn ready() -> (StatusCode, &'static str) {
    // The engine exists only after the configuration was checked, so serving means ready.
    (StatusCode::OK, "clusterwatch is ready.\n")
}

/// Prometheus' convention: 200 when the new configuration is in force, 500 with every problem
/// when it was refused and the running one kept.
async fn reload(State(state): State<AppState>) -> (StatusCode, String) {
    match state.reloader.reload().await {
        Ok(c) => (
            StatusCode::OK,
            format!(
                "configuration reloaded: {} targets kept running, {} started, {} stopped\n",
                c.kept, c.built, c.dropped
            ),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed; the running configuration is kept:\n{e}\n"),
        ),
    }
}

/// What this node sees now, one line per target (by name only: never a DSN, URI or
/// password), and the hook runner's last decisions; plain text for `clusterwatch status`.
async fn landing(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let lines = crate::status::observe(&state.engine.scrape(scrape_timeout(&headers)).await);
    let decisions =
        (state.hooks.as_ref()).map(|h| crate::status::last_decisions(&h.config().state_dir));
    if headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) == Some("text/plain") {
        return crate::status::render_text(&lines, decisions.as_deref()).into_response();
    }
    Html(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>clusterwatch</title></head>\n<body>\n\
         <h1>clusterwatch {version}</h1>\n\
         <p><a href=\"{path}\">Metrics</a> · <a href=\"/-/healthy\">health</a> · <a href=\"/-/ready\">ready</a> · reload: <code>POST /-/reload</code> or SIGHUP</p>\n\
         <p>Configuration: {origin}</p>\n{table}</body></html>\n",
        version = env!("CARGO_PKG_VERSION"),
        path = crate::status::escape_html(&state.telemetry_path),
        origin = crate::status::escape_html(&state.config_origin),
        table = crate::status::render_html(&lines, decisions.as_deref()),
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-prometheus-scrape-timeout-seconds",
            "2.5".parse().unwrap(),
        );
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
                .parse()
                .unwrap(),
        );
        assert_eq!(scrape_timeout(&h), Some(Duration::from_millis(2500)));
        assert!(wants_openmetrics(&h));
        let mut bad = HeaderMap::new();
        bad.insert("x-prometheus-scrape-timeout-seconds", "-1".parse().unwrap());
        assert_eq!(scrape_timeout(&bad), None);
        assert!(!wants_openmetrics(&bad));
    }
}
