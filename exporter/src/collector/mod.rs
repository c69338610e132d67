//! The collector trait, the target that binds it to a configured thing, and the scrape engine
//! that runs every target concurrently under its own deadline. Collectors only query and fill
//! a buffer; concurrency, deadlines, up/duration/error metrics and merging are owned here. The
//! list of kinds is `registry`.

pub mod dir;
pub mod etcd;
pub mod exporter;
pub mod file;
pub mod fs;
#[cfg(test)]
mod golden;
pub mod haproxy;
pub mod kamailio;
pub mod log;
pub mod mongo;
pub mod network;
pub mod pacemaker;
pub mod pg;
pub mod probe;
pub mod process;
pub mod program;
pub mod redis;
pub mod registry;
pub mod sre_stats;
pub mod supervisord;
pub mod system;
pub mod textfile;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::config::{Located, Problem, SectionContext, TargetId};
use crate::logging::OnChange;
use crate::snapshot::{Kind, Label, SampleBuffer};
use crate::sync;

/// A kind of collector: its name (file, `collector` label, metric subsystem), the config
/// section it reads, and how it builds targets from that section.
pub struct CollectorKind {
    /// Collector name, e.g. `fs`: the `collector` label and the metric subsystem.
    pub name: &'static str,
    /// Configuration section it reads, e.g. `filesystems`.
    pub section: &'static str,
    /// Built even when its section is absent (clusterwatch's own process).
    pub always_on: bool,
    /// Parses and checks the section into targets; records problems instead of failing.
    pub configure: Configure,
}

/// Parses a section into targets, recording problems (with lines) instead of failing early.
pub type Configure = fn(Located, &SectionContext, &mut Vec<Problem>) -> Vec<Arc<Target>>;

/// Passed to every collection: when it must be finished by.
#[derive(Clone, Copy, Debug)]
pub struct ScrapeContext {
    /// The moment the engine will abandon this target. Collectors that fan out to items
    /// (mounts, probes, members) bound each item by [`ScrapeContext::item_deadline`].
    pub deadline: Instant,
}

/// At most this much of a target's time is kept back from its items (see
/// [`ScrapeContext::item_deadline`]).
const ITEM_MARGIN: Duration = Duration::from_millis(500);

impl ScrapeContext {
    /// The deadline for one item of a target (a mount, a probe, an etcd member): a tenth of
    /// the time left, at most [`ITEM_MARGIN`], is kept back so a stuck item is reported by the
    /// collector as that item's failure instead of the engine aborting the whole target.
    pub fn item_deadline(&self) -> Instant {
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        now + left.saturating_sub((left / 10).min(ITEM_MARGIN))
    }

    /// Runs `work` until the deadline; past it, the work is dropped and the collection fails
    /// with [`CollectError::Timeout`] (reason `timeout`), whatever the client's own timeouts.
    pub async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, CollectError>>,
    ) -> Result<T, CollectError> {
        tokio::time::timeout_at(self.deadline, work)
            .await
            .unwrap_or(Err(CollectError::Timeout))
    }
}

/// What a collector does for one configured thing: query it once and fill the buffer.
/// Which thing it is (name, cluster, deadline) is held by its [`Target`].
#[async_trait]
pub trait Collector: Send + Sync + 'static {
    /// Queries the target once and writes samples into `out`. Samples written before an error
    /// or a missed deadline are discarded, so a scrape never shows half a target.
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError>;
}

/// One scrape target: a collector kind bound to one configured thing (a server, the host).
pub struct Target {
    kind: &'static str,
    id: TargetId,
    collector: Box<dyn Collector>,
    /// The item's own `labels:`, set once by the assembler after the collector built it.
    labels: std::sync::OnceLock<Vec<Label>>,
    /// The item's `active_when:`, set once by the assembler.
    active_when: std::sync::OnceLock<ActiveWhen>,
}

