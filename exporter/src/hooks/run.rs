//! A run's life after `policy` accepted it: a run slot, validation, the gate (disruptive
//! runs), then attempts (`started` → process, or its ordered steps → `finished`) with
//! bounded backoff. Every step is
//! journaled before the next acts. Deciding to run is `policy`'s; a process is `runner`'s.

use std::sync::Arc;
use std::time::Duration;

use super::config::{HookRule, HooksConfig, Step};
use super::env::{self, RunFacts};
use super::gate::{self, AbortOnDrop, Pass};
use super::journal::{Event, Record, RunResult};
use super::lease::{self, LeaseRefusal};
use super::payload::Alert;
use super::runner::{self, Exit, Outcome, Spec};
use super::{now, policy, Hooks};

/// Longest wait between retries of a hook that exits 1.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One accepted run and what it needs: the configuration it was decided under, its alert and
/// the notification's body (the hook's stdin).
pub(super) struct Run {
    pub(super) hooks: Arc<Hooks>,
    pub(super) cfg: Arc<HooksConfig>,
    /// Index into `cfg.rules`.
    pub(super) rule: usize,
    pub(super) run: u64,
    pub(super) notification: u64,
    pub(super) alert: Alert,
    pub(super) body: Arc<Vec<u8>>,
}

/// How an attempt's exit reads: exit 1 is a retry while attempts are left.
pub(super) fn result_of(exit: &Exit, retries_left: bool) -> RunResult {
    match exit {
        Exit::Code(0) => RunResult::Ok,
        Exit::Code(1) if retries_left => RunResult::Retry,
        Exit::Code(_) | Exit::Signal(_) => RunResult::Failed,
        Exit::Timeout => RunResult::Timeout,
        Exit::SpawnFailed(_) => RunResult::Error,
    }
}

/// The wait before attempt `attempt + 1`: doubling from `first`, at most [`MAX_BACKOFF`].
fn backoff(first: Duration, attempt: u32) -> Duration {
    first
        .saturating_mul(1 << (attempt.saturating_sub(1)).min(16))
        .min(MAX_BACKOFF)
}

impl Run {
    /// Starts the run in the background.
    pub(super) fn spawn(self) {
        tokio::spawn(self.execute());
    }

    fn rule(&self) -> &HookRule {
        &self.cfg.rules[self.rule]
    }

    fn hook(&self) -> &str {
        &self.rule().name
    }

    /// Validation, the gate for disruptive runs, attempts with backoff.
    async fn execute(self) {
        let Ok(_slot) = self.hooks.slots.acquire().await else {
            return;
        };
        if !self.validate().await {
            return;
        }
        if self.rule().wait_for_lease && !self.wait_for_lease().await {
            return;
        }
        let held = match self.rule().disruptive {
            true => match self.gate().await {
                Some(held) => Some(held),
                None => return,
            },
            false => None,
        };
        let token = held.as_ref().and_then(|(pass, _)| pass.fencing_token);
        let mut attempt = 1;
        while let Some(RunResult::Retry) = self.attempt(attempt, token).await {
            tokio::time::sleep(backoff(self.rule().retry_backoff, attempt)).await;
            // The service is stopping: no new attempt. The run stays open, so the next start
            // journals it `unknown`, as any run a stop interrupted.
            if self.hooks.slots.is_closed() {
                tracing::warn!(
                    hook = self.hook(),
                    run = self.run,
                    "stopping: the next attempt does not start"
                );
                return;
            }
            attempt += 1;
        }
    }

    /// Runs `argv` as a process of this run (attempt 0 is the validation), as `step` of a
    /// hook with steps.
    async fn process(
        &self,
        argv: &[String],
        attempt: u32,
        fencing_token: Option<u64>,
        step: Option<(&Step, usize)>,
    ) -> Outcome {
        let payload_file = self.hooks.payload_path(self.notification);
        let env = env::build(&RunFacts {
            rule: self.rule(),
            run: self.run,
            attempt,
            alert: &self.alert,
            payload_file: &payload_file,
            fencing_token,
            step: step.map(|(s, i)| (s.name.as_str(), i)),
        });
        if env.dropped_labels > 0 {
            tracing::warn!(
                hook = self.hook(),
                run = self.run,
                dropped = env.dropped_labels,
                "alert labels left out of the hook's environment (over its budget)"
            );
            self.hooks
                .count()
                .labels_dropped(self.hook(), env.dropped_labels);
        }
        runner::run(Spec {
            argv,
            env: env.vars,
            stdin: self.body.clone(),
            timeout: step.map_or(self.rule().timeout, |(s, _)| s.timeout),
            grace: self.cfg.kill_grace,
        })
        .await
    }

