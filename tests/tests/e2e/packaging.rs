//! The Debian package as an operator receives it: built by `packaging/build-deb`, unpacked
//! into a scratch root, checked for its files, its maintainer scripts, a working binary and
//! default configuration, and units that systemd accepts and rates as hardened.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::{repo_root, temp_dir};

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("could not run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn have_cargo_deb() -> bool {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The files every installation must have, relative to the root.
const EXPECTED: &[&str] = &[
    "usr/bin/clusterwatch",
    "etc/clusterwatch/clusterwatch.yml",
    "etc/default/clusterwatch",
    "usr/share/clusterwatch/alertmanager/alertmanager.yml",
    "usr/share/clusterwatch/examples/clusterwatch.yml",
    "usr/share/clusterwatch/examples/web.yml",
    "usr/share/clusterwatch/rules/README.md",
    "usr/share/man/man1/clusterwatch.1",
    "usr/share/bash-completion/completions/clusterwatch",
    "usr/share/zsh/vendor-completions/_clusterwatch",
    "usr/share/fish/vendor_completions.d/clusterwatch.fish",
    "usr/lib/systemd/system/clusterwatch.service",
    "usr/lib/systemd/system/clusterwatch-hooks.service",
    "usr/share/doc/clusterwatch/README.md",
];

/// Every file of `dir` in the repository whose name ends with `suffix` must be installed
/// under `installed`.
fn check_all_shipped(root: &Path, dir: &str, suffix: &str, installed: &str) -> Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(repo_root().join(dir))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(suffix) {
            let path = root.join(installed).join(&*name);
            ensure!(
                path.is_file(),
                "{dir}/{name} is not in the package ({})",
                path.display()
            );
            count += 1;
        }
    }
    ensure!(count > 0, "no {dir}/*{suffix} in the repository");
    Ok(count)
}

#[test]
fn the_debian_package_installs_a_working_hardened_exporter() -> Result<()> {
    if !have_cargo_deb() {
        let message = "cargo-deb is not installed (tests/run.sh installs it)";
        if std::env::var_os("CLUSTERWATCH_REQUIRE_BIN").is_some() {
            bail!(message);
        }
        eprintln!("skipped: {message}");
        return Ok(());
    }
    let out = temp_dir("cw-deb-")?;
    // The dev profile reuses the binary the tests already built; releases use the default.
    let mut build = Command::new(repo_root().join("packaging/build-deb"));
    build.args(["--profile", "dev", "--output"]).arg(out.path());
    // tests/run.sh has built every binary and points CLUSTERWATCH_BIN at them: package those
    // rather than rebuild (and replace) a binary other tests are running.
    if std::env::var_os("CLUSTERWATCH_BIN").is_some() {
        build.arg("--no-build");
    }
    let built = run(&mut build)?;
    let deb = PathBuf::from(built.lines().last().unwrap_or_default().trim());
    ensure!(deb.is_file(), "build-deb printed no package path: {built}");

    let depends = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"))?;
    ensure!(
        depends.contains("adduser"),
        "Depends lacks adduser: {depends}"
    );

    let root = out.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    for path in EXPECTED {
        ensure!(root.join(path).is_file(), "the package lacks /{path}");
    }
    check_all_shipped(&root, "rules", ".rules.yml", "usr/share/clusterwatch/rules")?;
    check_all_shipped(
        &root,
        "rules/runbooks",
        ".md",
        "usr/share/clusterwatch/rules/runbooks",
    )?;
    check_all_shipped(
        &root,
        "dashboards",
        ".json",
        "usr/share/clusterwatch/dashboards",
    )?;
    // The hook recipes, where the README's configuration examples run them from.
    check_all_shipped(
        &root,
        "alertmanager/hooks",
        "",
        "usr/lib/clusterwatch/hooks",
    )?;
    for entry in std::fs::read_dir(root.join("usr/lib/clusterwatch/hooks"))? {
        let path = entry?.path();
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata()?.permissions());
        ensure!(
            mode & 0o111 == 0o111,
            "{} is not executable (mode {mode:o})",
            path.display()
        );
    }

    // The packaged binary accepts the packaged configuration.
    let binary = root.join("usr/bin/clusterwatch");
    run(Command::new(&binary)
        .arg("check-config")
        .arg(root.join("etc/clusterwatch/clusterwatch.yml")))?;
    let man = std::fs::read_to_string(root.join("usr/share/man/man1/clusterwatch.1"))?;
    ensure!(
        man.contains("check\\-config"),
        "the man page does not list check-config"
    );

    let control = out.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control))?;
    let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(conffiles.contains("/etc/clusterwatch/clusterwatch.yml"));
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    ensure!(
        postinst.contains("adduser --system") && postinst.contains("clusterwatch.service"),
        "postinst neither creates the user nor enables the unit:\n{postinst}"
    );

    verify_units(&root, &binary)
}

/// `systemd-analyze verify` must accept both units without a warning, and `security` must
/// rate the exporter's unit as well hardened.
fn verify_units(root: &Path, binary: &Path) -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: unit verification skipped");
        return Ok(());
    }
    let units = temp_dir("cw-units-")?;
    for unit in ["clusterwatch.service", "clusterwatch-hooks.service"] {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit))?;
        // verify checks that ExecStart's program exists: point it at the unpacked one.
        let path = units.path().join(unit);
        std::fs::write(
            &path,
            text.replace("/usr/bin/clusterwatch", &binary.to_string_lossy()),
        )?;
        let output = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            output.status
        );
    }
    let report = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(units.path().join("clusterwatch.service"))
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout).into_owned()
        + &String::from_utf8_lossy(&report.stderr);
    let exposure: f64 = text
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for clusterwatch.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no exposure level in:\n{text}"))?;
    println!("systemd-analyze security: clusterwatch.service exposure {exposure}");
    // systemd rates 0–2 as "OK"; an unhardened unit scores 9.6.
    ensure!(
        exposure <= 2.0,
        "clusterwatch.service is under-hardened: {exposure}\n{text}"
    );
    Ok(())
}

/// An operator without a usable llvm-profdata learns it in seconds, with what to install,
/// instead of after the quarter of an hour the instrumented build and its training take.
#[test]
fn the_profile_guided_build_refuses_an_llvm_profdata_that_cannot_read_the_profiles() -> Result<()> {
    let target = temp_dir("cw-pgo-")?;
    let output = Command::new(repo_root().join("packaging/build-pgo"))
        .env("LLVM_PROFDATA", "/bin/false")
        .env("CARGO_TARGET_DIR", target.path())
        .output()
        .context("could not run packaging/build-pgo")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(1),
        "build-pgo exited with {} instead of 1:\n{stderr}",
        output.status
    );
    ensure!(
        stderr.contains("/bin/false cannot read the profiles of rustc (LLVM ")
            && stderr.contains("apt-get install llvm-19"),
        "the refusal does not say what is wrong and what to install:\n{stderr}"
    );
    ensure!(
        !target.path().join("pgo-generate").exists(),
        "build-pgo started the instrumented build before checking llvm-profdata"
    );
    Ok(())
}
