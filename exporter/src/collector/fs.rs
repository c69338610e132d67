//! Filesystem usage per mount point: size, free, available, used ratio, inodes, read-only, and
//! the configured alert threshold as its own series so one rule covers every mount. statvfs
//! runs off the runtime per mount; a stuck mount is reported, never waited on twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;

use crate::blocking::{BlockingError, InFlight};
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{compile_regex, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `fs` collector, configured by the `filesystems:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "fs",
    section: "filesystems",
    always_on: false,
    configure,
};

/// Filesystem types that are never real storage (node_exporter's list, plus tmpfs-like ones
/// whose fullness is a memory question).
const DEFAULT_EXCLUDE_FSTYPES: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|efivarfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|ramfs|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs|tmpfs|fuse\\.lxcfs|fuse\\.portal|fuse\\.gvfsd-fuse)$";
/// Mount points under which nothing is an operator's disk.
const DEFAULT_EXCLUDE_MOUNTPOINTS: &str = "^/(dev|proc|run|sys|var/lib/docker/.+|var/lib/containers/storage/.+|var/lib/kubelet/.+|snap/.+)($|/)";
/// Alert threshold for mounts without their own.
const DEFAULT_THRESHOLD: f64 = 0.85;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilesystems {
    name: Option<String>,
    default_threshold: Option<f64>,
    discover: Option<bool>,
    exclude_fstypes: Option<String>,
    exclude_mountpoints: Option<String>,
    // Parsed item by item below, so each bad mount is reported on its own line.
    #[allow(dead_code)]
    mounts: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    path: PathBuf,
    threshold: Option<f64>,
}

/// One explicitly configured path and its threshold.
#[derive(Clone, Debug)]
struct MountRule {
    path: PathBuf,
    threshold: f64,
}

/// Checked `filesystems:` settings.
pub struct FsCollector {
    default_threshold: f64,
    discover: bool,
    exclude_fstypes: Regex,
    exclude_mountpoints: Regex,
    mounts: Vec<MountRule>,
    mounts_file: PathBuf,
    inflight: InFlight,
}

fn check_threshold(v: f64, at: &Located, field: &str, problems: &mut Vec<Problem>) -> bool {
    if v > 0.0 && v <= 1.0 {
        return true;
    }
    let mut p = at.problem(
        field,
        format!("threshold {v} is not a ratio between 0 and 1"),
    );
    if v > 1.0 && v <= 100.0 {
        p = p.hint(format!("write {} for {v}%", v / 100.0));
    }
    problems.push(p);
    false
}

fn compile(
    pattern: Option<String>,
    default: &str,
    at: &Located,
    field: &str,
    problems: &mut Vec<Problem>,
) -> Regex {
    let p = pattern.unwrap_or_else(|| default.to_owned());
    compile_regex(&p, at, field, problems)
        .unwrap_or_else(|| Regex::new(default).expect("default pattern compiles"))
}

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let before = problems.len();
    let Some(raw) = at.parse::<Option<RawFilesystems>>(problems) else {
        return Vec::new();
    };
    let raw = raw.unwrap_or(RawFilesystems {
        name: None,
        default_threshold: None,
        discover: None,
        exclude_fstypes: None,
        exclude_mountpoints: None,
        mounts: None,
    });
    let default_threshold = raw.default_threshold.unwrap_or(DEFAULT_THRESHOLD);
    check_threshold(default_threshold, &at, "default_threshold", problems);
    let mut mounts: Vec<MountRule> = Vec::new();
    if let Some(list) = at.field("mounts") {
        for (m, item) in list.parse_list::<RawMount>(problems) {
            let threshold = m.threshold.unwrap_or(default_threshold);
            if m.threshold.is_some() && !check_threshold(threshold, &item, "threshold", problems) {
                continue;
            }
            if !m.path.is_absolute() {
                problems.push(
                    item.problem("path", "mount path must be absolute")
                        .hint("e.g. `/var/log`"),
                );
                continue;
            }
            if mounts.iter().any(|x| x.path == m.path) {
                problems.push(item.problem(
                    "path",
                    format!("mount {} is listed twice", m.path.display()),
                ));
                continue;
            }
            mounts.push(MountRule {
                path: m.path,
                threshold,
            });
        }
    }
    let id = TargetId::local(raw.name.unwrap_or_else(|| "local".into()));
    let collector = FsCollector {
        default_threshold,
        discover: raw.discover.unwrap_or(true),
        exclude_fstypes: compile(
            raw.exclude_fstypes,
            DEFAULT_EXCLUDE_FSTYPES,
            &at,
            "exclude_fstypes",
            problems,
        ),
        exclude_mountpoints: compile(
            raw.exclude_mountpoints,
            DEFAULT_EXCLUDE_MOUNTPOINTS,
            &at,
            "exclude_mountpoints",
            problems,
        ),
        mounts,
        mounts_file: PathBuf::from("/proc/self/mounts"),
        inflight: InFlight::new(),
    };
    if problems.len() > before {
        return Vec::new();
    }
    vec![Target::new(&KIND, id, collector)]
}

/// One line of /proc/self/mounts.
#[derive(Clone, Debug, PartialEq)]
struct MountEntry {
    device: String,
    mountpoint: PathBuf,
    fstype: String,
}

/// Parses /proc/self/mounts. Later lines win for the same mount point (over-mounts hide what
/// was below them).
fn parse_mounts(text: &str) -> Vec<MountEntry> {
    let mut out: Vec<MountEntry> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mp), Some(fstype)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let entry = MountEntry {
            device: unescape_octal(device),
            mountpoint: PathBuf::from(unescape_octal(mp)),
            fstype: fstype.to_owned(),
        };
        out.retain(|e| e.mountpoint != entry.mountpoint);
        out.push(entry);
    }
    out
}

/// The kernel writes space, tab, newline and backslash in mount fields as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount a path lives on: the longest mount point that is a prefix of it.
fn containing_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
}

/// What statvfs says about one mount.
#[derive(Clone, Copy, Debug)]
struct Usage {
    size: f64,
    free: f64,
    avail: f64,
    inodes: f64,
    inodes_free: f64,
    readonly: bool,
}

fn statvfs(path: &Path) -> Result<Usage, String> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let s = statvfs(path).map_err(|e| e.to_string())?;
    let frsize = s.fragment_size() as f64;
    Ok(Usage {
        size: s.blocks() as f64 * frsize,
        free: s.blocks_free() as f64 * frsize,
        avail: s.blocks_available() as f64 * frsize,
        inodes: s.files() as f64,
        inodes_free: s.files_free() as f64,
        readonly: s.flags().contains(FsFlags::ST_RDONLY),
    })
}

/// A mount to report: its labels and threshold.
struct Planned {
    path: PathBuf,
    device: String,
    fstype: String,
    threshold: f64,
}

impl FsCollector {
    /// Which mounts to stat: every discovered local filesystem (unless disabled) plus every
    /// configured path, configured thresholds winning.
    fn plan(&self, mounts: &[MountEntry]) -> Vec<Planned> {
        let mut plan: Vec<Planned> = Vec::new();
        if self.discover {
            for m in mounts {
                let mp = m.mountpoint.to_string_lossy();
                if self.exclude_fstypes.is_match(&m.fstype)
                    || self.exclude_mountpoints.is_match(&mp)
                {
                    continue;
                }
                plan.push(Planned {
                    path: m.mountpoint.clone(),
                    device: m.device.clone(),
                    fstype: m.fstype.clone(),
                    threshold: self.default_threshold,
                });
            }
        }
        for rule in &self.mounts {
            if let Some(p) = plan.iter_mut().find(|p| p.path == rule.path) {
                p.threshold = rule.threshold;
                continue;
            }
            // A configured path need not be a mount point (e.g. /var/lib/pgsql on the root
            // filesystem): statvfs reports the filesystem that holds it.
            let (device, fstype) = containing_mount(mounts, &rule.path)
                .map(|m| (m.device.clone(), m.fstype.clone()))
                .unwrap_or_default();
            plan.push(Planned {
                path: rule.path.clone(),
                device,
                fstype,
                threshold: rule.threshold,
            });
        }
        plan
    }
}

const HELP_SIZE: &str = "Total size of the filesystem in bytes.";
const HELP_FREE: &str = "Free bytes, including blocks reserved for root.";
const HELP_AVAIL: &str = "Bytes available to unprivileged users.";
const HELP_USED: &str = "Used fraction as df reports it: used / (used + available), 0..1.";
const HELP_INODES: &str = "Total inodes.";
const HELP_INODES_FREE: &str = "Free inodes.";
const HELP_INODES_USED: &str = "Used fraction of inodes, 0..1.";
const HELP_RO: &str = "1 if the filesystem is mounted read-only.";
const HELP_THRESHOLD: &str = "Configured alert threshold for the used ratio of this mount, 0..1.";
const HELP_STAT: &str = "1 if statvfs on the mount succeeded in time; 0 if it failed, timed out or an earlier call is still stuck.";

#[async_trait]
impl Collector for FsCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let mounts_file = self.mounts_file.clone();
        let text = self
            .inflight
            .run("/proc/self/mounts", ctx.deadline, move || {
                std::fs::read_to_string(mounts_file)
            })
            .await
            .map_err(|e| match e {
                BlockingError::Timeout | BlockingError::Stuck => CollectError::Timeout,
                BlockingError::Failed => CollectError::Io("reading the mount table failed".into()),
            })?
            .map_err(|e| CollectError::Io(format!("reading the mount table: {e}")))?;
        let plan = self.plan(&parse_mounts(&text));

        // Leave a little time before the target deadline so a stuck mount is reported as a
        // failed mount instead of taking the whole target down with it.
        let per_mount_deadline = ctx.item_deadline();
        let stats = futures::future::join_all(plan.iter().map(|p| {
            let path = p.path.clone();
            let key = p.path.to_string_lossy().into_owned();
            async move {
                self.inflight
                    .run(&key, per_mount_deadline, move || statvfs(&path))
                    .await
            }
        }))
        .await;

        for (p, stat) in plan.iter().zip(stats) {
            let mp = p.path.to_string_lossy();
            let labels = [
                ("mountpoint", mp.as_ref()),
                ("device", p.device.as_str()),
                ("fstype", p.fstype.as_str()),
            ];
            out.gauge(
                "clusterwatch_fs_threshold_ratio",
                HELP_THRESHOLD,
                &labels,
                p.threshold,
            );
            let usage = match stat {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    tracing::debug!(mountpoint = %mp, error = %e, "statvfs failed");
                    out.gauge("clusterwatch_fs_stat_success", HELP_STAT, &labels, 0.0);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(mountpoint = %mp, error = %e, "statvfs did not finish");
                    out.gauge("clusterwatch_fs_stat_success", HELP_STAT, &labels, 0.0);
                    continue;
                }
            };
            out.gauge("clusterwatch_fs_stat_success", HELP_STAT, &labels, 1.0);
            out.gauge("clusterwatch_fs_size_bytes", HELP_SIZE, &labels, usage.size);
            out.gauge("clusterwatch_fs_free_bytes", HELP_FREE, &labels, usage.free);
            out.gauge(
                "clusterwatch_fs_avail_bytes",
                HELP_AVAIL,
                &labels,
                usage.avail,
            );
            let used = usage.size - usage.free;
            let used_ratio = if used + usage.avail > 0.0 {
                used / (used + usage.avail)
            } else {
                0.0
            };
            out.gauge("clusterwatch_fs_used_ratio", HELP_USED, &labels, used_ratio);
            out.gauge("clusterwatch_fs_inodes", HELP_INODES, &labels, usage.inodes);
            out.gauge(
                "clusterwatch_fs_inodes_free",
                HELP_INODES_FREE,
                &labels,
                usage.inodes_free,
            );
            let inodes_used = if usage.inodes > 0.0 {
                1.0 - usage.inodes_free / usage.inodes
            } else {
                0.0
            };
            out.gauge(
                "clusterwatch_fs_inodes_used_ratio",
                HELP_INODES_USED,
                &labels,
                inodes_used,
            );
            out.gauge(
                "clusterwatch_fs_readonly",
                HELP_RO,
                &labels,
                if usage.readonly { 1.0 } else { 0.0 },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::parse;

    const MOUNTS: &str = "\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
tmpfs /run tmpfs rw 0 0
/dev/vdb /var/log xfs rw 0 0
/dev/vdc /mnt/with\\040space ext4 ro 0 0
/dev/vdd /var/log ext4 rw 0 0
";

    #[test]
    fn mount_table_unescapes_and_later_mounts_win() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 5);
        assert!(m
            .iter()
            .any(|e| e.mountpoint == Path::new("/mnt/with space")));
        let log = m
            .iter()
            .find(|e| e.mountpoint == Path::new("/var/log"))
            .unwrap();
        assert_eq!(log.device, "/dev/vdd");
    }

    fn fs_collector(yaml: &str) -> Arc<Target> {
        let cfg = parse(yaml, "t.yml", Path::new(".")).unwrap();
        cfg.targets.into_iter().find(|t| t.name() == "fs").unwrap()
    }

    #[test]
    fn plan_applies_thresholds_and_excludes_pseudo_filesystems() {
        let cfg = parse(
            "filesystems:\n  default_threshold: 0.8\n  mounts:\n    - { path: /, threshold: 0.75 }\n    - { path: /var/lib/pgsql }\n",
            "t.yml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(cfg.targets.iter().filter(|t| t.name() == "fs").count(), 1);
        let fs = FsCollector {
            default_threshold: 0.8,
            discover: true,
            exclude_fstypes: Regex::new(DEFAULT_EXCLUDE_FSTYPES).unwrap(),
            exclude_mountpoints: Regex::new(DEFAULT_EXCLUDE_MOUNTPOINTS).unwrap(),
            mounts: vec![
                MountRule {
                    path: "/".into(),
                    threshold: 0.75,
                },
                MountRule {
                    path: "/var/lib/pgsql".into(),
                    threshold: 0.8,
                },
            ],
            mounts_file: PathBuf::new(),
            inflight: InFlight::new(),
        };
        let plan = fs.plan(&parse_mounts(MOUNTS));
        let got: Vec<(String, String, f64)> = plan
            .iter()
            .map(|p| (p.path.display().to_string(), p.device.clone(), p.threshold))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/".into(), "/dev/vda".into(), 0.75),
                ("/mnt/with space".into(), "/dev/vdc".into(), 0.8),
                ("/var/log".into(), "/dev/vdd".into(), 0.8),
                ("/var/lib/pgsql".into(), "/dev/vda".into(), 0.8),
            ]
        );
    }

    #[test]
    fn percent_threshold_gets_a_hint() {
        let err = parse(
            "filesystems:\n  mounts:\n    - { path: /, threshold: 75 }\n",
            "t.yml",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].pos.line, 3);
        assert_eq!(err.problems[0].hint.as_deref(), Some("write 0.75 for 75%"));
    }

    #[tokio::test]
    async fn root_filesystem_is_reported_with_its_threshold() {
        let fs = fs_collector("filesystems:\n  mounts:\n    - { path: /, threshold: 0.75 }\n");
        let mut out = SampleBuffer::new();
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        fs.collect(&ctx, &mut out).await.unwrap();
        let thr = out.get("clusterwatch_fs_threshold_ratio").unwrap();
        let root = thr
            .samples
            .iter()
            .find(|s| s.labels[0].1 == "/")
            .expect("root mount reported");
        assert_eq!(root.value, 0.75);
        let size = out.get("clusterwatch_fs_size_bytes").unwrap();
        assert!(size
            .samples
            .iter()
            .any(|s| s.labels[0].1 == "/" && s.value > 0.0));
        let used = out.get("clusterwatch_fs_used_ratio").unwrap();
        assert!(used.samples.iter().all(|s| (0.0..=1.0).contains(&s.value)));
    }
}
