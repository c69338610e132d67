//! What each subcommand does: `serve`, `check-config`, `once`. Startup errors are reported
//! here, once, in plain words; nothing below this module exits the process.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::collector::Engine;
use crate::config::{self, Config};
use crate::http::{app, AppState};

/// Runs the command the user asked for and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match &cli.command {
        Some(Command::CheckConfig { file }) => check_config(file),
        Some(Command::Once) => run_async(once(&cli)),
        Some(Command::Serve) | None => run_async(serve(&cli)),
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clusterwatch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "clusterwatch stopped");
            eprintln!("clusterwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &Path) -> ExitCode {
    match config::load_file(file) {
        Ok(cfg) => {
            println!("{}: ok ({} targets)", file.display(), cfg.targets.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.render());
            eprintln!("{}: {} problem(s) found", e.file, e.problems.len());
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let loaded = match &cli.config_file {
        Some(path) => config::load_file(path),
        None => config::load_embedded(),
    };
    loaded.map_err(|e| anyhow::anyhow!("invalid configuration:\n{}", e.render()))
}

async fn once(cli: &Cli) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    let engine = Engine::new(cfg.targets, cfg.global.timeout);
    print!(
        "{}",
        engine
            .scrape(None)
            .await
            .into_snapshot()
            .encode_openmetrics()
    );
    Ok(())
}

async fn serve(cli: &Cli) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    if !cli.telemetry_path.starts_with('/') || cli.telemetry_path.len() < 2 {
        anyhow::bail!("--web.telemetry-path must start with / and not be / itself");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %cfg.origin,
        targets = cfg.targets.len(),
        "starting clusterwatch"
    );
    let state = AppState {
        engine: Arc::new(Engine::new(cfg.targets, cfg.global.timeout)),
        telemetry_path: cli.telemetry_path.clone(),
        config_origin: cfg.origin,
    };
    let listener = tokio::net::TcpListener::bind(cli.listen_address)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen_address))?;
    tracing::info!(address = %cli.listen_address, path = %cli.telemetry_path, "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("http server failed")?;
    tracing::info!("clusterwatch stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT so in-flight scrapes finish before exit.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}
