//! The `probe` collector: one target per configured probe (HTTP(S), TCP or SIP OPTIONS), so the
//! engine runs them concurrently under the deadline. It turns a probe's outcome into metrics and
//! keeps the consecutive-failure count per collection cycle (at most one probe run per
//! `interval`, whoever scrapes); the probing itself lives in `crate::probe`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::time::Instant;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::probe::http::{HttpProbe, RawHttp};
use crate::probe::sip::{RawSip, SipProbe};
use crate::probe::tcp::{RawTcp, TcpProbe};
use crate::probe::{Outcome, REASONS};
use crate::snapshot::SampleBuffer;

/// The `probe` collector, configured by the `probes:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "probe",
    section: "probes",
    always_on: false,
    configure,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    interval: Option<HumanDuration>,
    http: Option<RawHttp>,
    tcp: Option<RawTcp>,
    sip_options: Option<RawSip>,
}

enum Kind {
    Http(HttpProbe),
    Tcp(TcpProbe),
    Sip(SipProbe),
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawProbe>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let given = [
            raw.http.is_some(),
            raw.tcp.is_some(),
            raw.sip_options.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            problems.push(
                item.problem(
                    "name",
                    "a probe needs exactly one of http, tcp, sip_options",
                )
                .hint("write one probe per check, e.g. `tcp: { address: \"127.0.0.1:6379\" }`"),
            );
            continue;
        }
        // Problems inside a kind's block point at that block's own lines.
        let block = |field: &str| item.field(field).unwrap_or_else(|| item.clone());
        let kind = if let Some(h) = raw.http {
            h.check(&block("http"), ctx, problems).map(Kind::Http)
        } else if let Some(t) = raw.tcp {
            t.check(&block("tcp"), ctx, problems).map(Kind::Tcp)
        } else {
            raw.sip_options
                .and_then(|s| s.check(&block("sip_options"), problems))
                .map(Kind::Sip)
        };
        let Some(kind) = kind else { continue };
        if problems.len() > before {
            continue;
        }
        let interval = raw.interval.map_or(DEFAULT_INTERVAL, |d| d.0);
        if interval > MAX_INTERVAL {
            problems.push(item.problem("interval", "must be at most 1h"));
            continue;
        }
        let name = id.name.clone();
        out.push(Target::new(
            &KIND,
            id,
            ProbeCollector {
                name,
                kind,
                consecutive_failures: AtomicU64::new(0),
                interval,
                last: tokio::sync::Mutex::new(None),
            },
        ));
    }
    out
}

/// A probe runs at most once per this long; scrapes in between get its last outcome.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// One collection cycle's result, served to every scrape within `interval`.
struct Cycle {
    at: Instant,
    outcome: Outcome,
    elapsed: Duration,
    failures: u64,
}

/// One configured probe.
pub struct ProbeCollector {
    /// The target name, for log lines.
    name: String,
    kind: Kind,
    /// Failed cycles since the last success, kept across scrapes for "N in a row" rules.
    consecutive_failures: AtomicU64,
    /// Shortest time between two probe runs (`0s`: every scrape runs it).
    interval: Duration,
    /// The last cycle; the lock also makes concurrent scrapes share one run.
    last: tokio::sync::Mutex<Option<Cycle>>,
}

impl ProbeCollector {
    fn kind_label(&self) -> &'static str {
        match self.kind {
            Kind::Http(_) => "http",
            Kind::Tcp(_) => "tcp",
            Kind::Sip(_) => "sip_options",
        }
    }
}

impl ProbeCollector {
    /// Runs the probe once and advances the failure streak: one collection cycle.
    async fn run_cycle(&self, ctx: &ScrapeContext) -> Cycle {
        let started = Instant::now();
        // Ends before the engine's deadline, so a probe that runs out of time still reports
        // `reason="timeout"` itself instead of being aborted with nothing to show.
        let deadline = ctx.item_deadline();
        let outcome: Outcome = match &self.kind {
            Kind::Http(p) => p.run(deadline).await,
            Kind::Tcp(p) => p.run(deadline).await,
            Kind::Sip(p) => p.run(deadline).await,
        };
        let elapsed = started.elapsed();
        let failures = if outcome.failure.is_none() {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            0
        } else {
            tracing::debug!(probe = %self.name, reason = outcome.failure.map(|r| r.label()), detail = %outcome.detail, "probe failed");
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
        };
        Cycle {
            at: started,
            outcome,
            elapsed,
            failures,
        }
    }
}

const PHASES: &[&str] = &["resolve", "connect", "tls", "processing", "transfer"];

