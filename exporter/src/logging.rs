//! Log setup: logfmt (the exporter convention) or JSON on stderr, filtered by `--log.level`.
//! `RUST_LOG` overrides the level for debugging one module.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format (`--log.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `ts=… level=info msg=… key=value`.
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// Minimum level logged (`--log.level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Everything, including per-scrape details.
    Debug,
    /// Start, stop, state changes.
    Info,
    /// Failures of targets and hooks.
    Warn,
    /// Only what needs a person.
    Error,
}

impl LogLevel {
    fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Installs the global subscriber. Called once, first thing in `main`.
pub fn init(level: LogLevel, format: LogFormat) {
    // Our own modules at the chosen level; libraries only warn unless RUST_LOG says otherwise.
    let default = format!("warn,clusterwatch={}", level.as_filter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let layer = match format {
        // The Rust module path would be written as `target=`, clashing with our own `target`
        // field (the scrape target); operators need the latter.
        LogFormat::Logfmt => tracing_logfmt::builder()
            .with_target(false)
            .with_span_name(false)
            .with_span_path(false)
            .layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// The condition last logged for one thing (a target's failure reason, a reply's oddities), so
/// a condition is logged when it starts or changes, not on every scrape.
#[derive(Debug)]
pub struct OnChange<T>(Option<T>);

impl<T> Default for OnChange<T> {
    fn default() -> Self {
        OnChange(None)
    }
}

impl<T: PartialEq> OnChange<T> {
    /// Records `now`; true when it differs from what was recorded before (log it then).
    pub fn changed(&mut self, now: T) -> bool {
        let changed = self.0.as_ref() != Some(&now);
        self.0 = Some(now);
        changed
    }

    /// Forgets the condition (it ended); what was recorded, to say what it was.
    pub fn clear(&mut self) -> Option<T> {
        self.0.take()
    }
}
