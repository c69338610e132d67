//! The exporter under test: finds (building it if needed) the `clusterwatch` binary, runs it
//! on a free loopback port with a configuration written to a temporary file, and fetches its
//! endpoints. It starts the real binary; tests of the library API live with the exporter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;

use super::ports::free_port;
use super::process::{tail, LOG_TAIL_LINES};
use super::served::HttpServer;

/// How long the exporter gets to answer `/-/ready` after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of the `clusterwatch` binary the tests run, found once per test process.
///
/// `CLUSTERWATCH_BIN` if set. Otherwise `cargo build -p clusterwatch --bin clusterwatch`
/// (with `--release` when the tests are built in release mode) runs once, and the path comes
/// from cargo's own report, so `CARGO_TARGET_DIR` and cargo configuration are respected.
/// It always asks cargo rather than trusting an existing file: cargo does nothing when the
/// binary is fresh, and a stale binary would test old code. Only if cargo itself cannot be
/// run does an existing `<target>/<profile>/clusterwatch` get used.
pub fn binary() -> Result<PathBuf> {
    static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn locate() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CLUSTERWATCH_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("CLUSTERWATCH_BIN={} is not a file", path.display());
        }
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace");
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace)
        .args(["build", "-p", "clusterwatch", "--bin", "clusterwatch"])
        .arg("--message-format=json-render-diagnostics");
    if release {
        command.arg("--release");
    }
    // Cargo sets these for the test process itself. Passed on, they look like a changed
    // environment to build scripts that watch them (ring watches CARGO_MANIFEST_DIR), and the
    // TLS stack and the exporter would be rebuilt on every test run.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            command.env_remove(key.as_ref());
        }
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(err) => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            let fallback = target
                .join(if release { "release" } else { "debug" })
                .join("clusterwatch");
            if fallback.is_file() {
                eprintln!(
                    "harness: could not run {} ({err}); using {}",
                    cargo.to_string_lossy(),
                    fallback.display()
                );
                return Ok(fallback);
            }
            bail!(
                "could not run `{}` to build clusterwatch ({err}) and {} does not exist; \
                 build it or set CLUSTERWATCH_BIN",
                cargo.to_string_lossy(),
                fallback.display()
            );
        }
    };
    if !output.status.success() {
        bail!(
            "`cargo build -p clusterwatch --bin clusterwatch` failed with {}:\n{}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), LOG_TAIL_LINES)
        );
    }
    // cargo reports every artifact, fresh or rebuilt, as one JSON object per line.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "clusterwatch"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo built clusterwatch but reported no executable for it"))
}

/// A running exporter; dropping it stops the process (SIGTERM) and removes its directory.
/// The shared accessors (`port`, `addr`, `url`, `dir`, `client`, `logs`, `process`) come
/// from [`HttpServer`].
#[derive(Debug)]
pub struct Clusterwatch {
    server: HttpServer,
    config_path: Option<PathBuf>,
}

impl Clusterwatch {
    /// Starts `clusterwatch --config.file DIR/clusterwatch.yml --web.listen-address
    /// 127.0.0.1:PORT EXTRA_ARGS…` (no `--config.file` when `config_yaml` is `None`: the
    /// embedded default) and returns once `GET /-/ready` answers 200. On failure the error
    /// carries the tail of the exporter's output.
    pub async fn start(config_yaml: Option<&str>, extra_args: &[&str]) -> Result<Clusterwatch> {
        Self::start_with_env(config_yaml, extra_args, &[]).await
    }

    /// [`Clusterwatch::start`] with extra environment variables for the exporter, e.g.
    /// `CIB_file` so crm_mon reads a saved CIB.
    pub async fn start_with_env(
        config_yaml: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Clusterwatch> {
        let binary = binary()?;
        let dir = super::temp_dir("cw-clusterwatch-")?;
        let config_path = match config_yaml {
            Some(yaml) => {
                let path = dir.path().join("clusterwatch.yml");
                std::fs::write(&path, yaml)
                    .with_context(|| format!("could not write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let port = free_port()?;
        let mut command = Command::new(&binary);
        // Only what the test passes may configure the exporter: a CLUSTERWATCH_CONFIG (or
        // the like) in the developer's shell must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CLUSTERWATCH_") {
                command.env_remove(key);
            }
        }
        if let Some(path) = &config_path {
            command.arg("--config.file").arg(path);
        }
        command
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(extra_args)
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied());
        let server = HttpServer::spawn("clusterwatch", command, port, dir, START_TIMEOUT)
            .await
            .with_context(|| format!("clusterwatch binary: {}", binary.display()))?;
        Ok(Clusterwatch {
            server,
            config_path,
        })
    }

    /// The configuration file it was started with, if any; tests may rewrite it.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// `GET path`: status, headers and body.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, HeaderMap, String)> {
        self.get_with_headers(path, &[]).await
    }

    /// `GET path` with extra request headers, e.g. `Accept` or
    /// `X-Prometheus-Scrape-Timeout-Seconds`.
    pub async fn get_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, HeaderMap, String)> {
        let mut request = self.client().get(self.url(path));
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes())
                    .with_context(|| format!("bad header name {name}"))?,
                HeaderValue::from_str(value)
                    .with_context(|| format!("bad header value {value}"))?,
            );
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("GET {path} from clusterwatch"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .text()
            .await
            .with_context(|| format!("reading the body of GET {path} from clusterwatch"))?;
        Ok((status, headers, body))
    }
}

impl std::ops::Deref for Clusterwatch {
    type Target = HttpServer;
    fn deref(&self) -> &HttpServer {
        &self.server
    }
}

impl std::ops::DerefMut for Clusterwatch {
    fn deref_mut(&mut self) -> &mut HttpServer {
        &mut self.server
    }
}
