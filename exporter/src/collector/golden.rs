//! Golden exposition files for collectors whose output is a pure function of captured server
//! output: the exact OpenMetrics text is kept in `collector/testdata/golden/` (PostgreSQL's in
//! `testdata/pg/`, beside its captured rows), and any change fails the test.
//! `UPDATE_GOLDEN=1 cargo test -p clusterwatch --lib golden` rewrites them.

use std::path::{Path, PathBuf};

use crate::snapshot::SampleBuffer;

/// Where the golden file `name` lives.
fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/collector/testdata/golden")
        .join(format!("{name}.txt"))
}

/// Reads a captured input from `collector/testdata/`.
pub fn input(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/collector/testdata")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Asserts that `out` encodes to exactly the golden file `name`; with `UPDATE_GOLDEN` set in
/// the environment, writes it instead.
pub fn assert_golden(name: &str, out: SampleBuffer) {
    let actual = out.into_snapshot().encode_openmetrics();
    if let Err(e) = check(&path(name), &actual) {
        panic!("{e}\n(if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff)");
    }
}

/// Compares an exposition with the golden file at `path` (with `UPDATE_GOLDEN` set, writes
/// it instead); the error names the file and the first line that differs.
pub fn check(path: &Path, actual: &str) -> Result<(), String> {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("golden files sit in a directory"))
            .and_then(|()| std::fs::write(path, actual))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return Ok(());
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return Ok(());
    }
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    Err(format!(
        "exposition differs from {} at line {}:\n  golden: {:?}\n  now:    {:?}",
        path.display(),
        line + 1,
        expected.lines().nth(line).unwrap_or("<end>"),
        actual.lines().nth(line).unwrap_or("<end>"),
    ))
}
