//! Runs blocking system calls (statvfs, file reads) off the async runtime under a deadline,
//! on threads of its own. A call that never returns (a dead NFS server) keeps its thread, so
//! the same key is not started again until it does: one stuck mount costs one thread, not one
//! per scrape.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long a thread with no call to run waits for one before it ends.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A call, with the delivery of its result.
type Job = Box<dyn FnOnce() + Send>;

/// Threads waiting for a call, the one that went idle last at the end: it takes the next
/// call, so threads beyond what the calls in flight need stay idle and end after
/// [`KEEP_ALIVE`]. (tokio's blocking pool wakes its idle threads in turn instead: ten scrapes
/// a second then keep every thread a load spike ever started alive, each with its stack.)
/// There is no bound: a stuck call holds its thread, and a bound would let a few of them
/// starve every other call; [`InFlight`] bounds stuck threads by key instead.
static IDLE: Mutex<Vec<(u64, SyncSender<Job>)>> = Mutex::new(Vec::new());

/// Hands `job` to the thread that went idle last, or to a new thread.
fn spawn(job: Job) -> std::io::Result<()> {
    let idle = crate::sync::lock(&IDLE).pop();
    let job = match idle {
        // A thread leaves the list before it ends, so the send only fails if it panicked.
        Some((_, thread)) => match thread.send(job) {
            Ok(()) => return Ok(()),
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    std::thread::Builder::new()
        .name("blocking-call".into())
        .spawn(move || work(job))
        .map(drop)
}

/// A thread's life: runs calls until none came for [`KEEP_ALIVE`].
fn work(mut job: Job) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (sender, calls) = mpsc::sync_channel::<Job>(1);
    loop {
        job();
        crate::memory::release_unused_stack();
        crate::sync::lock(&IDLE).push((id, sender.clone()));
        job = match calls.recv_timeout(KEEP_ALIVE) {
            Ok(next) => next,
            Err(RecvTimeoutError::Timeout) => {
                let mut idle = crate::sync::lock(&IDLE);
                if let Some(at) = idle.iter().position(|(other, _)| *other == id) {
                    idle.remove(at);
                    return;
                }
                drop(idle);
                // Taken off the list just now: its call is on the way.
                match calls.recv() {
                    Ok(next) => next,
                    Err(_) => return,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// Why a blocking call gave no result.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockingError {
    /// The deadline passed; the call may still finish later in the background.
    #[error("deadline exceeded")]
    Timeout,
    /// An earlier call with the same key has not returned yet.
    #[error("an earlier call is still stuck")]
    Stuck,
    /// No thread could run the call (none could be started, or the call panicked).
    #[error("blocking task failed")]
    Failed,
}

/// Tracks calls in flight by key (e.g. a mount point).
#[derive(Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

impl InFlight {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the blocking pool unless a call for `key` is still running; gives up
    /// waiting at `deadline`.
    pub async fn run<T, F>(&self, key: &str, deadline: Instant, f: F) -> Result<T, BlockingError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        {
            let mut keys = crate::sync::lock(&self.keys);
            if !keys.insert(key.to_owned()) {
                return Err(BlockingError::Stuck);
            }
        }
        let keys = Arc::clone(&self.keys);
        let owned_key = key.to_owned();
        let (deliver, result) = tokio::sync::oneshot::channel();
        let started = spawn(Box::new(move || {
            let value = f();
            crate::sync::lock(&keys).remove(&owned_key);
            let _ = deliver.send(value);
        }));
        if started.is_err() {
            crate::sync::lock(&self.keys).remove(key);
            return Err(BlockingError::Failed);
        }
        match tokio::time::timeout_at(deadline, result).await {
            Ok(Ok(v)) => Ok(v),
            // The call panicked: its thread is gone, and so is the result.
            Ok(Err(_)) => {
                crate::sync::lock(&self.keys).remove(key);
                Err(BlockingError::Failed)
            }
            Err(_) => Err(BlockingError::Timeout),
        }
    }

    /// How many calls are still running (stuck ones included).
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.keys).len()
    }

    /// Whether no call is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_stuck_call_is_not_started_twice() {
        let inflight = InFlight::new();
        let (release, wait) = mpsc::channel::<()>();
        let deadline = Instant::now() + Duration::from_millis(50);
        let first = inflight
            .run("nfs", deadline, move || wait.recv().ok())
            .await;
        assert_eq!(first, Err(BlockingError::Timeout));
        let second = inflight
            .run("nfs", Instant::now() + Duration::from_millis(50), || {
                Some(())
            })
            .await;
        assert_eq!(second, Err(BlockingError::Stuck));
        // Other keys are unaffected.
        assert_eq!(
            inflight
                .run("local", Instant::now() + Duration::from_secs(5), || 7)
                .await,
            Ok(7)
        );
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !inflight.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(inflight.is_empty());
        assert_eq!(
            inflight
                .run("nfs", Instant::now() + Duration::from_secs(5), || 1)
                .await,
            Ok(1)
        );
    }

    #[tokio::test]
    async fn a_call_that_panics_fails_and_its_key_runs_again() {
        let inflight = InFlight::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let panicked = inflight
            .run("bad", deadline, || -> u8 { panic!("deliberately") })
            .await;
        assert_eq!(panicked, Err(BlockingError::Failed));
        assert_eq!(inflight.run("bad", deadline, || 3).await, Ok(3));
    }

    #[tokio::test]
    async fn one_call_after_another_reuses_the_idle_thread() {
        let inflight = InFlight::new();
        let mut threads = HashSet::new();
        for _ in 0..20 {
            let deadline = Instant::now() + Duration::from_secs(5);
            let thread = inflight
                .run("one", deadline, || std::thread::current().id())
                .await
                .unwrap();
            threads.insert(thread);
            // The thread puts itself on the idle list just after it delivered its result.
            while crate::sync::lock(&IDLE).is_empty() && Instant::now() < deadline {
                tokio::task::yield_now().await;
            }
        }
        // Other tests' calls may take the idle thread meanwhile; never one thread per call.
        assert!(threads.len() < 10, "{} threads for 20 calls", threads.len());
    }
}