/// An item's `active_when:`: the target is collected only while another target of the same
/// scrape (collected first) wrote a sample with all these labels at value 1, e.g.
/// `clusterwatch_redis_role{role="master"} 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveWhen {
    /// The `target` name of the condition's target (any collector).
    pub target: String,
    /// Only samples of this family count, when given.
    pub metric: Option<String>,
    /// Labels the sample must have, e.g. `role=master`.
    pub labels: Vec<(String, String)>,
}

impl ActiveWhen {
    /// Whether the condition holds in the samples of the targets collected so far; a
    /// condition target that failed wrote nothing, so its condition does not hold.
    pub fn holds<'a>(&self, collected: impl IntoIterator<Item = &'a SampleBuffer>) -> bool {
        collected.into_iter().any(|buffer| {
            buffer.families().any(|family| {
                self.metric.as_deref().is_none_or(|m| m == family.name)
                    && family.samples.iter().any(|s| {
                        s.value == 1.0
                            && self.labels.iter().all(|(k, v)| {
                                s.labels.iter().any(|(name, value)| name == k && value == v)
                            })
                    })
            })
        })
    }
}

impl Target {
    /// A target of `kind` for the configured thing `id`, collected by `collector`.
    pub fn new(kind: &CollectorKind, id: TargetId, collector: impl Collector) -> Arc<Target> {
        Arc::new(Target {
            kind: kind.name,
            id,
            collector: Box::new(collector),
            labels: std::sync::OnceLock::new(),
            active_when: std::sync::OnceLock::new(),
        })
    }
    /// Makes the target depend on a condition (checked by the assembler); a second call is
    /// ignored.
    pub fn set_active_when(&self, condition: ActiveWhen) {
        let _ = self.active_when.set(condition);
    }
    /// The condition under which the target is collected, if it has one.
    pub fn active_when(&self) -> Option<&ActiveWhen> {
        self.active_when.get()
    }
    /// Sets the target's own `labels:` (checked by the assembler); a second call is ignored.
    pub fn set_labels(&self, labels: Vec<(String, String)>) {
        let labels = labels
            .into_iter()
            .map(|(k, v)| (Cow::Owned(k), v))
            .collect();
        let _ = self.labels.set(labels);
    }
    /// The target's own `labels:`, added to every series of the target.
    pub fn labels(&self) -> &[Label] {
        self.labels.get().map(Vec::as_slice).unwrap_or_default()
    }
    /// The collector name (`fs`, `pg`, …): the `collector` label.
    pub fn name(&self) -> &'static str {
        self.kind
    }
    /// Which configured thing this is: target name, cluster, own deadline.
    pub fn id(&self) -> &TargetId {
        &self.id
    }
    /// The configured target name: the `target` label.
    pub fn target(&self) -> &str {
        &self.id.name
    }
    /// The replication group, for rules that count primaries per cluster.
    pub fn cluster(&self) -> Option<&str> {
        self.id.cluster.as_deref()
    }
    /// A per-target deadline overriding `global.timeout`.
    pub fn timeout(&self) -> Option<Duration> {
        self.id.timeout
    }
    /// Runs the collector once (see [`Collector::collect`]).
    pub async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        self.collector.collect(ctx, out).await
    }
}

/// The raw section of a collector that has one target on this host and nothing to set but
/// the target's name (`exporter:`, `system:`).
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NameOnly {
    name: Option<String>,
}

/// The target of a section that only names it (`{ name: … }`, or absent): `default` unless
/// renamed; `None` when the section is malformed (a problem is recorded).
pub fn named_local_target(
    at: &Located,
    default: &str,
    problems: &mut Vec<Problem>,
) -> Option<TargetId> {
    let raw = at.parse::<Option<NameOnly>>(problems)?.unwrap_or_default();
    Some(TargetId::local(raw.name.unwrap_or_else(|| default.into())))
}

