//! Redis for the tests: a master and a replica (`--replicaof`), or a standalone instance,
//! each a `redis-server` child on a free loopback port with its own temporary directory,
//! no persistence, an optional password and an optional TLS port beside the plain one.
//! Talks to them with `redis-cli` on the plain port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use super::ports::free_port;
use super::process::{find_program, run, wait_until, ChildGuard};

/// How long a node gets to answer PING after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long until a replica reports `master_link_status:up`.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on one `redis-cli` run (a paused node makes it hang).
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// One `redis-server` started by the harness; dropping it stops the server and removes its
/// directory.
pub struct RedisNode {
    // Declared before `dir` so the server stops before its directory is removed.
    guard: ChildGuard,
    name: String,
    port: u16,
    password: Option<String>,
    tls_port: Option<u16>,
    /// The `redis-server` program it runs (a replica runs its master's).
    server: PathBuf,
    dir: TempDir,
}

/// A test certificate authority and a server certificate it signed for `127.0.0.1` and
/// `localhost`, made with the `openssl` command line tool in a temporary directory.
pub struct TestCertificates {
    dir: TempDir,
}

impl TestCertificates {
    /// Creates the CA and the server certificate (P-256 keys, valid for one day).
    pub async fn create() -> Result<TestCertificates> {
        let openssl = find_program("CLUSTERWATCH_OPENSSL", &["openssl"])?;
        let dir = super::temp_dir("cw-certs-")?;
        let d = dir.path();
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )?;
        let steps = [
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout ca.key -out ca.crt -days 1 -subj /CN=clusterwatch-test-ca",
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout server.key -out server.csr -subj /CN=localhost",
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
             -out server.crt -days 1 -extfile server.ext",
        ];
        for args in steps {
            let mut command = Command::new(&openssl);
            command.current_dir(d).args(args.split_whitespace());
            run(command, CLI_TIMEOUT).await?;
        }
        Ok(TestCertificates { dir })
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn server_files(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        )
    }
}

impl RedisNode {
    /// Starts a standalone instance (a master without replicas) and waits until it answers
    /// PING. With `password`, clients must AUTH.
    pub async fn standalone(name: &str, password: Option<&str>) -> Result<RedisNode> {
        RedisNode::spawn(name, password, None, None, None).await
    }

    /// Starts a standalone instance that also listens for TLS on a second port
    /// ([`tls_url`](Self::tls_url)) with the server certificate of `certs`; clients are not
    /// asked for certificates.
    pub async fn standalone_tls(name: &str, certs: &TestCertificates) -> Result<RedisNode> {
        RedisNode::spawn(name, None, None, Some(certs), None).await
    }

    /// Starts a replica of `master` (`--replicaof`, `--masterauth` from the master's
    /// password) and waits until it answers PING; it may not have synced yet, see
    /// [`wait_link_up`](Self::wait_link_up).
    pub async fn replica_of(name: &str, master: &RedisNode) -> Result<RedisNode> {
        RedisNode::spawn(
            name,
            master.password(),
            Some(master.port),
            None,
            Some(&master.server),
        )
        .await
    }

