//! The hook journal: append-only JSON lines in `state_dir/journal.jsonl`, one record per
//! decision with a checksum, fsync'd before the caller goes on (group commit). A failed append
//! is cut back; a damaged record anywhere but the torn tail stops the start. It stores records;
//! what they mean for the next decision is `policy`'s business.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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

/// The facts an alert brought that explain a decision, by name (absent in journals from
/// before evidence was kept).
pub type Evidence = std::collections::BTreeMap<String, String>;

/// One journal line: a unix time and what happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time in seconds.
    pub ts: f64,
    /// The decision or event.
    #[serde(flatten)]
    pub event: Event,
}

/// How an attempt ended, as the journal's `result` field and the runs metric's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Exit 0.
    Ok,
    /// Exit 1 with attempts left: another attempt follows.
    Retry,
    /// Any other exit code, or a signal.
    Failed,
    /// Killed at its timeout.
    Timeout,
    /// Could not be started.
    Error,
}

impl RunResult {
    /// The label value (the journal's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Retry => "retry",
            RunResult::Failed => "failed",
            RunResult::Timeout => "timeout",
            RunResult::Error => "error",
        }
    }
}

/// The most alert names one `unmatched` record lists: enough to see a misrouted group, and a
/// bound on a record's size whatever a notification holds.
pub const UNMATCHED_NAMES_MAX: usize = 20;

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
    /// Firing alerts of a notification that no hook rule matched: the answer to "why did
    /// nothing run?" when a rule's `match` and the alert's labels do not meet.
    Unmatched {
        /// The notification they came in.
        notification: u64,
        /// How many.
        alerts: usize,
        /// Their distinct alert names, sorted, at most [`UNMATCHED_NAMES_MAX`].
        alertnames: Vec<String>,
    },
    /// A hook will run for an alert.
    Matched {
        /// The run's number.
        run: u64,
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
        /// Whether it counts against the budget and must never run twice.
        disruptive: bool,
        /// The notification whose payload the hook gets.
        notification: u64,
        /// The alert's `cluster` label: the replication group whose cooldown and budget it
        /// spends (empty: no such label; absent in journals from before groups).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster: String,
    },
    /// Skipped: this hook already handled this incident.
    Deduped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
    },
    /// Skipped: the hook acts only on the candidate's host (`only_if_candidate`) and the
    /// alert names another candidate, or none.
    NotCandidate {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// The alert's `candidate` label (empty: none).
        candidate: String,
        /// What explains the decision (see `Matched`).
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
    },
    /// Skipped: the hook ran too recently for this replication group.
    CooldownSkipped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
        /// The alert's `cluster` label (empty: none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster: String,
    },
    /// Skipped: the hourly budget of disruptive runs of this hook for this replication group
    /// is spent.
    BudgetSkipped {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
        /// The alert's `cluster` label (empty: none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster: String,
    },
    /// Skipped: disruptive runs started for more replication groups than `hooks.storm`
    /// allows within its window; no disruptive run starts until `until`.
    StormBreaker {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
        /// The alert's `cluster` label (empty: none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster: String,
        /// The groups that started disruptive runs within the window.
        groups: Vec<String>,
        /// Unix time until which the breaker holds.
        until: f64,
    },

    /// Skipped: the kill-switch file exists.
    KillSwitch {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
    },
    /// Would have run, but dry run is on.
    DryRun {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
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
        result: RunResult,
        /// The exit code, if it exited.
        exit_code: Option<i32>,
        /// Wall-clock time of the attempt.
        duration_seconds: f64,
        /// Last bytes of stdout.
        stdout_tail: String,
        /// Last bytes of stderr.
        stderr_tail: String,
    },
    /// A step of a hook with `steps:` is about to start (inside its run's `started`).
    StepStarted {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The step's name.
        step: String,
        /// 0 for the first step.
        index: usize,
    },
    /// A step ended. A step that did not end `ok` is the last of its run, and the run's
    /// `finished` carries its result.
    StepFinished {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The step's name.
        step: String,
        /// 0 for the first step.
        index: usize,
        /// `ok`, `failed`, `timeout` or `error`.
        result: RunResult,
        /// The exit code, if it exited.
        exit_code: Option<i32>,
        /// Wall-clock time of the step.
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
    /// A `wait_for_lease` hook found its replication group's leader key held, and it went
    /// (the old primary's lease ended) before `hooks.lease.wait`.
    LeaseWaited {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The leader key.
        key: String,
        /// Who held it (host/target).
        holder: String,
        /// How long the run waited.
        waited_seconds: f64,
    },
    /// The leader key was still held after `hooks.lease.wait`: the old primary keeps renewing
    /// its lease, so it is alive and reaches etcd. The run did not start.
    LeaseHeld {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The leader key.
        key: String,
        /// Who holds it (host/target).
        holder: String,
        /// How long the run waited.
        waited_seconds: f64,
    },
    /// etcd could not be read to check the leader key: the run did not start.
    LeaseUnavailable {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
        /// The leader key.
        key: String,
        /// What failed.
        error: String,
    },
    /// This host could not keep its leader lease while its server may still be primary, and
    /// ran the self-fence (`hooks.lease.self_fence`).
    SelfFenced {
        /// The replication group.
        cluster: String,
        /// This host's server.
        target: String,
        /// Why the lease could not be kept.
        reason: String,
        /// How the self-fence ended (`exit 0`, `timeout`, …).
        outcome: String,
        /// Its wall-clock time.
        duration_seconds: f64,
        /// Its stderr tail.
        stderr_tail: String,
    },
    /// Found at start: the run was accepted but had not started; it is fresh enough to be
    /// started now (validation runs again first).
    Resumed {
        /// The run.
        run: u64,
        /// The hook.
        hook: String,
    },
    /// Skipped: the incident began before damaged journal lines were accepted, so it may have
    /// been handled already; it is never run automatically.
    JournalDamaged {
        /// The hook.
        hook: String,
        /// The alert.
        alert: AlertRef,
        /// What explains the decision: the alert's `candidate`, `failed`, `observers` and `lag`
        /// (labels, else annotations) and its `description` and `value` annotations.
        #[serde(default, skip_serializing_if = "Evidence::is_empty")]
        evidence: Evidence,
    },
    /// `hooks journal --accept-damage` dropped these unreadable lines. Incidents that began
    /// before this record are never run automatically.
    DamageAccepted {
        /// The dropped lines (1-based, in the journal as it was).
        lines: Vec<u64>,
        /// Where the journal as it was is kept.
        saved_as: String,
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
    /// A record before the last good one cannot be read: decisions may be missing.
    #[error("{}", damage_message(path, damage))]
    Damaged {
        /// The journal file.
        path: String,
        /// Every damaged line.
        damage: Vec<Damage>,
    },
    /// The writer thread is gone.
    #[error("journal writer stopped")]
    Closed,
}

/// One journal line that cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset of the line's start.
    pub offset: u64,
    /// What is wrong with it.
    pub why: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} (byte {}): {}", self.line, self.offset, self.why)
    }
}