/// Why a collection failed. `reason()` is the short, bounded label value; the message is for
/// logs and must never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The deadline passed.
    #[error("deadline exceeded")]
    Timeout,
    /// Could not connect (refused, unreachable, DNS).
    #[error("connection failed: {0}")]
    Connect(String),
    /// The server rejected our credentials.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Connected and authenticated, but not allowed to read what we need.
    #[error("permission denied: {0}")]
    Permission(String),
    /// A query or command failed.
    #[error("query failed: {0}")]
    Query(String),
    /// A local read failed.
    #[error("i/o error: {0}")]
    Io(String),
    /// The answer did not make sense.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The collector itself panicked: a bug in clusterwatch, not a fault of the target.
    #[error("collector panicked: {0}")]
    Panic(String),
}

/// Every `reason` label value, so each error counter series exists from the first scrape
/// (an `increase()` over a series that appears at 1 misses the first failure).
pub const REASONS: &[&str] = &[
    "timeout",
    "connect",
    "auth",
    "permission",
    "query",
    "io",
    "protocol",
    "panic",
];

impl CollectError {
    /// The `reason` label value: a short word from [`REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            CollectError::Timeout => "timeout",
            CollectError::Connect(_) => "connect",
            CollectError::Auth(_) => "auth",
            CollectError::Permission(_) => "permission",
            CollectError::Query(_) => "query",
            CollectError::Io(_) => "io",
            CollectError::Protocol(_) => "protocol",
            CollectError::Panic(_) => "panic",
        }
    }
}

/// How much of Prometheus' scrape timeout to leave for encoding and the network.
fn scrape_margin(header: Duration) -> Duration {
    (header / 4).min(Duration::from_millis(500))
}

/// The deadline budget for one target: its timeout, capped by the scraper's own timeout.
pub fn target_budget(configured: Duration, scrape_timeout: Option<Duration>) -> Duration {
    match scrape_timeout {
        Some(h) => configured.min(h.saturating_sub(scrape_margin(h))),
        None => configured,
    }
}

/// Runs every target of a configuration concurrently and keeps per-target error counters.
/// The target set can be swapped by a reload while scrapes go on; each scrape works on the
/// set it started with.
pub struct Engine {
    current: RwLock<Arc<TargetSet>>,
    /// (collector, target) → count per entry of [`REASONS`], kept across scrapes and reloads.
    errors: Mutex<HashMap<(&'static str, String), [u64; REASONS.len()]>>,
    /// Last failure reason per (collector, target), so a failure is logged when it starts or
    /// changes, not on every scrape.
    last_failure: Mutex<HashMap<(&'static str, String), OnChange<&'static str>>>,
}

/// The targets of one configuration and the deadline for those without their own.
struct TargetSet {
    targets: Vec<Arc<Target>>,
    /// Per target, what its configuration looked like ([`crate::config::Config::fingerprints`]);
    /// `None` for targets that must never be reused.
    fingerprints: Vec<Option<u64>>,
    default_timeout: Duration,
}

/// What a reload did to the target set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetChanges {
    /// Targets whose configuration did not change: the running collector was kept, with its
    /// connections, caches and streaks.
    pub kept: usize,
    /// Targets built from the new configuration (new or changed).
    pub built: usize,
    /// Targets of the old configuration that are gone or were replaced.
    pub dropped: usize,
}

impl Engine {
    /// An engine over `targets` with `default_timeout` for targets without their own.
    pub fn new(targets: Vec<Arc<Target>>, default_timeout: Duration) -> Self {
        let fingerprints = vec![None; targets.len()];
        Engine::with_fingerprints(targets, fingerprints, default_timeout)
    }

    /// An engine whose targets can be kept across reloads: `fingerprints[i]` identifies the
    /// configuration `targets[i]` was built from.
    pub fn with_fingerprints(
        targets: Vec<Arc<Target>>,
        fingerprints: Vec<Option<u64>>,
        default_timeout: Duration,
    ) -> Self {
        debug_assert_eq!(targets.len(), fingerprints.len());
        Engine {
            current: RwLock::new(Arc::new(TargetSet {
                targets,
                fingerprints,
                default_timeout,
            })),
            errors: Mutex::new(HashMap::new()),
            last_failure: Mutex::new(HashMap::new()),
        }
    }

