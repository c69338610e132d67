//! Kamailio statistics over its JSON-RPC interface (`jsonrpcs` served by `xhttp`): every
//! `group:name = value` from `stats.get_statistics all`, typed as a level or a counter, and the
//! process count from `core.psx`. It reads only; it never calls an RPC command that changes state.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `kamailio` collector, configured by the `kamailio:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "kamailio",
    section: "kamailio",
    always_on: false,
    configure,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKamailio {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    url: String,
}

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawKamailio>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let url = match url::Url::parse(&raw.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                problems.push(
                    item.problem(
                        "url",
                        "not an http:// or https:// URL of Kamailio's JSON-RPC endpoint",
                    )
                    .hint("load xhttp and jsonrpcs and give e.g. http://127.0.0.1:5071/RPC"),
                );
                None
            }
        };
        let client = reqwest::Client::builder()
            // Kept connections go stale when Kamailio restarts; one connect per scrape is cheap.
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("clusterwatch/", env!("CARGO_PKG_VERSION")))
            .build();
        let client = match client {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(item.problem("url", format!("cannot build an HTTP client: {e}")));
                None
            }
        };
        if problems.len() > before {
            continue;
        }
        let (Some(url), Some(client)) = (url, client) else {
            continue;
        };
        out.push(Target::new(&KIND, id, KamailioCollector { url, client }));
    }
    out
}

/// One Kamailio instance.
pub struct KamailioCollector {
    url: url::Url,
    client: reqwest::Client,
}

/// Whether a statistic is a level (gauge) rather than an event count. Kamailio does not say;
/// memory, registrations and anything named active/current/in-use are levels.
pub fn is_level(group: &str, name: &str) -> bool {
    matches!(group, "shmem" | "pkmem" | "usrloc")
        || [
            "active_",
            "inuse_",
            "current_",
            "early_",
            "max_",
            "default_",
            "registered_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Splits one `group:name = value` line of `stats.get_statistics`.
pub(crate) fn parse_stat(line: &str) -> Option<(&str, &str, f64)> {
    let (key, value) = line.split_once(" = ")?;
    let (group, name) = key.trim().split_once(':')?;
    let value: f64 = value.trim().parse().ok()?;
    (!group.is_empty() && !name.is_empty()).then_some((group, name, value))
}

impl KamailioCollector {
    async fn call(&self, method: &str, params: Value) -> Result<Value, CollectError> {
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        let response = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    CollectError::Connect(format!("kamailio json-rpc: {}", e.without_url()))
                } else if e.is_timeout() {
                    CollectError::Timeout
                } else {
                    CollectError::Query(format!("kamailio json-rpc: {}", e.without_url()))
                }
            })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            CollectError::Query(format!("kamailio json-rpc body: {}", e.without_url()))
        })?;
        if !status.is_success() {
            return Err(CollectError::Protocol(format!(
                "{method}: http status {status}"
            )));
        }
        let mut reply: Value = serde_json::from_str(&text)
            .map_err(|e| CollectError::Protocol(format!("{method}: not JSON: {e}")))?;
        if let Some(err) = reply.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error");
            return Err(CollectError::Query(format!("{method}: {msg}")));
        }
        reply
            .get_mut("result")
            .map(Value::take)
            .ok_or_else(|| CollectError::Protocol(format!("{method}: no result")))
    }
}

#[async_trait]
impl Collector for KamailioCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let both = futures::future::join(
            self.call("stats.get_statistics", json!(["all"])),
            self.call("core.psx", json!([])),
        );
        let (stats, processes) = ctx.within(async { Ok(both.await) }).await?;
        let stats = stats?;
        let lines = stats
            .as_array()
            .ok_or_else(|| CollectError::Protocol("stats.get_statistics: not a list".into()))?;
        for (group, name, value) in lines
            .iter()
            .filter_map(Value::as_str)
            .filter_map(parse_stat)
        {
            let labels = [("group", group), ("name", name)];
            if is_level(group, name) {
                out.gauge(
                    "clusterwatch_kamailio_stat_current",
                    "A Kamailio statistic that is a level (memory, active transactions and dialogs, registrations), by group and name.",
                    &labels,
                    value,
                );
            } else {
                out.counter(
                    "clusterwatch_kamailio_stat_total",
                    "A Kamailio statistic that counts events since start (requests, replies, errors), by group and name.",
                    &labels,
                    value,
                );
            }
        }
        // Older builds or a restricted RPC may lack core.psx; the statistics still count.
        if let Some(list) = processes.ok().as_ref().and_then(Value::as_array) {
            out.gauge(
                "clusterwatch_kamailio_processes",
                "Kamailio processes (receivers, timers, TCP, RPC workers), from core.psx.",
                &[],
                list.len() as f64,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_lines_and_their_type() {
        assert_eq!(
            parse_stat("core:rcv_requests = 12"),
            Some(("core", "rcv_requests", 12.0))
        );
        assert_eq!(
            parse_stat("usrloc:location-users = 3"),
            Some(("usrloc", "location-users", 3.0))
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat(":x = 1"), None);
        assert!(is_level("shmem", "used_size"));
        assert!(is_level("tmx", "active_transactions"));
        assert!(is_level("dialog", "active_dialogs"));
        assert!(is_level("tcp", "current_opened_connections"));
        assert!(!is_level("core", "rcv_requests"));
        assert!(!is_level("sl", "200_replies"));
    }

    #[test]
    fn only_http_urls() {
        let err = crate::configuration::parse(
            "kamailio:\n  - { name: k, url: 'unix:/run/kamailio/kamailio_rpc.sock' }\n",
            "c.yml",
            std::path::Path::new("."),
        )
        .unwrap_err();
        assert!(
            err.render().contains("kamailio[0].url: not an http"),
            "{}",
            err.render()
        );
    }
}
