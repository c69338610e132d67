//! Runs blocking system calls (statvfs, file reads) off the async runtime under a deadline.
//! A call that never returns (a dead NFS server) keeps its thread, so the same key is not
//! started again until it does: one stuck mount costs one thread, not one per scrape.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Why a blocking call gave no result.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockingError {
    /// The deadline passed; the call may still finish later in the background.
    #[error("deadline exceeded")]
    Timeout,
    /// An earlier call with the same key has not returned yet.
    #[error("an earlier call is still stuck")]
    Stuck,
    /// The blocking pool could not run the call.
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
        let handle = tokio::task::spawn_blocking(move || {
            let result = f();
            crate::sync::lock(&keys).remove(&owned_key);
            crate::memory::release_unused_stack();
            result
        });
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(v)) => Ok(v),
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
}