    fn current(&self) -> Arc<TargetSet> {
        sync::read(&self.current).clone()
    }

    /// The targets now, for the landing page.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.current().targets.clone()
    }

    /// Swaps in the targets of a new configuration. A new target whose collector, name and
    /// fingerprint match a running one is replaced by the running one, so its connections,
    /// caches and failure streaks survive; error counters of targets still present are kept.
    pub fn replace_targets(
        &self,
        targets: Vec<Arc<Target>>,
        fingerprints: Vec<Option<u64>>,
        default_timeout: Duration,
    ) -> TargetChanges {
        let mut current = sync::write(&self.current);
        let old = current.clone();
        let mut changes = TargetChanges::default();
        let targets: Vec<Arc<Target>> = targets
            .into_iter()
            .zip(&fingerprints)
            .map(|(new, fp)| {
                let running = fp.and_then(|fp| {
                    old.targets.iter().zip(&old.fingerprints).find(|(t, ofp)| {
                        **ofp == Some(fp) && t.name() == new.name() && t.target() == new.target()
                    })
                });
                match running {
                    Some((t, _)) => {
                        changes.kept += 1;
                        Arc::clone(t)
                    }
                    None => {
                        changes.built += 1;
                        new
                    }
                }
            })
            .collect();
        changes.dropped = old.targets.len() - changes.kept;
        let present: std::collections::HashSet<(&'static str, String)> = targets
            .iter()
            .map(|t| (t.name(), t.target().to_owned()))
            .collect();
        sync::lock(&self.errors).retain(|k, _| present.contains(k));
        sync::lock(&self.last_failure).retain(|k, _| present.contains(k));
        *current = Arc::new(TargetSet {
            targets,
            fingerprints,
            default_timeout,
        });
        changes
    }

    /// Collects the target named `name` of collector `kind` once, outside any scrape, within
    /// `budget`: the leader lease must know its own server's role between scrapes, whoever
    /// scrapes. `None` when no such target is configured now (a reload removed it).
    pub async fn collect_one(
        &self,
        kind: &str,
        name: &str,
        budget: Duration,
    ) -> Option<(Result<(), CollectError>, SampleBuffer)> {
        let set = self.current();
        let target = set
            .targets
            .iter()
            .find(|t| t.name() == kind && t.target() == name)?;
        let (result, buffer, _) = run_target(target.clone(), Instant::now() + budget).await;
        Some((result, buffer))
    }

    /// Scrapes every target once. `scrape_timeout` is Prometheus' own timeout from the
    /// `X-Prometheus-Scrape-Timeout-Seconds` header. Never fails: failures become metrics.
    pub async fn scrape(&self, scrape_timeout: Option<Duration>) -> SampleBuffer {
        let set = self.current();
        let started = Instant::now();
        let deadline = |t: &Target| {
            started + target_budget(t.timeout().unwrap_or(set.default_timeout), scrape_timeout)
        };
        // Targets without a condition first, all at once; then those whose condition holds
        // in what the first ones wrote, within the same deadlines.
        let first: Vec<usize> = (0..set.targets.len())
            .filter(|&i| set.targets[i].active_when().is_none())
            .collect();
        let mut results: Vec<Option<Collected>> = (0..set.targets.len()).map(|_| None).collect();
        let runs = first.iter().map(|&i| {
            let t = Arc::clone(&set.targets[i]);
            run_target(t.clone(), deadline(&t))
        });
        for (i, r) in first.iter().zip(futures::future::join_all(runs).await) {
            results[*i] = Some(r);
        }
        let active: Vec<usize> = (0..set.targets.len())
            .filter(|&i| {
                set.targets[i].active_when().is_some_and(|cond| {
                    cond.holds(
                        set.targets
                            .iter()
                            .zip(&results)
                            .filter(|(t, _)| t.target() == cond.target)
                            .filter_map(|(_, r)| r.as_ref().map(|(_, buffer, _)| buffer)),
                    )
                })
            })
            .collect();
        let runs = active.iter().map(|&i| {
            let t = Arc::clone(&set.targets[i]);
            run_target(t.clone(), deadline(&t))
        });
        for (i, r) in active.iter().zip(futures::future::join_all(runs).await) {
            results[*i] = Some(r);
        }

        let mut out = SampleBuffer::new();
        declare_engine_families(&mut out);
        for (target, collected) in set.targets.iter().zip(results) {
            let labels = target_labels(target.as_ref());
            let mut own = SampleBuffer::with_common_labels(labels);
            if target.active_when().is_some() {
                let active = if collected.is_some() { 1.0 } else { 0.0 };
                own.gauge("clusterwatch_target_active", HELP_ACTIVE, &[], active);
            }
            // Inactive: not collected, so no up, duration or failure of its own.
            let Some((result, buffer, elapsed)) = collected else {
                out.merge(own);
                continue;
            };
            own.gauge(
                "clusterwatch_target_scrape_duration_seconds",
                HELP_DURATION,
                &[],
                elapsed.as_secs_f64(),
            );
            match result {
                Ok(()) => {
                    own.gauge("clusterwatch_target_up", HELP_UP, &[], 1.0);
                    out.merge(buffer);
                    self.note_success(target.as_ref());
                }
                Err(e) => {
                    own.gauge("clusterwatch_target_up", HELP_UP, &[], 0.0);
                    self.note_failure(target.as_ref(), &e);
                }
            }
            out.merge(own);
        }
        self.write_error_counters(&set.targets, &mut out);
        out
    }

    fn note_success(&self, t: &Target) {
        let mut last = sync::lock(&self.last_failure);
        let previous = last.remove(&(t.name(), t.target().to_owned()));
        if let Some(reason) = previous.and_then(|mut p| p.clear()) {
            tracing::info!(
                collector = t.name(),
                target = t.target(),
                previous_reason = reason,
                "target recovered"
            );
        }
    }

    fn note_failure(&self, t: &Target, e: &CollectError) {
        let reason = e.reason();
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            let mut errors = sync::lock(&self.errors);
            errors.entry((t.name(), t.target().to_owned())).or_default()[i] += 1;
        }
        let mut last = sync::lock(&self.last_failure);
        let logged = last.entry((t.name(), t.target().to_owned())).or_default();
        if logged.changed(reason) {
            tracing::warn!(collector = t.name(), target = t.target(), reason, error = %e, "target scrape failed");
        } else {
            tracing::debug!(collector = t.name(), target = t.target(), reason, error = %e, "target scrape failed again");
        }
    }