fn damage_message(path: &str, damage: &[Damage]) -> String {
    let first = damage.first().map(ToString::to_string).unwrap_or_default();
    let more = match damage.len() {
        0 | 1 => String::new(),
        n => format!(" and {} more line(s)", n - 1),
    };
    format!(
        "journal {path} is damaged at {first}{more}, before records that are intact: decisions \
         may be missing, so a hook that already ran could run again. Not starting. To recover: \
         `clusterwatch hooks journal --check` lists every damaged line; \
         `clusterwatch hooks journal --accept-damage` keeps the readable records (the file as it \
         was is saved beside it) and never runs automatically an incident that began before \
         then; or move the journal aside, which forgets every past decision"
    )
}

/// What a read of the journal found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every readable record, in order.
    pub records: Vec<Record>,
    /// For each record, its 1-based line.
    pub lines: Vec<u64>,
    /// Unreadable lines before the last readable one.
    pub damage: Vec<Damage>,
    /// Length of the file up to the end of the last readable record; anything after it is a
    /// torn tail (a write that was never acknowledged).
    pub good_len: u64,
    /// The file's length.
    pub len: u64,
}

/// `,"sum":"` + 16 hex digits + `"}`: the checksum field every record ends with.
const SUM_KEY: &[u8] = b",\"sum\":\"";
const SUM_HEX: usize = 16;
const SUM_SUFFIX_LEN: usize = SUM_KEY.len() + SUM_HEX + 2;

