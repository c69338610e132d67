//! The hook runner's own metrics: counters kept since start (bumped only through the methods
//! of [`Counters`]) and gauges read from the journal's state, written into the sample buffer
//! `/metrics` encodes. It counts; it decides nothing.

use std::collections::HashMap;

use super::config::HooksConfig;
use super::journal::{Event, RunResult};
use super::policy::{Context, State};
use crate::snapshot::SampleBuffer;

/// Notification outcomes, the `status` label of `clusterwatch_hook_notifications_total`.
pub const NOTIFICATION_STATUSES: &[&str] = &[
    "accepted",
    "unauthorized",
    "bad_request",
    "too_large",
    "error",
];

/// Run results, the `result` label of `clusterwatch_hook_runs_total`.
pub const RUN_RESULTS: &[&str] = &["ok", "failed", "timeout", "error"];

/// Skip reasons, the `reason` label of `clusterwatch_hook_skips_total`.
pub const SKIP_REASONS: &[&str] = &[
    "deduped",
    "cooldown",
    "budget",
    "storm_breaker",
    "not_candidate",
    "kill_switch",
    "dry_run",
    "validate_failed",
    "abandoned",
    "lock_held_elsewhere",
    "lock_unavailable",
    "lease_held",
    "lease_unavailable",
    "journal_damaged",
];

/// Lock outcomes, the `result` label of `clusterwatch_hook_lock_total`.
pub const LOCK_RESULTS: &[&str] = &["acquired", "held_elsewhere", "unavailable", "lost"];