    fn write_error_counters(&self, targets: &[Arc<Target>], out: &mut SampleBuffer) {
        let errors = sync::lock(&self.errors);
        for t in targets {
            let counts = errors
                .get(&(t.name(), t.target().to_owned()))
                .copied()
                .unwrap_or_default();
            let mut labels = SampleBuffer::with_common_labels(target_labels(t.as_ref()));
            for (reason, count) in REASONS.iter().zip(counts) {
                labels.counter(
                    "clusterwatch_target_scrape_errors_total",
                    HELP_ERRORS,
                    &[("reason", reason)],
                    count as f64,
                );
            }
            out.merge(labels);
        }
    }
}

const HELP_ACTIVE: &str = "Whether the target's active_when condition held at this scrape (1) so it was collected, or not (0).";
const HELP_UP: &str = "Whether the last collection of the target succeeded (1) or failed (0).";
const HELP_DURATION: &str = "How long the last collection of the target took, in seconds.";
const HELP_ERRORS: &str = "Failed collections of the target, by short reason (timeout, connect, auth, permission, query, io, protocol, panic).";

fn declare_engine_families(out: &mut SampleBuffer) {
    out.declare("clusterwatch_target_active", HELP_ACTIVE, Kind::Gauge);
    out.declare("clusterwatch_target_up", HELP_UP, Kind::Gauge);
    out.declare(
        "clusterwatch_target_scrape_duration_seconds",
        HELP_DURATION,
        Kind::Gauge,
    );
    out.declare(
        "clusterwatch_target_scrape_errors_total",
        HELP_ERRORS,
        Kind::Counter,
    );
}

