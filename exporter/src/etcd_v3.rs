//! The etcd v3 client both etcd users share: endpoint URLs checked from the configuration and
//! an HTTP client for the v3 JSON gateway with the configured TLS files. It holds no key or
//! lease logic: the `etcd` collector reads health, the hook lock takes claims.

use std::path::PathBuf;

use url::Url;

use crate::config::{Located, Problem};

/// Endpoints are `http(s)://host:port`; the URL becomes the `endpoint` label, so anything
/// that could carry a secret (user info) or change the meaning (a path) is refused. The hook
/// runner's etcd lock checks its endpoints the same way.
pub fn check_endpoints(raw: &[String], at: &Located, problems: &mut Vec<Problem>) -> Vec<Url> {
    if raw.is_empty() {
        problems.push(
            at.problem("endpoints", "at least one endpoint is needed")
                .hint("list every member's client URL, e.g. `http://10.0.0.1:2379`"),
        );
    }
    let mut out: Vec<Url> = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let field = format!("endpoints[{i}]");
        let url = match Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                problems.push(
                    at.problem(&field, format!("invalid URL: {e}"))
                        .hint("write e.g. `http://10.0.0.1:2379`"),
                );
                continue;
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            problems.push(
                at.problem(
                    &field,
                    "an endpoint must be an http:// or https:// URL with a host",
                )
                .hint("write e.g. `https://10.0.0.1:2379`"),
            );
        } else if !url.username().is_empty() || url.password().is_some() {
            problems.push(
                at.problem(&field, "credentials in the URL are not supported")
                    .hint("use client certificates (`cert_file`, `key_file`)"),
            );
        } else if url.path() != "/" || url.query().is_some() {
            problems.push(
                at.problem(&field, "an endpoint has no path")
                    .hint("write only scheme, host and port, e.g. `http://10.0.0.1:2379`"),
            );
        } else if out.contains(&url) {
            problems.push(at.problem(&field, "endpoint listed twice"));
        } else {
            out.push(url);
        }
    }
    out
}

/// TLS files for talking to etcd, already resolved against the configuration's directory.
pub struct TlsFiles {
    /// CA bundle to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

/// An HTTP client for etcd's endpoints with the given TLS files; problems name `at`'s fields.
pub fn build_client(
    tls: &TlsFiles,
    at: &Located,
    problems: &mut Vec<Problem>,
) -> Option<reqwest::Client> {
    // Cluster members are reached directly; an `http_proxy` meant for the internet must not
    // reroute them.
    let mut builder = reqwest::Client::builder().use_rustls_tls().no_proxy();
    let read = |field: &str, path: &PathBuf, problems: &mut Vec<Problem>| {
        std::fs::read(path)
            .map_err(|e| {
                problems.push(at.problem(field, format!("cannot read {}: {e}", path.display())))
            })
            .ok()
    };
    if let Some(path) = &tls.ca {
        let pem = read("ca_file", path, problems)?;
        match reqwest::Certificate::from_pem(&pem) {
            Ok(c) => builder = builder.add_root_certificate(c),
            Err(_) => {
                problems.push(at.problem("ca_file", "not a PEM certificate"));
                return None;
            }
        }
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let mut pem = read("cert_file", cert, problems)?;
            pem.push(b'\n');
            pem.extend(read("key_file", key, problems)?);
            match reqwest::Identity::from_pem(&pem) {
                Ok(id) => builder = builder.identity(id),
                Err(_) => {
                    problems.push(
                        at.problem("cert_file", "not a PEM certificate and private key")
                            .hint("`cert_file` holds the certificate, `key_file` its PKCS#8 or RSA key"),
                    );
                    return None;
                }
            }
        }
        (None, None) => {}
        _ => {
            problems.push(
                at.problem("cert_file", "`cert_file` and `key_file` go together")
                    .hint("give both for client certificate authentication, or neither"),
            );
            return None;
        }
    }
    match builder.build() {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(at.problem("endpoints", format!("cannot set up HTTP client: {e}")));
            None
        }
    }
}
