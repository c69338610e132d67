//! Kamailio for the tests: a `kamailio` child in the foreground (`-DD -E`) with a minimal
//! configuration the harness writes: SIP on a free UDP port answering OPTIONS with 200, and
//! JSON-RPC (`jsonrpcs` over `xhttp`) on a free TCP port at `/RPC`. No routing, no database.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::ports::free_port;
use super::process::{find_program, ChildGuard};

/// How long Kamailio gets to answer JSON-RPC after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One running Kamailio; dropping it stops the process and removes its directory.
pub struct Kamailio {
    guard: ChildGuard,
    sip_port: u16,
    http_port: u16,
    _dir: TempDir,
}

impl Kamailio {
    /// Starts Kamailio and waits until `core.version` answers over JSON-RPC.
    pub async fn start() -> Result<Kamailio> {
        let kamailio = find_program("CLUSTERWATCH_KAMAILIO", &["kamailio", "/usr/sbin/kamailio"])?;
        let dir = super::temp_dir("cw-kamailio-")?;
        let sip_port = free_port()?;
        let http_port = free_port()?;
        let modules = ["kex", "corex", "tm", "tmx", "sl", "pv", "xhttp", "jsonrpcs"]
            .map(|m| format!("loadmodule \"{m}.so\"\n"))
            .concat();
        let cfg = format!(
            "#!KAMAILIO\ndebug=2\nlog_stderror=yes\nchildren=2\ntcp_children=2\nauto_aliases=no\n\
             listen=udp:127.0.0.1:{sip_port}\nlisten=tcp:127.0.0.1:{http_port}\n\
             tcp_accept_no_cl=yes\nhttp_reply_parse=yes\n{modules}\
             modparam(\"jsonrpcs\", \"transport\", 1)\n\
             request_route {{\n  if (method == \"OPTIONS\") {{ sl_send_reply(\"200\", \"Keepalive\"); exit; }}\n\
               sl_send_reply(\"404\", \"Not here\");\n}}\n\
             event_route[xhttp:request] {{\n  if ($hu =~ \"^/RPC\") {{ jsonrpc_dispatch(); }}\n\
               else {{ xhttp_reply(\"404\", \"Not Found\", \"text/plain\", \"\"); }}\n}}\n"
        );
        let cfg_path = dir.path().join("kamailio.cfg");
        std::fs::write(&cfg_path, cfg)
            .with_context(|| format!("could not write {}", cfg_path.display()))?;
        let mut command = Command::new(kamailio);
        command
            .args(["-DD", "-E", "-m", "32", "-M", "4", "-f"])
            .arg(&cfg_path)
            .arg("-Y")
            .arg(dir.path())
            .arg("-P")
            .arg(dir.path().join("kamailio.pid"));
        let mut guard = ChildGuard::spawn("kamailio", command, dir.path())?;
        let client = super::http::client()?;
        let url = format!("http://127.0.0.1:{http_port}/RPC");
        guard
            .wait_ready(START_TIMEOUT, "kamailio JSON-RPC", async || {
                let r = client
                    .post(&url)
                    .body(r#"{"jsonrpc":"2.0","method":"core.version","id":1}"#)
                    .send()
                    .await?;
                Ok(r.status().is_success())
            })
            .await?;
        Ok(Kamailio {
            guard,
            sip_port,
            http_port,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT/RPC`, the JSON-RPC endpoint.
    pub fn rpc_url(&self) -> String {
        format!("http://127.0.0.1:{}/RPC", self.http_port)
    }

    /// `127.0.0.1:PORT`, where it speaks SIP over UDP.
    pub fn sip_addr(&self) -> String {
        format!("127.0.0.1:{}", self.sip_port)
    }

    /// Kamailio's main process, to stop it.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
