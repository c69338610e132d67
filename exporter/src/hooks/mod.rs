//! The webhook receiver and hook runner. [`Hooks`] holds the state and the wiring: the
//! configuration in force, the journal, the decision state, the counters, run slots and the
//! gate. [`Hooks::receive`] runs inside the webhook POST: it decides with `policy` and returns
//! only once the decisions are fsync'd (the 200 means "on disk"); accepted runs then live in
//! `run`, outside the request.

pub mod config;
pub mod env;
pub mod gate;
pub mod journal;
pub mod lease;
pub mod lock;
mod metrics;
pub mod payload;
pub mod policy;
pub mod receiver;
mod run;
pub mod runner;
#[cfg(test)]
mod tests;
mod tools;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::Semaphore;

use crate::snapshot::SampleBuffer;
use config::HooksConfig;
pub use gate::{LocalGate, Pass, Refusal, RunGate};
use journal::{Event, Journal, JournalError, Record};
use metrics::Counters;
pub use metrics::{LOCK_RESULTS, NOTIFICATION_STATUSES, RUN_RESULTS, SKIP_REASONS};
use payload::{Alert, Notification, PayloadError};
use policy::{Context, OpenRun, State};
use run::Run;
pub use tools::{journal_command, replay};

/// Why a notification was not accepted. Each maps to one HTTP status in `receiver`.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Missing or wrong credentials.
    #[error("unauthorized")]
    Unauthorized,
    /// Body over `max_body_bytes`.
    #[error("request body too large")]
    TooLarge,
    /// The body ended before its announced length, or could not be read.
    #[error("incomplete request body: {0}")]
    Incomplete(String),
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
            HookError::Incomplete(_) | HookError::BadRequest(_) => "bad_request",
            HookError::Journal(_) => "error",
        }
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
    /// What this host's leader-lease holders report (`hooks.lease`).
    leases: lease::Board,
}

/// Unix time now, in seconds: the journal's and the decisions' clock.
pub fn now() -> f64 {
    crate::clock::unix_now().as_secs_f64()
}

impl Hooks {
    /// Opens the journal (refusing a damaged one), replays it, records runs a previous process
    /// left open (`unknown`, `resumed` or `abandoned`), starts the resumed ones and re-runs
    /// interrupted non-disruptive runs that opted in.
    pub async fn start(cfg: HooksConfig, gate: Box<dyn RunGate>) -> anyhow::Result<Arc<Hooks>> {
        let (journal, records) = Journal::open(&cfg.state_dir)?;
        let mut state = State::replay(&records);
        let interrupted = state.interrupted(now(), cfg.resume_max_age.as_secs_f64());
        let found: Vec<Record> = interrupted.iter().map(|(r, _)| r.clone()).collect();
        for r in &found {
            state.apply(r);
            match &r.event {
                Event::Unknown { run, hook } => {
                    tracing::warn!(run, hook = %hook, "a hook run was interrupted by a stop or crash; its effect is unknown and it will not be re-run")
                }
                Event::Resumed { run, hook } => {
                    tracing::info!(run, hook = %hook, "a hook run accepted before a stop had not started; starting it now")
                }
                _ => {}
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
            leases: lease::Board::default(),
        });
        let cfg = hooks.config();
        for (r, open) in interrupted {
            hooks.after_restart(&cfg, &r.event, open).await;
        }
        Ok(hooks)
    }

    /// A run found open at start: a resumed one starts under its own number; an interrupted
    /// non-disruptive one that opted in runs again under a new one.
    async fn after_restart(self: &Arc<Self>, cfg: &Arc<HooksConfig>, event: &Event, open: OpenRun) {
        let rule = cfg.rules.iter().position(|x| x.name == open.hook);
        match (event, rule) {
            (Event::Resumed { run, .. }, Some(rule)) => match self.load_alert(&open) {
                Some((alert, body)) => Run {
                    hooks: self.clone(),
                    cfg: cfg.clone(),
                    rule,
                    run: *run,
                    notification: open.notification,
                    alert,
                    body,
                }
                .spawn(),
                None => {
                    self.abandon(&open.hook, *run, "payload file gone".into())
                        .await
                }
            },
            (Event::Resumed { run, .. }, None) => {
                self.abandon(&open.hook, *run, "hook no longer configured".into())
                    .await
            }
            (Event::Unknown { .. }, Some(rule))
                if !open.disruptive && cfg.rules[rule].rerun_after_crash =>
            {
                self.rerun(cfg.clone(), rule, open).await
            }
            _ => {}
        }
    }

    /// The checked configuration in force now.
    pub fn config(&self) -> Arc<HooksConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks that `new` can replace the running configuration: what the process opened or
    /// bound at start (listener, journal, lock, run slots) cannot change without a restart.
    pub fn check_reconfigure(&self, new: &HooksConfig) -> Result<(), String> {
        config::restart_needed(&self.config(), new)
    }

