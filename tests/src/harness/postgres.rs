//! PostgreSQL for the tests: a primary with WAL archiving and a streaming standby made with
//! `pg_basebackup -R`, each node in its own temporary directory on a free loopback port. As
//! root the servers run as `postgres`; the harness never touches a system cluster.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tempfile::TempDir;

use super::ports::free_port;
use super::process::{
    find_program, pid_alive, read_lossy, run, run_blocking, signal_tree, tail, wait_until,
    LOG_TAIL_LINES, POLL_INTERVAL,
};

/// The superuser the harness connects as (trusted, no password).
pub const SUPERUSER: &str = "postgres";

/// The least-privilege role every primary gets: `LOGIN`, member of `pg_monitor`, with
/// password [`MONITOR_PASSWORD`] (scram-sha-256 over TCP).
pub const MONITOR_USER: &str = "monitor";

/// The password of [`MONITOR_USER`].
pub const MONITOR_PASSWORD: &str = "monitorpass";

/// The `application_name` (and replication slot name) of the standby of
/// [`PgCluster::start_pair`].
pub const STANDBY_NAME: &str = "standby1";

/// How long until a standby shows as `streaming` in the primary's `pg_stat_replication`.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound on initdb, pg_basebackup and pg_ctl runs (pg_ctl itself waits at most
/// [`PG_CTL_WAIT_SECS`]).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// `pg_ctl -t`: how long pg_ctl waits for start, stop or promote to complete.
const PG_CTL_WAIT_SECS: &str = "60";

/// Upper bound on one psql run; psql also gets `PGCONNECT_TIMEOUT` so a paused server
/// fails the connection instead of hanging it.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the PostgreSQL programs are and which user runs them.
struct Install {
    bin_dir: PathBuf,
    /// The `postgres` user's ids when we are root: files it must own are chowned to it and
    /// every program runs through `runuser -u postgres --`.
    run_as: Option<(Uid, Gid)>,
    runuser: PathBuf,
}

fn install() -> Result<&'static Install> {
    static INSTALL: OnceLock<std::result::Result<Install, String>> = OnceLock::new();
    INSTALL
        .get_or_init(|| find_install().map_err(|err| format!("{err:#}")))
        .as_ref()
        .map_err(|err| anyhow!("PostgreSQL is not usable for the tests: {err}"))
}

fn find_install() -> Result<Install> {
    let bin_dir = find_bin_dir()?;
    let run_as = if Uid::effective().is_root() {
        let user = User::from_name(SUPERUSER)
            .context("could not look up the postgres user")?
            .ok_or_else(|| {
                anyhow!("running as root needs a `{SUPERUSER}` system user to run the servers")
            })?;
        Some((user.uid, user.gid))
    } else {
        None
    };
    let runuser = if run_as.is_some() {
        find_program("CLUSTERWATCH_RUNUSER", &["runuser"]).or_else(|err| {
            let fallback = PathBuf::from("/usr/sbin/runuser");
            if fallback.is_file() {
                Ok(fallback)
            } else {
                Err(err)
            }
        })?
    } else {
        PathBuf::new()
    };
    Ok(Install {
        bin_dir,
        run_as,
        runuser,
    })
}

/// `CLUSTERWATCH_PG_BINDIR` if set; else the newest `/usr/lib/postgresql/<version>/bin`
/// (Debian's layout, several versions can be installed side by side); else the directory of
/// `initdb` on `PATH`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CLUSTERWATCH_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            bail!("CLUSTERWATCH_PG_BINDIR={} has no initdb", dir.display());
        }
        return Ok(dir);
    }
    let mut newest: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|name| name.split('.').map(|part| part.parse().ok()).collect())
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file()
                && newest.as_ref().is_none_or(|(best, _)| version > *best)
            {
                newest = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = newest {
        return Ok(bin);
    }
    let initdb = find_program("CLUSTERWATCH_PG_BINDIR", &["initdb"])
        .context("found no PostgreSQL server programs (initdb)")?;
    Ok(initdb
        .parent()
        .expect("a program found on PATH has a parent directory")
        .to_owned())
}

