//! The textfile directory: `*.prom` files written by cron jobs (nightly dump, rsync) merged
//! into the exposition, as node_exporter does, with each file's mtime. A malformed file is
//! left out whole and reported by `clusterwatch_textfile_file_error`; it never fails a scrape.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use serde::Deserialize;

use crate::blocking::{BlockingError, InFlight};
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{Located, Problem, SectionContext, TargetId};
use crate::snapshot::{Kind, Label, SampleBuffer};

/// The `textfile` collector, configured by the `textfile:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "textfile",
    section: "textfile",
    always_on: false,
    configure,
};

/// A textfile larger than this is not a cron job's report; it is rejected unread.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTextfile {
    directory: PathBuf,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let Some(raw) = at.parse::<Option<RawTextfile>>(problems).flatten() else {
        if problems.is_empty() {
            problems.push(at.problem("directory", "the textfile section needs a `directory`"));
        }
        return Vec::new();
    };
    vec![Target::new(
        &KIND,
        TargetId::local("textfile"),
        TextfileCollector {
            directory: ctx.resolve(&raw.directory),
            inflight: InFlight::new(),
        },
    )]
}

/// The configured textfile directory.
pub struct TextfileCollector {
    directory: PathBuf,
    inflight: InFlight,
}

/// One series read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct TextSample {
    /// Sample name as written.
    pub name: String,
    /// Label pairs as written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
    /// Counter (a `_total` sample of a family typed counter) or gauge (everything else).
    pub kind: Kind,
    /// The family's HELP, if the file gave one.
    pub help: Option<String>,
}

fn valid_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Label pairs as written in a file.
type Pairs = Vec<(String, String)>;

/// Labels from `a="x",b="y"}` (after the opening brace); returns them and the rest after `}`.
fn parse_labels(mut rest: &str) -> Result<(Pairs, &str), String> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let key = rest[..eq].trim();
        if !valid_name(key, false) {
            return Err(format!("invalid label name `{key}`"));
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in a label value".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.push((key.to_owned(), value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses a file in the Prometheus text format (0.0.4), all or nothing: any bad line, a
/// client-side timestamp, a duplicate series or a name clusterwatch owns rejects the file.
pub fn parse_textfile(text: &str) -> Result<Vec<TextSample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}", i + 1);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(t)) => {
                    let t = t.trim();
                    if !["counter", "gauge", "untyped", "histogram", "summary"].contains(&t) {
                        return Err(at(format!("unknown type `{t}`")));
                    }
                    if types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(at(format!("second TYPE for `{name}`")));
                    }
                }
                (Some("HELP"), Some(name), help) => {
                    helps.insert(name.to_owned(), help.unwrap_or("").to_owned());
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' ', '\t'])
            .ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at(format!("invalid metric name `{name}`")));
        }
        if name.starts_with("clusterwatch_") {
            return Err(at(format!("`{name}` is in clusterwatch's own namespace")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r).map_err(at)?,
            None => (Vec::new(), &line[name_end..]),
        };
        if let Some((k, _)) = labels
            .iter()
            .find(|(k, _)| k == "target" || k == "cluster" || k == "collector")
        {
            return Err(at(format!("label `{k}` is set by clusterwatch")));
        }
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| at("missing or bad value".into()))?;
        if fields.next().is_some() {
            return Err(at("client-side timestamps are not supported".into()));
        }
        let mut key: Vec<&(String, String)> = labels.iter().collect();
        key.sort();
        if !seen.insert(format!("{name}{key:?}")) {
            return Err(at(format!("duplicate series for `{name}`")));
        }
        let base = name.strip_suffix("_total").unwrap_or(name);
        let is_counter = name.ends_with("_total")
            && (types.get(base).map(String::as_str) == Some("counter")
                || types.get(name).map(String::as_str) == Some("counter"));
        samples.push(TextSample {
            name: name.to_owned(),
            labels,
            value,
            kind: if is_counter {
                Kind::Counter
            } else {
                Kind::Gauge
            },
            help: helps.get(name).or_else(|| helps.get(base)).cloned(),
        });
    }
    Ok(samples)
}

/// One `*.prom` file: its mtime and its samples or why it was rejected.
struct Read1 {
    file: String,
    mtime: Option<f64>,
    result: Result<Vec<TextSample>, String>,
}

