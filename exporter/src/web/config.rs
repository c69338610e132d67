//! The web configuration file (`--web.config.file`, `hooks.web_config_file`) in the format of
//! Prometheus' exporter-toolkit, checked into [`Settings`]: certificates read, keys matched,
//! hashes parsed. It serves nothing; a setting rustls cannot honour is an error, never ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::source::{suggest, Node};
use crate::config::{ConfigError, Located, Problem};
use crate::probe::tls::read_certs;

/// Checked web settings for one listener. Cheap to clone: the TLS configuration is shared.
#[derive(Clone)]
pub struct Settings {
    /// The file they came from, for logs.
    pub origin: String,
    /// TLS server configuration, when `tls_server_config` is present.
    pub tls: Option<Arc<ServerConfig>>,
    /// Which client certificates the TLS configuration asks for.
    pub client_auth: ClientAuth,
    /// Basic-auth users and their bcrypt hashes; empty means no basic auth.
    pub users: BTreeMap<String, PasswordHash>,
    /// Headers added to every response (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("origin", &self.origin)
            .field("tls", &self.tls.is_some())
            .field("client_auth", &self.client_auth)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// `tls_server_config.client_auth_type`, limited to what rustls verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert`: no client certificate is asked for.
    None,
    /// `RequireAndVerifyClientCert`: a certificate signed by `client_ca_file` is required.
    Require,
    /// `VerifyClientCertIfGiven`: a certificate is optional, but checked when presented.
    IfGiven,
}

/// A bcrypt hash from the file. Not a password, but never printed either.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// The hash text, for the one place that verifies against it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The blocks of a web configuration file.
const BLOCKS: &[&str] = &[
    "tls_server_config",
    "http_server_config",
    "basic_auth_users",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    prefer_server_cipher_suites: Option<bool>,
    // exporter-toolkit keys rustls cannot honour, named here so the problem can say why.
    cipher_suites: Option<IgnoredAny>,
    curve_preferences: Option<IgnoredAny>,
    client_allowed_sans: Option<IgnoredAny>,
    cert: Option<IgnoredAny>,
    key: Option<IgnoredAny>,
    client_ca: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    headers: Option<BTreeMap<String, String>>,
    http2: Option<bool>,
}

/// The response headers exporter-toolkit lets a web config set; the others belong to the
/// server (Content-Type, Content-Length) or to authentication.
const ALLOWED_HEADERS: &[&str] = &[
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
];

const CLIENT_AUTH_TYPES: &[&str] = &[
    "NoClientCert",
    "RequireAndVerifyClientCert",
    "VerifyClientCertIfGiven",
];

const VERSIONS: &[&str] = &["TLS12", "TLS13"];

/// Reads and checks a web configuration file; relative paths in it are relative to its
/// directory.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = crate::config::read_text(path, "--web.config.file or hooks.web_config_file")?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &path.display().to_string(), &base)
}