/// First 8 bytes of SHA-256 over the record's JSON without its `sum` field, in hex.
fn sum_of(json: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, json);
    d.as_ref()[..SUM_HEX / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One record as its journal line: JSON with a trailing `sum` field, and a newline.
pub fn encode(r: &Record, out: &mut Vec<u8>) {
    let json = serde_json::to_vec(r).expect("records always serialize");
    let sum = sum_of(&json);
    out.extend_from_slice(&json[..json.len() - 1]);
    out.extend_from_slice(SUM_KEY);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

fn unreadable(e: serde_json::Error) -> String {
    let msg = e.to_string();
    let what = msg.split(" at line ").next().unwrap_or(&msg);
    format!("not a readable record ({what} at column {})", e.column())
}

/// Decodes one line (without its newline). `Ok((record, had_sum))`.
fn decode(line: &[u8]) -> Result<(Record, bool), String> {
    if line.contains(&0) {
        return Err("NUL bytes (a block the file system never wrote)".into());
    }
    let suffix_at = line.len().saturating_sub(SUM_SUFFIX_LEN);
    let has_sum = line.len() > SUM_SUFFIX_LEN
        && line[suffix_at..].starts_with(SUM_KEY)
        && line.ends_with(b"\"}");
    if !has_sum {
        let r = serde_json::from_slice(line).map_err(unreadable)?;
        // A record from before checksums has only fields a record has: a checksummed record
        // whose `sum` key was hit (`"sun"`) must not pass for an old one.
        let as_read: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(line).map_err(unreadable)?;
        let known = serde_json::to_value(&r).unwrap_or_default();
        if let Some(k) = as_read.keys().find(|k| known.get(k.as_str()).is_none()) {
            return Err(format!("unknown field `{k}`"));
        }
        return Ok((r, false));
    }
    let mut json = line[..suffix_at].to_vec();
    json.push(b'}');
    let given = &line[suffix_at + SUM_KEY.len()..line.len() - 2];
    if given != sum_of(&json).as_bytes() {
        return Err("checksum mismatch (the record was changed)".into());
    }
    let r = serde_json::from_slice(&json).map_err(unreadable)?;
    Ok((r, true))
}

/// Reads every line and sorts them into records, damage and a torn tail. A journal written
/// before records carried checksums reads as it is; once a checksummed record was written,
/// a line without one is damage.
pub fn scan_bytes(bytes: &[u8]) -> Scan {
    let mut scan = Scan {
        len: bytes.len() as u64,
        ..Scan::default()
    };
    let mut bad: Vec<Damage> = Vec::new();
    let mut seen_sum = false;
    let (mut offset, mut lineno) = (0usize, 0u64);
    while offset < bytes.len() {
        lineno += 1;
        let (line, end) = match bytes[offset..].iter().position(|b| *b == b'\n') {
            Some(i) => (&bytes[offset..offset + i], offset + i + 1),
            None => (&bytes[offset..], bytes.len()),
        };
        let complete = end <= bytes.len() && bytes.get(end - 1) == Some(&b'\n');
        let result = match decode(line) {
            Ok(_) if !complete => Err("no newline at its end".to_owned()),
            Ok((_, false)) if seen_sum => Err("no checksum after checksummed records".to_owned()),
            other => other,
        };
        match result {
            Ok((r, had_sum)) => {
                seen_sum |= had_sum;
                // Everything unreadable so far lies before a good record: damage.
                scan.damage.append(&mut bad);
                scan.records.push(r);
                scan.lines.push(lineno);
                scan.good_len = end as u64;
            }
            Err(why) => bad.push(Damage {
                line: lineno,
                offset: offset as u64,
                why,
            }),
        }
        offset = end;
    }
    scan
}

/// Reads the journal file (absent: empty).
pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let path = dir.join(FILE_NAME);
    match File::open(&path) {
        Ok(mut f) => scan_file(&mut f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Scan::default()),
        Err(e) => Err(e),
    }
}

fn scan_file(file: &mut File) -> std::io::Result<Scan> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(scan_bytes(&bytes))
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

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> JournalError {
    let path = path.display().to_string();
    move |source| JournalError::Io {
        path: path.clone(),
        source,
    }
}

/// Opens (creating) the journal in `dir` under its lock and reads it whole.
fn locked_scan(dir: &Path) -> Result<(Flock<File>, Scan, PathBuf), JournalError> {
    let path = dir.join(FILE_NAME);
    let io = io_error(&path);
    std::fs::create_dir_all(dir).map_err(&io)?;
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(&io)?;
    // One writer per journal: a second clusterwatch on the same state_dir would decide
    // without seeing the first one's runs, and could run a disruptive hook twice.
    let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        io(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("locked by another process ({errno}); is another clusterwatch using this state_dir?"),
        ))
    })?;
    let scan = scan_file(&mut file).map_err(&io)?;
    Ok((file, scan, path))
}

