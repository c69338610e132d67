//! The hook journal: append-only JSON lines in `state_dir/journal.jsonl`, one record per
//! decision, fsync'd before the caller goes on. Concurrent appends share one fsync (group
//! commit). It stores records; what they mean for the next decision is `policy`'s business.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The journal's file name inside `state_dir`.
pub const FILE_NAME: &str = "journal.jsonl";

/// Which alert a decision is about: the dedupe key is (hook, fingerprint, starts_at, status).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AlertRef {
    /// Alertmanager's fingerprint of the label set.
    pub fingerprint: String,
    /// When the incident started.
    pub starts_at: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// The `alertname` label, for people reading the journal.
    pub alertname: String,
}

/// One journal line: a unix time and what happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time in seconds.
    pub ts: f64,
    /// The decision or event.
    #[serde(flatten)]
    pub event: Event,
}

/// Every kind of record. Runs are numbered; a run's records share its number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A notification was accepted.
    Received {
        /// Sequence number, also naming its payload file.
        notification: u64,
        /// Alertmanager's receiver name.
        receiver: String,
        /// Group status.
        status: String,
        /// Alertmanager's group key.
        group_key: String,
        /// Number of alerts in it.
        alerts: usize,
    },
    /// A hook will run for an alert.
    Matched {
        /// The run's number.
        run: u64,
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// Whether it counts against the budget and must never run twice.
        disruptive: bool,
        /// The notification whose payload the hook gets.
        notification: u64,
    },
    /// Skipped: this hook already handled this incident.
    Deduped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
    },
    /// Skipped: the hook ran too recently.
    CooldownSkipped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
    },
    /// Skipped: the hourly budget of disruptive runs is spent.
    BudgetSkipped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
    },
    /// Skipped: the kill-switch file exists.
    KillSwitch {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
    },
    /// Would have run, but dry run is on.
    DryRun {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
    },
    /// The validation command did not exit 0; the hook did not run.
    ValidateFailed {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// How the validation ended (`exit 3`, `timeout`, …).
        outcome: String,
        /// Its stderr tail.
        stderr_tail: String,
    },
    /// An attempt is about to start.
    Started {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// An attempt ended.
    Finished {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The attempt.
        attempt: u32,
        /// `ok`, `retry`, `failed`, `timeout` or `error`.
        result: String,
        /// The exit code, if it exited.
        exit_code: Option<i32>,
        /// Wall-clock time of the attempt.
        duration_seconds: f64,
        /// Last bytes of stdout.
        stdout_tail: String,
        /// Last bytes of stderr.
        stderr_tail: String,
    },
    /// Found at start: the run had started when clusterwatch stopped; its effect is unknown.
    Unknown {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
    },
    /// The cluster-wide lock was taken for a disruptive run; it may start.
    LockAcquired {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The incident's claim key in etcd.
        key: String,
        /// The claim's create revision, passed to the hook as `CW_FENCING_TOKEN`.
        fencing_token: Option<u64>,
    },
    /// Another receiver claimed this incident: it is handled there, never here.
    LockHeldElsewhere {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// Who holds it (host/pid/start of that receiver).
        owner: String,
    },
    /// etcd did not answer: the disruptive run did not start.
    LockUnavailable {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// What failed.
        error: String,
    },
    /// The run lease was lost while the hook ran; the hook was left running.
    LockLost {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// What failed.
        error: String,
    },
    /// The run never started (clusterwatch stopped first, kill switch, lock refused).
    Abandoned {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// Why.
        reason: String,
    },
}

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A read, write or fsync failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The writer thread is gone.
    #[error("journal writer stopped")]
    Closed,
}

