//! A workbench for the webhook receiver: a temporary directory with a bearer token, hook
//! scripts that record each invocation (arguments, environment, stdin) to files, a free port
//! for `hooks.listen`, webhook v4 payload builders, and a reader for the journal. It starts no
//! server itself; tests start clusterwatch with [`HookLab::config`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::ports::free_port;

/// The token Alertmanager and the tests present.
pub const TOKEN: &str = "test-hook-token-5b9f";

/// A temporary directory holding the token, the scripts, their records and the state dir.
pub struct HookLab {
    dir: TempDir,
    /// The webhook's own port (`hooks.listen`).
    pub port: u16,
    client: reqwest::Client,
}

impl HookLab {
    /// A fresh lab with the token file written and a free port chosen.
    pub fn new() -> Result<HookLab> {
        let dir = super::temp_dir("cw-hooks-")?;
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n"))?;
        Ok(HookLab {
            dir,
            port: free_port()?,
            client: super::http::client()?,
        })
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The journal's directory (`hooks.state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A clusterwatch configuration with a `hooks:` section: own listener on the lab's port,
    /// the lab's token and state dir, `settings` (indented YAML lines for the section) and
    /// `rules` (YAML list items indented by four spaces).
    pub fn config(&self, settings: &str, rules: &str) -> String {
        format!(
            "hooks:\n  listen: 127.0.0.1:{port}\n  bearer_token_file: {dir}/token\n  state_dir: {dir}/state\n{settings}  rules:\n{rules}",
            port = self.port,
            dir = self.dir.path().display(),
        )
    }

    /// Writes an executable `/bin/sh` script `name` with `body`.
    pub fn script(&self, name: &str, body: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
            .with_context(|| format!("could not write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    /// A hook script that records its invocation: one line `RUN STATUS FINGERPRINT` appended
    /// to `NAME.log`, its environment (NUL-separated) to `NAME.env.RUN`, its stdin to
    /// `NAME.stdin.RUN`, its PID to `NAME.pid`; then runs `then` (e.g. `sleep 30` or `exit 2`).
    pub fn recorder(&self, name: &str, then: &str) -> Result<PathBuf> {
        let d = self.dir.path().display();
        self.script(
            name,
            &format!(
                "env -0 > {d}/{name}.env.$CW_RUN\ncat > {d}/{name}.stdin.$CW_RUN\necho $$ > {d}/{name}.pid\n\
                 echo \"$CW_RUN $CW_ALERT_STATUS $CW_ALERT_FINGERPRINT\" >> {d}/{name}.log\n{then}"
            ),
        )
    }

    /// The lines `NAME.log` holds: one per invocation.
    pub fn invocations(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// A file the lab's scripts wrote.
    pub fn read(&self, file: &str) -> Result<Vec<u8>> {
        let path = self.dir.path().join(file);
        std::fs::read(&path).with_context(|| format!("could not read {}", path.display()))
    }

    /// `http://127.0.0.1:PORT/hooks/alertmanager`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/alertmanager", self.port)
    }

    /// POSTs `body` with the lab's bearer token; returns the status.
    pub async fn post(&self, body: impl Into<Vec<u8>>) -> Result<reqwest::StatusCode> {
        self.post_with(Some(&format!("Bearer {TOKEN}")), body).await
    }

    /// POSTs `body` with `authorization` as the Authorization header (none if `None`).
    pub async fn post_with(
        &self,
        authorization: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> Result<reqwest::StatusCode> {
        let mut request = self
            .client
            .post(self.url())
            .header("content-type", "application/json")
            .body(body.into());
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        Ok(request
            .send()
            .await
            .context("POST to the webhook")?
            .status())
    }

    /// Every journal record, parsed.
    pub fn journal(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir().join("journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Journal records of one `event` kind.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.journal()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }
}

/// One alert as Alertmanager's webhook sends it.
pub fn alert(status: &str, labels: Value, fingerprint: &str, starts_at: &str) -> Value {
    json!({
        "status": status,
        "labels": labels,
        "annotations": {"summary": "test"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.invalid/graph",
        "fingerprint": fingerprint,
    })
}

/// A webhook v4 notification holding `alerts`.
pub fn notification(status: &str, group_key: &str, alerts: Vec<Value>) -> Value {
    json!({
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "clusterwatch-hooks",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": alerts,
    })
}