/// The labels every engine sample of a target carries: collector, target, (if set) cluster,
/// then the target's own `labels:` (their names never clash with the engine's: the
/// assembler refuses reserved names).
fn target_labels(t: &Target) -> Vec<Label> {
    let mut labels = identity_labels(t);
    labels.insert(0, (Cow::Borrowed("collector"), t.name().to_owned()));
    labels.extend(t.labels().iter().cloned());
    labels
}

/// Target and (if set) cluster: the first labels of every sample a collector writes.
fn identity_labels(t: &Target) -> Vec<Label> {
    let mut labels = vec![(Cow::Borrowed("target"), t.target().to_owned())];
    if let Some(c) = t.cluster() {
        labels.push((Cow::Borrowed("cluster"), c.to_owned()));
    }
    labels
}

/// One target's collection: its result, its samples (empty on failure), how long it took.
type Collected = (Result<(), CollectError>, SampleBuffer, Duration);

/// Runs one target in its own task so a collector that blocks or hangs cannot hold up the
/// others; past the deadline the task is aborted and the target reported down.
async fn run_target(target: Arc<Target>, deadline: Instant) -> Collected {
    let started = Instant::now();
    let ctx = ScrapeContext { deadline };
    // Collector samples carry target/cluster but not `collector`: the subsystem in the
    // metric name says that already. The target's own labels come last and give way to a
    // label of the same name the collector writes itself.
    let common = identity_labels(target.as_ref());
    let task = tokio::spawn(async move {
        let mut buf = SampleBuffer::with_common_labels(common);
        let r = target.collect(&ctx, &mut buf).await;
        buf.add_labels_where_absent(target.labels());
        (r, buf)
    });
    let abort = task.abort_handle();
    let outcome = match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok((r, buf))) => (r, buf),
        // The task is never cancelled but by the abort below, so a join error is a panic.
        Ok(Err(join_err)) => (
            Err(CollectError::Panic(panic_message(join_err))),
            SampleBuffer::new(),
        ),
        Err(_) => {
            abort.abort();
            (Err(CollectError::Timeout), SampleBuffer::new())
        }
    };
    let (result, buffer) = outcome;
    let buffer = if result.is_ok() {
        buffer
    } else {
        SampleBuffer::new()
    };
    (result, buffer, started.elapsed())
}