struct Pending {
    bytes: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// An open journal; appends are durable when [`Journal::append`] returns.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Pending>,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, returns it with every record already in it. A
    /// torn last line (a crash during a write, never acknowledged) is cut off.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        let path = dir.join(FILE_NAME);
        let io = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // One writer per journal: a second clusterwatch on the same state_dir would decide
        // without seeing the first one's runs, and could run a disruptive hook twice.
        let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            io(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("locked by another process ({errno}); is another clusterwatch using this state_dir?"),
            ))
        })?;
        let (records, good_len) = read_from(&mut file, &path).map_err(io)?;
        if good_len < file.metadata().map_err(io)?.len() {
            tracing::warn!(journal = %path.display(), "cutting off a torn last journal line");
            file.set_len(good_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let (tx, rx) = mpsc::channel::<Pending>();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("hook-journal".into())
            .spawn(move || writer(file, rx, &thread_path))
            .map_err(io)?;
        Ok((Journal { tx, path }, records))
    }

    /// Appends `records` and waits until they are on disk.
    pub async fn append(&self, records: &[Record]) -> Result<(), JournalError> {
        let mut bytes = Vec::with_capacity(256 * records.len());
        for r in records {
            serde_json::to_writer(&mut bytes, r).expect("records always serialize");
            bytes.push(b'\n');
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Pending { bytes, done })
            .map_err(|_| JournalError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(JournalError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(msg),
            }),
            Err(_) => Err(JournalError::Closed),
        }
    }
}

/// Drains everything queued, writes it, one fsync for all of it, then acknowledges each.
fn writer(mut file: Flock<File>, rx: mpsc::Receiver<Pending>, path: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|p| p.bytes.len()).sum());
        for p in &batch {
            buf.extend_from_slice(&p.bytes);
        }
        let result = file
            .write_all(&buf)
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(journal = %path.display(), error = %e, "journal write failed");
        }
        for p in batch {
            let _ = p.done.send(result.clone());
        }
    }
}

/// Reads every complete record; returns them and the length of the well-formed prefix.
fn read_from(file: &mut File, path: &Path) -> std::io::Result<(Vec<Record>, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&mut *file);
    let mut records = Vec::new();
    let mut good = 0u64;
    let mut line = Vec::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        lineno += 1;
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => records.push(r),
            // A record from a newer version or hand-edited: keep going, say where.
            Err(e) => {
                tracing::warn!(journal = %path.display(), line = lineno, error = %e, "skipping an unreadable journal line")
            }
        }
        good += n as u64;
    }
    Ok((records, good))
}

/// Reads a journal without opening it for writing (for `hooks journal` and `hooks replay`).
pub fn read(dir: &Path) -> std::io::Result<Vec<Record>> {
    let path = dir.join(FILE_NAME);
    match File::open(&path) {
        Ok(mut f) => Ok(read_from(&mut f, &path)?.0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// One record as a line for people: time, event, and its fields.
pub fn render(r: &Record) -> String {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(r.ts.max(0.0)),
    );
    let mut v = serde_json::to_value(&r.event).unwrap_or_default();
    let event = v
        .get("event")
        .and_then(|e| e.as_str())
        .unwrap_or("?")
        .to_owned();
    let mut fields = Vec::new();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("event");
        if let Some(serde_json::Value::Object(alert)) = obj.remove("alert") {
            for (k, v) in alert {
                fields.push(format!("{k}={}", plain(&v)));
            }
        }
        for (k, v) in obj.iter() {
            fields.push(format!("{k}={}", plain(v)));
        }
    }
    format!("{time} {event:<16} {}", fields.join(" "))
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if !s.is_empty() && !s.contains([' ', '\n', '"']) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> Record {
        Record {
            ts: 1.5,
            event: Event::Unknown {
                run: n,
                hook: "h".into(),
            },
        }
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, old) = Journal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            j.append(&[rec(1), rec(2)]).await.unwrap();
        }
        // A crash in the middle of a write leaves half a line.
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":2,\"event\":\"unkn").unwrap();
        drop(f);
        // The first writer's thread lets go of the lock once it has seen its channel close.
        let mut tries = 0;
        let (j, old) = loop {
            match Journal::open(dir.path()) {
                Ok(opened) => break opened,
                Err(e) if tries > 500 => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
            tries += 1;
        };
        assert_eq!(old, vec![rec(1), rec(2)]);
        let second = Journal::open(dir.path())
            .err()
            .expect("a second writer is refused");
        assert!(
            second.to_string().contains("another clusterwatch"),
            "{second}"
        );
        j.append(&[rec(3)]).await.unwrap();
        assert_eq!(read(dir.path()).unwrap(), vec![rec(1), rec(2), rec(3)]);
        assert!(render(&rec(3)).contains("unknown"));
    }
}
