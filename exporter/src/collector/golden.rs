//! Golden exposition files for collectors whose output is a pure function of captured server
//! output: the exact OpenMetrics text is kept in `collector/testdata/golden/`, and any change
//! to it fails the test. `UPDATE_GOLDEN=1 cargo test -p clusterwatch --lib` rewrites them.

use std::path::PathBuf;

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

/// Asserts that `out` encodes to exactly the golden file `name`; with `UPDATE_GOLDEN=1` in
/// the environment, writes it instead.
pub fn assert_golden(name: &str, out: SampleBuffer) {
    let actual = out.into_snapshot().encode_openmetrics();
    let p = path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(p.parent().expect("golden files sit in a directory"))
            .and_then(|()| std::fs::write(&p, &actual))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        return;
    }
    let expected = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {}: {e}; create it with UPDATE_GOLDEN=1",
            p.display()
        )
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "exposition differs from {} at line {}:\n  golden: {:?}\n  now:    {:?}\n\
             (if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff)",
            p.display(),
            line + 1,
            expected.lines().nth(line).unwrap_or("<end>"),
            actual.lines().nth(line).unwrap_or("<end>"),
        );
    }
}
