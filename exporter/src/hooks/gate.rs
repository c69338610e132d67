//! The gate a disruptive run passes before it starts: the [`RunGate`] seam, the single
//! receiver's [`LocalGate`] (always open), and the journal record of each outcome. The etcd
//! gate itself is `lock::EtcdLock`; whether a hook should run at all is `policy`'s call.

use async_trait::async_trait;

use super::journal::{AlertRef, Event};

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

/// A gate's answer as the journal records it, with the `clusterwatch_hook_lock_total` result
/// and (for a refusal) the skip reason. `None`: a gate that keeps no lock, nothing to record.
pub(super) fn outcome(
    hook: &str,
    run: u64,
    answer: &Result<Pass, Refusal>,
) -> Option<(Event, &'static str, Option<&'static str>)> {
    let hook = hook.to_owned();
    Some(match answer {
        Ok(pass) => {
            let key = pass.key.clone()?;
            let event = Event::LockAcquired {
                run,
                hook,
                key,
                fencing_token: pass.fencing_token,
            };
            (event, "acquired", None)
        }
        Err(Refusal::HeldElsewhere(owner)) => {
            tracing::info!(hook = %hook, run, owner = %owner, "another receiver holds this incident; not running it here");
            let owner = owner.clone();
            let event = Event::LockHeldElsewhere { run, hook, owner };
            (event, "held_elsewhere", Some("lock_held_elsewhere"))
        }
        Err(Refusal::Unavailable(error)) => {
            tracing::error!(hook = %hook, run, error = %error, "cannot take the hook lock; the disruptive run does not start");
            let error = error.clone();
            let event = Event::LockUnavailable { run, hook, error };
            (event, "unavailable", Some("lock_unavailable"))
        }
    })
}

/// A background task that ends with its owner (the lock-loss watch of a run).
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
