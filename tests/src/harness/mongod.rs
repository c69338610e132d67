//! A real `mongod` for the tests, when one is installed (MongoDB is not packaged for Debian):
//! a standalone server or a single-member replica set on a free loopback port in its own
//! temporary directory. Without a binary, tests say they were skipped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use bson::doc;
use tempfile::TempDir;

use super::mongo_standin::run_command;
use super::ports::free_port;
use super::process::{find_program, ChildGuard};

/// How long a server gets to answer `ping` after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound on one harness command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One `mongod` started by the harness; dropping it stops the server and removes its
/// directory.
pub struct Mongod {
    // Declared before `dir` so the server stops before its directory is removed.
    _guard: ChildGuard,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Mongod {
    /// The `mongod` binary: `CLUSTERWATCH_MONGOD` if set, else the first on PATH.
    pub fn find() -> Option<PathBuf> {
        find_program("CLUSTERWATCH_MONGOD", &["mongod"]).ok()
    }

    /// Starts `mongod` (a replica set member of `repl_set` if given, not yet initiated) and
    /// waits until it answers `ping`.
    pub async fn start(binary: &Path, repl_set: Option<&str>) -> Result<Mongod> {
        let dir = super::temp_dir("cw-mongod-")?;
        let port = free_port()?;
        let data = dir.path().join("db");
        std::fs::create_dir(&data)?;
        let mut command = Command::new(binary);
        command
            .args(["--port", &port.to_string(), "--bind_ip", "127.0.0.1"])
            .arg("--dbpath")
            .arg(&data)
            .args(["--nounixsocket", "--quiet"]);
        if let Some(set) = repl_set {
            command.args(["--replSet", set]);
        }
        let mut guard = ChildGuard::spawn("mongod", command, dir.path())?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        guard
            .wait_ready(START_TIMEOUT, "mongod to answer ping", async || {
                let reply = run_command(addr, "admin", doc! { "ping": 1 }, COMMAND_TIMEOUT).await?;
                Ok(reply.get_f64("ok").ok() == Some(1.0))
            })
            .await?;
        Ok(Mongod {
            _guard: guard,
            addr,
            _dir: dir,
        })
    }

    /// `127.0.0.1:PORT`: also its member name once initiated.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `mongodb://127.0.0.1:PORT/?directConnection=true`.
    pub fn uri(&self) -> String {
        format!("mongodb://{}/?directConnection=true", self.addr)
    }

    /// Initiates a one-member set named as given at start, with this server as its member.
    pub async fn initiate(&self) -> Result<()> {
        let config = doc! { "_id": "rs0", "members": [ { "_id": 0, "host": self.addr() } ] };
        let reply = run_command(
            self.addr,
            "admin",
            doc! { "replSetInitiate": config },
            COMMAND_TIMEOUT,
        )
        .await?;
        if reply.get_f64("ok").ok() != Some(1.0) {
            bail!("replSetInitiate failed: {reply}");
        }
        Ok(())
    }
}
