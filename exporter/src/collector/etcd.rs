//! etcd cluster health: one target per etcd cluster, every member endpoint asked concurrently
//! (`/health`, `/metrics`, the v3 gateway's maintenance status) and summed up into quorum and
//! leader series. It only reads; it never writes a key or changes membership.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::etcd_v3::{build_client, check_endpoints, TlsFiles};
use crate::snapshot::SampleBuffer;

/// The `etcd` collector, configured by the `etcd:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "etcd",
    section: "etcd",
    always_on: false,
    configure,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    endpoints: Vec<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawEtcd>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let endpoints = check_endpoints(&raw.endpoints, &item, problems);
        let tls = TlsFiles {
            ca: raw.ca_file.map(|p| ctx.resolve(&p)),
            cert: raw.cert_file.map(|p| ctx.resolve(&p)),
            key: raw.key_file.map(|p| ctx.resolve(&p)),
        };
        let client = build_client(&tls, &item, problems);
        if problems.len() > before {
            continue;
        }
        let Some(client) = client else { continue };
        out.push(Target::new(&KIND, id, EtcdCollector { endpoints, client }));
    }
    out
}

/// One etcd cluster: its member endpoints and a client whose connections live across scrapes.
pub struct EtcdCollector {
    endpoints: Vec<Url>,
    client: reqwest::Client,
}

/// What one member told us; `None` fields were not answered in time.
#[derive(Debug, Default, PartialEq)]
struct Member {
    healthy: Option<bool>,
    status: Option<Status>,
    has_leader: Option<f64>,
    is_leader: Option<f64>,
    leader_changes: Option<f64>,
    proposals_committed: Option<f64>,
}

impl Member {
    fn up(&self) -> bool {
        self.healthy.is_some() || self.status.is_some() || self.has_leader.is_some()
    }

    fn is_leader(&self) -> Option<bool> {
        match &self.status {
            Some(s) => Some(s.leader != 0 && s.leader == s.member_id),
            None => self.is_leader.map(|v| v == 1.0),
        }
    }

    fn has_leader(&self) -> Option<bool> {
        match self.has_leader {
            Some(v) => Some(v == 1.0),
            None => self.status.as_ref().map(|s| s.leader != 0),
        }
    }
}

/// The parts of `POST /v3/maintenance/status` we use. etcd's JSON gateway writes 64-bit
/// numbers as strings.
#[derive(Debug, Default, PartialEq)]
struct Status {
    member_id: u64,
    leader: u64,
    raft_term: u64,
    raft_index: u64,
}

fn parse_status(body: &[u8]) -> Option<Status> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let num = |v: &serde_json::Value| -> Option<u64> {
        match v {
            serde_json::Value::String(s) => s.parse().ok(),
            serde_json::Value::Number(n) => n.as_u64(),
            // Zero values are left out of proto3 JSON.
            serde_json::Value::Null => Some(0),
            _ => None,
        }
    };
    Some(Status {
        member_id: num(&v["header"]["member_id"])?,
        leader: num(&v["leader"])?,
        raft_term: num(&v["raftTerm"])?,
        raft_index: num(&v["raftIndex"])?,
    })
}

/// `/health` answers `{"health":"true"}` (200) or `{"health":"false","reason":…}` (503).
fn parse_health(body: &[u8]) -> Option<bool> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match &v["health"] {
        serde_json::Value::String(s) => Some(s == "true"),
        serde_json::Value::Bool(b) => Some(*b),
        _ => None,
    }
}

/// The first sample of each wanted metric in Prometheus text exposition, by name. Enough for
/// etcd's unlabelled server gauges and counters; labelled samples are matched by name too.
fn prometheus_values(text: &str, names: &[&str]) -> Vec<Option<f64>> {
    let mut out = vec![None; names.len()];
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let Some(i) = names.iter().position(|n| *n == &line[..name_end]) else {
            continue;
        };
        if out[i].is_some() {
            continue;
        }
        let rest = &line[name_end..];
        let rest = match rest.strip_prefix('{') {
            // Label values may contain `}` only escaped inside quotes; etcd's do not.
            Some(r) => r.split_once('}').map(|(_, v)| v).unwrap_or(""),
            None => rest,
        };
        out[i] = rest.split_whitespace().next().and_then(|v| v.parse().ok());
    }
    out
}

const METRICS: [&str; 4] = [
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
];

impl EtcdCollector {
    async fn get(&self, req: reqwest::RequestBuilder, deadline: Instant) -> Option<Vec<u8>> {
        let fetch = async {
            let resp = req.send().await.ok()?;
            // /health answers 503 with a body when the member is unhealthy: still an answer.
            resp.bytes().await.ok().map(|b| b.to_vec())
        };
        tokio::time::timeout_at(deadline, fetch)
            .await
            .ok()
            .flatten()
    }

