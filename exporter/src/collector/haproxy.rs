//! HAProxy backends and servers from HAProxy's CSV statistics, read over HTTP (`stats uri`
//! with `;csv;norefresh`) or from the stats unix socket (`show stat`). It only reads: it never
//! sends an admin command, and frontends are left to HAProxy's own exporter.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{
    read_secret_file, HumanDuration, Located, Problem, Secret, SectionContext, TargetId,
};
use crate::snapshot::SampleBuffer;

/// The `haproxy` collector, configured by the `haproxy:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "haproxy",
    section: "haproxy",
    always_on: false,
    configure,
};

/// Server states as the `state` label of `clusterwatch_haproxy_server_status`. HAProxy's
/// transitional `UP 1/2` (still serving, checks failing) counts as `up` and `DOWN 1/2` (not
/// serving yet, checks passing) as `down`: the label says whether traffic goes there now.
pub const SERVER_STATES: &[&str] = &["up", "down", "maint", "drain", "nolb", "no_check"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHaproxy {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    url: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawHaproxy>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let source = check_source(&raw.url, &item, problems);
        let auth = match (raw.username, raw.password_file) {
            (Some(user), Some(file)) => match read_secret_file(&ctx.resolve(&file)) {
                Ok(secret) => Some((user, secret)),
                Err(e) => {
                    problems.push(item.problem("password_file", e));
                    None
                }
            },
            (None, None) => None,
            _ => {
                problems.push(
                    item.problem("username", "`username` and `password_file` go together")
                        .hint("the stats page's `stats auth USER:PASSWORD`: give both or neither"),
                );
                None
            }
        };
        if problems.len() > before {
            continue;
        }
        let Some(source) = source else { continue };
        if auth.is_some() && matches!(source, Source::Socket(_)) {
            problems.push(item.problem("username", "a stats socket takes no credentials"));
            continue;
        }
        out.push(Target::new(
            &KIND,
            id,
            HaproxyCollector {
                source,
                auth,
                // The stats page is on the cluster's network: never through an `http_proxy`.
                client: reqwest::Client::builder()
                    .use_rustls_tls()
                    .no_proxy()
                    .build()
                    .expect("a client without custom certificates always builds"),
            },
        ));
    }
    out
}

/// Where the statistics come from.
#[derive(Debug, PartialEq)]
enum Source {
    /// The stats page, with `;csv;norefresh` appended.
    Http(Url),
    /// The stats socket (`stats socket … level user` is enough).
    Socket(PathBuf),
}

fn check_source(text: &str, at: &Located, problems: &mut Vec<Problem>) -> Option<Source> {
    let hint = "write the stats page, e.g. `http://127.0.0.1:8404/stats`, or the stats socket, e.g. `unix:///run/haproxy/admin.sock`";
    let url = match Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            problems.push(at.problem("url", format!("invalid URL: {e}")).hint(hint));
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        problems.push(
            at.problem("url", "credentials in the URL are not supported")
                .hint("use `username` and `password_file`"),
        );
        return None;
    }
    match url.scheme() {
        "http" | "https" if url.host().is_some() => {
            let mut url = url;
            if !url.path().ends_with(";csv") && !url.path().contains(";csv;") {
                let path = format!("{};csv;norefresh", url.path());
                url.set_path(&path);
            }
            Some(Source::Http(url))
        }
        "unix" => Some(Source::Socket(PathBuf::from(url.path()))),
        _ => {
            problems.push(at.problem("url", "unsupported URL").hint(hint));
            None
        }
    }
}

/// One HAProxy instance.
pub struct HaproxyCollector {
    source: Source,
    auth: Option<(String, Secret)>,
    client: reqwest::Client,
}

impl HaproxyCollector {
    async fn fetch(&self) -> Result<String, CollectError> {
        match &self.source {
            Source::Http(url) => {
                let mut req = self.client.get(url.clone());
                if let Some((user, password)) = &self.auth {
                    req = req.basic_auth(user, Some(password.expose()));
                }
                // reqwest's error text names the URL, which has no credentials (checked).
                let resp = req
                    .send()
                    .await
                    .map_err(|e| CollectError::Connect(e.to_string()))?;
                match resp.status() {
                    s if s.is_success() => {}
                    reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                        return Err(CollectError::Auth(format!(
                            "stats page answered {}",
                            resp.status()
                        )))
                    }
                    s => return Err(CollectError::Query(format!("stats page answered {s}"))),
                }
                resp.text()
                    .await
                    .map_err(|e| CollectError::Protocol(e.to_string()))
            }
            Source::Socket(path) => {
                let mut stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| CollectError::Connect(format!("{}: {e}", path.display())))?;
                let io = |e: std::io::Error| CollectError::Io(format!("{}: {e}", path.display()));
                stream.write_all(b"show stat\n").await.map_err(io)?;
                let mut text = String::new();
                // Without `prompt` mode HAProxy closes the socket after one command.
                stream.read_to_string(&mut text).await.map_err(io)?;
                Ok(text)
            }
        }
    }
}