#[async_trait]
impl Collector for ProbeCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .is_some_and(|c| c.at.elapsed() < self.interval);
        if !fresh {
            *last = Some(self.run_cycle(ctx).await);
        }
        let Some(Cycle {
            outcome,
            elapsed,
            failures,
            ..
        }) = last.as_ref()
        else {
            unreachable!("a cycle was just stored");
        };
        let (elapsed, failures) = (*elapsed, *failures);
        let kind = [("kind", self.kind_label())];
        out.gauge(
            "clusterwatch_probe_success",
            "Whether the probe succeeded (1) or failed (0) on this scrape.",
            &kind,
            if outcome.failure.is_none() { 1.0 } else { 0.0 },
        );
        out.gauge(
            "clusterwatch_probe_duration_seconds",
            "How long the probe took, including resolve, connect and TLS on a fresh connection.",
            &[],
            elapsed.as_secs_f64(),
        );
        for phase in PHASES {
            if let Some((_, d)) = outcome.phases.iter().find(|(n, _)| n == phase) {
                out.gauge(
                    "clusterwatch_probe_phase_duration_seconds",
                    "Time spent per phase of the probe (resolve, connect, tls, processing = until the first answer, transfer = reading the body).",
                    &[("phase", phase)],
                    d.as_secs_f64(),
                );
            }
        }
        if let Some(code) = outcome.status {
            out.gauge(
                "clusterwatch_probe_status_code",
                "The last HTTP or SIP status code the peer answered.",
                &[],
                code as f64,
            );
        }
        if let Some(expiry) = outcome.cert_expiry {
            out.gauge(
                "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
                "Earliest notAfter (unix time) in the certificate chain the server presented.",
                &[],
                expiry,
            );
        }
        if let Kind::Sip(_) = self.kind {
            out.gauge(
                "clusterwatch_probe_sip_out_of_service",
                "1 if the SIP peer answered 503 Service Unavailable (put out of service), else 0.",
                &[],
                if outcome.out_of_service == Some(true) {
                    1.0
                } else {
                    0.0
                },
            );
        }
        out.state_set(
            "clusterwatch_probe_failure_reason",
            "Why the probe failed on this scrape; every reason is 0 when it succeeded.",
            &[],
            "reason",
            REASONS,
            outcome.failure.map(|r| r.label()),
        );
        out.gauge(
            "clusterwatch_probe_consecutive_failures",
            "Failed runs of the probe in a row, reset to 0 by a success.",
            &[],
            failures as f64,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::configuration::parse;
    use std::path::Path;

    #[test]
    fn every_problem_of_a_probe_section_is_reported_with_its_line() {
        let yaml = "probes:\n  - name: a\n    http: { url: 'ftp://x/', expect_status: [\"9xx\"] }\n  - name: b\n    tcp: { address: 'nohost', expect: '(' }\n  - name: c\n    sip_options: { address: '127.0.0.1:5060', transport: sctp }\n  - name: d\n  - name: e\n    tcp: { address: '127.0.0.1:1' }\n    http: { url: 'http://x/' }\n";
        let err = parse(yaml, "c.yml", Path::new(".")).unwrap_err();
        let text = err.render();
        for want in [
            "c.yml:3:13: probes[0].http.url",
            "probes[0].http.url: not an http:// or https:// URL",
            "probes[0].http.expect_status: not a status code or class",
            "probes[1].tcp.address: expected host:port",
            "probes[1].tcp.expect: invalid regular expression",
            "probes[2].sip_options.transport: unknown transport",
            "probes[3].name: a probe needs exactly one of http, tcp, sip_options",
            "probes[4].name: a probe needs exactly one",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn the_failure_streak_counts_cycles_not_scrapes() {
        // Port 1 on loopback refuses: every run fails at once.
        let yaml = "probes:\n  - { name: cycled, interval: 1h, tcp: { address: '127.0.0.1:1' } }\n  - { name: every, interval: 0s, tcp: { address: '127.0.0.1:1' } }\n";
        let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
        let ctx = crate::collector::ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        let mut streaks = Vec::new();
        for t in cfg.targets.iter().filter(|t| t.name() == "probe") {
            let mut last = 0.0;
            for _ in 0..4 {
                let mut b = crate::snapshot::SampleBuffer::new();
                t.collect(&ctx, &mut b).await.unwrap();
                let family = b.get("clusterwatch_probe_consecutive_failures").unwrap();
                last = family.samples[0].value;
            }
            streaks.push((t.target().to_owned(), last));
        }
        // Four scrapes within one interval are one cycle; with `0s` each scrape is one.
        assert_eq!(
            streaks,
            [("cycled".to_owned(), 1.0), ("every".to_owned(), 4.0)]
        );
        let err = parse(
            "probes:\n  - { name: x, interval: 2h, tcp: { address: '127.0.0.1:1' } }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(err
            .render()
            .contains("probes[0].interval: must be at most 1h"));
    }

    #[test]
    fn a_good_section_builds_one_target_per_probe() {
        let yaml = "probes:\n  - { name: web, cluster: front, http: { url: 'https://127.0.0.1:8443/', tls: { verify: false }, expect_status: [200, \"3xx\"], expect_body: ok } }\n  - { name: redis, tcp: { address: '127.0.0.1:6379', send: \"PING\\r\\n\", expect: '^\\+PONG' } }\n  - { name: cp1, timeout: 2s, sip_options: { address: '[::1]:5060', transport: tcp } }\n";
        let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
        let names: Vec<&str> = cfg
            .targets
            .iter()
            .filter(|t| t.name() == "probe")
            .map(|t| t.target())
            .collect();
        assert_eq!(names, ["web", "redis", "cp1"]);
    }
}