impl Journal {
    /// Opens (creating) the journal in `dir`, returns it with every record already in it. A
    /// torn tail (a crash during a write, never acknowledged) is cut off; a damaged line
    /// before an intact record is [`JournalError::Damaged`].
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        let (file, scan, path) = locked_scan(dir)?;
        let io = io_error(&path);
        if !scan.damage.is_empty() {
            return Err(JournalError::Damaged {
                path: path.display().to_string(),
                damage: scan.damage,
            });
        }
        if scan.good_len < scan.len {
            tracing::warn!(journal = %path.display(), bytes = scan.len - scan.good_len, "cutting off a torn journal tail (a write that was never acknowledged)");
            file.set_len(scan.good_len).map_err(&io)?;
            file.sync_all().map_err(&io)?;
        }
        let (tx, rx) = mpsc::channel::<Pending>();
        let thread_path = path.clone();
        let good_len = scan.good_len;
        std::thread::Builder::new()
            .name("hook-journal".into())
            .spawn(move || writer(file, good_len, rx, &thread_path))
            .map_err(&io)?;
        Ok((Journal { tx, path }, scan.records))
    }

    /// Appends `records` and waits until they are on disk, whole.
    pub async fn append(&self, records: &[Record]) -> Result<(), JournalError> {
        let mut bytes = Vec::with_capacity(256 * records.len());
        for r in records {
            encode(r, &mut bytes);
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
fn writer(mut file: Flock<File>, good_len: u64, rx: mpsc::Receiver<Pending>, path: &Path) {
    let mut end = End {
        good_len,
        dirty: false,
    };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|p| p.bytes.len()).sum());
        for p in &batch {
            buf.extend_from_slice(&p.bytes);
        }
        let result = end.write(&mut *file, &buf);
        if let Err(e) = &result {
            tracing::error!(journal = %path.display(), error = %e, cut_back = !end.dirty, "journal write failed; the decisions in it are refused");
        }
        for p in batch {
            let _ = p.done.send(result.clone());
        }
    }
}

/// Where a file can be appended to, synced and cut.
trait Sink {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()>;
    fn cut(&mut self, len: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write_all(buf)?;
        self.sync_data()
    }
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.sync_data()
    }
}

/// The journal's end: the length of what was acknowledged, and whether a failed write may
/// still lie after it.
struct End {
    good_len: u64,
    dirty: bool,
}

impl End {
    /// A write that fails is cut back to the last acknowledged byte; until that cut succeeds,
    /// every batch is refused, so no record is ever written after a fragment.
    fn write(&mut self, sink: &mut impl Sink, buf: &[u8]) -> Result<(), String> {
        if self.dirty {
            sink.cut(self.good_len).map_err(|e| {
                format!("the journal still ends in a failed write that cannot be cut back: {e}")
            })?;
            self.dirty = false;
        }
        match sink.append(buf) {
            Ok(()) => {
                self.good_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.dirty = sink.cut(self.good_len).is_err();
                Err(e.to_string())
            }
        }
    }
}

