//! Alertmanager's webhook payload (version 4): strict decoding of the fields the runner needs,
//! unknown fields ignored. It decides nothing; `policy` does.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A webhook notification as Alertmanager sends it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// Must be `"4"`.
    pub version: String,
    /// Identifies the alert group.
    pub group_key: String,
    /// `firing` or `resolved` for the group as a whole.
    pub status: Status,
    /// The Alertmanager receiver that sent it.
    pub receiver: String,
    /// The alerts of the group.
    pub alerts: Vec<Alert>,
}

/// One alert of a notification.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: Status,
    /// The alert's labels.
    pub labels: BTreeMap<String, String>,
    /// The alert's annotations (kept as evidence in the journal).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the alert started (RFC 3339, as sent): one incident has one start time.
    pub starts_at: String,
    /// Alertmanager's identity of the label set.
    pub fingerprint: String,
}

/// An alert's (or group's) status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Firing.
    Firing,
    /// Resolved.
    Resolved,
}

impl Status {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

impl Alert {
    /// The `alertname` label, or empty.
    pub fn alertname(&self) -> &str {
        self.labels
            .get("alertname")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Why a body is not a notification. The message is for the log; the client gets the kind.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// Another payload version.
    #[error("unsupported payload version `{0}` (expected 4)")]
    Version(String),
    /// Valid JSON, but a value the runner cannot key on.
    #[error("invalid alert: {0}")]
    Invalid(String),
}

/// Decodes and checks a webhook body.
pub fn decode(body: &[u8]) -> Result<Notification, PayloadError> {
    // The version is checked first so a future format gets a precise answer, not a shape error.
    #[derive(Deserialize)]
    struct Version {
        version: Option<serde_json::Value>,
    }
    let v: Version =
        serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    match v.version {
        Some(serde_json::Value::String(s)) if s == "4" => {}
        Some(other) => {
            let shown: String = other.to_string().chars().take(16).collect();
            return Err(PayloadError::Version(shown));
        }
        None => return Err(PayloadError::Malformed("missing field `version`".into())),
    }
    let n: Notification =
        serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    if n.alerts.is_empty() {
        return Err(PayloadError::Invalid("no alerts".into()));
    }
    for (i, a) in n.alerts.iter().enumerate() {
        if a.fingerprint.is_empty() || a.fingerprint.len() > 64 {
            return Err(PayloadError::Invalid(format!(
                "alerts[{i}]: bad fingerprint"
            )));
        }
        if a.starts_at.is_empty() || a.starts_at.len() > 64 {
            return Err(PayloadError::Invalid(format!("alerts[{i}]: bad startsAt")));
        }
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal webhook body with one alert.
    pub(crate) fn body(status: &str, labels: &str, fp: &str, starts: &str) -> String {
        format!(
            r#"{{"version":"4","groupKey":"{{}}:{{}}","status":"{status}","receiver":"hooks",
            "groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am",
            "truncatedAlerts":0,"alerts":[{{"status":"{status}","labels":{labels},"annotations":{{}},
            "startsAt":"{starts}","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{fp}"}}]}}"#
        )
    }

    #[test]
    fn decodes_a_real_shaped_payload_and_ignores_unknown_fields() {
        let b = body(
            "firing",
            r#"{"alertname":"X","cluster":"c"}"#,
            "abc",
            "2026-01-01T00:00:00Z",
        );
        let b = b.replacen("\"version\"", "\"someNewField\":[1,2],\"version\"", 1);
        let n = decode(b.as_bytes()).unwrap();
        assert_eq!(n.alerts[0].alertname(), "X");
        assert_eq!(n.alerts[0].status, Status::Firing);
    }

    #[test]
    fn rejects_bad_payloads() {
        assert!(matches!(decode(b"{nope"), Err(PayloadError::Malformed(_))));
        let b = body("firing", "{}", "abc", "t").replace("\"4\"", "\"3\"");
        assert!(matches!(
            decode(b.as_bytes()),
            Err(PayloadError::Version(_))
        ));
        let b = body("firing", "{}", "abc", "t").replace("\"fingerprint\":\"abc\"", "\"x\":1");
        assert!(matches!(
            decode(b.as_bytes()),
            Err(PayloadError::Malformed(_))
        ));
        let b = body("firing", "{}", "", "t");
        assert!(matches!(
            decode(b.as_bytes()),
            Err(PayloadError::Invalid(_))
        ));
        let b = body("burning", "{}", "a", "t");
        assert!(matches!(
            decode(b.as_bytes()),
            Err(PayloadError::Malformed(_))
        ));
    }
}
