//! A private OpenSSH server on a free loopback port, for tools that reach other nodes over SSH
//! (repmgr's `--siblings-follow`): its own host key and one client key, all in its temporary
//! directory; nothing in the system's SSH configuration is read or changed.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::unistd::{Uid, User};
use tempfile::TempDir;

use super::process::{find_program, run, ChildGuard};
use super::{free_port, wait_until};

/// How long sshd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running sshd; dropping it stops the server and removes its keys.
pub struct Sshd {
    // Declared before `dir` so the server stops before its directory is removed.
    guard: ChildGuard,
    port: u16,
    dir: TempDir,
}

impl Sshd {
    /// Starts sshd on 127.0.0.1 accepting only `user`, with a client key made here (owned by
    /// `user`), and returns once it accepts connections. When not root, sshd can only let in
    /// the user running it, so `user` must be that user.
    pub async fn start(user: &str) -> Result<Sshd> {
        let sshd = find_program("CLUSTERWATCH_SSHD", &["sshd", "/usr/sbin/sshd"])
            .context("sshd is missing: install the Debian package `openssh-server`")?;
        let keygen = find_program("CLUSTERWATCH_SSH_KEYGEN", &["ssh-keygen"])?;
        let dir = super::temp_dir("cw-sshd-")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for key in ["host_key", "client_key"] {
            let mut command = Command::new(&keygen);
            command
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "clusterwatch-test",
                    "-f",
                ])
                .arg(dir.path().join(key));
            run(command, START_TIMEOUT).await?;
        }
        let public = std::fs::read_to_string(dir.path().join("client_key.pub"))?;
        std::fs::write(dir.path().join("authorized_keys"), public)?;
        let root = Uid::effective().is_root();
        if root {
            let account = User::from_name(user)?.with_context(|| format!("no user {user}"))?;
            nix::unistd::chown(
                &dir.path().join("client_key"),
                Some(account.uid),
                Some(account.gid),
            )?;
            // sshd's privilege separation directory, which its service unit would create.
            std::fs::create_dir_all("/run/sshd")?;
        }
        let port = free_port()?;
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nAllowUsers {user}\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 # PAM lets in a service account whose password is locked (`!`), by key.\n\
                 UsePAM {pam}\nPidFile none\nLogLevel ERROR\n",
                dir = dir.path().display(),
                pam = if root { "yes" } else { "no" },
            ),
        )?;
        let mut command = Command::new(sshd);
        command.arg("-D").arg("-e").arg("-f").arg(&config);
        let guard = ChildGuard::spawn("sshd", command, dir.path())?;
        let sshd = Sshd { guard, port, dir };
        wait_until(START_TIMEOUT, "sshd to listen", async || {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok())
        })
        .await
        .with_context(|| format!("sshd log:\n{}", sshd.guard.log_tail(20)))?;
        Ok(sshd)
    }

    /// The client key `user` presents.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// ssh options reaching this server without a prompt or a known-hosts entry, for
    /// `ssh OPTIONS 127.0.0.1 COMMAND` (repmgr's `ssh_options`).
    pub fn client_options(&self) -> String {
        format!(
            "-q -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p {} -i {}",
            self.port,
            self.client_key().display()
        )
    }
}