/// Reads a journal without opening it for writing (for `hooks replay`); damage is an error.
pub fn read(dir: &Path) -> Result<Vec<Record>, JournalError> {
    let path = dir.join(FILE_NAME);
    let scan = scan(dir).map_err(io_error(&path))?;
    if !scan.damage.is_empty() {
        return Err(JournalError::Damaged {
            path: path.display().to_string(),
            damage: scan.damage,
        });
    }
    Ok(scan.records)
}

/// `hooks journal --accept-damage`: keeps the readable records, drops the damaged lines and
/// the torn tail, and ends the journal with `closing` records and a `damage_accepted` record.
/// The file as it was is kept as `journal.jsonl.damaged-UNIXTIME`. Needs the journal's lock
/// (clusterwatch stopped). Returns what was dropped.
pub fn accept_damage(
    dir: &Path,
    now: f64,
    closing: impl FnOnce(&[Record]) -> Vec<Record>,
) -> Result<Vec<Damage>, JournalError> {
    // The lock is held until the new file is in place: no clusterwatch starts on either.
    let (_lock, scan, path) = locked_scan(dir)?;
    let io = io_error(&path);
    if scan.damage.is_empty() {
        return Ok(Vec::new());
    }
    let saved = dir.join(format!("{FILE_NAME}.damaged-{}", now as u64));
    std::fs::copy(&path, &saved).map_err(&io)?;
    File::open(&saved).and_then(|f| f.sync_all()).map_err(&io)?;
    let mut bytes = Vec::new();
    let mut tail = closing(&scan.records);
    tail.push(Record {
        ts: now,
        event: Event::DamageAccepted {
            lines: scan.damage.iter().map(|d| d.line).collect(),
            saved_as: saved.display().to_string(),
        },
    });
    for r in scan.records.iter().chain(&tail) {
        encode(r, &mut bytes);
    }
    // A new file renamed over the old one: a crash leaves the one or the other, whole.
    let fresh = dir.join(format!("{FILE_NAME}.new"));
    let mut f = File::create(&fresh).map_err(&io)?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(&io)?;
    std::fs::rename(&fresh, &path).map_err(&io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(&io)?;
    Ok(scan.damage)
}

/// One record as a line for people: time, event, and its fields, control characters escaped.
pub fn render(r: &Record) -> String {
    let time = render_time(r.ts);
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
                fields.push(format!("{}={}", escape(&k), plain(&v)));
            }
        }
        let evidence = obj.remove("evidence");
        if let Some(serde_json::Value::Object(evidence)) = &evidence {
            for (k, v) in evidence {
                fields.push(format!("evidence.{}={}", escape(k), plain(v)));
            }
        }
        for (k, v) in obj.iter() {
            fields.push(format!("{}={}", escape(k), plain(v)));
        }
    }
    format!("{time} {event:<16} {}", fields.join(" "))
}