/// HAProxy's `type` column.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowKind {
    Frontend,
    Backend,
    Server,
    Other,
}

/// One line of `show stat`: the columns we export.
#[derive(Debug, PartialEq)]
pub(crate) struct Row {
    proxy: String,
    name: String,
    kind: RowKind,
    status: String,
    /// Backend: active servers up. Server: 1 if it is an active (not backup) server.
    active: Option<f64>,
    /// Backend: backup servers up.
    backup: Option<f64>,
    sessions: Option<f64>,
    check_duration_ms: Option<f64>,
    downtime_seconds: Option<f64>,
    last_change_seconds: Option<f64>,
    check_failures: Option<f64>,
    check_downs: Option<f64>,
}

/// Parses HAProxy's CSV statistics (the same text over HTTP and the socket). Columns are
/// found by header name, so versions that add columns keep working.
pub(crate) fn parse_stats(text: &str) -> Result<Vec<Row>, String> {
    let text = text
        .strip_prefix("# ")
        .ok_or("no `# pxname,…` header: not HAProxy CSV statistics")?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| col(name).ok_or(format!("no `{name}` column"));
    let (pxname, svname, status, kind) = (
        need("pxname")?,
        need("svname")?,
        need("status")?,
        need("type")?,
    );
    let [act, bck, scur, check_duration, downtime, lastchg, chkfail, chkdown] = [
        "act",
        "bck",
        "scur",
        "check_duration",
        "downtime",
        "lastchg",
        "chkfail",
        "chkdown",
    ]
    .map(col);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| e.to_string())?;
        let text = |i: usize| record.get(i).unwrap_or("");
        let num = |i: Option<usize>| i.and_then(|i| record.get(i)).and_then(|v| v.parse().ok());
        rows.push(Row {
            proxy: text(pxname).to_owned(),
            name: text(svname).to_owned(),
            kind: match text(kind) {
                "0" => RowKind::Frontend,
                "1" => RowKind::Backend,
                "2" => RowKind::Server,
                _ => RowKind::Other,
            },
            status: text(status).to_owned(),
            active: num(act),
            backup: num(bck),
            sessions: num(scur),
            check_duration_ms: num(check_duration),
            downtime_seconds: num(downtime),
            last_change_seconds: num(lastchg),
            check_failures: num(chkfail),
            check_downs: num(chkdown),
        });
    }
    Ok(rows)
}

/// Maps HAProxy's server status text (`UP`, `UP 1/2`, `DOWN 1/3`, `MAINT (via b/s)`,
/// `DRAIN (agent)`, `no check`, …) to one of [`SERVER_STATES`].
fn server_state(status: &str) -> Option<&'static str> {
    if status == "no check" {
        return Some("no_check");
    }
    match status.split([' ', '(']).next()? {
        "UP" => Some("up"),
        "DOWN" => Some("down"),
        "MAINT" => Some("maint"),
        "DRAIN" => Some("drain"),
        "NOLB" => Some("nolb"),
        _ => None,
    }
}

#[async_trait]
impl Collector for HaproxyCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let text = ctx.within(self.fetch()).await?;
        let rows = parse_stats(&text).map_err(CollectError::Protocol)?;
        write_rows(&rows, out);
        Ok(())
    }
}

/// The samples of every backend and server row; frontends and the rest are skipped.
fn write_rows(rows: &[Row], out: &mut SampleBuffer) {
    let mut servers_per_backend: Vec<(&str, usize)> = Vec::new();
    for row in rows.iter().filter(|r| r.kind == RowKind::Server) {
        match servers_per_backend
            .iter_mut()
            .find(|(b, _)| *b == row.proxy)
        {
            Some((_, n)) => *n += 1,
            None => servers_per_backend.push((&row.proxy, 1)),
        }
    }
    for row in rows {
        match row.kind {
            RowKind::Server => server_samples(row, out),
            RowKind::Backend => {
                let servers = servers_per_backend
                    .iter()
                    .find(|(b, _)| *b == row.proxy)
                    .map_or(0, |(_, n)| *n);
                backend_samples(row, servers, out)
            }
            RowKind::Frontend | RowKind::Other => {}
        }
    }
}

