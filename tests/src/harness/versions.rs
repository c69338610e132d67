//! The server versions of the version matrix and where their programs are: Debian's
//! PostgreSQL 15 and Redis 7.0, and the others `tests/run.sh` installs into a local virtual
//! environment and names in `CLUSTERWATCH_PG<major>_BINDIR` / `CLUSTERWATCH_REDIS<nn>_SERVER`.
//! Each is checked to run here and to be the version it claims; if not, the reason says why.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One version of the matrix.
pub struct Version {
    /// The version as people say it, e.g. `16` or `6.2`.
    pub version: &'static str,
    /// For PostgreSQL the directory of its programs, for Redis the `redis-server` program;
    /// or why it cannot be used here.
    pub location: Result<PathBuf, String>,
}

/// PostgreSQL 15 (Debian), 16 and 18.
pub fn postgres() -> Vec<Version> {
    [
        (
            "15",
            "CLUSTERWATCH_PG15_BINDIR",
            Some("/usr/lib/postgresql/15/bin"),
        ),
        ("16", "CLUSTERWATCH_PG16_BINDIR", None),
        ("18", "CLUSTERWATCH_PG18_BINDIR", None),
    ]
    .into_iter()
    .map(|(version, variable, debian)| Version {
        version,
        location: locate(variable, debian).and_then(|dir| {
            check(&dir.join("postgres"), &format!("PostgreSQL) {version}.")).map(|()| dir)
        }),
    })
    .collect()
}

/// Redis 6.0, 6.2 and 7.0 (Debian).
pub fn redis() -> Vec<Version> {
    [
        ("6.0", "CLUSTERWATCH_REDIS60_SERVER", None),
        ("6.2", "CLUSTERWATCH_REDIS62_SERVER", None),
        (
            "7.0",
            "CLUSTERWATCH_REDIS70_SERVER",
            Some("/usr/bin/redis-server"),
        ),
    ]
    .into_iter()
    .map(|(version, variable, debian)| Version {
        version,
        location: locate(variable, debian)
            .and_then(|server| check(&server, &format!("v={version}.")).map(|()| server)),
    })
    .collect()
}

fn locate(variable: &str, debian: Option<&str>) -> Result<PathBuf, String> {
    match (std::env::var_os(variable), debian) {
        (Some(path), _) => Ok(PathBuf::from(path)),
        (None, Some(path)) => Ok(PathBuf::from(path)),
        (None, None) => Err(format!("{variable} is not set (tests/run.sh installs it)")),
    }
}

/// Runs `program --version` and expects `marker` in what it prints.
fn check(program: &Path, marker: &str) -> Result<(), String> {
    let output = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not run here: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !text.contains(marker) {
        return Err(format!(
            "{} --version said `{}` ({}), expected `{marker}`",
            program.display(),
            text.lines().next().unwrap_or_default().trim(),
            output.status
        ));
    }
    Ok(())
}