    async fn probe(&self, base: &Url, deadline: Instant) -> Member {
        let url = |p: &str| {
            base.join(p)
                .expect("endpoint URLs are checked to have no path")
        };
        let health = self.get(self.client.get(url("health")), deadline);
        let metrics = self.get(self.client.get(url("metrics")), deadline);
        let status = self.get(
            self.client
                .post(url("v3/maintenance/status"))
                .header("content-type", "application/json")
                .body("{}"),
            deadline,
        );
        let (health, metrics, status) = tokio::join!(health, metrics, status);
        let values = metrics
            .map(|m| prometheus_values(&String::from_utf8_lossy(&m), &METRICS))
            .unwrap_or_else(|| vec![None; METRICS.len()]);
        Member {
            healthy: health.as_deref().and_then(parse_health),
            status: status.as_deref().and_then(parse_status),
            has_leader: values[0],
            is_leader: values[1],
            leader_changes: values[2],
            proposals_committed: values[3],
        }
    }
}

/// Quorum in etcd's sense: a strict majority of the members.
fn quorum_held(healthy: usize, members: usize) -> bool {
    healthy * 2 > members
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[async_trait]
impl Collector for EtcdCollector {
    /// Never fails: an unreachable member is a metric, and losing members is exactly what
    /// this target must report (quorum lost), not a scrape failure.
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        // Answer before the engine's deadline so a black-holed member costs its own series,
        // not the whole cluster's.
        let deadline = ctx.item_deadline();
        let members =
            futures::future::join_all(self.endpoints.iter().map(|e| self.probe(e, deadline))).await;

        let mut healthy = 0;
        let mut leader_present = false;
        for (endpoint, m) in self.endpoints.iter().zip(&members) {
            let endpoint = endpoint.as_str().trim_end_matches('/');
            let l: &[(&'static str, &str)] = &[("endpoint", endpoint)];
            out.gauge(
                "clusterwatch_etcd_member_up",
                "Whether the etcd member answered over HTTP (1) or not (0).",
                l,
                flag(m.up()),
            );
            let is_healthy = m.healthy == Some(true);
            healthy += usize::from(is_healthy);
            out.gauge(
                "clusterwatch_etcd_member_healthy",
                "Whether the etcd member's /health endpoint reported healthy (1) or not (0).",
                l,
                flag(is_healthy),
            );
            if let Some(has) = m.has_leader() {
                leader_present |= has;
                out.gauge(
                    "clusterwatch_etcd_member_has_leader",
                    "Whether the etcd member knows of a leader (1) or not (0).",
                    l,
                    flag(has),
                );
            }
            if let Some(is) = m.is_leader() {
                out.gauge(
                    "clusterwatch_etcd_member_is_leader",
                    "Whether the etcd member is the raft leader (1) or not (0).",
                    l,
                    flag(is),
                );
            }
            if let Some(s) = &m.status {
                out.gauge(
                    "clusterwatch_etcd_member_raft_term",
                    "The raft term the etcd member is in; it grows with every election.",
                    l,
                    s.raft_term as f64,
                );
                out.gauge(
                    "clusterwatch_etcd_member_raft_index",
                    "The raft log index the etcd member has reached.",
                    l,
                    s.raft_index as f64,
                );
            }
            if let Some(v) = m.leader_changes {
                out.counter(
                    "clusterwatch_etcd_member_leader_changes_seen_total",
                    "Leader changes the etcd member has seen since it started.",
                    l,
                    v,
                );
            }
            if let Some(v) = m.proposals_committed {
                out.counter(
                    "clusterwatch_etcd_member_proposals_committed_total",
                    "Raft proposals the etcd member has committed since it started.",
                    l,
                    v,
                );
            }
        }
        let configured = self.endpoints.len();
        out.gauge(
            "clusterwatch_etcd_members",
            "etcd members configured for this cluster (endpoints listed).",
            &[],
            configured as f64,
        );
        out.gauge(
            "clusterwatch_etcd_members_healthy",
            "etcd members that reported healthy.",
            &[],
            healthy as f64,
        );
        out.gauge(
            "clusterwatch_etcd_quorum_held",
            "Whether more than half of the etcd members are healthy (1) or quorum is lost (0).",
            &[],
            flag(quorum_held(healthy, configured)),
        );
        out.gauge(
            "clusterwatch_etcd_leader_present",
            "Whether any answering etcd member knows of a leader (1) or none does (0).",
            &[],
            flag(leader_present),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;
    use std::path::Path;

    const METRICS_TEXT: &str = "\
# HELP etcd_server_has_leader Whether or not a leader exists. 1 is existence, 0 is not.
# TYPE etcd_server_has_leader gauge
etcd_server_has_leader 1
# TYPE etcd_server_is_leader gauge
etcd_server_is_leader 0
etcd_server_leader_changes_seen_total 3
etcd_server_proposals_committed_total 1.234e+06
etcd_server_proposals_committed_total_other 9
etcd_network_peer_round_trip_time_seconds_bucket{To=\"8e9e05c52164694d\",le=\"0.0001\"} 0
";

    #[test]
    fn reads_unlabelled_server_metrics() {
        let v = prometheus_values(METRICS_TEXT, &METRICS);
        assert_eq!(v, vec![Some(1.0), Some(0.0), Some(3.0), Some(1_234_000.0)]);
        let labelled = prometheus_values(
            METRICS_TEXT,
            &["etcd_network_peer_round_trip_time_seconds_bucket", "absent"],
        );
        assert_eq!(labelled, vec![Some(0.0), None]);
    }

    #[test]
    fn reads_the_gateway_status_with_string_numbers() {
        // As etcd 3.4 answers POST /v3/maintenance/status.
        let body = br#"{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"13668033151171901709","raftIndex":"5","raftTerm":"2","raftAppliedIndex":"5","dbSizeInUse":"16384"}"#;
        let s = parse_status(body).unwrap();
        assert_eq!(s.raft_term, 2);
        assert_eq!(s.raft_index, 5);
        let m = Member {
            status: Some(s),
            ..Member::default()
        };
        assert_eq!(m.is_leader(), Some(true));
        assert_eq!(m.has_leader(), Some(true));
        assert!(m.up());
        // A member without a leader leaves `leader` out (proto3 zero value).
        let lost = parse_status(br#"{"header":{"member_id":"7"},"raftIndex":"9","raftTerm":"4"}"#)
            .unwrap();
        assert_eq!(lost.leader, 0);
        assert!(parse_status(b"not json").is_none());
    }

    #[test]
    fn reads_health_answers() {
        assert_eq!(parse_health(br#"{"health":"true"}"#), Some(true));
        assert_eq!(
            parse_health(br#"{"health":"false","reason":"RAFT NO LEADER"}"#),
            Some(false)
        );
        assert_eq!(parse_health(b"<html>"), None);
        assert!(!Member::default().up());
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert!(quorum_held(2, 3));
        assert!(!quorum_held(1, 3));
        assert!(!quorum_held(2, 4));
        assert!(quorum_held(3, 5));
        assert!(!quorum_held(0, 1));
    }

    #[test]
    fn endpoint_problems_are_reported_with_lines() {
        let err = parse(
            "etcd:\n  - name: ce\n    endpoints: [ftp://a:1, \"http://u:p@a:2379\", http://a:2379/v2, http://b:2379, http://b:2379]\n  - name: empty\n    endpoints: []\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        let text = err.render();
        assert_eq!(err.problems.len(), 5, "{text}");
        assert!(text.contains("etcd[0].endpoints[0]"), "{text}");
        assert!(text.contains("credentials in the URL"), "{text}");
        assert!(!text.contains("u:p"), "no credentials echoed: {text}");
        assert!(text.contains("endpoint listed twice"), "{text}");
        assert!(text.contains("at least one endpoint"), "{text}");
    }

    #[tokio::test]
    async fn unreachable_members_are_metrics_not_a_failure() {
        let cfg = parse(
            "etcd:\n  - name: ce\n    cluster: clearwater\n    endpoints: [http://127.0.0.1:9, http://127.0.0.1:1]\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap();
        let ctx = ScrapeContext {
            deadline: Instant::now() + std::time::Duration::from_secs(2),
        };
        let mut out = SampleBuffer::new();
        cfg.targets[0].collect(&ctx, &mut out).await.unwrap();
        let value = |name: &str| out.get(name).unwrap().samples[0].value;
        assert_eq!(value("clusterwatch_etcd_members"), 2.0);
        assert_eq!(value("clusterwatch_etcd_members_healthy"), 0.0);
        assert_eq!(value("clusterwatch_etcd_quorum_held"), 0.0);
        assert_eq!(value("clusterwatch_etcd_leader_present"), 0.0);
        let up = out.get("clusterwatch_etcd_member_up").unwrap();
        assert_eq!(up.samples.len(), 2);
        assert!(up.samples.iter().all(|s| s.value == 0.0));
        assert_eq!(up.samples[0].labels[0].1, "http://127.0.0.1:9");
    }
}
