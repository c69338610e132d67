//! Log files followed like `tail -F`: from the end at start, across rotation (a new file at the
//! path) and truncation (copytruncate), counting new lines that match named patterns. Memory
//! and work per scrape are bounded; it does not keep or export line content.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;

use crate::blocking::{BlockingError, InFlight};
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{compile_regex, HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `log` collector, configured by the `logs:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "log",
    section: "logs",
    always_on: false,
    configure,
};

/// Bytes read per scrape unless the target sets `max_read_bytes`: a burst of log lines is
/// worked through over several scrapes instead of one long one.
const DEFAULT_MAX_READ_BYTES: u64 = 4 * 1024 * 1024;
/// A line longer than this is matched on its first this-many bytes.
const DEFAULT_MAX_LINE_BYTES: usize = 8 * 1024;
/// Size of one read.
const CHUNK: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    path: PathBuf,
    patterns: BTreeMap<String, String>,
    max_read_bytes: Option<u64>,
    max_line_bytes: Option<usize>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawLog>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        if raw.patterns.is_empty() {
            problems.push(
                item.problem("patterns", "at least one pattern is needed")
                    .hint("e.g. `patterns: { error: 'ERROR|FATAL' }`"),
            );
        }
        let mut patterns = Vec::new();
        for (name, pattern) in &raw.patterns {
            if !valid_pattern_name(name) {
                problems.push(
                    item.problem("patterns", format!("`{name}` is not a pattern name"))
                        .hint("lowercase letters, digits and `_`: it becomes the `pattern` label"),
                );
            }
            if let Some(re) = compile_regex(pattern, &item, &format!("patterns.{name}"), problems) {
                patterns.push((name.clone(), re));
            }
        }
        if raw.max_read_bytes == Some(0) {
            problems
                .push(item.problem("max_read_bytes", "max_read_bytes must be greater than zero"));
        }
        if raw.max_line_bytes == Some(0) {
            problems
                .push(item.problem("max_line_bytes", "max_line_bytes must be greater than zero"));
        }
        if problems.len() > before {
            continue;
        }
        let limits = Limits {
            read: raw.max_read_bytes.unwrap_or(DEFAULT_MAX_READ_BYTES),
            line: raw.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES),
        };
        let path = ctx.resolve(&raw.path);
        let names = patterns.iter().map(|(n, _)| n.clone()).collect();
        let tail = Tail::new(path.clone(), patterns, limits);
        out.push(Target::new(
            &KIND,
            id,
            LogCollector {
                path,
                names,
                tail: Arc::new(Mutex::new(tail)),
                inflight: InFlight::new(),
            },
        ));
    }
    out
}

fn valid_pattern_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// How much one scrape may read, and how much of one line is kept.
#[derive(Clone, Copy, Debug)]
struct Limits {
    read: u64,
    line: usize,
}

/// Counters exported for one file.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counts {
    present: bool,
    /// Per pattern, in configuration order: matches, and unix time of the last one.
    matches: Vec<u64>,
    last_match: Vec<f64>,
    lines: u64,
    bytes: u64,
    rotations: u64,
    truncations: u64,
    lines_cut: u64,
    /// Bytes written to the file (and a rotated-in successor) not read yet.
    unread: u64,
}

/// Where the follower is in the file it follows.
struct Tail {
    path: PathBuf,
    patterns: Vec<(String, Regex)>,
    limits: Limits,
    /// The file being read, its identity (device, inode) and the offset read up to.
    open: Option<(File, (u64, u64))>,
    offset: u64,
    /// The start of a line whose end has not been written yet, at most `limits.line` bytes.
    partial: Vec<u8>,
    /// The current line is longer than `limits.line`; its rest is skipped.
    partial_cut: bool,
    /// The first look happened: a file found then is read from its end, one that appears
    /// later (created or rotated in) from its start.
    started: bool,
    counts: Counts,
}

impl Tail {
    fn new(path: PathBuf, patterns: Vec<(String, Regex)>, limits: Limits) -> Self {
        let n = patterns.len();
        Tail {
            path,
            patterns,
            limits,
            open: None,
            offset: 0,
            partial: Vec::new(),
            partial_cut: false,
            started: false,
            counts: Counts {
                matches: vec![0; n],
                last_match: vec![0.0; n],
                ..Counts::default()
            },
        }
    }

    /// Reads what was appended since the last poll, at most `limits.read` bytes, following a
    /// rotation once the old file is read to its end.
    fn poll(&mut self) -> std::io::Result<Counts> {
        let mut budget = self.limits.read;
        let at_path = match std::fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let first_look = !self.started;
        self.started = true;
        if self.open.is_none() {
            if at_path.is_none() {
                self.counts.present = false;
                self.counts.unread = 0;
                return Ok(self.counts.clone());
            }
            self.open_new(first_look)?;
        }
        self.counts.present = at_path.is_some();
        loop {
            self.read_open(&mut budget)?;
            let (file, id) = self.open.as_ref().expect("a file is open");
            let len = file.metadata()?.len();
            let replaced = at_path.as_ref().is_none_or(|m| (m.dev(), m.ino()) != *id);
            if !replaced {
                self.counts.unread = len.saturating_sub(self.offset);
                break;
            }
            if self.offset < len {
                // The rotated file still has lines to read: finish it on the next scrape.
                self.counts.unread = len - self.offset + at_path.as_ref().map_or(0, |m| m.len());
                break;
            }
            // The old file is read to its end: its last line is complete now.
            self.counts.rotations += 1;
            self.end_partial_line();
            self.open = None;
            if at_path.is_none() {
                self.counts.unread = 0;
                break;
            }
            self.open_new(false)?;
        }
        Ok(self.counts.clone())
    }

    fn open_new(&mut self, from_end: bool) -> std::io::Result<()> {
        let file = File::open(&self.path)?;
        let own = file.metadata()?;
        // Identity of what was opened, not of what was stat'ed a moment before.
        let id = (own.dev(), own.ino());
        self.offset = if from_end { own.len() } else { 0 };
        self.partial.clear();
        self.partial_cut = false;
        self.open = Some((file, id));
        Ok(())
    }

    /// Reads the open file from the offset, within the budget.
    fn read_open(&mut self, budget: &mut u64) -> std::io::Result<()> {
        let file = &mut self.open.as_mut().expect("a file is open").0;
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated in place (copytruncate): start again from its beginning.
            self.counts.truncations += 1;
            self.offset = 0;
            self.partial.clear();
            self.partial_cut = false;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; CHUNK];
        while *budget > 0 {
            let want = (*budget).min(CHUNK as u64) as usize;
            let file = &mut self.open.as_mut().expect("a file is open").0;
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            *budget -= n as u64;
            self.counts.bytes += n as u64;
            self.feed(&buf[..n]);
        }
        Ok(())
    }

    /// Splits bytes into lines, keeping at most `limits.line` bytes of each.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (piece, complete) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[(piece.len() + usize::from(complete)).min(bytes.len())..];
            let room = self.limits.line.saturating_sub(self.partial.len());
            if piece.len() > room {
                self.partial_cut = true;
            }
            self.partial
                .extend_from_slice(&piece[..piece.len().min(room)]);
            if complete {
                self.end_partial_line();
            }
        }
    }

    /// Counts and matches the line collected so far, and starts a new one.
    fn end_partial_line(&mut self) {
        if self.partial.is_empty() && !self.partial_cut {
            return;
        }
        let line = String::from_utf8_lossy(&self.partial);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        self.counts.lines += 1;
        if self.partial_cut {
            self.counts.lines_cut += 1;
        }
        let mut now = None;
        for (i, (_, re)) in self.patterns.iter().enumerate() {
            if re.is_match(line) {
                self.counts.matches[i] += 1;
                self.counts.last_match[i] = *now.get_or_insert_with(|| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64())
                });
            }
        }
        self.partial.clear();
        self.partial_cut = false;
    }
}

/// One followed log file.
pub struct LogCollector {
    path: PathBuf,
    /// Pattern names in configuration order (the `pattern` label).
    names: Vec<String>,
    tail: Arc<Mutex<Tail>>,
    inflight: InFlight,
}

fn write(names: &[String], c: &Counts, out: &mut SampleBuffer) {
    out.gauge(
        "clusterwatch_log_file_present",
        "Whether the log file exists (1) or not (0).",
        &[],
        if c.present { 1.0 } else { 0.0 },
    );
    for (i, name) in names.iter().enumerate() {
        out.counter(
            "clusterwatch_log_matches_total",
            "New log lines that matched the named pattern since clusterwatch started.",
            &[("pattern", name)],
            c.matches[i] as f64,
        );
        out.gauge(
            "clusterwatch_log_last_match_timestamp_seconds",
            "Unix time a new line last matched the named pattern (when it was read; 0 when none has).",
            &[("pattern", name)],
            c.last_match[i],
        );
    }
    let counters: [(&str, &'static str, u64); 5] = [
        (
            "clusterwatch_log_lines_total",
            "New log lines read since clusterwatch started.",
            c.lines,
        ),
        (
            "clusterwatch_log_read_bytes_total",
            "Bytes of the log read since clusterwatch started.",
            c.bytes,
        ),
        (
            "clusterwatch_log_rotations_total",
            "Times the followed file was replaced at its path or removed (rotation), after being read to its end.",
            c.rotations,
        ),
        (
            "clusterwatch_log_truncations_total",
            "Times the file shrank under the read position (copytruncate) and was read again from its start.",
            c.truncations,
        ),
        (
            "clusterwatch_log_lines_cut_total",
            "Lines longer than max_line_bytes, matched on their beginning only.",
            c.lines_cut,
        ),
    ];
    for (name, help, v) in counters {
        out.counter(name, help, &[], v as f64);
    }
    out.gauge(
        "clusterwatch_log_unread_bytes",
        "Bytes written to the log that are not read yet (more than max_read_bytes arrived since the last scrape).",
        &[],
        c.unread as f64,
    );
}

#[async_trait]
impl Collector for LogCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let tail = Arc::clone(&self.tail);
        let key = self.path.to_string_lossy().into_owned();
        let counts = self
            .inflight
            .run(&key, ctx.deadline, move || {
                tail.lock().unwrap_or_else(|p| p.into_inner()).poll()
            })
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("log read failed".into()),
            })?
            .map_err(|e| CollectError::Io(format!("{}: {e}", self.path.display())))?;
        write(&self.names, &counts, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn collector(dir: &Path, extra: &str) -> Arc<Target> {
        let yaml = format!(
            "logs:\n  - name: app\n    path: app.log\n    patterns: {{ error: 'ERROR', oom: 'Out of memory' }}\n{extra}"
        );
        crate::configuration::parse(&yaml, "c.yml", dir)
            .unwrap_or_else(|e| panic!("{}", e.render()))
            .targets
            .into_iter()
            .find(|t| t.name() == "log")
            .unwrap()
    }

    /// Scrapes once; returns (error matches, oom matches, lines) and the buffer.
    async fn scrape(c: &Target) -> (f64, f64, f64, SampleBuffer) {
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        let mut out = SampleBuffer::new();
        c.collect(&ctx, &mut out).await.unwrap();
        let m = out.get("clusterwatch_log_matches_total").unwrap();
        let by = |p: &str| m.samples.iter().find(|s| s.labels[0].1 == p).unwrap().value;
        let lines = out.get("clusterwatch_log_lines_total").unwrap().samples[0].value;
        (by("error"), by("oom"), lines, out)
    }

    fn one(b: &SampleBuffer, name: &str) -> f64 {
        b.get(name).unwrap().samples[0].value
    }

    fn append(p: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[tokio::test]
    async fn follows_from_the_end_and_counts_new_matching_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        // 170 KiB of history with an ERROR in it: not new, not counted.
        append(&log, &"INFO ok\n".repeat(170 * 128));
        append(&log, "ERROR old\n");
        let c = collector(dir.path(), "");
        let (err, oom, lines, b) = scrape(c.as_ref()).await;
        assert_eq!((err, oom, lines), (0.0, 0.0, 0.0));
        assert_eq!(one(&b, "clusterwatch_log_file_present"), 1.0);
        assert_eq!(
            one(&b, "clusterwatch_log_last_match_timestamp_seconds"),
            0.0
        );

        append(
            &log,
            "INFO fine\nERROR disk full\nkernel: Out of memory: ERROR\nERROR no newl",
        );
        let (err, oom, lines, b) = scrape(c.as_ref()).await;
        assert_eq!(
            (err, oom, lines),
            (2.0, 1.0, 3.0),
            "the unfinished line waits"
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let last = one(&b, "clusterwatch_log_last_match_timestamp_seconds");
        assert!((now - last).abs() < 60.0, "{last}");

        append(&log, "ine yet\n");
        let (err, _, lines, _) = scrape(c.as_ref()).await;
        assert_eq!((err, lines), (3.0, 4.0));
    }

    #[tokio::test]
    async fn follows_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let c = collector(dir.path(), "");
        // Missing at start: present 0; created later: read from its start.
        let (_, _, _, b) = scrape(c.as_ref()).await;
        assert_eq!(one(&b, "clusterwatch_log_file_present"), 0.0);
        append(&log, "ERROR one\n");
        assert_eq!(scrape(c.as_ref()).await.0, 1.0);

        // logrotate `create`: lines written before the rename are read from the old file,
        // then the new file from its start.
        append(&log, "ERROR two, last line of the old file\n");
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        append(&log, "ERROR three, first line of the new file\n");
        let (err, _, _, b) = scrape(c.as_ref()).await;
        assert_eq!(err, 3.0);
        assert_eq!(one(&b, "clusterwatch_log_rotations_total"), 1.0);

        // copytruncate: the file shrinks under the read position.
        append(&log, &"INFO padding\n".repeat(100));
        scrape(c.as_ref()).await;
        std::fs::write(&log, "ERROR four\n").unwrap();
        let (err, _, _, b) = scrape(c.as_ref()).await;
        assert_eq!(err, 4.0);
        assert_eq!(one(&b, "clusterwatch_log_truncations_total"), 1.0);
        assert_eq!(one(&b, "clusterwatch_log_rotations_total"), 1.0);

        // Removed: present 0, counts kept.
        std::fs::remove_file(&log).unwrap();
        let (err, _, _, b) = scrape(c.as_ref()).await;
        assert_eq!(err, 4.0);
        assert_eq!(one(&b, "clusterwatch_log_file_present"), 0.0);
    }

    #[tokio::test]
    async fn work_per_scrape_and_line_length_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "").unwrap();
        let c = collector(
            dir.path(),
            "    max_read_bytes: 1000\n    max_line_bytes: 50\n",
        );
        scrape(c.as_ref()).await;
        // 100 lines of 20 bytes, then one 10 000-byte line that starts with ERROR.
        append(&log, &"ERROR 0123456789abc\n".repeat(100));
        append(&log, &format!("ERROR {}\n", "x".repeat(9993)));
        let (err, _, _, b) = scrape(c.as_ref()).await;
        assert_eq!(err, 50.0);
        assert_eq!(one(&b, "clusterwatch_log_read_bytes_total"), 1000.0);
        assert_eq!(one(&b, "clusterwatch_log_unread_bytes"), 11_000.0);
        let mut scrapes = 1;
        loop {
            let (err, _, lines, b) = scrape(c.as_ref()).await;
            scrapes += 1;
            if one(&b, "clusterwatch_log_unread_bytes") == 0.0 {
                assert_eq!((err, lines), (101.0, 101.0));
                assert_eq!(one(&b, "clusterwatch_log_lines_cut_total"), 1.0);
                break;
            }
            assert!(scrapes < 20);
        }
        assert_eq!(scrapes, 12, "1000 bytes a scrape");
    }

    #[test]
    fn config_problems_have_lines() {
        let err = crate::configuration::parse(
            "logs:\n  - { name: a, path: /a, patterns: { Bad-Name: x, ok: '(' } }\n  - { name: b, path: /b, patterns: {} , max_read_bytes: 0 }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        for want in [
            "`Bad-Name` is not a pattern name",
            "invalid regular expression",
            "at least one pattern is needed",
            "max_read_bytes must be greater than zero",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