    /// The validation command, if any: `true` when it exited 0; otherwise journaled.
    async fn validate(&self) -> bool {
        let Some(argv) = &self.rule().validate else {
            return true;
        };
        let o = self.process(argv, 0, None, None).await;
        if o.exit == Exit::Code(0) {
            return true;
        }
        let (hook, run) = (self.hook().to_owned(), self.run);
        tracing::warn!(hook = %hook, run, outcome = %o.exit, "hook validation failed; not running it");
        self.hooks.count().skip(&hook, "validate_failed");
        let outcome = o.exit.to_string();
        let stderr_tail = o.stderr_tail;
        let event = Event::ValidateFailed {
            run,
            hook,
            outcome,
            stderr_tail,
        };
        let _ = self.hooks.commit(vec![Record { ts: now(), event }]).await;
        false
    }

    /// For `wait_for_lease`: waits until no one holds the alert's group's leader key (the old
    /// primary's lease has ended) and journals the wait. `false`, journaled and counted, when
    /// it is still held after `hooks.lease.wait`, or etcd cannot say.
    async fn wait_for_lease(&self) -> bool {
        // check-config refuses wait_for_lease without both.
        let (Some(lease_cfg), Some(lock)) = (&self.cfg.lease, &self.cfg.lock) else {
            return true;
        };
        let (hook, run) = (self.hook().to_owned(), self.run);
        let cluster = self.alert.labels.get("cluster").map_or("", String::as_str);
        let key = lease::key(&lock.prefix, cluster);
        let answer = match cluster.is_empty() {
            true => Err(LeaseRefusal::Unavailable(
                "the alert has no `cluster` label: no leader key to check".into(),
            )),
            false => lease::wait_until_free(lock, lease_cfg, cluster).await,
        };
        let (event, skip) = match answer {
            Ok(None) => return true,
            Ok(Some((holder, waited_seconds))) => {
                tracing::info!(hook = %hook, run, key = %key, holder = %holder, waited_seconds, "the old primary's leader lease has ended; going on");
                let event = Event::LeaseWaited {
                    run,
                    hook: hook.clone(),
                    key,
                    holder,
                    waited_seconds,
                };
                (event, None)
            }
            Err(LeaseRefusal::Held(holder, waited_seconds)) => {
                tracing::error!(hook = %hook, run, key = %key, holder = %holder, waited_seconds, "the leader lease is still held: its primary is alive and reaches etcd; not running");
                let event = Event::LeaseHeld {
                    run,
                    hook: hook.clone(),
                    key,
                    holder,
                    waited_seconds,
                };
                (event, Some("lease_held"))
            }
            Err(LeaseRefusal::Unavailable(error)) => {
                tracing::error!(hook = %hook, run, key = %key, error = %error, "cannot check the leader lease; not running");
                let event = Event::LeaseUnavailable {
                    run,
                    hook: hook.clone(),
                    key,
                    error,
                };
                (event, Some("lease_unavailable"))
            }
        };
        if let Some(reason) = skip {
            self.hooks.count().skip(&hook, reason);
        }
        // Journal first: a run whose wait is not on record must not act.
        let committed = self.hooks.commit(vec![Record { ts: now(), event }]).await;
        skip.is_none() && committed.is_ok()
    }

    /// Takes the gate and journals its answer. `None`: do not run. Otherwise the pass and a
    /// task that journals `lock_lost` if the lock goes while the run goes on.
    async fn gate(&self) -> Option<(Pass, Option<AbortOnDrop>)> {
        let (hook, run) = (self.hook(), self.run);
        let answer = self
            .hooks
            .gate
            .acquire(hook, run, &policy::alert_ref(&self.alert))
            .await;
        if let Some((event, result, skip)) = gate::outcome(hook, run, &answer) {
            {
                let mut count = self.hooks.count();
                count.lock(hook, result);
                if let Some(reason) = skip {
                    count.skip(hook, reason);
                }
            }
            // Journal first: a run whose lock is not on record must not act.
            let ts = now();
            self.hooks.commit(vec![Record { ts, event }]).await.ok()?;
        }
        let mut pass = answer.ok()?;
        let watch = pass.lost.take().map(|lost| self.watch_lock(lost));
        Some((pass, watch))
    }

    fn watch_lock(&self, lost: tokio::sync::oneshot::Receiver<String>) -> AbortOnDrop {
        let (hooks, hook, run) = (self.hooks.clone(), self.hook().to_owned(), self.run);
        AbortOnDrop(tokio::spawn(async move {
            let Ok(error) = lost.await else { return };
            tracing::error!(hook = %hook, run, error = %error, "the hook lock was lost while the hook runs; it is left to finish");
            hooks.count().lock(&hook, "lost");
            let event = Event::LockLost { run, hook, error };
            let _ = hooks.commit(vec![Record { ts: now(), event }]).await;
        }))
    }