/// What a panicking collector said, for the log (its payload, when it is text).
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text payload".into()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleepy {
        sleep: Duration,
    }

    fn no_targets(_: Located, _: &SectionContext, _: &mut Vec<Problem>) -> Vec<Arc<Target>> {
        Vec::new()
    }

    const TEST: CollectorKind = CollectorKind {
        name: "test",
        section: "test",
        always_on: false,
        configure: no_targets,
    };

    fn sleepy(name: &str, sleep: Duration) -> Arc<Target> {
        Target::new(&TEST, TargetId::local(name), Sleepy { sleep })
    }

    #[async_trait]
    impl Collector for Sleepy {
        async fn collect(
            &self,
            _ctx: &ScrapeContext,
            out: &mut SampleBuffer,
        ) -> Result<(), CollectError> {
            out.gauge("clusterwatch_test_value", "A value.", &[], 1.0);
            tokio::time::sleep(self.sleep).await;
            Ok(())
        }
    }

    #[test]
    fn budget_is_capped_by_the_scrape_timeout_header() {
        let five = Duration::from_secs(5);
        assert_eq!(target_budget(five, None), five);
        assert_eq!(target_budget(five, Some(Duration::from_secs(10))), five);
        assert_eq!(
            target_budget(five, Some(Duration::from_secs(2))),
            Duration::from_millis(1500)
        );
        assert_eq!(
            target_budget(five, Some(Duration::from_millis(400))),
            Duration::from_millis(300)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_target_costs_its_deadline_and_is_down_while_others_report() {
        let fast = sleepy("fast", Duration::from_millis(10));
        let slow = sleepy("slow", Duration::from_secs(3600));
        let engine = Engine::new(vec![fast, slow], Duration::from_secs(1));
        let started = Instant::now();
        let out = engine.scrape(None).await;
        assert!(started.elapsed() < Duration::from_millis(1100));
        let up = out.get("clusterwatch_target_up").unwrap();
        let by_target: Vec<(String, f64)> = up
            .samples
            .iter()
            .map(|s| (s.labels[1].1.clone(), s.value))
            .collect();
        assert_eq!(by_target, vec![("fast".into(), 1.0), ("slow".into(), 0.0)]);
        // Only the healthy target's samples are kept.
        assert_eq!(out.get("clusterwatch_test_value").unwrap().samples.len(), 1);
        let errors = out.get("clusterwatch_target_scrape_errors_total").unwrap();
        assert_eq!(
            errors.samples.len(),
            2 * REASONS.len(),
            "every reason from the start"
        );
        let counted: Vec<(String, String, f64)> = errors
            .samples
            .iter()
            .filter(|s| s.value > 0.0)
            .map(|s| (s.labels[1].1.clone(), s.labels[2].1.clone(), s.value))
            .collect();
        assert_eq!(counted, vec![("slow".into(), "timeout".into(), 1.0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_unchanged_targets_and_their_error_counts() {
        let sleepy = |name: &str, sleep: u64| sleepy(name, Duration::from_millis(sleep));
        let (a, slow) = (sleepy("a", 10), sleepy("slow", 3_600_000));
        let engine = Engine::with_fingerprints(
            vec![a.clone(), slow.clone()],
            vec![Some(1), Some(2)],
            Duration::from_secs(1),
        );
        engine.scrape(None).await;

        // `a` unchanged, `slow` changed, `c` new, nothing without a fingerprint is ever kept.
        let changes = engine.replace_targets(
            vec![sleepy("a", 10), sleepy("slow", 3_600_000), sleepy("c", 10)],
            vec![Some(1), Some(3), None],
            Duration::from_secs(1),
        );
        assert_eq!(
            changes,
            TargetChanges {
                kept: 1,
                built: 2,
                dropped: 1
            }
        );
        let now = engine.targets();
        assert!(Arc::ptr_eq(&now[0], &a), "the running `a` is kept");
        assert!(
            !Arc::ptr_eq(&now[1], &slow),
            "the changed `slow` is rebuilt"
        );

        // Counters of a target still configured go on; a removed target's are forgotten.
        let out = engine.scrape(None).await;
        let timeouts = |out: &SampleBuffer, target: &str| {
            out.get("clusterwatch_target_scrape_errors_total")
                .unwrap()
                .samples
                .iter()
                .find(|s| s.labels[1].1 == target && s.labels[2].1 == "timeout")
                .map(|s| s.value)
        };
        assert_eq!(timeouts(&out, "slow"), Some(2.0));
        engine.replace_targets(vec![sleepy("a", 10)], vec![Some(1)], Duration::from_secs(1));
        engine.replace_targets(
            vec![sleepy("a", 10), sleepy("slow", 3_600_000)],
            vec![Some(1), Some(2)],
            Duration::from_secs(1),
        );
        let out = engine.scrape(None).await;
        assert_eq!(timeouts(&out, "slow"), Some(1.0));
    }

    struct Stateful;

    #[async_trait]
    impl Collector for Stateful {
        async fn collect(
            &self,
            _: &ScrapeContext,
            out: &mut SampleBuffer,
        ) -> Result<(), CollectError> {
            out.gauge(
                "clusterwatch_test_state",
                "A state.",
                &[("state", "ok")],
                1.0,
            );
            Ok(())
        }
    }

    #[tokio::test]
    async fn own_labels_reach_every_series_but_never_override_the_collectors() {
        let t = Target::new(&TEST, TargetId::local("t"), Stateful);
        t.set_labels(vec![
            ("page".into(), "no".into()),
            ("state".into(), "mine".into()),
        ]);
        let out = Engine::new(vec![t], Duration::from_secs(1))
            .scrape(None)
            .await;
        let labels_of = |family: &str| -> Vec<Vec<String>> {
            out.get(family)
                .unwrap()
                .samples
                .iter()
                .map(|s| s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .collect()
        };
        assert_eq!(
            labels_of("clusterwatch_test_state"),
            vec![vec!["target=t", "state=ok", "page=no"]],
            "the collector's `state` wins and is written once"
        );
        for family in [
            "clusterwatch_target_up",
            "clusterwatch_target_scrape_duration_seconds",
            "clusterwatch_target_scrape_errors_total",
        ] {
            for labels in labels_of(family) {
                assert!(
                    labels.contains(&"page=no".to_owned()),
                    "{family}: {labels:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_target_is_collected_only_while_its_condition_holds_in_the_same_scrape() {
        let when = |state: &str| ActiveWhen {
            target: "cond".into(),
            metric: Some("clusterwatch_test_state".into()),
            labels: vec![("state".into(), state.into())],
        };
        let (on, off) = (sleepy("on", Duration::ZERO), sleepy("off", Duration::ZERO));
        on.set_active_when(when("ok"));
        off.set_active_when(when("bad"));
        // Listed before the condition's target: the order of the file does not matter.
        let cond = Target::new(&TEST, TargetId::local("cond"), Stateful);
        let out = Engine::new(vec![on, off, cond], Duration::from_secs(1))
            .scrape(None)
            .await;
        let by_target = |family: &str| -> Vec<(String, f64)> {
            out.get(family)
                .map(|f| {
                    f.samples
                        .iter()
                        .map(|s| {
                            let target = s.labels.iter().find(|(k, _)| k == "target");
                            (target.unwrap().1.clone(), s.value)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            by_target("clusterwatch_target_active"),
            vec![("on".into(), 1.0), ("off".into(), 0.0)]
        );
        assert_eq!(
            by_target("clusterwatch_target_up"),
            vec![("on".into(), 1.0), ("cond".into(), 1.0)],
            "an inactive target has no up series"
        );
        assert_eq!(by_target("clusterwatch_test_value").len(), 1);
    }

    struct Panicky;

    #[async_trait]
    impl Collector for Panicky {
        async fn collect(
            &self,
            _: &ScrapeContext,
            _: &mut SampleBuffer,
        ) -> Result<(), CollectError> {
            panic!("index out of bounds");
        }
    }

    #[tokio::test]
    async fn a_collector_panic_is_reason_panic_not_protocol() {
        let engine = Engine::new(
            vec![Target::new(&TEST, TargetId::local("p"), Panicky)],
            Duration::from_secs(1),
        );
        let out = engine.scrape(None).await;
        let up = out.get("clusterwatch_target_up").unwrap();
        assert_eq!(up.samples[0].value, 0.0);
        let counted: Vec<&str> = out
            .get("clusterwatch_target_scrape_errors_total")
            .unwrap()
            .samples
            .iter()
            .filter(|s| s.value > 0.0)
            .map(|s| s.labels[2].1.as_str())
            .collect();
        assert_eq!(counted, vec!["panic"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_keeps_a_tenth_of_the_time_left_back_at_most_half_a_second() {
        let now = Instant::now();
        let ctx = |left| ScrapeContext {
            deadline: now + left,
        };
        let kept = |left| ctx(left).deadline - ctx(left).item_deadline();
        assert_eq!(kept(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(kept(Duration::from_secs(60)), Duration::from_millis(500));
        assert_eq!(kept(Duration::ZERO), Duration::ZERO);
    }
}