/// Checks web configuration text. `file` is used in messages; `base_dir` resolves paths.
pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Settings, ConfigError> {
    let fail = |problems| ConfigError {
        file: file.to_owned(),
        problems,
    };
    let doc = Node::parse_document(text).map_err(|p| fail(vec![p]))?;
    let root = Located::new(&doc, "");
    let mut problems = Vec::new();
    match doc.as_map() {
        Some(entries) => {
            for (key, _) in entries
                .iter()
                .filter(|(k, _)| !BLOCKS.contains(&k.name.as_str()))
            {
                problems.push(
                    Problem::new(&key.name, key.pos, format!("unknown key `{}`", key.name)).hint(
                        suggest(&key.name, BLOCKS)
                            .unwrap_or_else(|| format!("known keys: {}", BLOCKS.join(", "))),
                    ),
                );
            }
        }
        // An empty file is valid (plain HTTP, no users), as in exporter-toolkit.
        None if matches!(doc.value, crate::config::source::Value::Null) => {}
        None => problems.push(
            Problem::new("", doc.pos, "a web configuration is a mapping")
                .hint("start with `tls_server_config:` or `basic_auth_users:`"),
        ),
    }
    let tls = root
        .field("tls_server_config")
        .and_then(|at| check_tls(&at, base_dir, &mut problems));
    let users = root
        .field("basic_auth_users")
        .map(|at| check_users(&at, &mut problems))
        .unwrap_or_default();
    let headers = root
        .field("http_server_config")
        .map(|at| check_http(&at, &mut problems))
        .unwrap_or_default();
    if !problems.is_empty() {
        problems.sort_by_key(|p| (p.pos.line, p.pos.column));
        return Err(fail(problems));
    }
    let (tls, client_auth) = match tls {
        Some((config, auth)) => (Some(config), auth),
        None => (None, ClientAuth::None),
    };
    Ok(Settings {
        origin: file.to_owned(),
        tls,
        client_auth,
        users,
        headers,
    })
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// What to write instead of an exporter-toolkit key rustls cannot honour.
fn unsupported(raw: &RawTls) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    let mut add = |present: bool, key, why, instead| {
        if present {
            out.push((key, why, instead));
        }
    };
    add(
        raw.cipher_suites.is_some(),
        "cipher_suites",
        "cipher suites cannot be chosen: rustls offers only its own modern, safe suites",
        "remove cipher_suites",
    );
    add(
        raw.curve_preferences.is_some(),
        "curve_preferences",
        "curve preferences cannot be chosen: rustls uses its own safe key-exchange groups",
        "remove curve_preferences",
    );
    add(
        raw.client_allowed_sans.is_some(),
        "client_allowed_sans",
        "client certificates cannot be limited by subject alternative name",
        "issue client certificates from a CA used only for this purpose and remove client_allowed_sans",
    );
    add(
        raw.cert.is_some(),
        "cert",
        "inline certificates are not read",
        "write the PEM to a file and set cert_file",
    );
    add(
        raw.key.is_some(),
        "key",
        "inline keys are not read",
        "write the PEM to a file and set key_file",
    );
    add(
        raw.client_ca.is_some(),
        "client_ca",
        "inline client CAs are not read",
        "write the PEM to a file and set client_ca_file",
    );
    out
}

fn check_version(
    at: &Located,
    field: &str,
    value: Option<&str>,
    problems: &mut Vec<Problem>,
) -> Option<Option<&'static rustls::SupportedProtocolVersion>> {
    match value {
        None => Some(None),
        Some("TLS12") => Some(Some(&rustls::version::TLS12)),
        Some("TLS13") => Some(Some(&rustls::version::TLS13)),
        Some(v @ ("TLS10" | "TLS11")) => {
            problems.push(
                at.problem(
                    field,
                    format!("{v} is not supported: rustls implements TLS 1.2 and 1.3 only"),
                )
                .hint("use TLS12 (or TLS13); every current Prometheus speaks both"),
            );
            None
        }
        Some(v) => {
            problems.push(
                at.problem(field, format!("unknown TLS version `{v}`"))
                    .hint(suggest(v, VERSIONS).unwrap_or_else(|| "use TLS12 or TLS13".into())),
            );
            None
        }
    }
}