    async fn spawn(
        name: &str,
        password: Option<&str>,
        master_port: Option<u16>,
        tls: Option<&TestCertificates>,
        server: Option<&Path>,
    ) -> Result<RedisNode> {
        let server = match server {
            Some(server) => server.to_owned(),
            None => find_program("CLUSTERWATCH_REDIS_SERVER", &["redis-server"])?,
        };
        let dir = super::temp_dir(&format!("cw-redis-{name}-"))?;
        let port = free_port()?;
        let mut command = Command::new(&server);
        // Run inside the temporary directory too: anything the server writes before `--dir`
        // applies (or to a relative path) stays out of the working directory of the tests.
        command
            .current_dir(dir.path())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", ""])
            // Redis 7 waits 5 s by default before a diskless full sync, hoping for more
            // replicas to join; one replica is all we have.
            .args(["--repl-diskless-sync-delay", "0"]);
        if let Some(password) = password {
            command.args(["--requirepass", password, "--masterauth", password]);
        }
        if let Some(master_port) = master_port {
            command.args(["--replicaof", "127.0.0.1", &master_port.to_string()]);
        }
        let tls_port = match tls {
            Some(certs) => {
                let port = free_port()?;
                let (cert, key) = certs.server_files();
                command
                    .args(["--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(certs.ca_file())
                    .args(["--tls-auth-clients", "no"]);
                Some(port)
            }
            None => None,
        };
        let guard = ChildGuard::spawn(&format!("redis-{name}"), command, dir.path())?;
        let mut node = RedisNode {
            guard,
            name: name.to_owned(),
            port,
            password: password.map(str::to_owned),
            tls_port,
            server,
            dir,
        };
        node.wait_ping().await?;
        Ok(node)
    }

    async fn wait_ping(&mut self) -> Result<()> {
        let cli = CliTarget::of(self)?;
        self.guard
            .wait_ready(START_TIMEOUT, "PONG from redis-server", async || {
                let answer = cli.run(&["PING"]).await?;
                if answer == "PONG" {
                    Ok(true)
                } else {
                    bail!("PING answered `{answer}`")
                }
            })
            .await
    }

    /// The node's name as given to its constructor.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT` for a node started with
    /// [`standalone_tls`](Self::standalone_tls).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    /// The password clients must AUTH with, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The node's temporary directory (its `--dir` and log files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT ARGS…` (authenticated through `REDISCLI_AUTH`)
    /// and returns its output without the final newline. An error reply is output too,
    /// e.g. `ERR unknown command …`: `redis-cli` does not fail on it.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        CliTarget::of(self)?
            .run(args)
            .await
            .with_context(|| format!("redis-cli on Redis node {}", self.name))
    }

    /// `redis-cli ARGS…` against whatever answers Redis on `127.0.0.1:port` without a
    /// password (an HAProxy frontend, say), like [`cli`](Self::cli).
    pub async fn cli_at(port: u16, args: &[&str]) -> Result<String> {
        CliTarget {
            program: find_program("CLUSTERWATCH_REDIS_CLI", &["redis-cli"])?,
            port,
            password: None,
        }
        .run(args)
        .await
        .with_context(|| format!("redis-cli on 127.0.0.1:{port}"))
    }

    /// `INFO section` as a map of its `key:value` lines.
    pub async fn info(&self, section: &str) -> Result<BTreeMap<String, String>> {
        let text = self.cli(&["INFO", section]).await?;
        Ok(text
            .lines()
            .filter_map(|line| line.trim_end().split_once(':'))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect())
    }

    /// Waits until this replica's `INFO replication` shows `master_link_status:up`.
    pub async fn wait_link_up(&self, timeout: Duration) -> Result<()> {
        wait_until(
            timeout,
            &format!(
                "Redis replica {} to report master_link_status:up",
                self.name
            ),
            async || {
                let info = self.info("replication").await?;
                match info.get("master_link_status").map(String::as_str) {
                    Some("up") => Ok(true),
                    other => bail!("master_link_status: {other:?}"),
                }
            },
        )
        .await
        .with_context(|| format!("replica log tail:\n{}", self.guard.log_tail(20)))
    }

    /// Stops the server (SIGTERM; Redis exits at once as nothing is persisted).
    pub fn stop(&mut self) -> Result<()> {
        self.guard.stop()?;
        Ok(())
    }

    /// Starts a stopped or killed server again with the same arguments (same port, same
    /// role) and waits until it answers PING.
    pub async fn start(&mut self) -> Result<()> {
        self.guard.start()?;
        self.wait_ping().await
    }

    /// Kills the server with SIGKILL, as in a crash.
    pub fn kill9(&mut self) -> Result<()> {
        self.guard.kill9()
    }

    /// Freezes the server with SIGSTOP: connections stay open, nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.guard.pause()
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) -> Result<()> {
        self.guard.resume()
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The process guard, for other signals or the PID.
    pub fn process(&self) -> &ChildGuard {
        &self.guard
    }
}

impl std::fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisNode")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("pid", &self.guard.pid())
            .finish()
    }
}

/// What `redis-cli` needs to reach a node, apart from the node itself, so readiness checks
/// can run while the node's guard is borrowed mutably.
struct CliTarget {
    program: PathBuf,
    port: u16,
    password: Option<String>,
}

impl CliTarget {
    fn of(node: &RedisNode) -> Result<CliTarget> {
        Ok(CliTarget {
            program: find_program("CLUSTERWATCH_REDIS_CLI", &["redis-cli"])?,
            port: node.port,
            password: node.password.clone(),
        })
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(&self.program);
        command
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            // The environment, not `-a`, so the password stays out of argv and error text.
            .env_remove("REDISCLI_AUTH");
        if let Some(password) = &self.password {
            command.env("REDISCLI_AUTH", password);
        }
        let output = run(command, CLI_TIMEOUT).await?;
        Ok(output.trim_end_matches('\n').to_owned())
    }
}

/// A master and one replica of it.
#[derive(Debug)]
pub struct RedisPair {
    /// Started first, without `--replicaof`.
    pub master: RedisNode,
    /// Started with `--replicaof` the master.
    pub replica: RedisNode,
}

impl RedisPair {
    /// Starts a master and a replica without passwords and waits until the replica's link
    /// to the master is up.
    pub async fn start() -> Result<RedisPair> {
        RedisPair::start_with(None).await
    }

    /// Like [`start`](Self::start), with `requirepass` and `masterauth` set to `password`.
    pub async fn start_with_password(password: &str) -> Result<RedisPair> {
        RedisPair::start_with(Some(password)).await
    }

    /// Like [`start`](Self::start), both nodes running `server` (another Redis version).
    pub async fn start_server(server: &Path) -> Result<RedisPair> {
        let master = RedisNode::spawn("master", None, None, None, Some(server)).await?;
        RedisPair::start_replica(master).await
    }

    async fn start_with(password: Option<&str>) -> Result<RedisPair> {
        RedisPair::start_replica(RedisNode::standalone("master", password).await?).await
    }

    async fn start_replica(master: RedisNode) -> Result<RedisPair> {
        let replica = RedisNode::replica_of("replica", &master).await?;
        let pair = RedisPair { master, replica };
        pair.wait_replication_up(REPLICATION_TIMEOUT).await?;
        Ok(pair)
    }

    /// Waits until the replica reports `master_link_status:up`.
    pub async fn wait_replication_up(&self, timeout: Duration) -> Result<()> {
        self.replica
            .wait_link_up(timeout)
            .await
            .with_context(|| format!("master log tail:\n{}", self.master.guard.log_tail(20)))
    }
}