impl Install {
    /// A command for PostgreSQL program `program`, run as the `postgres` user when we are
    /// root, in `cwd` (which that user must be able to enter), with no `PG*` variables
    /// inherited from the caller's environment.
    fn command(&self, bin_dir: &Path, program: &str, cwd: &Path) -> Command {
        let program = bin_dir.join(program);
        let mut command = match self.run_as {
            Some(_) => {
                let mut command = Command::new(&self.runuser);
                command.args(["-u", SUPERUSER, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.current_dir(cwd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        // English messages, whatever the caller's locale, so errors can be matched.
        command.env("LC_ALL", "C");
        command
    }

    /// Makes `path` owned by the user the servers run as (no-op unless we are root).
    fn give_away(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("could not chown {} to {SUPERUSER}", path.display()))?;
        }
        Ok(())
    }

    /// Writes `contents` to `path` and makes it the server user's.
    fn write_file(&self, path: &Path, contents: &str) -> Result<()> {
        fs::write(path, contents).with_context(|| format!("could not write {}", path.display()))?;
        self.give_away(path)
    }

    /// Creates a node directory the server user owns. Fails early, with a hint, if a parent
    /// directory would stop that user from reaching it.
    fn node_dir(&self, name: &str) -> Result<TempDir> {
        let dir = super::temp_dir(&format!("cw-pg-{name}-"))?;
        if self.run_as.is_some() {
            for ancestor in dir.path().ancestors().skip(1) {
                let mode = fs::metadata(ancestor)
                    .with_context(|| format!("could not stat {}", ancestor.display()))?
                    .permissions()
                    .mode();
                if mode & 0o001 == 0 {
                    bail!(
                        "the {SUPERUSER} user cannot enter {} (mode {mode:o}), so it cannot \
                         reach {}; point TMPDIR at a directory every user can traverse",
                        ancestor.display(),
                        dir.path().display()
                    );
                }
            }
        }
        self.give_away(dir.path())?;
        Ok(dir)
    }
}

/// One PostgreSQL server started by the harness. Dropping it stops the server
/// (`pg_ctl stop -m immediate`, SIGKILL as a fallback) and removes its directory.
///
/// Layout of [`dir`](Self::dir): `data/` (PGDATA), `archive/` (the WAL archive its
/// `archive_command` fills), `server.log`, and the unix socket.
pub struct PgNode {
    name: String,
    port: u16,
    /// Where its PostgreSQL programs are (a standby uses its upstream's).
    bin_dir: PathBuf,
    dir: TempDir,
}

impl PgNode {
    /// Creates, configures and starts a primary: `initdb` (superuser `postgres`,
    /// `--auth-local=trust --auth-host=scram-sha-256`), replication and WAL archiving on,
    /// listening on 127.0.0.1 only, plus the [`MONITOR_USER`] role.
    ///
    /// `pg_hba.conf`: trust for local sockets (in a directory only root and `postgres` can
    /// enter) and for `postgres` over 127.0.0.1, including replication; scram-sha-256 for
    /// every other user.
    pub async fn start_primary(name: &str) -> Result<PgNode> {
        PgNode::start_primary_in(name, &install()?.bin_dir).await
    }

    /// Like [`start_primary`](Self::start_primary), with the programs in `bin_dir` (another
    /// PostgreSQL version; it still runs as the same user).
    pub async fn start_primary_in(name: &str, bin_dir: &Path) -> Result<PgNode> {
        let install = install()?;
        let node = PgNode::create(name, bin_dir)?;
        let mut initdb = install.command(bin_dir, "initdb", node.dir());
        initdb
            .arg("-D")
            .arg(node.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            // --no-sync: nobody needs these files to survive a power cut.
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"]);
        run(initdb, COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("initdb failed for PostgreSQL node {name}"))?;

        let mut conf = OpenOptions::new()
            .append(true)
            .open(node.data_dir().join("postgresql.conf"))
            .context("could not open postgresql.conf")?;
        conf.write_all(COMMON_CONF.as_bytes())
            .context("could not append to postgresql.conf")?;
        install.write_file(&node.data_dir().join("pg_hba.conf"), PG_HBA)?;
        node.write_node_conf()?;

        node.start().await?;
        node.psql(&format!(
            "CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}'; \
             GRANT pg_monitor TO {MONITOR_USER};"
        ))
        .await
        .context("could not create the monitor role")?;
        Ok(node)
    }

    /// Creates and starts a streaming standby of `upstream` with `pg_basebackup -R -X stream`,
    /// a physical replication slot named `application_name` on the upstream, and
    /// `primary_conninfo` carrying `application_name` (so it shows by that name in the
    /// upstream's `pg_stat_replication`). Does not wait for streaming: see
    /// [`wait_standby_streaming`](Self::wait_standby_streaming).
    pub async fn start_standby(
        name: &str,
        upstream: &PgNode,
        application_name: &str,
    ) -> Result<PgNode> {
        if application_name.is_empty()
            || !application_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bail!("standby name `{application_name}` must be [a-z0-9_]+: it is also a slot name");
        }
        let install = install()?;
        let node = PgNode::create(name, &upstream.bin_dir)?;
        let mut basebackup = install.command(&node.bin_dir, "pg_basebackup", node.dir());
        basebackup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &upstream.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg("-D")
            .arg(node.data_dir())
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .args(["-C", "-S", application_name]);
        run(basebackup, COMMAND_TIMEOUT).await.with_context(|| {
            format!(
                "pg_basebackup of {} for standby {name} failed; upstream log:\n{}",
                upstream.name,
                tail(&upstream.logs(), LOG_TAIL_LINES)
            )
        })?;
        // The copy carries the upstream's node.conf (port, socket, archive); replace it.
        node.write_node_conf()?;
        // pg_basebackup -R wrote a primary_conninfo without application_name; a later line
        // of the same setting wins.
        let mut auto_conf = OpenOptions::new()
            .append(true)
            .open(node.data_dir().join("postgresql.auto.conf"))
            .context("could not open the standby's postgresql.auto.conf")?;
        writeln!(
            auto_conf,
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} application_name={application_name}'",
            upstream.port
        )
        .context("could not append primary_conninfo to postgresql.auto.conf")?;
        node.start().await?;
        Ok(node)
    }

    fn create(name: &str, bin_dir: &Path) -> Result<PgNode> {
        let install = install()?;
        let dir = install.node_dir(name)?;
        let node = PgNode {
            name: name.to_owned(),
            port: free_port()?,
            bin_dir: bin_dir.to_owned(),
            dir,
        };
        fs::create_dir(node.archive_dir()).context("could not create the WAL archive directory")?;
        install.give_away(&node.archive_dir())?;
        Ok(node)
    }

    /// The settings that differ between nodes; `postgresql.conf` includes this file.
    fn write_node_conf(&self) -> Result<()> {
        for path in [self.dir(), &self.archive_dir()] {
            let text = path.to_string_lossy();
            if !text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
            {
                bail!("{text} would need quoting in archive_command; use a plainer TMPDIR");
            }
        }
        let conf = format!(
            "# written by the clusterwatch test harness: what differs between nodes\n\
             port = {port}\n\
             unix_socket_directories = '{socket}'\n\
             archive_command = '{archive}'\n",
            port = self.port,
            socket = self.dir().display(),
            archive = self.default_archive_command(),
        );
        install()?.write_file(&self.data_dir().join("node.conf"), &conf)
    }

    /// The node's name as given to its constructor (used in messages and the directory name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's temporary directory; also its unix socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PGDATA.
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// Where the default `archive_command` copies WAL segments.
    pub fn archive_dir(&self) -> PathBuf {
        self.dir().join("archive")
    }

    /// The server log (`pg_ctl -l`).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("server.log")
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// `postgresql://USER:PASSWORD@127.0.0.1:PORT/postgres`, user and password
    /// percent-encoded.
    pub fn dsn_for(&self, user: &str, password: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/postgres",
            percent_encode(user),
            percent_encode(password),
            self.port
        )
    }

    /// [`dsn_for`](Self::dsn_for) the [`MONITOR_USER`] role.
    pub fn monitor_dsn(&self) -> String {
        self.dsn_for(MONITOR_USER, MONITOR_PASSWORD)
    }

    /// [`monitor_dsn`](Self::monitor_dsn), reaching the node at `port` on 127.0.0.1 instead
    /// of its own (through a [`TcpProxy`](super::TcpProxy), for a path a test can cut).
    pub fn monitor_dsn_via(&self, port: u16) -> String {
        self.monitor_dsn()
            .replace(&format!(":{}/", self.port), &format!(":{port}/"))
    }

    /// The `archive_command` the node starts with:
    /// `test ! -f ARCHIVE/%f && cp %p ARCHIVE/%f`.
    pub fn default_archive_command(&self) -> String {
        let archive = self.archive_dir();
        let archive = archive.display();
        format!("test ! -f {archive}/%f && cp %p {archive}/%f")
    }

    /// Runs `sql` with `psql -X -A -t` as the superuser over the unix socket and returns its
    /// output without the final newline (rows on lines, columns separated by `|`).
    /// Several statements in one string run in one transaction, so `ALTER SYSTEM` and the
    /// like need a call of their own.
    pub async fn psql(&self, sql: &str) -> Result<String> {
        let mut command = self.psql_command(SUPERUSER);
        command.arg("-h").arg(self.dir());
        self.run_psql(command, sql).await
    }

    /// Runs `sql` as `user` with `password` over TCP to 127.0.0.1 (so pg_hba's
    /// scram-sha-256 applies), the password passed in `PGPASSWORD`.
    pub async fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String> {
        let mut command = self.psql_command(user);
        command
            .args(["-h", "127.0.0.1", "-w"])
            .env("PGPASSWORD", password);
        self.run_psql(command, sql).await
    }

    fn psql_command(&self, user: &str) -> Command {
        let install = install().expect("a node exists only if PostgreSQL was found");
        let mut command = install.command(&self.bin_dir, "psql", self.dir());
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-p", &self.port.to_string(), "-U", user, "-d", "postgres"])
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    async fn run_psql(&self, mut command: Command, sql: &str) -> Result<String> {
        command.arg("-c").arg(sql);
        let output = run(command, PSQL_TIMEOUT)
            .await
            .with_context(|| format!("psql on PostgreSQL node {} failed", self.name))?;
        Ok(output.trim_end_matches('\n').to_owned())
    }

    /// Starts the server (`pg_ctl start -w`) and returns once it accepts connections (for a
    /// standby: once it has reached a consistent state and allows read-only queries).
    pub async fn start(&self) -> Result<()> {
        self.remove_stale_lock_files()?;
        let mut command = self.pg_ctl();
        command.arg("-l").arg(self.log_path()).arg("start");
        run(command, COMMAND_TIMEOUT).await.with_context(|| {
            format!(
                "could not start PostgreSQL node {} on port {}; last log lines:\n{}",
                self.name,
                self.port,
                tail(&self.logs(), LOG_TAIL_LINES)
            )
        })?;
        Ok(())
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast -w`).
    pub async fn stop(&self) -> Result<()> {
        self.resume_if_running();
        let mut command = self.pg_ctl();
        command.args(["-m", "fast", "stop"]);
        run(command, COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("could not stop PostgreSQL node {}", self.name))?;
        Ok(())
    }

    /// Promotes a standby (`pg_ctl promote -w`); returns once it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        let mut command = self.pg_ctl();
        command.arg("promote");
        run(command, COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("could not promote PostgreSQL node {}", self.name))?;
        Ok(())
    }

    /// Kills the postmaster and all its processes with SIGKILL, as in a crash, and returns
    /// once they are gone. [`start`](Self::start) brings it back through crash recovery.
    pub fn kill9(&self) -> Result<()> {
        let pid = self.postmaster_pid()?;
        let killed = signal_tree(pid, Signal::SIGKILL)?;
        wait_gone(&killed, Duration::from_secs(10))
            .with_context(|| format!("PostgreSQL node {} survived SIGKILL", self.name))
    }

    /// Freezes the whole server with SIGSTOP: the postmaster and every backend, walsender
    /// and auxiliary process. Stopping only the postmaster would leave established
    /// connections (which the exporter keeps between scrapes) answering.
    pub fn pause(&self) -> Result<()> {
        signal_tree(self.postmaster_pid()?, Signal::SIGSTOP)?;
        Ok(())
    }

    /// Undoes [`pause`](Self::pause) (SIGCONT to the postmaster and its processes).
    pub fn resume(&self) -> Result<()> {
        signal_tree(self.postmaster_pid()?, Signal::SIGCONT)?;
        Ok(())
    }

    fn resume_if_running(&self) {
        if let Some(pid) = self.running_postmaster() {
            let _ = signal_tree(pid, Signal::SIGCONT);
        }
    }

    /// The postmaster's PID, from `postmaster.pid`; fails if the server is not running.
    pub fn postmaster_pid(&self) -> Result<i32> {
        self.running_postmaster()
            .ok_or_else(|| anyhow!("PostgreSQL node {} is not running", self.name))
    }

    fn running_postmaster(&self) -> Option<i32> {
        lock_file_pid(&self.data_dir().join("postmaster.pid")).filter(|&pid| pid_alive(pid))
    }

    /// After a SIGKILL `postmaster.pid` and the socket's `.lock` file stay behind.
    /// PostgreSQL itself would ignore them once their PID is gone, but this machine's init
    /// never reaps orphans, so the dead postmaster stays a zombie and PostgreSQL's
    /// `kill(pid, 0)` check takes it for a live server.
    fn remove_stale_lock_files(&self) -> Result<()> {
        let lock_files = [
            self.data_dir().join("postmaster.pid"),
            self.dir().join(format!(".s.PGSQL.{}.lock", self.port)),
        ];
        for path in lock_files {
            let Some(pid) = lock_file_pid(&path) else {
                continue;
            };
            if !pid_alive(pid) {
                fs::remove_file(&path)
                    .with_context(|| format!("could not remove stale {}", path.display()))?;
            }
        }
        Ok(())
    }

    fn pg_ctl(&self) -> Command {
        let install = install().expect("a node exists only if PostgreSQL was found");
        let mut command = install.command(&self.bin_dir, "pg_ctl", self.dir());
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", PG_CTL_WAIT_SECS]);
        command
    }

    /// Writes a little WAL, switches to a new segment and returns the name of the segment
    /// just completed, which is now due for archiving. `pg_switch_wal()` alone does nothing
    /// when no WAL was written since the last switch, as right after `pg_basebackup`.
    pub async fn switch_wal(&self) -> Result<String> {
        self.psql("SELECT pg_logical_emit_message(false, 'clusterwatch-harness', 'switch')")
            .await?;
        // At a segment boundary pg_walfile_name() names the segment that ends there.
        self.psql("SELECT pg_walfile_name(pg_switch_wal())").await
    }

    /// Waits until WAL segment `segment` is in [`archive_dir`](Self::archive_dir).
    pub async fn wait_archived(&self, segment: &str, timeout: Duration) -> Result<()> {
        let path = self.archive_dir().join(segment);
        wait_until(
            timeout,
            &format!("{segment} to be archived by {}", self.name),
            async || Ok(path.is_file()),
        )
        .await
        .with_context(|| format!("log tail:\n{}", tail(&self.logs(), LOG_TAIL_LINES)))
    }

    /// Changes `archive_command` with `ALTER SYSTEM` and reloads, returning once new sessions
    /// see the new value (the archiver picks it up on its next cycle). Use e.g. `false` to
    /// make archiving fail.
    pub async fn set_archive_command(&self, command: &str) -> Result<()> {
        self.psql(&format!(
            "ALTER SYSTEM SET archive_command = '{}'",
            command.replace('\'', "''")
        ))
        .await?;
        self.reload_until_archive_command_is(command).await
    }

    /// Undoes [`set_archive_command`](Self::set_archive_command): back to
    /// [`default_archive_command`](Self::default_archive_command).
    pub async fn reset_archive_command(&self) -> Result<()> {
        self.psql("ALTER SYSTEM RESET archive_command").await?;
        self.reload_until_archive_command_is(&self.default_archive_command())
            .await
    }

    async fn reload_until_archive_command_is(&self, expected: &str) -> Result<()> {
        self.psql("SELECT pg_reload_conf()").await?;
        wait_until(
            Duration::from_secs(10),
            &format!("archive_command on {} to become `{expected}`", self.name),
            async || {
                let current = self.psql("SHOW archive_command").await?;
                Ok(current == expected)
            },
        )
        .await
    }

    /// Creates repmgr's own extension (Debian package `repmgr`) and fills its node table as
    /// `repmgr primary register` / `standby register` would: `node1` the primary, `node2` its
    /// standby. Their conninfo carries `password=hunter2`, which must never reach metrics.
    /// [`MONITOR_USER`] cannot read the table until [`grant_repmgr`](Self::grant_repmgr).
    pub async fn create_repmgr_nodes(&self) -> Result<()> {
        self.psql("CREATE EXTENSION repmgr").await?;
        self.psql(
            "INSERT INTO repmgr.nodes (node_id, upstream_node_id, active, node_name, type, conninfo, repluser, config_file) VALUES \
             (1, NULL, true, 'node1', 'primary', 'host=node1 user=repmgr password=hunter2', 'repmgr', '/etc/repmgr.conf'), \
             (2, 1, true, 'node2', 'standby', 'host=node2 user=repmgr password=hunter2', 'repmgr', '/etc/repmgr.conf')",
        )
        .await?;
        Ok(())
    }

    /// Lets [`MONITOR_USER`] read repmgr's node table (`pg_monitor` does not cover it).
    pub async fn grant_repmgr(&self) -> Result<()> {
        self.psql(&format!(
            "GRANT USAGE ON SCHEMA repmgr TO {MONITOR_USER}; GRANT SELECT ON repmgr.nodes TO {MONITOR_USER}"
        ))
        .await?;
        Ok(())
    }

    /// Points this standby's replication connection at `port` on 127.0.0.1 (its upstream,
    /// or a proxy in front of it) as `application_name`, and waits until it streams from
    /// there (`pg_stat_wal_receiver`).
    pub async fn stream_through(&self, application_name: &str, port: u16) -> Result<()> {
        self.psql(&format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={port} user={SUPERUSER} application_name={application_name}'"
        ))
        .await?;
        self.psql("SELECT pg_reload_conf()").await?;
        wait_until(
            Duration::from_secs(30),
            &format!("{} to stream through port {port}", self.name),
            async || {
                let row = self
                    .psql("SELECT status, sender_port FROM pg_stat_wal_receiver")
                    .await?;
                if row == format!("streaming|{port}") {
                    Ok(true)
                } else {
                    bail!("pg_stat_wal_receiver: `{row}`")
                }
            },
        )
        .await
    }

    /// Waits until this node's `pg_stat_replication` shows the standby `application_name`
    /// in state `streaming`.
    pub async fn wait_standby_streaming(
        &self,
        application_name: &str,
        timeout: Duration,
    ) -> Result<()> {
        let sql = format!(
            "SELECT state FROM pg_stat_replication WHERE application_name = '{}'",
            application_name.replace('\'', "''")
        );
        wait_until(
            timeout,
            &format!("standby {application_name} to stream from {}", self.name),
            async || {
                let state = self.psql(&sql).await?;
                if state == "streaming" {
                    Ok(true)
                } else {
                    bail!("pg_stat_replication state: `{state}`")
                }
            },
        )
        .await
        .with_context(|| format!("primary log tail:\n{}", tail(&self.logs(), LOG_TAIL_LINES)))
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let Some(pid) = self.running_postmaster() else {
            return;
        };
        // A paused server would not act on pg_ctl's SIGQUIT.
        let processes = signal_tree(pid, Signal::SIGCONT).unwrap_or_else(|_| vec![pid]);
        let mut command = self.pg_ctl();
        command.args(["-m", "immediate", "stop"]);
        if let Err(err) = run_blocking(command) {
            eprintln!(
                "harness: pg_ctl stop failed for PostgreSQL node {}, sending SIGKILL: {err:#}",
                self.name
            );
            let _ = signal_tree(pid, Signal::SIGKILL);
        }
        // Backends exit just after the postmaster; wait so none writes into the directory
        // while it is being removed.
        if let Err(err) = wait_gone(&processes, Duration::from_secs(10)) {
            eprintln!("harness: PostgreSQL node {}: {err:#}", self.name);
        }
    }
}

impl std::fmt::Debug for PgNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNode")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("dir", &self.dir())
            .finish()
    }
}

/// A primary and one streaming standby ([`STANDBY_NAME`]). The field names are the initial
/// roles: after a test promotes the standby they no longer say who is primary.
#[derive(Debug)]
pub struct PgCluster {
    /// The node started by initdb.
    pub primary: PgNode,
    /// The node cloned from `primary` with `pg_basebackup -R`.
    pub standby: PgNode,
}

impl PgCluster {
    /// Starts a primary and a standby and returns once the standby is streaming.
    pub async fn start_pair() -> Result<PgCluster> {
        PgCluster::start_pair_in(&install()?.bin_dir).await
    }

    /// Like [`start_pair`](Self::start_pair), with the programs in `bin_dir`.
    pub async fn start_pair_in(bin_dir: &Path) -> Result<PgCluster> {
        let primary = PgNode::start_primary_in("primary", bin_dir).await?;
        let standby = PgNode::start_standby("standby", &primary, STANDBY_NAME).await?;
        let cluster = PgCluster { primary, standby };
        cluster.wait_streaming(REPLICATION_TIMEOUT).await?;
        Ok(cluster)
    }

    /// Waits until the primary shows the standby as `streaming`.
    pub async fn wait_streaming(&self, timeout: Duration) -> Result<()> {
        self.primary
            .wait_standby_streaming(STANDBY_NAME, timeout)
            .await
            .with_context(|| {
                format!(
                    "standby log tail:\n{}",
                    tail(&self.standby.logs(), LOG_TAIL_LINES)
                )
            })
    }

    /// [`PgNode::set_archive_command`] on the primary.
    pub async fn set_archive_command(&self, command: &str) -> Result<()> {
        self.primary.set_archive_command(command).await
    }

    /// [`PgNode::reset_archive_command`] on the primary.
    pub async fn reset_archive_command(&self) -> Result<()> {
        self.primary.reset_archive_command().await
    }
}

/// Waits (blocking: it also runs in `Drop`) until none of `pids` is alive.
fn wait_gone(pids: &[i32], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&pid| pid_alive(pid)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes {alive:?} still alive after {timeout:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The PID on the first line of a PostgreSQL lock file (`postmaster.pid`, socket locks).
fn lock_file_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Appended to every primary's postgresql.conf (and so copied to its standbys).
const COMMON_CONF: &str = "
# added by the clusterwatch test harness
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
archive_mode = on
# Tests crash processes, never the machine: durability to disk only costs time.
fsync = off
# Standbys report positions every second, so lag columns move within a test's deadlines.
wal_receiver_status_interval = 1s
# A standby retries a lost upstream every second instead of every 5 s.
wal_retrieve_retry_interval = 1s
shared_buffers = 16MB
max_connections = 40
log_line_prefix = '%m [%p] %q%a '
include_if_exists = 'node.conf'
";

/// Replaces initdb's pg_hba.conf; see [`PgNode::start_primary`].
const PG_HBA: &str = "\
# written by the clusterwatch test harness
local   all          all                         trust
local   replication  all                         trust
host    all          postgres     127.0.0.1/32   trust
host    replication  postgres     127.0.0.1/32   trust
host    all          all          127.0.0.1/32   scram-sha-256
host    replication  all          127.0.0.1/32   scram-sha-256
";

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn dsn_parts_are_percent_encoded() {
        assert_eq!(percent_encode("monitor"), "monitor");
        assert_eq!(percent_encode("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }
}