fn check_tls(
    at: &Located,
    base: &Path,
    problems: &mut Vec<Problem>,
) -> Option<(Arc<ServerConfig>, ClientAuth)> {
    let raw = at.parse::<RawTls>(problems)?;
    let before = problems.len();
    for (key, why, instead) in unsupported(&raw) {
        problems.push(at.problem(key, why).hint(instead));
    }
    for (field, value) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
        if value.is_none() {
            problems.push(
                at.problem(field, format!("missing field `{field}`"))
                    .hint("TLS needs the server certificate (cert_file) and its key (key_file)"),
            );
        }
    }
    let min = check_version(at, "min_version", raw.min_version.as_deref(), problems);
    let max = check_version(at, "max_version", raw.max_version.as_deref(), problems);
    // exporter-toolkit's default minimum is TLS 1.2, which is also rustls' floor.
    let min = min.map(|v| v.unwrap_or(&rustls::version::TLS12));
    let max = max.map(|v| v.unwrap_or(&rustls::version::TLS13));
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match (min, max) {
        (Some(min), Some(max)) => {
            let all = [&rustls::version::TLS12, &rustls::version::TLS13];
            let rank = |v: &rustls::SupportedProtocolVersion| u16::from(v.version);
            let chosen: Vec<_> = all
                .into_iter()
                .filter(|v| rank(v) >= rank(min) && rank(v) <= rank(max))
                .collect();
            if chosen.is_empty() {
                problems.push(
                    at.problem("max_version", "max_version is below min_version")
                        .hint("e.g. min_version: TLS12 with max_version: TLS13"),
                );
            }
            chosen
        }
        _ => Vec::new(),
    };
    let client_auth = match raw.client_auth_type.as_deref() {
        None | Some("NoClientCert") => Some(ClientAuth::None),
        Some("RequireAndVerifyClientCert") => Some(ClientAuth::Require),
        Some("VerifyClientCertIfGiven") => Some(ClientAuth::IfGiven),
        Some(v @ ("RequireAnyClientCert" | "RequestClientCert")) => {
            problems.push(
                at.problem(
                    "client_auth_type",
                    format!("{v} is not supported: rustls never accepts a client certificate it has not verified"),
                )
                .hint("use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"),
            );
            None
        }
        Some(v) => {
            problems.push(
                at.problem(
                    "client_auth_type",
                    format!("unknown client_auth_type `{v}`"),
                )
                .hint(
                    suggest(v, CLIENT_AUTH_TYPES)
                        .unwrap_or_else(|| format!("one of {}", CLIENT_AUTH_TYPES.join(", "))),
                ),
            );
            None
        }
    };
    match (client_auth, &raw.client_ca_file) {
        (Some(ClientAuth::Require | ClientAuth::IfGiven), None) => problems.push(
            at.problem(
                "client_auth_type",
                "verifying client certificates needs client_ca_file",
            )
            .hint("set client_ca_file to the PEM file of the CA that signs client certificates"),
        ),
        (Some(ClientAuth::None), Some(_)) => problems.push(
            at.problem(
                "client_ca_file",
                "client_ca_file is set but client_auth_type asks for no client certificate",
            )
            .hint("set client_auth_type: RequireAndVerifyClientCert, or remove client_ca_file"),
        ),
        _ => {}
    }
    if problems.len() > before {
        return None;
    }
    let client_auth = client_auth?;
    let (cert_file, key_file) = (raw.cert_file?, raw.key_file?);

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&resolve(base, &cert_file))
        .map_err(|e| problems.push(at.problem("cert_file", e)))
        .ok();
    let key_path = resolve(base, &key_file);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| {
            problems.push(
                at.problem(
                    "key_file",
                    format!("{}: no usable private key: {e}", key_path.display()),
                )
                .hint("a PEM file with one PKCS#8, PKCS#1 or SEC1 private key"),
            )
        })
        .ok();
    let verifier = match (&raw.client_ca_file, client_auth) {
        (Some(ca), ClientAuth::Require | ClientAuth::IfGiven) => {
            let ca_path = resolve(base, ca);
            let mut roots = RootCertStore::empty();
            let added = read_certs(&ca_path).and_then(|certs| {
                certs.into_iter().try_for_each(|c| {
                    roots.add(c).map_err(|e| {
                        format!("{}: not a usable CA certificate: {e}", ca_path.display())
                    })
                })
            });
            let built = added.and_then(|()| {
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let builder = if client_auth == ClientAuth::IfGiven {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                builder
                    .build()
                    .map_err(|e| format!("{}: cannot verify with it: {e}", ca_path.display()))
            });
            match built {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(at.problem("client_ca_file", e));
                    return None;
                }
            }
        }
        _ => None,
    };
    let (certs, key) = (certs?, key?);
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| problems.push(at.problem("min_version", format!("{e}"))))
        .ok()?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = match builder.with_single_cert(certs, key) {
        Ok(c) => c,
        Err(rustls::Error::InconsistentKeys(_)) => {
            problems.push(
                at.problem(
                    "key_file",
                    format!(
                        "{} is not the key of the certificate in {}",
                        key_path.display(),
                        resolve(base, &cert_file).display()
                    ),
                )
                .hint("cert_file and key_file must be one pair; check both after a renewal"),
            );
            return None;
        }
        Err(e) => {
            problems.push(at.problem(
                "key_file",
                format!("the certificate and key are not usable together: {e}"),
            ));
            return None;
        }
    };
    config.ignore_client_order = raw.prefer_server_cipher_suites.unwrap_or(true);
    // HTTP/1.1 only: that is what the listener serves.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some((Arc::new(config), client_auth))
}