/// Counters since the process started, and the gauges only the runner knows.
#[derive(Default)]
pub(super) struct Counters {
    notifications: HashMap<&'static str, u64>,
    runs: HashMap<(String, &'static str), u64>,
    skips: HashMap<(String, &'static str), u64>,
    lock: HashMap<(String, &'static str), u64>,
    in_flight: HashMap<String, i64>,
    last_duration: HashMap<String, f64>,
    labels_dropped: HashMap<String, u64>,
    unmatched: u64,
}

impl Counters {
    /// A notification answered with `status` (one of `NOTIFICATION_STATUSES`).
    pub(super) fn notification(&mut self, status: &'static str) {
        *self.notifications.entry(status).or_default() += 1;
    }

    /// A matching alert that did not run `hook`, for `reason` (one of `SKIP_REASONS`).
    pub(super) fn skip(&mut self, hook: &str, reason: &'static str) {
        *self.skips.entry((hook.to_owned(), reason)).or_default() += 1;
    }

    /// The skips among a notification's decisions.
    pub(super) fn decided(&mut self, event: &Event) {
        let skip = match event {
            Event::Deduped { hook, .. } => Some((hook, "deduped")),
            Event::CooldownSkipped { hook, .. } => Some((hook, "cooldown")),
            Event::BudgetSkipped { hook, .. } => Some((hook, "budget")),
            Event::StormBreaker { hook, .. } => Some((hook, "storm_breaker")),
            Event::NotCandidate { hook, .. } => Some((hook, "not_candidate")),
            Event::KillSwitch { hook, .. } => Some((hook, "kill_switch")),
            Event::DryRun { hook, .. } => Some((hook, "dry_run")),
            Event::JournalDamaged { hook, .. } => Some((hook, "journal_damaged")),
            _ => None,
        };
        if let Some((hook, reason)) = skip {
            self.skip(hook, reason);
        }
        if let Event::Unmatched { alerts, .. } = event {
            self.unmatched += *alerts as u64;
        }
    }

    /// A lock outcome (one of `LOCK_RESULTS`).
    pub(super) fn lock(&mut self, hook: &str, result: &'static str) {
        *self.lock.entry((hook.to_owned(), result)).or_default() += 1;
    }

    /// An attempt of `hook` started.
    pub(super) fn started(&mut self, hook: &str) {
        *self.in_flight.entry(hook.to_owned()).or_default() += 1;
    }

    /// Labels left out of a hook process's environment.
    pub(super) fn labels_dropped(&mut self, hook: &str, n: usize) {
        if n > 0 {
            *self.labels_dropped.entry(hook.to_owned()).or_default() += n as u64;
        }
    }

    /// An attempt ended; a retry is not a finished run.
    pub(super) fn finished(&mut self, hook: &str, result: RunResult, seconds: f64) {
        *self.in_flight.entry(hook.to_owned()).or_default() -= 1;
        self.last_duration.insert(hook.to_owned(), seconds);
        if result != RunResult::Retry {
            *self
                .runs
                .entry((hook.to_owned(), result.as_str()))
                .or_default() += 1;
        }
    }
}

/// Writes the `clusterwatch_hook_*` families: every hook × result/reason series exists from
/// the start, at 0, so `increase()` sees the first failure.
pub(super) fn write(
    cfg: &HooksConfig,
    c: &Counters,
    state: &State,
    ctx: Context,
    out: &mut SampleBuffer,
) {
    let t = ctx.now;
    for status in NOTIFICATION_STATUSES {
        out.counter(
                "clusterwatch_hook_notifications_total",
                "Webhook notifications by outcome (accepted, unauthorized, bad_request, too_large, error).",
                &[("status", status)],
                c.notifications.get(status).copied().unwrap_or(0) as f64,
            );
    }
    out.counter(
        "clusterwatch_hook_unmatched_alerts_total",
        "Firing alerts received that matched no hook rule (their names are journaled as `unmatched`).",
        &[],
        c.unmatched as f64,
    );
    let kill = ctx.kill_switch;
    out.gauge(
        "clusterwatch_hook_kill_switch_active",
        "1 while the kill-switch file exists: no hook runs.",
        &[],
        if kill { 1.0 } else { 0.0 },
    );
    out.gauge(
        "clusterwatch_hook_dry_run",
        "1 when global dry run is on.",
        &[],
        if cfg.dry_run { 1.0 } else { 0.0 },
    );
    out.gauge(
        "clusterwatch_hook_disruptive_runs_last_hour",
        "Disruptive runs accepted in the last hour, over all hooks.",
        &[],
        state.disruptive_last_hour(t) as f64,
    );
    out.gauge(
        "clusterwatch_hook_disruptive_runs_last_hour_max_group",
        "The most disruptive runs one hook had for one replication group in the last hour (what the budget applies to).",
        &[],
        state.disruptive_max_group(t) as f64,
    );
    out.gauge(
        "clusterwatch_hook_storm_breaker_active",
        "1 while the storm breaker holds: no disruptive run starts.",
        &[],
        if state.storm_active(t) { 1.0 } else { 0.0 },
    );
    out.gauge(
        "clusterwatch_hook_max_disruptive_per_hour",
        "The configured hourly budget of disruptive runs, per hook and replication group.",
        &[],
        cfg.max_disruptive_per_hour as f64,
    );
    for rule in &cfg.rules {
        let hook = rule.name.as_str();
        let per_hook = [
            (
                "clusterwatch_hook_runs_total",
                "Finished hook runs by result (ok, failed, timeout, error); retries count once.",
                "result",
                RUN_RESULTS,
                &c.runs,
            ),
            (
                "clusterwatch_hook_skips_total",
                "Matching alerts that did not run the hook, by reason.",
                "reason",
                SKIP_REASONS,
                &c.skips,
            ),
        ];
        for (name, help, label, values, counts) in per_hook {
            for v in values {
                let n = counts.get(&(hook.to_owned(), *v)).copied().unwrap_or(0);
                out.counter(name, help, &[("hook", hook), (label, v)], n as f64);
            }
        }
        // Only disruptive runs take the lock, and only with `hooks.lock` set.
        if rule.disruptive && cfg.lock.is_some() {
            for result in LOCK_RESULTS {
                let n = c
                    .lock
                    .get(&(hook.to_owned(), *result))
                    .copied()
                    .unwrap_or(0);
                out.counter(
                    "clusterwatch_hook_lock_total",
                    "Cluster-wide lock outcomes of disruptive runs (acquired, held_elsewhere, unavailable, lost).",
                    &[("hook", hook), ("result", result)],
                    n as f64,
                );
            }
        }
        out.counter(
            "clusterwatch_hook_env_labels_dropped_total",
            "Alert labels left out of a hook's environment because all labels together passed the environment budget.",
            &[("hook", hook)],
            c.labels_dropped.get(hook).copied().unwrap_or(0) as f64,
        );
        out.gauge(
            "clusterwatch_hook_runs_in_flight",
            "Hook processes running now.",
            &[("hook", hook)],
            c.in_flight.get(hook).copied().unwrap_or(0) as f64,
        );
        if let Some(d) = c.last_duration.get(hook) {
            out.gauge(
                "clusterwatch_hook_last_run_duration_seconds",
                "Duration of the hook's last attempt.",
                &[("hook", hook)],
                *d,
            );
        }
        if let Some(ts) = state.last_success(hook) {
            out.gauge(
                "clusterwatch_hook_last_success_timestamp_seconds",
                "Unix time of the hook's last successful attempt (from the journal).",
                &[("hook", hook)],
                ts,
            );
        }
        out.gauge(
                "clusterwatch_hook_journal_unknown_runs",
                "Runs of this hook interrupted by a stop or crash in the last 24 hours: their effect is unknown.",
                &[("hook", hook), ("disruptive", if rule.disruptive { "true" } else { "false" })],
                state.unknown_runs(hook, t) as f64,
            );
    }
}
