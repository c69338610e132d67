//! etcd for the tests: a cluster of N members (Debian's `etcd-server`), each an `etcd` child
//! with its own data directory and free client and peer ports on 127.0.0.1, joined through
//! `--initial-cluster`. Members can be killed and restarted one by one.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::http;
use super::ports::free_port;
use super::process::{find_program, wait_until, ChildGuard};

/// How long a new cluster gets until every member reports healthy (a leader elected).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One member: its process and client port.
pub struct EtcdMember {
    guard: ChildGuard,
    name: String,
    client_port: u16,
}

impl EtcdMember {
    /// The member's name (`m0`, `m1`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:PORT`, its client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's process, to kill or restart it.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

/// A running etcd cluster; dropping it stops every member and removes the data directories.
pub struct EtcdCluster {
    // Declared before `dir` so the members stop before their directories are removed.
    members: Vec<EtcdMember>,
    client: reqwest::Client,
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports healthy.
    pub async fn start(size: usize) -> Result<EtcdCluster> {
        let etcd = find_program("CLUSTERWATCH_ETCD", &["etcd"])?;
        let dir = super::temp_dir("cw-etcd-")?;
        let ports: Vec<(String, u16, u16)> = (0..size)
            .map(|i| Ok((format!("m{i}"), free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial_cluster = ports
            .iter()
            .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, client_port, peer_port) in ports {
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let mut command = Command::new(&etcd);
            command
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(dir.path().join(&name))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "clusterwatch-test"])
                // Its own metrics listener stays off: the client port serves /metrics.
                .env_remove("ETCD_LISTEN_METRICS_URLS");
            let guard = ChildGuard::spawn(&format!("etcd-{name}"), command, dir.path())?;
            members.push(EtcdMember {
                guard,
                name,
                client_port,
            });
        }
        let cluster = EtcdCluster {
            members,
            client: http::client()?,
            dir,
        };
        for i in 0..size {
            let url = format!("{}/health", cluster.members[i].endpoint());
            let client = cluster.client.clone();
            wait_until(START_TIMEOUT, "every etcd member healthy", async || {
                http::is_ready(&client, &url).await
            })
            .await
            .with_context(|| {
                format!(
                    "etcd member {} log tail:\n{}",
                    cluster.members[i].name,
                    cluster.members[i].guard.log_tail(20)
                )
            })?;
        }
        Ok(cluster)
    }

    /// Every member's client URL, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut EtcdMember {
        &mut self.members[i]
    }

    /// The directory holding every member's data directory and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}
