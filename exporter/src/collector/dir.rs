//! Directory contents: total bytes, file count, newest and oldest file age, for places such as
//! the WAL archive or a log directory (growth comes from PromQL `deriv`). The walk runs off
//! the runtime under the target's deadline; it never follows symlinks.

use std::path::{Path, PathBuf};
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

/// The `dir` collector, configured by the `directories:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "dir",
    section: "directories",
    always_on: false,
    configure,
};

/// How deep a recursive walk goes: deep enough for dated archive trees, bounded so a symlink
/// loop or a runaway tree cannot make a scrape unbounded.
const MAX_DEPTH: usize = 8;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    path: PathBuf,
    /// Only count files whose name matches (e.g. `^[0-9A-F]{24}$` for WAL segments).
    pattern: Option<String>,
    #[serde(default)]
    recursive: bool,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawDirectory>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let pattern = raw
            .pattern
            .as_deref()
            .and_then(|p| compile_regex(p, &item, "pattern", problems));
        if problems.len() > before {
            continue;
        }
        out.push(Target::new(
            &KIND,
            id,
            DirCollector {
                path: ctx.resolve(&raw.path),
                pattern,
                recursive: raw.recursive,
                inflight: InFlight::new(),
            },
        ));
    }
    out
}

/// One watched directory.
pub struct DirCollector {
    path: PathBuf,
    pattern: Option<Regex>,
    recursive: bool,
    inflight: InFlight,
}

/// What a walk found.
#[derive(Debug, Default, PartialEq)]
struct DirStats {
    bytes: u64,
    files: u64,
    newest: Option<SystemTime>,
    oldest: Option<SystemTime>,
}

fn walk(root: &Path, pattern: Option<&Regex>, recursive: bool) -> std::io::Result<DirStats> {
    let mut stats = DirStats::default();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // The root must be readable; a subdirectory vanishing mid-walk (rotation) is not
            // a failure.
            Err(e) if depth == 0 => return Err(e),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if recursive && depth < MAX_DEPTH {
                    stack.push((entry.path(), depth + 1));
                }
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            if let Some(p) = pattern {
                if !p.is_match(&entry.file_name().to_string_lossy()) {
                    continue;
                }
            }
            stats.bytes += meta.len();
            stats.files += 1;
            if let Ok(m) = meta.modified() {
                stats.newest = Some(stats.newest.map_or(m, |n| n.max(m)));
                stats.oldest = Some(stats.oldest.map_or(m, |o| o.min(m)));
            }
        }
    }
    Ok(stats)
}

#[async_trait]
impl Collector for DirCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let (path, pattern, recursive) = (self.path.clone(), self.pattern.clone(), self.recursive);
        let key = self.path.to_string_lossy().into_owned();
        let stats = self
            .inflight
            .run(&key, ctx.deadline, move || {
                walk(&path, pattern.as_ref(), recursive)
            })
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("directory walk failed".into()),
            })?
            .map_err(|e| CollectError::Io(format!("{}: {e}", self.path.display())))?;
        out.gauge(
            "clusterwatch_dir_bytes",
            "Total size of the files in the directory, in bytes.",
            &[],
            stats.bytes as f64,
        );
        out.gauge(
            "clusterwatch_dir_files",
            "Number of files in the directory.",
            &[],
            stats.files as f64,
        );
        if let Some(t) = stats.newest {
            out.gauge(
                "clusterwatch_dir_newest_file_age_seconds",
                "Age of the most recently modified file, in seconds.",
                &[],
                clock::age_seconds(t),
            );
        }
        if let Some(t) = stats.oldest {
            out.gauge(
                "clusterwatch_dir_oldest_file_age_seconds",
                "Age of the least recently modified file, in seconds.",
                &[],
                clock::age_seconds(t),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_matching_files_and_ages() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("000000010000000000000001"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.path().join("000000010000000000000002"), vec![0u8; 50]).unwrap();
        std::fs::write(dir.path().join("00000002.history"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub").join("000000010000000000000003"),
            vec![0u8; 7],
        )
        .unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("000000010000000000000001"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let wal = Regex::new("^[0-9A-F]{24}$").unwrap();
        let flat = walk(dir.path(), Some(&wal), false).unwrap();
        assert_eq!((flat.bytes, flat.files), (150, 2));
        assert!(clock::age_seconds(flat.oldest.unwrap()) >= 3599.0);
        assert!(clock::age_seconds(flat.newest.unwrap()) < 60.0);
        let deep = walk(dir.path(), None, true).unwrap();
        assert_eq!((deep.bytes, deep.files), (158, 4));
    }

    #[test]
    fn missing_directory_is_an_error() {
        assert!(walk(Path::new("/nonexistent/clusterwatch"), None, false).is_err());
    }
}
