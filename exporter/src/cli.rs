//! The command line: subcommands and flags in exporter conventions (`--web.listen-address`,
//! `--config.file`, …). Parsing only; what each command does lives in `commands`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::{LogFormat, LogLevel};

/// The default listen address: port 9469, chosen once for clusterwatch (no common stack
/// component uses it) and kept.
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9469";

/// Watches small HA stacks (PostgreSQL, Redis, MongoDB, gateways) and serves Prometheus metrics.
#[derive(Debug, Parser)]
#[command(name = "clusterwatch", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (YAML). Without it, the embedded default is used.
    #[arg(
        long = "config.file",
        value_name = "FILE",
        global = true,
        env = "CLUSTERWATCH_CONFIG"
    )]
    pub config_file: Option<PathBuf>,

    /// Address to serve metrics on.
    #[arg(long = "web.listen-address", value_name = "ADDR", default_value = DEFAULT_LISTEN_ADDRESS, global = true)]
    pub listen_address: SocketAddr,

    /// Path metrics are served under.
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        default_value = "/metrics",
        global = true
    )]
    pub telemetry_path: String,

    /// Web configuration file (exporter-toolkit format): TLS, client certificates and
    /// basic-auth users for the main listener.
    #[arg(long = "web.config.file", value_name = "FILE", global = true)]
    pub web_config_file: Option<PathBuf>,

    /// Minimum log level.
    #[arg(long = "log.level", value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long = "log.format", value_enum, default_value_t = LogFormat::Logfmt, global = true)]
    pub log_format: LogFormat,

    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve metrics (the default).
    Serve,
    /// Check a configuration file and print every problem with its line; exit 1 on problems.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Run every collector once, print the exposition and exit.
    Once,
    /// Read a password from stdin (one line) and print its bcrypt hash for `basic_auth_users`.
    HashPassword {
        /// bcrypt cost: each step doubles the work of a check.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
        cost: u32,
    },
    /// The hook runner's offline tools (need --config.file with a `hooks:` section).
    Hooks {
        /// What to do.
        #[command(subcommand)]
        command: HooksCommand,
    },
}

/// `clusterwatch hooks …`.
#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Print what the runner would decide for a webhook payload; runs and records nothing.
    Replay {
        /// A webhook v4 JSON body, as Alertmanager sends it.
        payload: PathBuf,
    },
    /// Print the journal, one decision per line.
    Journal {
        /// Only check it: list every damaged line; exit 1 if there is one.
        #[arg(long, conflicts_with = "accept_damage")]
        check: bool,
        /// Drop damaged lines (the file as it was is saved beside it); incidents that began
        /// before now are then never run automatically. clusterwatch must be stopped.
        #[arg(long)]
        accept_damage: bool,
    },
}
