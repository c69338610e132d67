//! Live reload on SIGHUP and `POST /-/reload`: the configuration and the web configurations
//! are read and checked whole first, and only then put in force; on any error the running ones
//! stay and the failure is a metric. Unchanged targets keep running (connections, caches).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::collector::{Engine, TargetChanges};
use crate::configuration::{self, Config};
use crate::hooks::Hooks;
use crate::snapshot::SampleBuffer;
use crate::web::Security;

/// Reloads the configuration into the running engine and hook runner.
pub struct Reloader {
    /// `--config.file`, or `None` for the embedded default.
    source: Option<PathBuf>,
    engine: Arc<Engine>,
    hooks: Option<Arc<Hooks>>,
    /// `--web.config.file` and the main listener's settings, re-read by every reload.
    main_web: Option<(PathBuf, Arc<Security>)>,
    /// The webhook listener's settings (`hooks.web_config_file`).
    hooks_web: Option<Arc<Security>>,
    /// One reload at a time: a SIGHUP that arrives during a `POST /-/reload` waits for it and
    /// then reads the file again, so the last edit always wins.
    running: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
}

struct Status {
    last_successful: bool,
    last_success: f64,
    succeeded: u64,
    failed: u64,
}

impl Reloader {
    /// A reloader for a process that just loaded its configuration from `source`; that first
    /// load counts as the last successful one, as in Prometheus.
    pub fn new(source: Option<PathBuf>, engine: Arc<Engine>, hooks: Option<Arc<Hooks>>) -> Self {
        Reloader {
            source,
            engine,
            hooks,
            main_web: None,
            hooks_web: None,
            running: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                last_successful: true,
                last_success: crate::clock::unix_now().as_secs_f64(),
                succeeded: 0,
                failed: 0,
            }),
        }
    }

    /// Also re-reads the main listener's web configuration file on every reload.
    pub fn with_main_web(mut self, path: PathBuf, security: Arc<Security>) -> Self {
        self.main_web = Some((path, security));
        self
    }

    /// Also swaps the webhook listener's web settings from `hooks.web_config_file`.
    pub fn with_hooks_web(mut self, security: Arc<Security>) -> Self {
        self.hooks_web = Some(security);
        self
    }

    /// Reads, checks and applies the configuration. `Err` carries every problem, in the words
    /// of `check-config`; the running configuration is then untouched.
    pub async fn reload(&self) -> Result<TargetChanges, String> {
        let _one_at_a_time = self.running.lock().await;
        let outcome = self.load_and_apply().await;
        let mut status = crate::sync::lock(&self.status);
        match &outcome {
            Ok(changes) => {
                status.last_successful = true;
                status.last_success = crate::clock::unix_now().as_secs_f64();
                status.succeeded += 1;
                tracing::info!(
                    kept = changes.kept,
                    built = changes.built,
                    dropped = changes.dropped,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                status.last_successful = false;
                status.failed += 1;
                tracing::error!(error = %e, "configuration reload failed; the running configuration is kept");
            }
        }
        outcome
    }

    async fn load_and_apply(&self) -> Result<TargetChanges, String> {
        let source = self.source.clone();
        let web_path = self.main_web.as_ref().map(|(path, _)| path.clone());
        // Loading reads files (passwords, certificates, CSVs' metadata): not on a runtime thread.
        let (loaded, web) = tokio::task::spawn_blocking(move || {
            let cfg = configuration::load(source.as_deref());
            (cfg, web_path.map(|path| Security::load(&path)))
        })
        .await
        .map_err(|e| format!("the configuration loader failed: {e}"))?;
        let cfg: Config = loaded.map_err(|e| e.render())?;
        let web = web.transpose().map_err(|e| e.render())?;

        // Check everything before changing anything.
        match (&self.hooks, &cfg.hooks) {
            (Some(running), Some(new)) => running.check_reconfigure(new)?,
            (None, None) => {}
            (None, Some(_)) => {
                return Err(
                    "the `hooks:` section was added; starting the webhook receiver needs a restart (the running configuration is kept)".into(),
                )
            }
            (Some(_), None) => {
                return Err(
                    "the `hooks:` section was removed; stopping the webhook receiver needs a restart (the running configuration is kept)".into(),
                )
            }
        }

        if let (Some((_, security)), Some(settings)) = (&self.main_web, web) {
            security.replace(settings);
        }
        if let (Some(running), Some(new)) = (&self.hooks, cfg.hooks) {
            if let (Some(security), Some(settings)) = (&self.hooks_web, new.web.clone()) {
                security.replace(settings);
            }
            running.reconfigure(new);
        }
        Ok(self
            .engine
            .replace_targets(cfg.targets, cfg.fingerprints, cfg.global.timeout))
    }

    /// Writes the `clusterwatch_config_*` families.
    pub fn write_metrics(&self, out: &mut SampleBuffer) {
        let status = crate::sync::lock(&self.status);
        out.gauge(
            "clusterwatch_config_last_reload_successful",
            "Whether the last configuration reload succeeded (1) or failed and the previous configuration is still running (0).",
            &[],
            if status.last_successful { 1.0 } else { 0.0 },
        );
        out.gauge(
            "clusterwatch_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully, at start or by a reload (unix time).",
            &[],
            status.last_success,
        );
        for (result, n) in [("success", status.succeeded), ("failure", status.failed)] {
            out.counter(
                "clusterwatch_config_reloads_total",
                HELP_RELOADS,
                &[("result", result)],
                n as f64,
            );
        }
    }
}

const HELP_RELOADS: &str =
    "Configuration reloads since start (SIGHUP or POST /-/reload), by result.";

/// Reloads on every SIGHUP of `hangup` until the process stops. The stream is made first
/// thing at start, because until then SIGHUP's default action would end the process.
pub fn reload_on_sighup(mut hangup: tokio::signal::unix::Signal, reloader: Arc<Reloader>) {
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received, reloading the configuration");
            let _ = reloader.reload().await;
        }
    });
}