    /// One attempt: `started` on disk, the process, `finished`. `None` if it did not start.
    async fn attempt(&self, attempt: u32, fencing_token: Option<u64>) -> Option<RunResult> {
        let (hook, run) = (self.hook().to_owned(), self.run);
        if self.hooks.context().kill_switch {
            self.hooks.abandon(&hook, run, "kill switch".into()).await;
            return None;
        }
        let event = Event::Started {
            run,
            hook: hook.clone(),
            attempt,
        };
        // Journal first: if the record cannot be written, the hook must not act.
        self.hooks
            .commit(vec![Record { ts: now(), event }])
            .await
            .ok()?;
        tracing::info!(hook = %hook, run, attempt, "hook started");
        self.hooks.count().started(&hook);
        let (o, result) = match self.rule().steps.is_empty() {
            true => {
                let o = self
                    .process(&self.rule().command, attempt, fencing_token, None)
                    .await;
                let result = result_of(&o.exit, attempt <= self.rule().retries);
                (o, result)
            }
            false => self.steps(attempt, fencing_token).await,
        };
        let seconds = o.duration.as_secs_f64();
        self.hooks.count().finished(&hook, result, seconds);
        tracing::info!(hook = %hook, run, attempt, result = result.as_str(), outcome = %o.exit, seconds, "hook finished");
        let exit_code = match o.exit {
            Exit::Code(c) => Some(c),
            _ => None,
        };
        let event = Event::Finished {
            run,
            hook,
            attempt,
            result,
            exit_code,
            duration_seconds: seconds,
            stdout_tail: o.stdout_tail,
            stderr_tail: o.stderr_tail,
        };
        let _ = self.hooks.commit(vec![Record { ts: now(), event }]).await;
        Some(result)
    }

    /// The steps in order, each between `step_started` and `step_finished`, up to the first
    /// that does not end `ok` (never retried: the steps before it have acted). The run's
    /// outcome is that step's (or the last one's), over the steps' whole time.
    async fn steps(&self, attempt: u32, fencing_token: Option<u64>) -> (Outcome, RunResult) {
        let (hook, run) = (self.hook().to_owned(), self.run);
        let mut total = Duration::ZERO;
        let mut last = None;
        for (index, step) in self.rule().steps.iter().enumerate() {
            let event = Event::StepStarted {
                run,
                hook: hook.clone(),
                step: step.name.clone(),
                index,
            };
            // Journal first: a step that is not on record must not act.
            if self
                .hooks
                .commit(vec![Record { ts: now(), event }])
                .await
                .is_err()
            {
                let exit = Exit::SpawnFailed("the step could not be journaled".into());
                let o = Outcome {
                    exit,
                    duration: total,
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                };
                return (o, RunResult::Error);
            }
            let o = self
                .process(&step.command, attempt, fencing_token, Some((step, index)))
                .await;
            let result = result_of(&o.exit, false);
            total += o.duration;
            tracing::info!(hook = %hook, run, step = %step.name, index, result = result.as_str(), outcome = %o.exit, "hook step finished");
            let event = Event::StepFinished {
                run,
                hook: hook.clone(),
                step: step.name.clone(),
                index,
                result,
                exit_code: match o.exit {
                    Exit::Code(c) => Some(c),
                    _ => None,
                },
                duration_seconds: o.duration.as_secs_f64(),
                stdout_tail: o.stdout_tail.clone(),
                stderr_tail: o.stderr_tail.clone(),
            };
            let _ = self.hooks.commit(vec![Record { ts: now(), event }]).await;
            last = Some((o, result));
            if result != RunResult::Ok {
                break;
            }
        }
        // check-config refuses empty steps; should none be left, nothing ran.
        let (mut o, result) = last.unwrap_or_else(|| {
            let o = Outcome {
                exit: Exit::SpawnFailed("the hook has no steps".into()),
                duration: total,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
            };
            (o, RunResult::Error)
        });
        o.duration = total;
        (o, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_results_and_backoff_is_bounded() {
        assert_eq!(result_of(&Exit::Code(0), false), RunResult::Ok);
        assert_eq!(result_of(&Exit::Code(1), true), RunResult::Retry);
        assert_eq!(result_of(&Exit::Code(1), false), RunResult::Failed);
        assert_eq!(result_of(&Exit::Signal(9), true), RunResult::Failed);
        assert_eq!(result_of(&Exit::Timeout, true), RunResult::Timeout);
        assert_eq!(
            result_of(&Exit::SpawnFailed("x".into()), true),
            RunResult::Error
        );
        let s = Duration::from_secs(10);
        assert_eq!(backoff(s, 1), s);
        assert_eq!(backoff(s, 2), 2 * s);
        assert_eq!(backoff(s, 40), MAX_BACKOFF);
    }
}
