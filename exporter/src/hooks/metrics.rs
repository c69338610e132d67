//! The hook runner's own metrics: counters kept since start and gauges read from the journal's
//! state, written into the sample buffer `/metrics` encodes. It counts; it decides nothing.

use std::collections::HashMap;

use super::config::HooksConfig;
use super::policy::{Context, State};
use super::{LOCK_RESULTS, NOTIFICATION_STATUSES, RUN_RESULTS, SKIP_REASONS};
use crate::snapshot::SampleBuffer;

/// Counters since the process started, and the gauges only the runner knows.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) notifications: HashMap<&'static str, u64>,
    pub(super) runs: HashMap<(String, &'static str), u64>,
    pub(super) skips: HashMap<(String, &'static str), u64>,
    pub(super) lock: HashMap<(String, &'static str), u64>,
    pub(super) in_flight: HashMap<String, i64>,
    pub(super) last_duration: HashMap<String, f64>,
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
        "clusterwatch_hook_max_disruptive_per_hour",
        "The configured hourly budget of disruptive runs.",
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
