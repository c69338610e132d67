//! supervisord for the tests: one `supervisord -n` child in a temporary directory, its
//! control socket there, and the programs (and any extra sections) the test gives it.
//! Dropping it stops supervisord and, with it, its programs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::process::{find_program, wait_until, ChildGuard};

/// How long supervisord gets to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running supervisord.
pub struct Supervisord {
    _guard: ChildGuard,
    socket: PathBuf,
    dir: TempDir,
}

impl Supervisord {
    /// Starts supervisord with a unix socket and `sections` (e.g. `[program:x]` blocks, or an
    /// `[inet_http_server]`) after its own, and waits for the socket.
    pub async fn start(sections: &str) -> Result<Supervisord> {
        let supervisord = find_program("SUPERVISORD", &["supervisord"])?;
        let dir = super::temp_dir("cw-supervisord-")?;
        let d = dir.path().display();
        let conf = dir.path().join("supervisord.conf");
        std::fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nchildlogdir={d}\nuser=root\n\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 {sections}"
            ),
        )
        .with_context(|| format!("could not write {}", conf.display()))?;
        let mut command = Command::new(supervisord);
        command.arg("-c").arg(&conf);
        let guard = ChildGuard::spawn("supervisord", command, dir.path())?;
        let socket = dir.path().join("supervisor.sock");
        wait_until(START_TIMEOUT, "the supervisord socket", async || {
            Ok(socket.exists())
        })
        .await?;
        Ok(Supervisord {
            _guard: guard,
            socket,
            dir,
        })
    }

    /// `unix:///…/supervisor.sock`, as clusterwatch's `supervisord.url` takes it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Its directory (configuration, logs, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for Supervisord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisord")
            .field("socket", &self.socket)
            .finish()
    }
}