    /// Puts a configuration checked by [`Hooks::check_reconfigure`] in force for the next
    /// notification; runs already decided finish under the one they started with.
    pub fn reconfigure(&self, new: HooksConfig) {
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    fn context(&self) -> Context {
        context(&self.config())
    }

    /// The counters, for one bump through their methods.
    fn count(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn payload_path(&self, notification: u64) -> PathBuf {
        self.config()
            .state_dir
            .join("payloads")
            .join(format!("{notification}.json"))
    }

    /// Counts a refused notification.
    pub fn count_rejected(&self, e: &HookError) {
        self.count().notification(e.status());
    }

    /// Decides a notification, journals every decision durably, then starts the accepted
    /// runs in the background. Runs inside the request; returns once the journal is on disk.
    pub async fn receive(self: &Arc<Self>, body: bytes::Bytes) -> Result<Receipt, HookError> {
        let n = payload::decode(&body)?;
        let cfg = self.config();
        let ctx = context(&cfg);
        let (records, planned) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
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
            self.give_back(&cfg, &planned, ctx.now);
            return Err(e.into());
        }
        {
            let mut count = self.count();
            count.notification("accepted");
            records.iter().for_each(|r| count.decided(&r.event));
        }
        let receipt = Receipt {
            alerts: n.alerts.len(),
            runs: planned.len(),
        };
        let body = Arc::new(body.to_vec());
        for p in planned {
            Run {
                hooks: self.clone(),
                cfg: cfg.clone(),
                rule: p.rule,
                run: p.run,
                notification,
                alert: n.alerts[p.alert].clone(),
                body: body.clone(),
            }
            .spawn();
        }
        Ok(receipt)
    }

    /// Alertmanager will retry after the 500: the accepted runs are given back (in memory; the
    /// journal never had them), so the retry is decided afresh instead of being taken for a
    /// repeat of a run that never came.
    fn give_back(&self, cfg: &HooksConfig, planned: &[policy::Planned], now: f64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for p in planned {
            let hook = cfg.rules[p.rule].name.clone();
            let reason = "not stored".into();
            let event = Event::Abandoned {
                run: p.run,
                hook,
                reason,
            };
            state.apply(&Record { ts: now, event });
        }
    }

    /// Makes a notification's decisions durable: the payload file first when runs will need
    /// it (CW_PAYLOAD_FILE, a run after a restart), then the journal records.
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

    /// The alert a run was for, and its notification's body, from the payload file.
    fn load_alert(&self, open: &OpenRun) -> Option<(Alert, Arc<Vec<u8>>)> {
        let Ok(body) = std::fs::read(self.payload_path(open.notification)) else {
            tracing::warn!(hook = %open.hook, "its payload file is gone");
            return None;
        };
        let n = serde_json::from_slice::<Notification>(&body).ok()?;
        let alert = n
            .alerts
            .into_iter()
            .find(|a| policy::alert_ref(a) == open.alert)?;
        Some((alert, Arc::new(body)))
    }

    async fn rerun(self: &Arc<Self>, cfg: Arc<HooksConfig>, rule: usize, open: OpenRun) {
        let Some((alert, body)) = self.load_alert(&open) else {
            return;
        };
        let run = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_run();
        let event = Event::Matched {
            run,
            hook: open.hook.clone(),
            alert: open.alert,
            disruptive: false,
            notification: open.notification,
            cluster: open.cluster.clone(),
            evidence: policy::evidence_of(&alert),
        };
        if self
            .commit(vec![Record { ts: now(), event }])
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(hook = %open.hook, run, "re-running an interrupted non-disruptive hook");
        let notification = open.notification;
        let hooks = self.clone();
        Run {
            hooks,
            cfg,
            rule,
            run,
            notification,
            alert,
            body,
        }
        .spawn();
    }

    /// Applies records to the state and journals them.
    async fn commit(&self, records: Vec<Record>) -> Result<(), JournalError> {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            records.iter().for_each(|r| state.apply(r));
        }
        let result = self.journal.append(&records).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot journal a hook decision");
        }
        result
    }

    /// Closes a run that never started.
    async fn abandon(&self, hook: &str, run: u64, reason: String) {
        tracing::warn!(hook, run, reason = %reason, "hook run abandoned before it started");
        self.count().skip(hook, "abandoned");
        let hook = hook.to_owned();
        let event = Event::Abandoned { run, hook, reason };
        let _ = self.commit(vec![Record { ts: now(), event }]).await;
    }

    /// Writes the `clusterwatch_hook_*` families.
    pub fn write_metrics(&self, out: &mut SampleBuffer) {
        let c = self.count();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = self.config();
        metrics::write(&cfg, &c, &state, context(&cfg), out);
        self.leases.write(out);
    }

    /// For a service stop: no accepted run takes a slot from now on (it stays accepted, not
    /// started, for the next start to resume), and this waits until every run holding a slot has ended or
    /// `limit` has passed. Returns how many runs were still going then.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        self.slots.close();
        let total = self.config().max_concurrent_runs;
        let deadline = tokio::time::Instant::now().checked_add(limit);
        loop {
            let running = total.saturating_sub(self.slots.available_permits());
            let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if running == 0 || late {
                return running;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The outside facts for a decision now: the clock and the kill-switch file.
fn context(cfg: &HooksConfig) -> Context {
    Context {
        now: now(),
        kill_switch: cfg.kill_switch_file.as_ref().is_some_and(|p| p.exists()),
        dry_run: cfg.dry_run,
        max_disruptive_per_hour: cfg.max_disruptive_per_hour,
        storm: cfg.storm,
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