fn check_users(at: &Located, problems: &mut Vec<Problem>) -> BTreeMap<String, PasswordHash> {
    // Values are taken as any YAML so that serde's "wrong type" message, which quotes the
    // value, never prints what may be a password written where a hash belongs.
    let Some(raw) = at.parse::<Option<BTreeMap<String, serde_json::Value>>>(problems) else {
        return BTreeMap::new();
    };
    let mut users = BTreeMap::new();
    for (user, value) in raw.unwrap_or_default() {
        let hash = value.as_str().unwrap_or_default().to_owned();
        if user.is_empty() || user.contains(':') {
            problems.push(
                at.problem(&user, "a user name must be non-empty and without `:`")
                    .hint("basic auth sends `user:password`, split at the first `:`"),
            );
        }
        if bcrypt::HashParts::from_str(&hash).is_err() {
            // The value is not quoted: it may be a password written where a hash belongs.
            problems.push(
                at.problem(&user, "the value is not a bcrypt hash")
                    .hint("make one with `clusterwatch hash-password`; it starts with `$2`"),
            );
        }
        users.insert(user, PasswordHash(hash));
    }
    users
}

fn check_http(at: &Located, problems: &mut Vec<Problem>) -> Vec<(HeaderName, HeaderValue)> {
    let Some(raw) = at.parse::<RawHttp>(problems) else {
        return Vec::new();
    };
    if raw.http2 == Some(true) {
        problems.push(
            at.problem(
                "http2",
                "HTTP/2 is not served; the listener speaks HTTP/1.1",
            )
            .hint("remove http2 or set it to false"),
        );
    }
    let Some(headers_at) = at.field("headers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in raw.headers.unwrap_or_default() {
        let Some(allowed) = ALLOWED_HEADERS
            .iter()
            .find(|h| h.eq_ignore_ascii_case(&name))
        else {
            problems.push(
                headers_at
                    .problem(&name, format!("header `{name}` cannot be set here"))
                    .hint(suggest(&name, ALLOWED_HEADERS).unwrap_or_else(|| {
                        format!("settable headers: {}", ALLOWED_HEADERS.join(", "))
                    })),
            );
            continue;
        };
        match HeaderValue::from_str(&value) {
            Ok(v) => out.push((
                HeaderName::from_bytes(allowed.as_bytes()).expect("the allowed names are valid"),
                v,
            )),
            Err(_) => problems.push(headers_at.problem(&name, "not a valid header value")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA, a server pair signed by it and an unrelated key, as PEM files in a temp dir.
    fn files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(d.join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(d.join("server.key"), key.serialize_pem()).unwrap();
        std::fs::write(d.join("other.key"), other.serialize_pem()).unwrap();
        std::fs::write(d.join("junk.pem"), "not a certificate\n").unwrap();
        dir
    }

    fn problems(yaml: &str, dir: &Path) -> String {
        parse(yaml, "web.yml", dir).unwrap_err().render()
    }

    const TLS: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";

    #[test]
    fn relative_files_load_and_client_certificates_are_required() {
        let dir = files();
        let yaml = format!(
            "{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n  min_version: TLS13\n"
        );
        let s = parse(&yaml, "web.yml", dir.path()).unwrap();
        assert!(s.tls.is_some());
        assert_eq!(s.client_auth, ClientAuth::Require);
        assert!(s.users.is_empty());
        let empty = parse("", "web.yml", dir.path()).unwrap();
        assert!(empty.tls.is_none() && empty.users.is_empty());
    }

    #[test]
    fn settings_rustls_cannot_honour_say_why_and_what_instead() {
        let dir = files();
        let yaml = format!(
            "{TLS}  client_auth_type: RequireAnyClientCert\n  min_version: TLS10\n  max_version: TLS11\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n  curve_preferences: [X25519]\n"
        );
        let text = problems(&yaml, dir.path());
        assert!(
            text.contains("web.yml:4:3: tls_server_config.client_auth_type: RequireAnyClientCert is not supported")
                && text.contains("use RequireAndVerifyClientCert"),
            "{text}"
        );
        assert!(
            text.contains("web.yml:5:3: tls_server_config.min_version: TLS10 is not supported")
                && text.contains("use TLS12"),
            "{text}"
        );
        assert!(
            text.contains("web.yml:6:3: tls_server_config.max_version: TLS11"),
            "{text}"
        );
        assert!(
            text.contains(
                "web.yml:7:18: tls_server_config.cipher_suites: cipher suites cannot be chosen"
            ),
            "{text}"
        );
        assert!(
            text.contains("web.yml:8:22: tls_server_config.curve_preferences"),
            "{text}"
        );
        let text = problems(
            &format!("{TLS}  client_auth_type: RequestClientCert\n"),
            dir.path(),
        );
        assert!(
            text.contains("RequestClientCert is not supported"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let dir = files();
        let text = problems("tls_server_confg:\n  cert_file: a\n", dir.path());
        assert!(
            text.contains("web.yml:1:1: ") && text.contains("did you mean `tls_server_config`?"),
            "{text}"
        );
        let text = problems(
            "tls_server_config:\n  cert_fil: server.pem\n  key_file: server.key\n",
            dir.path(),
        );
        assert!(
            text.contains("web.yml:2:3: tls_server_config.cert_fil: unknown field")
                && text.contains("did you mean `cert_file`?"),
            "{text}"
        );
        let text = problems(
            &format!("{TLS}  client_auth_type: RequireAndVerifyClientCerts\n"),
            dir.path(),
        );
        assert!(
            text.contains("did you mean `RequireAndVerifyClientCert`?"),
            "{text}"
        );
    }

    #[test]
    fn client_ca_and_client_auth_type_go_together() {
        let dir = files();
        let text = problems(
            &format!("{TLS}  client_auth_type: VerifyClientCertIfGiven\n"),
            dir.path(),
        );
        assert!(text.contains("web.yml:4:3: tls_server_config.client_auth_type: verifying client certificates needs client_ca_file"), "{text}");
        let text = problems(&format!("{TLS}  client_ca_file: ca.pem\n"), dir.path());
        assert!(text.contains("tls_server_config.client_ca_file: client_ca_file is set but client_auth_type asks for no client certificate"), "{text}");
        let text = problems("tls_server_config:\n  cert_file: server.pem\n", dir.path());
        assert!(text.contains("missing field `key_file`"), "{text}");
    }

    #[test]
    fn bad_files_are_named_with_their_key() {
        let dir = files();
        let d = dir.path().display();
        let text = problems(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: other.key\n",
            dir.path(),
        );
        assert!(
            text.contains(&format!("web.yml:3:3: tls_server_config.key_file: {d}/other.key is not the key of the certificate in {d}/server.pem")),
            "{text}"
        );
        let text = problems(
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: junk.pem\n",
            dir.path(),
        );
        assert!(
            text.contains(&format!(
                "tls_server_config.cert_file: cannot read {d}/missing.pem"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "tls_server_config.key_file: {d}/junk.pem: no usable private key"
            )),
            "{text}"
        );
        let text = problems(
            &format!(
                "{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: junk.pem\n"
            ),
            dir.path(),
        );
        assert!(text.contains(&format!("web.yml:5:3: tls_server_config.client_ca_file: {d}/junk.pem: no certificate in the file")), "{text}");
    }

    #[test]
    fn a_value_that_is_not_a_bcrypt_hash_is_refused_without_being_quoted() {
        let dir = files();
        let text = problems(
            "basic_auth_users:\n  alice: hunter2\n  'b:c': '$2y$10$abc'\n  carol: 987654\n",
            dir.path(),
        );
        assert!(
            text.contains("web.yml:4:3: basic_auth_users.carol: the value is not a bcrypt hash"),
            "{text}"
        );
        assert!(!text.contains("987654"), "{text}");
        assert!(
            text.contains("web.yml:2:3: basic_auth_users.alice: the value is not a bcrypt hash"),
            "{text}"
        );
        assert!(text.contains("clusterwatch hash-password"), "{text}");
        assert!(
            text.contains("basic_auth_users.b:c: a user name must be non-empty and without `:`"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        let hash = bcrypt::hash("pw", 4).unwrap();
        let s = parse(
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
            "web.yml",
            dir.path(),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains(&hash));
    }

    #[test]
    fn only_security_headers_can_be_set_and_http2_is_not_served() {
        let dir = files();
        let text = problems(
            "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Option: deny\n",
            dir.path(),
        );
        assert!(
            text.contains("web.yml:2:3: http_server_config.http2: HTTP/2 is not served"),
            "{text}"
        );
        assert!(text.contains("web.yml:4:5: http_server_config.headers.X-Frame-Option: header `X-Frame-Option` cannot be set here") && text.contains("did you mean `X-Frame-Options`?"), "{text}");
        let s = parse(
            "http_server_config:\n  headers:\n    x-frame-options: deny\n",
            "web.yml",
            dir.path(),
        )
        .unwrap();
        assert_eq!(s.headers[0].0.as_str(), "x-frame-options");
    }
}
