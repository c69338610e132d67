//! The webhook receiver and hook runner: one [`Hooks`] value holds the configuration, the
//! journal, the decision state and the counters; `receiver` serves HTTP, `policy` decides,
//! `runner` runs processes, `journal` stores records. Nothing here runs inside a request.

pub mod config;
pub mod journal;
pub mod lock;
mod metrics;
pub mod payload;
pub mod policy;
pub mod receiver;
pub mod runner;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::snapshot::SampleBuffer;
use config::{HookRule, HooksConfig};
use journal::{AlertRef, Event, Journal, JournalError, Record};
use metrics::Counters;
use payload::{Notification, PayloadError};
use policy::{Context, State};
use runner::{Exit, Spec};

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
    "kill_switch",
    "dry_run",
    "validate_failed",
    "abandoned",
    "lock_held_elsewhere",
    "lock_unavailable",
];

/// Lock outcomes, the `result` label of `clusterwatch_hook_lock_total`.
pub const LOCK_RESULTS: &[&str] = &["acquired", "held_elsewhere", "unavailable", "lost"];

/// Longest wait between retries of a hook that exits 1.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a notification was not accepted. Each maps to one HTTP status in `receiver`.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Missing or wrong credentials.
    #[error("unauthorized")]
    Unauthorized,
    /// Body over `max_body_bytes`.
    #[error("request body too large")]
    TooLarge,
    /// Not a webhook v4 notification.
    #[error(transparent)]
    BadRequest(#[from] PayloadError),
    /// The journal could not record it; Alertmanager should retry.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl HookError {
    /// The `status` label value.
    pub fn status(&self) -> &'static str {
        match self {
            HookError::Unauthorized => "unauthorized",
            HookError::TooLarge => "too_large",
            HookError::BadRequest(_) => "bad_request",
            HookError::Journal(_) => "error",
        }
    }
}

/// Asked before a disruptive run starts: the seam for the cluster-wide lock (`lock::EtcdLock`),
/// so that with several receivers one of them acts. The default allows every run.
#[async_trait]
pub trait RunGate: Send + Sync + 'static {
    /// `Ok(pass)` to go ahead (the pass is held until the run ends), `Err` to not run.
    async fn acquire(&self, hook: &str, run: u64, alert: &AlertRef) -> Result<Pass, Refusal>;
}

/// Leave to run, held for the whole run (all attempts).
pub struct Pass {
    /// Passed to the hook as `CW_FENCING_TOKEN`: grows with every claim, so the system the
    /// hook acts on can refuse an older holder.
    pub fencing_token: Option<u64>,
    /// The lock's key, for the journal.
    pub key: Option<String>,
    /// Fires with the reason if the lock is lost while the run goes on.
    pub lost: Option<tokio::sync::oneshot::Receiver<String>>,
    /// Dropped when the run ends: releases the lock.
    pub guard: Box<dyn Send>,
}

/// Why a disruptive run may not start.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another receiver claimed this incident (who).
    HeldElsewhere(String),
    /// The lock could not be asked (what failed); never "run anyway".
    Unavailable(String),
}

/// The gate of a single receiver: always open.
pub struct LocalGate;

#[async_trait]
impl RunGate for LocalGate {
    async fn acquire(&self, _hook: &str, _run: u64, _alert: &AlertRef) -> Result<Pass, Refusal> {
        Ok(Pass {
            fencing_token: None,
            key: None,
            lost: None,
            guard: Box::new(()),
        })
    }
}

/// What the handler answers for an accepted notification.
#[derive(Debug, serde::Serialize)]
pub struct Receipt {
    /// Alerts in the notification.
    pub alerts: usize,
    /// Hook runs started for it.
    pub runs: usize,
}

/// The receiver and runner: configuration, journal, decision state and counters.
pub struct Hooks {
    /// Swapped whole by a reload; a decision and the runs it starts keep the one they saw.
    cfg: RwLock<Arc<HooksConfig>>,
    journal: Journal,
    state: Mutex<State>,
    counters: Mutex<Counters>,
    slots: Semaphore,
    gate: Box<dyn RunGate>,
}