fn read_directory(dir: &Path) -> std::io::Result<Vec<Read1>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.ends_with(".prom") {
            continue;
        }
        let path = entry.path();
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        let result = if meta.len() > MAX_FILE_BYTES {
            Err(format!("larger than {MAX_FILE_BYTES} bytes"))
        } else {
            let mut buf = Vec::new();
            match std::fs::File::open(&path)
                .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut buf))
            {
                Ok(_) => match String::from_utf8(buf) {
                    Ok(text) => parse_textfile(&text),
                    Err(_) => Err("not UTF-8".into()),
                },
                Err(e) => Err(format!("cannot read: {e}")),
            }
        };
        out.push(Read1 {
            file,
            mtime,
            result,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

#[async_trait]
impl Collector for TextfileCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let dir = self.directory.clone();
        let key = self.directory.to_string_lossy().into_owned();
        let files = self
            .inflight
            .run(&key, ctx.deadline, move || read_directory(&dir))
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("textfile directory read failed".into()),
            })?
            .map_err(|e| CollectError::Io(format!("{}: {e}", self.directory.display())))?;
        for f in files {
            let labels = [("file", f.file.as_str())];
            if let Some(m) = f.mtime {
                out.gauge(
                    "clusterwatch_textfile_file_mtime_seconds",
                    "Unix time the textfile was last modified.",
                    &labels,
                    m,
                );
            }
            let mut error = f.result.is_err();
            match f.result {
                Ok(samples) => {
                    // All or nothing: a file whose samples clash with earlier families is
                    // dropped whole. Checked on a copy so a clash leaves nothing behind.
                    let mut staged = SampleBuffer::new();
                    for s in samples {
                        let help = Cow::Owned(
                            s.help
                                .unwrap_or_else(|| format!("Read from textfile {}.", f.file)),
                        );
                        let labels: Vec<Label> = s
                            .labels
                            .into_iter()
                            .map(|(k, v)| (Cow::Owned(k), v))
                            .collect();
                        let mut probe = out.get(&s.name).map(|fam| fam.kind);
                        if probe.is_none() {
                            probe = staged.get(&s.name).map(|fam| fam.kind);
                        }
                        if probe.is_some_and(|k| k != s.kind) {
                            error = true;
                            break;
                        }
                        staged.push_owned(&s.name, help, s.kind, labels, s.value);
                    }
                    if error {
                        tracing::warn!(file = %f.file, "textfile clashes with another family's type; left out");
                    } else {
                        // The target label comes from this collector's own buffer.
                        for fam in staged.families() {
                            for sample in &fam.samples {
                                out.push_owned(
                                    &fam.name,
                                    fam.help.clone(),
                                    fam.kind,
                                    sample.labels.clone(),
                                    sample.value,
                                );
                            }
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(file = %f.file, error = %why, "textfile rejected");
                }
            }
            out.gauge(
                "clusterwatch_textfile_file_error",
                "1 when the textfile could not be read or parsed and was left out.",
                &labels,
                if error { 1.0 } else { 0.0 },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_cron_report() {
        let s = parse_textfile(
            "# HELP backup_last_success_timestamp_seconds Last good nightly dump.\n\
             # TYPE backup_last_success_timestamp_seconds gauge\n\
             backup_last_success_timestamp_seconds{job=\"pg_dump\",db=\"a \\\"b\\\"\"} 1.7e9\n\
             # TYPE rsync_runs counter\n\
             rsync_runs_total 12\n\
             no_type_metric NaN\n",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels[1], ("db".into(), "a \"b\"".into()));
        assert_eq!(s[0].help.as_deref(), Some("Last good nightly dump."));
        assert_eq!((s[1].kind, s[1].value), (Kind::Counter, 12.0));
        assert_eq!(s[2].kind, Kind::Gauge);
    }

    #[test]
    fn rejects_bad_files_with_the_line() {
        for (text, why) in [
            ("ok 1\nbad-name 2\n", "line 2: invalid metric name"),
            ("x{a=\"1} 2\n", "unterminated"),
            ("x 1 1700000000000\n", "timestamps"),
            ("x 1\nx 2\n", "duplicate series"),
            ("x{target=\"a\"} 1\n", "set by clusterwatch"),
            ("clusterwatch_fake 1\n", "own namespace"),
            ("x one\n", "bad value"),
        ] {
            let err = parse_textfile(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_bad_file_is_reported_and_the_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.prom"), "dump_ok 1\n").unwrap();
        std::fs::write(dir.path().join("bad.prom"), "dump_failed{ 1\n").unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "not a textfile").unwrap();
        let c = TextfileCollector {
            directory: dir.path().to_path_buf(),
            inflight: InFlight::new(),
        };
        let mut out = SampleBuffer::new();
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        c.collect(&ctx, &mut out).await.unwrap();
        assert_eq!(out.get("dump_ok").unwrap().samples[0].value, 1.0);
        assert!(out.get("dump_failed").is_none());
        let errors: Vec<(String, f64)> = out
            .get("clusterwatch_textfile_file_error")
            .unwrap()
            .samples
            .iter()
            .map(|s| (s.labels[0].1.clone(), s.value))
            .collect();
        assert_eq!(
            errors,
            [("bad.prom".into(), 1.0), ("good.prom".into(), 0.0)]
        );
        assert_eq!(
            out.get("clusterwatch_textfile_file_mtime_seconds")
                .unwrap()
                .samples
                .len(),
            2
        );
    }
}
