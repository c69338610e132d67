//! Single files: presence, size and age (flag files such as the CP out-of-service marker),
//! a status file's content as a state-set over declared states (SOUNZ's node role), and a
//! regex matched against content. Reads are capped in size and run off the runtime.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;

use crate::blocking::{BlockingError, InFlight};
use crate::clock;
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{compile_regex, HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `file` collector, configured by the `files:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "file",
    section: "files",
    always_on: false,
    configure,
};

/// How much of a file is read by default for `states:` and `match:`: status files are a word.
const DEFAULT_MAX_BYTES: u64 = 64 * 1024;
/// The most `max_bytes` may be: the read happens on every scrape.
const MAX_MAX_BYTES: u64 = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    path: PathBuf,
    /// The states a status file may hold; its content becomes a state-set over them.
    states: Option<Vec<String>>,
    /// A regular expression matched against the content.
    #[serde(rename = "match")]
    matches: Option<String>,
    /// Read at most this many bytes of content.
    max_bytes: Option<u64>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawFile>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let matches = raw
            .matches
            .as_deref()
            .and_then(|p| compile_regex(p, &item, "match", problems));
        let states = raw.states.unwrap_or_default();
        if states.iter().any(|s| s.trim().is_empty() || s.trim() != s) {
            problems.push(
                item.problem(
                    "states",
                    "a state must be a word without surrounding spaces",
                )
                .hint("content is compared after trimming whitespace"),
            );
        }
        for (i, s) in states.iter().enumerate() {
            if states[..i].iter().any(|o| o.eq_ignore_ascii_case(s)) {
                problems.push(item.problem("states", format!("state `{s}` is listed twice")));
            }
        }
        if raw.max_bytes == Some(0) {
            problems.push(item.problem("max_bytes", "max_bytes must be greater than zero"));
        } else if raw.max_bytes.is_some_and(|n| n > MAX_MAX_BYTES) {
            problems.push(
                item.problem("max_bytes", "max_bytes must be at most 16777216 (16 MiB)")
                    .hint("only the start of a status file is read on every scrape"),
            );
        }
        if problems.len() > before {
            continue;
        }
        out.push(Target::new(
            &KIND,
            id,
            FileCollector {
                path: ctx.resolve(&raw.path),
                states,
                matches,
                max_bytes: raw.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
                inflight: InFlight::new(),
            },
        ));
    }
    out
}

/// One watched file.
pub struct FileCollector {
    path: PathBuf,
    states: Vec<String>,
    matches: Option<Regex>,
    max_bytes: u64,
    inflight: InFlight,
}

/// What one look at the file found; `None` when it does not exist.
#[derive(Debug, PartialEq)]
struct Seen {
    size: u64,
    modified: Option<SystemTime>,
    /// The first `max_bytes` of content, when states or a match need it.
    content: Option<String>,
}

fn look(path: &std::path::Path, max_bytes: u64, read: bool) -> std::io::Result<Option<Seen>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let content = if read && meta.is_file() {
        let mut buf = Vec::new();
        file.take(max_bytes).read_to_end(&mut buf)?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    } else {
        None
    };
    Ok(Some(Seen {
        size: meta.len(),
        modified: meta.modified().ok(),
        content,
    }))
}

/// The declared state the content names, compared trimmed and ignoring ASCII case.
fn state_of<'a>(content: &str, states: &'a [String]) -> Option<&'a str> {
    let word = content.trim();
    states
        .iter()
        .find(|s| s.eq_ignore_ascii_case(word))
        .map(String::as_str)
}

#[async_trait]
impl Collector for FileCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let path = self.path.clone();
        let (max, read) = (
            self.max_bytes,
            !self.states.is_empty() || self.matches.is_some(),
        );
        let key = self.path.to_string_lossy().into_owned();
        let seen = self
            .inflight
            .run(&key, ctx.deadline, move || look(&path, max, read))
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("file read failed".into()),
            })?
            .map_err(|e| CollectError::Io(format!("{}: {e}", self.path.display())))?;
        out.gauge(
            "clusterwatch_file_present",
            "Whether the file exists (1) or not (0).",
            &[],
            if seen.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(s) = &seen {
            out.gauge(
                "clusterwatch_file_size_bytes",
                "Size of the file, in bytes.",
                &[],
                s.size as f64,
            );
            if let Some(m) = s.modified {
                let age = clock::age_seconds(m);
                out.gauge(
                    "clusterwatch_file_modified_age_seconds",
                    "Seconds since the file was last modified.",
                    &[],
                    age,
                );
            }
        }
        let content = seen.as_ref().and_then(|s| s.content.as_deref());
        if !self.states.is_empty() {
            let current = content.and_then(|c| state_of(c, &self.states));
            let states: Vec<&str> = self.states.iter().map(String::as_str).collect();
            out.state_set(
                "clusterwatch_file_state",
                "The status file's content as a state-set over the configured states (all 0 when missing or unrecognised).",
                &[],
                "state",
                &states,
                current,
            );
            out.gauge(
                "clusterwatch_file_state_unknown",
                "1 when the status file exists but its content is none of the configured states.",
                &[],
                if content.is_some() && current.is_none() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        if let Some(re) = &self.matches {
            out.gauge(
                "clusterwatch_file_content_matches",
                "Whether the file's content (its first max_bytes) matches the configured regular expression (1) or not (0).",
                &[],
                if content.is_some_and(|c| re.is_match(c)) {
                    1.0
                } else {
                    0.0
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration as config;
    use std::path::Path;

    const SOUNZ: &[&str] = &[
        "down",
        "production",
        "standby",
        "production_alone",
        "standby_as_production",
        "production_as_standby",
    ];

    fn states() -> Vec<String> {
        SOUNZ.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn content_maps_to_a_declared_state() {
        let s = states();
        assert_eq!(state_of("standby\n", &s), Some("standby"));
        assert_eq!(
            state_of("  PRODUCTION_ALONE \r\n", &s),
            Some("production_alone")
        );
        assert_eq!(state_of("prod", &s), None);
        assert_eq!(state_of("", &s), None);
    }

    #[test]
    fn reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, "x".repeat(10_000)).unwrap();
        let seen = look(&p, 100, true).unwrap().unwrap();
        assert_eq!(seen.size, 10_000);
        assert_eq!(seen.content.unwrap().len(), 100);
        assert_eq!(look(&dir.path().join("none"), 100, true).unwrap(), None);
    }

    #[test]
    fn config_problems_have_lines() {
        let err = config::parse(
            "files:\n  - { name: a, path: /a, match: \"(\" }\n  - { name: b, path: /b, states: [up, Up] }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert!(
            err.contains("c.yml:2:") && err.contains("invalid regular expression"),
            "{err}"
        );
        assert!(
            err.contains("c.yml:3:") && err.contains("listed twice"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn status_file_switch_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sounz.status");
        let c = FileCollector {
            path: p.clone(),
            states: states(),
            matches: Some(Regex::new("^production").unwrap()),
            max_bytes: DEFAULT_MAX_BYTES,
            inflight: InFlight::new(),
        };
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        let state = |b: &SampleBuffer| -> Vec<String> {
            b.get("clusterwatch_file_state")
                .unwrap()
                .samples
                .iter()
                .filter(|s| s.value == 1.0)
                .map(|s| s.labels[0].1.clone())
                .collect()
        };
        let one = |b: &SampleBuffer, n: &str| b.get(n).unwrap().samples[0].value;
        let mut b = SampleBuffer::new();
        c.collect(&ctx, &mut b).await.unwrap();
        assert_eq!(one(&b, "clusterwatch_file_present"), 0.0);
        assert!(state(&b).is_empty());
        assert_eq!(b.get("clusterwatch_file_state").unwrap().samples.len(), 6);

        std::fs::write(&p, "standby\n").unwrap();
        let mut b = SampleBuffer::new();
        c.collect(&ctx, &mut b).await.unwrap();
        assert_eq!(state(&b), ["standby"]);
        assert_eq!(one(&b, "clusterwatch_file_content_matches"), 0.0);

        std::fs::write(&p, "production_alone\n").unwrap();
        let mut b = SampleBuffer::new();
        c.collect(&ctx, &mut b).await.unwrap();
        assert_eq!(state(&b), ["production_alone"]);
        assert_eq!(one(&b, "clusterwatch_file_content_matches"), 1.0);
        assert_eq!(one(&b, "clusterwatch_file_state_unknown"), 0.0);

        std::fs::write(&p, "maintenance\n").unwrap();
        let mut b = SampleBuffer::new();
        c.collect(&ctx, &mut b).await.unwrap();
        assert!(state(&b).is_empty());
        assert_eq!(one(&b, "clusterwatch_file_state_unknown"), 1.0);
    }
}