/// Unix time now, in seconds.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Hooks {
    /// Opens the journal, replays it, records runs a previous process left open (`unknown`
    /// or `abandoned`), and re-queues interrupted non-disruptive runs that opted in.
    pub async fn start(cfg: HooksConfig, gate: Box<dyn RunGate>) -> anyhow::Result<Arc<Hooks>> {
        let (journal, records) = Journal::open(&cfg.state_dir)?;
        let mut state = State::replay(&records);
        let interrupted = state.interrupted(now());
        let found: Vec<Record> = interrupted.iter().map(|(r, _)| r.clone()).collect();
        for r in &found {
            state.apply(r);
            if let Event::Unknown { run, hook } = &r.event {
                tracing::warn!(run, hook = %hook, "a hook run was interrupted by a stop or crash; its effect is unknown and it will not be re-run");
            }
        }
        journal.append(&found).await?;
        let hooks = Arc::new(Hooks {
            slots: Semaphore::new(cfg.max_concurrent_runs),
            cfg: RwLock::new(Arc::new(cfg)),
            journal,
            state: Mutex::new(state),
            counters: Mutex::new(Counters::default()),
            gate,
        });
        let cfg = hooks.config();
        for (r, open) in interrupted {
            let Event::Unknown { .. } = r.event else {
                continue;
            };
            let Some(ri) = cfg.rules.iter().position(|x| x.name == open.hook) else {
                continue;
            };
            if open.disruptive || !cfg.rules[ri].rerun_after_crash {
                continue;
            }
            hooks.rerun(cfg.clone(), ri, open).await;
        }
        Ok(hooks)
    }

    /// The checked configuration in force now.
    pub fn config(&self) -> Arc<HooksConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks that `new` can replace the running configuration: what the process opened or
    /// bound at start (listener, journal, lock, run slots) cannot change without a restart.
    pub fn check_reconfigure(&self, new: &HooksConfig) -> Result<(), String> {
        let old = self.config();
        let fixed = [
            ("hooks.listen", old.listen != new.listen),
            ("hooks.state_dir", old.state_dir != new.state_dir),
            (
                "hooks.max_concurrent_runs",
                old.max_concurrent_runs != new.max_concurrent_runs,
            ),
            (
                "hooks.lock",
                old.lock.as_ref().map(lock::LockConfig::identity)
                    != new.lock.as_ref().map(lock::LockConfig::identity),
            ),
            // The listener was started plain or with TLS; its file's content can change.
            (
                "hooks.web_config_file (added or removed)",
                old.web.is_some() != new.web.is_some(),
            ),
        ];
        let changed: Vec<&str> = fixed
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let changed = changed.join(", ");
        Err(format!(
            "{changed} cannot change while clusterwatch runs; restart it to apply (the running configuration is kept)"
        ))
    }

    /// Puts a configuration checked by [`Hooks::check_reconfigure`] in force for the next
    /// notification; runs already decided finish under the one they started with.
    pub fn reconfigure(&self, new: HooksConfig) {
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    fn context(&self) -> Context {
        context(&self.config())
    }

    fn payload_path(&self, notification: u64) -> PathBuf {
        self.config()
            .state_dir
            .join("payloads")
            .join(format!("{notification}.json"))
    }

    /// Counts a refused notification.
    pub fn count_rejected(&self, e: &HookError) {
        *self
            .counters
            .lock()
            .unwrap()
            .notifications
            .entry(e.status())
            .or_default() += 1;
    }

    /// Decides a notification, journals every decision durably, then starts the accepted
    /// runs in the background. Returns once the journal is on disk.
    pub async fn receive(self: &Arc<Self>, body: bytes::Bytes) -> Result<Receipt, HookError> {
        let n = payload::decode(&body)?;
        let cfg = self.config();
        let ctx = context(&cfg);
        let (records, planned) = {
            let mut state = self.state.lock().unwrap();
            policy::plan(&mut state, &cfg.rules, &n, &ctx)
        };
        let Some(Record {
            event: Event::Received { notification, .. },
            ..
        }) = records.first()
        else {
            unreachable!("plan always starts with `received`");
        };
        let notification = *notification;
        if let Err(e) = self
            .store(notification, &body, &records, !planned.is_empty())
            .await
        {
            // Alertmanager will retry after the 500: give the accepted runs back, so the retry
            // is decided afresh instead of being taken for a repeat of a run that never came.
            let mut state = self.state.lock().unwrap();
            for p in &planned {
                state.apply(&Record {
                    ts: ctx.now,
                    event: Event::Abandoned {
                        run: p.run,
                        hook: cfg.rules[p.rule].name.clone(),
                        reason: "not stored".into(),
                    },
                });
            }
            return Err(e.into());
        }
        {
            let mut c = self.counters.lock().unwrap();
            *c.notifications.entry("accepted").or_default() += 1;
            for r in &records {
                if let Some((hook, reason)) = skip_of(&r.event) {
                    *c.skips.entry((hook.to_owned(), reason)).or_default() += 1;
                }
            }
        }
        let receipt = Receipt {
            alerts: n.alerts.len(),
            runs: planned.len(),
        };
        let body = Arc::new(body.to_vec());
        for p in planned {
            let hooks = self.clone();
            let alert = n.alerts[p.alert].clone();
            let body = body.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                hooks
                    .execute(&cfg, p.rule, p.run, notification, &alert, body)
                    .await;
            });
        }
        Ok(receipt)
    }

    /// Makes a notification's decisions durable: the payload file first when runs will need
    /// it (CW_PAYLOAD_FILE, a re-run after a crash), then the journal records.
    async fn store(
        &self,
        notification: u64,
        body: &bytes::Bytes,
        records: &[Record],
        with_payload: bool,
    ) -> Result<(), JournalError> {
        if with_payload {
            let path = self.payload_path(notification);
            let (at, body) = (path.clone(), body.clone());
            tokio::task::spawn_blocking(move || write_durably(&at, &body))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| JournalError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        self.journal.append(records).await
    }

    async fn rerun(self: &Arc<Self>, cfg: Arc<HooksConfig>, rule: usize, open: policy::OpenRun) {
        let Ok(body) = std::fs::read(self.payload_path(open.notification)) else {
            tracing::warn!(hook = %open.hook, "cannot re-run: its payload file is gone");
            return;
        };
        let Ok(n) = serde_json::from_slice::<Notification>(&body) else {
            return;
        };
        let Some(alert) = n
            .alerts
            .iter()
            .find(|a| policy::alert_ref(a) == open.alert)
            .cloned()
        else {
            return;
        };
        let run = self.state.lock().unwrap().next_run();
        let matched = Record {
            ts: now(),
            event: Event::Matched {
                run,
                hook: open.hook.clone(),
                alert: open.alert,
                disruptive: false,
                notification: open.notification,
            },
        };
        if self.commit(vec![matched]).await.is_err() {
            return;
        }
        tracing::info!(hook = %open.hook, run, "re-running an interrupted non-disruptive hook");
        let hooks = self.clone();
        let notification = open.notification;
        tokio::spawn(async move {
            hooks
                .execute(&cfg, rule, run, notification, &alert, Arc::new(body))
                .await;
        });
    }

    /// Applies records to the state and journals them.
    async fn commit(&self, records: Vec<Record>) -> Result<(), JournalError> {
        {
            let mut state = self.state.lock().unwrap();
            for r in &records {
                state.apply(r);
            }
        }
        let result = self.journal.append(&records).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot journal a hook decision");
        }
        result
    }

    fn env(
        &self,
        rule: &HookRule,
        run: u64,
        attempt: u32,
        notification: u64,
        alert: &payload::Alert,
        fencing_token: Option<u64>,
    ) -> Vec<(String, String)> {
        let mut env = vec![
            ("PATH".to_owned(), runner::HOOK_PATH.to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("CW_HOOK".to_owned(), rule.name.clone()),
            ("CW_RUN".to_owned(), run.to_string()),
            ("CW_ATTEMPT".to_owned(), attempt.to_string()),
            (
                "CW_ALERT_STATUS".to_owned(),
                alert.status.as_str().to_owned(),
            ),
            ("CW_ALERT_FINGERPRINT".to_owned(), alert.fingerprint.clone()),
            ("CW_ALERT_STARTS_AT".to_owned(), alert.starts_at.clone()),
            (
                "CW_PAYLOAD_FILE".to_owned(),
                self.payload_path(notification).display().to_string(),
            ),
        ];
        if let Some(t) = fencing_token {
            env.push(("CW_FENCING_TOKEN".to_owned(), t.to_string()));
        }
        env.extend(rule.env.iter().cloned());
        env.extend(runner::label_env(&alert.labels));
        env
    }

    /// One accepted run: validation, the gate for disruptive runs, attempts with backoff.
    async fn execute(
        self: Arc<Self>,
        cfg: &HooksConfig,
        ri: usize,
        run: u64,
        notification: u64,
        alert: &payload::Alert,
        body: Arc<Vec<u8>>,
    ) {
        let rule = &cfg.rules[ri];
        let hook = rule.name.clone();
        let Ok(_slot) = self.slots.acquire().await else {
            return;
        };

        if let Some(validate) = &rule.validate {
            let o = runner::run(Spec {
                argv: validate,
                env: self.env(rule, run, 0, notification, alert, None),
                stdin: body.clone(),
                timeout: rule.timeout,
                grace: cfg.kill_grace,
            })
            .await;
            if o.exit != Exit::Code(0) {
                tracing::warn!(hook = %hook, run, outcome = %o.exit, "hook validation failed; not running it");
                self.skip(&hook, "validate_failed");
                let _ = self
                    .commit(vec![Record {
                        ts: now(),
                        event: Event::ValidateFailed {
                            run,
                            hook: hook.clone(),
                            outcome: o.exit.to_string(),
                            stderr_tail: o.stderr_tail,
                        },
                    }])
                    .await;
                return;
            }
        }
        let (_pass, _watch) = if rule.disruptive {
            match self.lock(&hook, run, alert).await {
                Some(held) => held,
                None => return,
            }
        } else {
            (None, None)
        };
        let token = _pass.as_ref().and_then(|p| p.fencing_token);

        let mut attempt = 1;
        loop {
            if self.context().kill_switch {
                self.abandon(&hook, run, "kill switch".into()).await;
                return;
            }
            let started = Record {
                ts: now(),
                event: Event::Started {
                    run,
                    hook: hook.clone(),
                    attempt,
                },
            };
            // Journal first: if the record cannot be written, the hook must not act.
            if self.commit(vec![started]).await.is_err() {
                return;
            }
            tracing::info!(hook = %hook, run, attempt, "hook started");
            *self
                .counters
                .lock()
                .unwrap()
                .in_flight
                .entry(hook.clone())
                .or_default() += 1;
            let o = runner::run(Spec {
                argv: &rule.command,
                env: self.env(rule, run, attempt, notification, alert, token),
                stdin: body.clone(),
                timeout: rule.timeout,
                grace: cfg.kill_grace,
            })
            .await;
            let retry = o.exit == Exit::Code(1) && attempt <= rule.retries;
            let result = match &o.exit {
                Exit::Code(0) => "ok",
                _ if retry => "retry",
                Exit::Code(_) | Exit::Signal(_) => "failed",
                Exit::Timeout => "timeout",
                Exit::SpawnFailed(_) => "error",
            };
            {
                let mut c = self.counters.lock().unwrap();
                *c.in_flight.entry(hook.clone()).or_default() -= 1;
                c.last_duration
                    .insert(hook.clone(), o.duration.as_secs_f64());
                if !retry {
                    *c.runs.entry((hook.clone(), result)).or_default() += 1;
                }
            }
            tracing::info!(hook = %hook, run, attempt, result, outcome = %o.exit, seconds = o.duration.as_secs_f64(), "hook finished");
            let exit_code = match o.exit {
                Exit::Code(c) => Some(c),
                _ => None,
            };
            let finished = Record {
                ts: now(),
                event: Event::Finished {
                    run,
                    hook: hook.clone(),
                    attempt,
                    result: result.to_owned(),
                    exit_code,
                    duration_seconds: o.duration.as_secs_f64(),
                    stdout_tail: o.stdout_tail,
                    stderr_tail: o.stderr_tail,
                },
            };
            let _ = self.commit(vec![finished]).await;
            if !retry {
                return;
            }
            let backoff = rule
                .retry_backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }

    /// Takes the gate for a disruptive run and journals the outcome. `None`: do not run.
    /// Otherwise the pass and a task that journals `lock_lost` if the lock goes mid-run.
    async fn lock(
        self: &Arc<Self>,
        hook: &str,
        run: u64,
        alert: &payload::Alert,
    ) -> Option<(Option<Pass>, Option<AbortOnDrop>)> {
        let (hook, ts) = (hook.to_owned(), now());
        let refused = |reason: &'static str, event: Event| {
            self.skip(&hook, reason);
            Record { ts, event }
        };
        let (record, pass) = match self
            .gate
            .acquire(&hook, run, &policy::alert_ref(alert))
            .await
        {
            Ok(pass) => {
                if pass.key.is_none() {
                    return Some((Some(pass), None));
                }
                let event = Event::LockAcquired {
                    run,
                    hook: hook.clone(),
                    key: pass.key.clone().unwrap_or_default(),
                    fencing_token: pass.fencing_token,
                };
                (Record { ts, event }, Some(pass))
            }
            Err(Refusal::HeldElsewhere(owner)) => {
                tracing::info!(hook = %hook, run, owner = %owner, "another receiver holds this incident; not running it here");
                let event = Event::LockHeldElsewhere {
                    run,
                    hook: hook.clone(),
                    owner,
                };
                (refused("lock_held_elsewhere", event), None)
            }
            Err(Refusal::Unavailable(error)) => {
                tracing::error!(hook = %hook, run, error = %error, "cannot take the hook lock; the disruptive run does not start");
                let event = Event::LockUnavailable {
                    run,
                    hook: hook.clone(),
                    error,
                };
                (refused("lock_unavailable", event), None)
            }
        };
        let result = match &record.event {
            Event::LockAcquired { .. } => "acquired",
            Event::LockHeldElsewhere { .. } => "held_elsewhere",
            _ => "unavailable",
        };
        self.count_lock(&hook, result);
        // Journal first: a run whose lock is not on record must not act.
        if self.commit(vec![record]).await.is_err() {
            return None;
        }
        let mut pass = pass?;
        let watch = pass.lost.take().map(|lost| {
            let hooks = self.clone();
            AbortOnDrop(tokio::spawn(async move {
                let Ok(error) = lost.await else { return };
                tracing::error!(hook = %hook, run, error = %error, "the hook lock was lost while the hook runs; it is left to finish");
                hooks.count_lock(&hook, "lost");
                let event = Event::LockLost { run, hook, error };
                let _ = hooks.commit(vec![Record { ts: now(), event }]).await;
            }))
        });
        Some((Some(pass), watch))
    }

    fn count_lock(&self, hook: &str, result: &'static str) {
        *self
            .counters
            .lock()
            .unwrap()
            .lock
            .entry((hook.to_owned(), result))
            .or_default() += 1;
    }

    async fn abandon(&self, hook: &str, run: u64, reason: String) {
        tracing::warn!(hook, run, reason = %reason, "hook run abandoned before it started");
        self.skip(hook, "abandoned");
        let _ = self
            .commit(vec![Record {
                ts: now(),
                event: Event::Abandoned {
                    run,
                    hook: hook.to_owned(),
                    reason,
                },
            }])
            .await;
    }

    fn skip(&self, hook: &str, reason: &'static str) {
        *self
            .counters
            .lock()
            .unwrap()
            .skips
            .entry((hook.to_owned(), reason))
            .or_default() += 1;
    }

    /// Writes the `clusterwatch_hook_*` families.
    pub fn write_metrics(&self, out: &mut SampleBuffer) {
        let c = self.counters.lock().unwrap();
        let state = self.state.lock().unwrap();
        let cfg = self.config();
        metrics::write(&cfg, &c, &state, context(&cfg), out);
    }

    /// For a service stop: no accepted run takes a slot from now on (it stays in the journal
    /// as accepted, not started), and this waits until every run holding a slot has ended or
    /// `limit` has passed. Returns how many runs were still going then.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.slots.close();
        let total = self.config().max_concurrent_runs;
        let deadline = tokio::time::Instant::now().checked_add(limit);
        loop {
            let running = total.saturating_sub(self.slots.available_permits());
            let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if running == 0 || late {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The outside facts for a decision now: the clock and the kill-switch file.
fn context(cfg: &HooksConfig) -> Context {
    Context {
        now: now(),
        kill_switch: cfg.kill_switch_file.as_ref().is_some_and(|p| p.exists()),
        dry_run: cfg.dry_run,
        max_disruptive_per_hour: cfg.max_disruptive_per_hour,
    }
}

fn skip_of(e: &Event) -> Option<(&str, &'static str)> {
    match e {
        Event::Deduped { hook, .. } => Some((hook, "deduped")),
        Event::CooldownSkipped { hook, .. } => Some((hook, "cooldown")),
        Event::BudgetSkipped { hook, .. } => Some((hook, "budget")),
        Event::KillSwitch { hook, .. } => Some((hook, "kill_switch")),
        Event::DryRun { hook, .. } => Some((hook, "dry_run")),
        _ => None,
    }
}

fn write_durably(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(body)?;
    f.sync_data()
}

/// `clusterwatch hooks replay`: the decisions for `body` against the current journal, as
/// lines, without journaling or running anything.
pub fn replay(cfg: &HooksConfig, body: &[u8]) -> Result<Vec<String>, String> {
    let n = payload::decode(body).map_err(|e| e.to_string())?;
    let records =
        journal::read(&cfg.state_dir).map_err(|e| format!("cannot read the journal: {e}"))?;
    let mut state = State::replay(&records);
    let (decided, _) = policy::plan(&mut state, &cfg.rules, &n, &context(cfg));
    let mut lines: Vec<String> = decided.iter().skip(1).map(journal::render).collect();
    if lines.is_empty() {
        lines.push("no hook matches any alert of this notification".into());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::hooks::payload::tests::body;
    use crate::hooks::policy::tests::rule;

    fn config(dir: &std::path::Path, rules: Vec<HookRule>) -> HooksConfig {
        HooksConfig {
            listen: config::Listen::Main,
            auth: config::Auth::Bearer(Secret::new("t")),
            state_dir: dir.to_path_buf(),
            max_body_bytes: 1 << 20,
            max_disruptive_per_hour: 5,
            kill_switch_file: Some(dir.join("stop")),
            dry_run: false,
            max_concurrent_runs: 2,
            kill_grace: Duration::from_millis(100),
            rules,
            lock: None,
            web: None,
        }
    }

    fn alert_body(fp: &str) -> bytes::Bytes {
        body("firing", r#"{"alertname":"NoPrimary"}"#, fp, "t0").into()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn events(dir: &std::path::Path) -> Vec<Event> {
        journal::read(dir)
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }

    #[tokio::test]
    async fn exit_1_is_retried_then_succeeds_and_exit_2_is_not() {
        let dir = tempfile::tempdir().unwrap();
        // Fails with 1 on the first attempt, succeeds on the second.
        let flaky = dir.path().join("flaky");
        let mut r = rule("flaky", false, 0);
        r.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "[ -e {m} ] && exit 0; touch {m}; exit 1",
                m = flaky.display()
            ),
        ];
        r.retries = 3;
        r.retry_backoff = Duration::from_millis(10);
        let mut hard = rule("hard", false, 0);
        hard.command = vec!["/bin/sh".into(), "-c".into(), "exit 2".into()];
        hard.retries = 3;
        let hooks = Hooks::start(config(dir.path(), vec![r, hard]), Box::new(LocalGate))
            .await
            .unwrap();
        let receipt = hooks.receive(alert_body("f1")).await.unwrap();
        assert_eq!(receipt.runs, 2);
        let finished = |d: &std::path::Path| {
            events(d)
                .into_iter()
                .filter_map(|e| match e {
                    Event::Finished {
                        hook,
                        attempt,
                        result,
                        ..
                    } => Some((hook, attempt, result)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        until("both runs to end", || {
            finished(dir.path())
                .iter()
                .filter(|f| f.2 != "retry")
                .count()
                == 2
        })
        .await;
        let mut f = finished(dir.path());
        f.sort();
        assert_eq!(
            f,
            vec![
                ("flaky".into(), 1, "retry".into()),
                ("flaky".into(), 2, "ok".into()),
                ("hard".into(), 1, "failed".into()),
            ]
        );
    }

    #[tokio::test]
    async fn a_notification_that_could_not_be_stored_is_decided_afresh_on_retry() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the payload directory should be: storing the payload fails.
        std::fs::write(dir.path().join("payloads"), "").unwrap();
        let hooks = Hooks::start(
            config(dir.path(), vec![rule("promote", true, 3600)]),
            Box::new(LocalGate),
        )
        .await
        .unwrap();
        let err = hooks.receive(alert_body("f1")).await.unwrap_err();
        assert_eq!(err.status(), "error");
        std::fs::remove_file(dir.path().join("payloads")).unwrap();
        // Alertmanager's retry: not a repeat, not in cooldown, not over budget.
        assert_eq!(hooks.receive(alert_body("f1")).await.unwrap().runs, 1);
    }

    #[tokio::test]
    async fn cooldown_and_kill_switch_survive_a_restart_and_replay_shows_the_decision() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = Hooks::start(
            config(dir.path(), vec![rule("promote", true, 3600)]),
            Box::new(LocalGate),
        )
        .await
        .unwrap();
        assert_eq!(hooks.receive(alert_body("f1")).await.unwrap().runs, 1);
        until("the run to finish", || {
            events(dir.path())
                .iter()
                .any(|e| matches!(e, Event::Finished { .. }))
        })
        .await;
        drop(hooks);

        let cfg = config(dir.path(), vec![rule("promote", true, 3600)]);
        let before = events(dir.path()).len();
        let lines = replay(&cfg, &alert_body("f2")).unwrap();
        assert!(lines[0].contains("cooldown_skipped"), "{lines:?}");
        let lines = replay(&cfg, &alert_body("f1")).unwrap();
        assert!(lines[0].contains("deduped"), "{lines:?}");
        // Replay journals nothing.
        assert_eq!(events(dir.path()).len(), before);

        // The first runner's journal writer lets go of its lock once its last task is done.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let hooks = loop {
            match Hooks::start(
                config(dir.path(), vec![rule("promote", true, 3600)]),
                Box::new(LocalGate),
            )
            .await
            {
                Ok(h) => break h,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e:#}"),
            }
        };
        assert_eq!(hooks.receive(alert_body("f2")).await.unwrap().runs, 0);
        assert!(matches!(
            events(dir.path()).last(),
            Some(Event::CooldownSkipped { .. })
        ));
        std::fs::write(dir.path().join("stop"), "").unwrap();
        assert_eq!(hooks.receive(alert_body("f3")).await.unwrap().runs, 0);
        assert!(matches!(
            events(dir.path()).last(),
            Some(Event::KillSwitch { .. })
        ));
        let mut out = SampleBuffer::new();
        hooks.write_metrics(&mut out);
        let text = out.into_snapshot().encode_text();
        assert!(
            text.contains("clusterwatch_hook_kill_switch_active 1"),
            "{text}"
        );
        assert!(
            text.contains("clusterwatch_hook_skips_total{hook=\"promote\",reason=\"cooldown\"} 1"),
            "{text}"
        );
    }
}