/// RFC 3339 for a time between 1970 and 9999; anything else (a damaged or hand-edited record)
/// as the raw number.
fn render_time(ts: f64) -> String {
    const YEAR_10000: f64 = 253_402_300_800.0;
    if ts.is_finite() && (0.0..YEAR_10000).contains(&ts) {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(ts),
        )
        .to_string()
    } else {
        format!("ts={ts}")
    }
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if !s.is_empty() && !s.contains([' ', '\n', '"']) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// Control characters (C0, DEL, C1: terminal escapes) as `\u{..}`, so a webhook field cannot
/// drive the terminal of whoever reads the journal.
fn escape(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
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

    fn lines(records: &[Record]) -> Vec<u8> {
        let mut b = Vec::new();
        for r in records {
            encode(r, &mut b);
        }
        b
    }

    fn reopen(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        // The previous writer's thread lets go of the lock once it has seen its channel close.
        for _ in 0..500 {
            match Journal::open(dir) {
                Err(JournalError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other,
            }
        }
        panic!("the journal lock was never released")
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, old) = Journal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            j.append(&[rec(1), rec(2)]).await.unwrap();
        }
        // A crash in the middle of a write leaves half a line, and ext4 NULs after it.
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":2,\"event\":\"unkn\0\0\0\0").unwrap();
        drop(f);
        let (j, old) = reopen(dir.path()).unwrap();
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

    #[test]
    fn only_the_tail_may_be_torn() {
        let good = lines(&[rec(1), rec(2), rec(3)]);
        let l1 = lines(&[rec(1)]).len();
        // NULs at the very end, or a whole NUL block: a torn tail, the records stay.
        let mut tail = good.clone();
        tail.extend_from_slice(&[0u8; 4096]);
        let s = scan_bytes(&tail);
        assert!(s.damage.is_empty());
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.good_len, good.len() as u64);
        // 4 KiB of NULs before the second record: damage, named by line.
        let mut nuls = good[..l1].to_vec();
        nuls.extend_from_slice(&[0u8; 4096]);
        nuls.extend_from_slice(&good[l1..]);
        let s = scan_bytes(&nuls);
        assert_eq!(s.damage.len(), 1, "{:?}", s.damage);
        assert_eq!(s.damage[0].line, 2);
        assert!(s.damage[0].why.contains("NUL"));
        // A garbage line in the middle.
        let mut garbage = good[..l1].to_vec();
        garbage.extend_from_slice(b"garbage\n");
        garbage.extend_from_slice(&good[l1..]);
        assert_eq!(scan_bytes(&garbage).damage[0].line, 2);
        // A fragment left by a failed write, then a record on the same line.
        let mut fragment = good[..l1].to_vec();
        fragment.extend_from_slice(b"{\"ts\":2,\"ev");
        fragment.extend_from_slice(&good[l1..]);
        let s = scan_bytes(&fragment);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.records.len(), 2);
        // One changed byte that leaves valid JSON: the checksum tells.
        let mut changed = good.clone();
        let at = l1 + good[l1..].windows(3).position(|w| w == b"\"h\"").unwrap() + 1;
        changed[at] = b'g';
        let s = scan_bytes(&changed);
        assert_eq!(s.damage.len(), 1);
        assert!(s.damage[0].why.contains("checksum"), "{:?}", s.damage);
    }

    #[test]
    fn journals_without_checksums_still_read_and_results_keep_their_spelling() {
        let old = b"{\"ts\":1.5,\"event\":\"unknown\",\"run\":1,\"hook\":\"h\"}\n\
{\"ts\":2.0,\"event\":\"finished\",\"run\":1,\"hook\":\"h\",\"attempt\":1,\"result\":\"retry\",\"exit_code\":1,\"duration_seconds\":0.1,\"stdout_tail\":\"\",\"stderr_tail\":\"\"}\n";
        let s = scan_bytes(old);
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert_eq!(s.records[0], rec(1));
        assert!(matches!(
            s.records[1].event,
            Event::Finished {
                result: RunResult::Retry,
                ..
            }
        ));
        // New records are read by the old reader too: the same fields, plus `sum`.
        let mut new = Vec::new();
        encode(&s.records[1], &mut new);
        let v: serde_json::Value = serde_json::from_slice(&new).unwrap();
        assert_eq!(v["result"], "retry");
        assert_eq!(v["sum"].as_str().unwrap().len(), SUM_HEX);
        // An old journal continued by the new writer: old lines first, then checksummed.
        let mut mixed = old.to_vec();
        mixed.extend_from_slice(&new);
        assert!(scan_bytes(&mixed).damage.is_empty());
        // A checksummed line whose `sum` key was hit is no old record.
        let mut hit = new.clone();
        let at = hit.windows(5).position(|w| w == b"\"sum\"").unwrap();
        hit[at + 3] = b'n';
        let mut first = hit.clone();
        first.extend_from_slice(&new);
        let s = scan_bytes(&first);
        assert_eq!(s.damage.len(), 1, "{:?}", s.damage);
        assert!(
            s.damage[0].why.contains("unknown field `sun`"),
            "{:?}",
            s.damage
        );
        // ... but an unchecked line after a checked one is damage.
        let mut bad = new.clone();
        bad.extend_from_slice(&old[..]);
        bad.extend_from_slice(&new);
        assert!(!scan_bytes(&bad).damage.is_empty());
    }

    #[tokio::test]
    async fn a_damaged_journal_refuses_to_open_until_the_damage_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut bytes = lines(&[rec(1)]);
        bytes.extend_from_slice(b"garbage\n");
        bytes.extend_from_slice(&lines(&[rec(3)]));
        std::fs::write(&path, &bytes).unwrap();
        let e = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("line 2 (byte"), "{e}");
        assert!(
            e.contains("--accept-damage") && e.contains("--check"),
            "{e}"
        );
        let dropped = accept_damage(dir.path(), 100.0, |_| vec![rec(9)]).unwrap();
        assert_eq!(dropped.len(), 1);
        let saved = dir.path().join(format!("{FILE_NAME}.damaged-100"));
        assert_eq!(std::fs::read(saved).unwrap(), bytes);
        let (_j, records) = reopen(dir.path()).unwrap();
        assert_eq!(&records[..3], &[rec(1), rec(3), rec(9)]);
        assert!(matches!(
            &records[3].event,
            Event::DamageAccepted { lines, .. } if lines == &[2]
        ));
    }

    /// A file that takes `room` more bytes, then fails (as a full disk does, part-way).
    struct Full {
        bytes: Vec<u8>,
        room: usize,
        cut_fails: bool,
    }

    impl Sink for Full {
        fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
            let n = buf.len().min(self.room);
            self.bytes.extend_from_slice(&buf[..n]);
            self.room -= n;
            if n < buf.len() {
                return Err(std::io::Error::other("No space left on device"));
            }
            Ok(())
        }
        fn cut(&mut self, len: u64) -> std::io::Result<()> {
            if self.cut_fails {
                return Err(std::io::Error::other("cannot truncate"));
            }
            self.bytes.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_is_cut_back_or_writing_stops_until_it_can_be() {
        let mut f = Full {
            bytes: Vec::new(),
            room: 1 << 20,
            cut_fails: false,
        };
        let mut end = End {
            good_len: 0,
            dirty: false,
        };
        end.write(&mut f, &lines(&[rec(1)])).unwrap();
        f.room = 10;
        assert!(end.write(&mut f, &lines(&[rec(2)])).is_err());
        // Cut back: the next record starts on its own line.
        f.room = 1 << 20;
        end.write(&mut f, &lines(&[rec(3)])).unwrap();
        assert_eq!(scan_bytes(&f.bytes).records, vec![rec(1), rec(3)]);
        assert!(scan_bytes(&f.bytes).damage.is_empty());

        // The cut fails too: every later write is refused until it works.
        f.room = 10;
        f.cut_fails = true;
        assert!(end.write(&mut f, &lines(&[rec(4)])).is_err());
        f.room = 1 << 20;
        let refused = end.write(&mut f, &lines(&[rec(5)])).unwrap_err();
        assert!(refused.contains("cannot be cut back"), "{refused}");
        f.cut_fails = false;
        end.write(&mut f, &lines(&[rec(6)])).unwrap();
        let s = scan_bytes(&f.bytes);
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert_eq!(s.records, vec![rec(1), rec(3), rec(6)]);
    }

    #[test]
    fn rendering_never_panics_and_escapes_control_characters() {
        let mut r = rec(1);
        r.ts = 1e300;
        assert!(render(&r).starts_with("ts=1"));
        r.ts = f64::NAN;
        assert!(render(&r).starts_with("ts=NaN"));
        r.ts = -5.0;
        let _ = render(&r);
        r.event = Event::Unknown {
            run: 1,
            hook: "a\u{1b}[2Jb\u{9b}c\u{7f}".into(),
        };
        let line = render(&r);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\u{1b}[2Jb\\u{9b}c\\u{7f}"), "{line}");
    }
}