fn server_samples(row: &Row, out: &mut SampleBuffer) {
    let l: &[(&'static str, &str)] = &[("backend", &row.proxy), ("server", &row.name)];
    out.state_set(
        "clusterwatch_haproxy_server_status",
        "HAProxy server state (up, down, maint, drain, nolb, no_check); `UP 1/2` counts as up, `DOWN 1/2` as down.",
        l,
        "state",
        SERVER_STATES,
        server_state(&row.status),
    );
    if let Some(v) = row.sessions {
        out.gauge(
            "clusterwatch_haproxy_server_current_sessions",
            "Sessions currently open to the HAProxy server.",
            l,
            v,
        );
    }
    if let Some(v) = row.check_duration_ms {
        out.gauge(
            "clusterwatch_haproxy_server_check_duration_seconds",
            "How long the last health check of the HAProxy server took, in seconds.",
            l,
            v / 1000.0,
        );
    }
    if let Some(v) = row.last_change_seconds {
        out.gauge(
            "clusterwatch_haproxy_server_last_change_age_seconds",
            "Seconds since the HAProxy server last changed state (UP/DOWN).",
            l,
            v,
        );
    }
    if let Some(v) = row.downtime_seconds {
        out.counter(
            "clusterwatch_haproxy_server_downtime_seconds_total",
            "Total time the HAProxy server has been down, in seconds.",
            l,
            v,
        );
    }
    if let Some(v) = row.check_failures {
        out.counter(
            "clusterwatch_haproxy_server_check_failures_total",
            "Failed health checks of the HAProxy server.",
            l,
            v,
        );
    }
    if let Some(v) = row.check_downs {
        out.counter(
            "clusterwatch_haproxy_server_check_downs_total",
            "Times health checks took the HAProxy server from UP to DOWN.",
            l,
            v,
        );
    }
}

fn backend_samples(row: &Row, servers: usize, out: &mut SampleBuffer) {
    let l: &[(&'static str, &str)] = &[("backend", &row.proxy)];
    out.gauge(
        "clusterwatch_haproxy_backend_up",
        "Whether HAProxy reports the backend UP (1: at least one server can take traffic) or DOWN (0).",
        l,
        if row.status == "UP" { 1.0 } else { 0.0 },
    );
    out.gauge(
        "clusterwatch_haproxy_backend_servers",
        "Servers configured in the HAProxy backend.",
        l,
        servers as f64,
    );
    if let Some(v) = row.active {
        out.gauge(
            "clusterwatch_haproxy_backend_active_servers",
            "Active (non-backup) servers of the HAProxy backend that are up.",
            l,
            v,
        );
    }
    if let Some(v) = row.backup {
        out.gauge(
            "clusterwatch_haproxy_backend_backup_servers",
            "Backup servers of the HAProxy backend that are up.",
            l,
            v,
        );
    }
    if let Some(v) = row.sessions {
        out.gauge(
            "clusterwatch_haproxy_backend_current_sessions",
            "Sessions currently open through the HAProxy backend.",
            l,
            v,
        );
    }
    if let Some(v) = row.last_change_seconds {
        out.gauge(
            "clusterwatch_haproxy_backend_last_change_age_seconds",
            "Seconds since the HAProxy backend last changed state (UP/DOWN).",
            l,
            v,
        );
    }
    if let Some(v) = row.downtime_seconds {
        out.counter(
            "clusterwatch_haproxy_backend_downtime_seconds_total",
            "Total time the HAProxy backend has been down (no server up), in seconds.",
            l,
            v,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;
    use std::path::Path;

    // Captured from Debian's HAProxy 2.6 in front of a Redis master (r1) and replica (r2),
    // checked with tcp-check `PING` and `role:master`; r3 disabled, r4 without checks.
    const GOING_DOWN: &str = include_str!("fixtures/haproxy-2.6-going-down.csv");
    // The same after `set server redis_master/r4 state drain` over the stats socket.
    const DRAIN: &str = include_str!("fixtures/haproxy-2.6-drain.csv");

    fn row<'a>(rows: &'a [Row], proxy: &str, name: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.proxy == proxy && r.name == name)
            .unwrap()
    }

    #[test]
    fn parses_servers_and_backends_from_real_csv() {
        let rows = parse_stats(GOING_DOWN).unwrap();
        let r1 = row(&rows, "redis_master", "r1");
        assert_eq!(r1.kind, RowKind::Server);
        assert_eq!(r1.status, "UP 1/2");
        assert_eq!(r1.check_failures, Some(1.0));
        let r2 = row(&rows, "redis_master", "r2");
        assert_eq!(
            (r2.status.as_str(), r2.check_duration_ms),
            ("DOWN", Some(501.0))
        );
        assert_eq!(r2.downtime_seconds, Some(5.0));
        let backend = row(&rows, "redis_master", "BACKEND");
        assert_eq!(backend.kind, RowKind::Backend);
        assert_eq!((backend.active, backend.backup), (Some(2.0), Some(0.0)));
        assert_eq!(row(&rows, "stats", "FRONTEND").kind, RowKind::Frontend);
        let empty = row(&parse_stats(DRAIN).unwrap(), "empty", "BACKEND")
            .status
            .clone();
        assert_eq!(empty, "DOWN");
    }

    #[test]
    fn maps_every_status_to_a_state() {
        let rows = parse_stats(DRAIN).unwrap();
        let states: Vec<(&str, Option<&str>)> = rows
            .iter()
            .filter(|r| r.kind == RowKind::Server)
            .map(|r| (r.name.as_str(), server_state(&r.status)))
            .collect();
        assert_eq!(
            states,
            vec![
                ("r1", Some("up")),
                ("r2", Some("down")),
                ("r3", Some("maint")),
                ("r4", Some("drain")),
                ("e1", Some("down")),
            ]
        );
        assert_eq!(server_state("UP 1/2"), Some("up"));
        assert_eq!(server_state("DOWN 1/3"), Some("down"));
        assert_eq!(server_state("MAINT (via b/s)"), Some("maint"));
        assert_eq!(server_state("DRAIN (agent)"), Some("drain"));
        assert_eq!(server_state("NOLB"), Some("nolb"));
        assert_eq!(server_state("no check"), Some("no_check"));
        assert_eq!(server_state("weird"), None);
    }

    #[test]
    fn rejects_what_is_not_csv_statistics() {
        assert!(parse_stats("<html>Statistics Report</html>").is_err());
        assert!(parse_stats("# a,b\n1,2\n").is_err());
    }

    #[test]
    fn url_gets_csv_suffix_and_sockets_are_accepted() {
        let cfg = parse(
            "haproxy:\n  - { name: a, url: \"http://127.0.0.1:8404/stats\" }\n  - { name: b, url: \"http://127.0.0.1:8404/;csv\" }\n  - { name: c, url: \"unix:///run/haproxy/admin.sock\" }\n",
            "c.yml",
            Path::new("."),
        );
        assert!(cfg.is_ok(), "{:?}", cfg.err().map(|e| e.render()));
        let mut problems = Vec::new();
        let node = crate::config::source::Node::parse_document("{}").unwrap();
        let at = Located::new(&node, "haproxy[0]");
        assert_eq!(
            check_source("http://h:8404/stats", &at, &mut problems),
            Some(Source::Http(
                Url::parse("http://h:8404/stats;csv;norefresh").unwrap()
            ))
        );
        assert_eq!(
            check_source("unix:///run/haproxy/admin.sock", &at, &mut problems),
            Some(Source::Socket(PathBuf::from("/run/haproxy/admin.sock")))
        );
        assert_eq!(
            check_source("http://u:secret@h/stats", &at, &mut problems),
            None
        );
        assert_eq!(check_source("ftp://h/", &at, &mut problems), None);
        assert_eq!(problems.len(), 2);
        assert!(problems.iter().all(|p| !p.message.contains("secret")));
    }

    #[tokio::test]
    async fn samples_cover_servers_and_backends() {
        let rows = parse_stats(GOING_DOWN).unwrap();
        let mut out = SampleBuffer::new();
        for r in rows.iter().filter(|r| r.kind == RowKind::Server) {
            server_samples(r, &mut out);
        }
        let status = out.get("clusterwatch_haproxy_server_status").unwrap();
        // Every state of each of the five servers is present.
        assert_eq!(status.samples.len(), 5 * SERVER_STATES.len());
        let up: Vec<&str> = status
            .samples
            .iter()
            .filter(|s| s.value == 1.0 && s.labels[2].1 == "up")
            .map(|s| s.labels[1].1.as_str())
            .collect();
        assert_eq!(up, vec!["r1"]);
    }

    #[test]
    fn golden_exposition_of_captured_csv() {
        for (name, text) in [
            ("haproxy-2.6-going-down", GOING_DOWN),
            ("haproxy-2.6-drain", DRAIN),
        ] {
            let mut out = SampleBuffer::new();
            write_rows(&parse_stats(text).unwrap(), &mut out);
            crate::collector::golden::assert_golden(name, out);
        }
    }
}
