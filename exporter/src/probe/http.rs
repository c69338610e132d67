//! The HTTP(S) probe: one request per scrape on a fresh connection (so `duration` always
//! includes resolve, connect and TLS, as an operator's `curl` would), with redirects followed
//! or not, the status checked against codes or classes and the body against a regex.

use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, HOST, LOCATION, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use regex::Regex;
use serde::Deserialize;
use tokio::time::Instant;
use url::{Position, Url};

use super::tls::{RawTls, TlsSetup};
use super::{dial, Outcome, Reason};
use crate::config::{compile_regex, Located, Problem, SectionContext};

/// Redirects followed at most, like browsers and curl's default of a few dozen, but smaller:
/// a health endpoint that redirects more than this is broken.
const MAX_REDIRECTS: usize = 10;

/// Bytes of body read at most; the regex sees only these.
const MAX_BODY: usize = 1 << 20;

/// The `http:` block of a probe, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    url: String,
    method: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    expect_status: Option<Vec<StatusSpec>>,
    expect_body: Option<String>,
    follow_redirects: Option<bool>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StatusSpec {
    Code(u16),
    Text(String),
}

/// An accepted status: one code, or a class (`2xx` is 200..=299).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMatch {
    /// Exactly this code.
    Code(u16),
    /// Any code of this hundred (2 for `2xx`).
    Class(u16),
}

impl StatusMatch {
    fn matches(self, code: u16) -> bool {
        match self {
            StatusMatch::Code(c) => c == code,
            StatusMatch::Class(c) => code / 100 == c,
        }
    }
}

/// A checked HTTP probe.
pub struct HttpProbe {
    method: Method,
    url: Url,
    headers: Vec<(HeaderName, HeaderValue)>,
    expect_status: Vec<StatusMatch>,
    expect_body: Option<Regex>,
    follow_redirects: bool,
    tls: Arc<TlsSetup>,
}

impl RawHttp {
    /// Checks the block; problems are reported at `at`, the `http:` block.
    pub fn check(
        self,
        at: &Located,
        ctx: &SectionContext,
        problems: &mut Vec<Problem>,
    ) -> Option<HttpProbe> {
        let before = problems.len();
        let url = match Url::parse(&self.url) {
            // Refused rather than dropped: the probe would get 401 with no hint why. Never
            // echoed: the URL with them is a secret.
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                problems.push(
                    at.problem("url", "credentials in the URL (user:password@) are not supported")
                        .hint("remove them from the URL and send them as a header, e.g. `headers: { Authorization: 'Basic <base64 of user:password>' }`"),
                );
                None
            }
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                problems.push(
                    at.problem("url", "not an http:// or https:// URL with a host")
                        .hint("e.g. http://10.172.20.10:90/ or https://app.example.org/health"),
                );
                None
            }
        };
        let method = match self.method.as_deref() {
            None => Method::GET,
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| problems.push(at.problem("method", "not an HTTP method")))
                .unwrap_or(Method::GET),
        };
        let mut headers = Vec::new();
        for (k, v) in self.headers {
            match (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                (Ok(k), Ok(v)) => headers.push((k, v)),
                _ => problems.push(at.problem(
                    "headers",
                    format!("header `{k}` is not a valid HTTP header name and value"),
                )),
            }
        }
        let mut expect_status = Vec::new();
        for spec in self
            .expect_status
            .unwrap_or_else(|| vec![StatusSpec::Text("2xx".into())])
        {
            match parse_status(&spec) {
                Some(m) => expect_status.push(m),
                None => problems.push(
                    at.problem("expect_status", "not a status code or class")
                        .hint("write codes like 200 or classes like \"2xx\""),
                ),
            }
        }
        let expect_body = self
            .expect_body
            .as_deref()
            .and_then(|p| compile_regex(p, at, "expect_body", problems));
        let tls = self
            .tls
            .unwrap_or_default()
            .check(at, "tls", ctx, &[b"http/1.1"], problems);
        if problems.len() > before {
            return None;
        }
        Some(HttpProbe {
            method,
            url: url?,
            headers,
            expect_status,
            expect_body,
            follow_redirects: self.follow_redirects.unwrap_or(true),
            tls: Arc::new(tls?),
        })
    }
}

fn parse_status(spec: &StatusSpec) -> Option<StatusMatch> {
    match spec {
        StatusSpec::Code(c) if (100..600).contains(c) => Some(StatusMatch::Code(*c)),
        StatusSpec::Code(_) => None,
        StatusSpec::Text(t) => {
            let t = t.trim().to_ascii_lowercase();
            if let Some(class) = t.strip_suffix("xx") {
                let c: u16 = class.parse().ok()?;
                (1..=5).contains(&c).then_some(StatusMatch::Class(c))
            } else {
                let c: u16 = t.parse().ok()?;
                (100..600).contains(&c).then_some(StatusMatch::Code(c))
            }
        }
    }
}

/// Aborts the connection task when the probe is done with it, also on a timeout.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HttpProbe {
    /// Runs the probe once; everything it finds is in the outcome.
    pub async fn run(&self, deadline: Instant) -> Outcome {
        let mut out = Outcome::default();
        let mut url = self.url.clone();
        let mut method = self.method.clone();
        for hop in 0..=MAX_REDIRECTS {
            match self.fetch(&url, &method, deadline, &mut out).await {
                Some(Some(next)) if hop < MAX_REDIRECTS => {
                    // 303 always, and 301/302 after a POST in practice, continue with GET.
                    if out.status == Some(303)
                        || (method == Method::POST && matches!(out.status, Some(301 | 302)))
                    {
                        method = Method::GET;
                    }
                    url = next;
                }
                Some(Some(_)) => {
                    out.fail(
                        Reason::Protocol,
                        format!("more than {MAX_REDIRECTS} redirects"),
                    );
                    break;
                }
                _ => break,
            }
        }
        out
    }

    /// One request on a new connection. `Some(Some(url))`: follow a redirect to `url`;
    /// `Some(None)`: done (the outcome says whether it passed); `None`: failed.
    async fn fetch(
        &self,
        url: &Url,
        method: &Method,
        deadline: Instant,
        out: &mut Outcome,
    ) -> Option<Option<Url>> {
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let https = url.scheme() == "https";
        let stream = dial(host, port, https.then_some(&*self.tls), deadline, out).await?;
        let handshake =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream));
        let (mut sender, conn) = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                out.fail(Reason::Protocol, format!("http handshake: {e}"));
                return None;
            }
            Err(_) => {
                out.fail(Reason::Timeout, "http handshake timed out");
                return None;
            }
        };
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));

        let mut request = Request::builder()
            .method(method.clone())
            .uri(&url[Position::BeforePath..Position::AfterQuery])
            .body(Empty::<Bytes>::new())
            .ok()?;
        let h = request.headers_mut();
        if let Ok(v) = HeaderValue::try_from(&url[Position::BeforeHost..Position::AfterPort]) {
            h.insert(HOST, v);
        }
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("clusterwatch/", env!("CARGO_PKG_VERSION"))),
        );
        for (k, v) in &self.headers {
            h.insert(k.clone(), v.clone());
        }

        let started = Instant::now();
        let response = tokio::time::timeout_at(deadline, sender.send_request(request)).await;
        out.add_phase("processing", started.elapsed());
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                out.fail(Reason::Protocol, format!("http request: {e}"));
                return None;
            }
            Err(_) => {
                out.fail(Reason::Timeout, "no http response before the deadline");
                return None;
            }
        };
        let code = response.status().as_u16();
        out.status = Some(code);
        if self.follow_redirects && response.status().is_redirection() {
            if let Some(next) = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            {
                return Some(Some(next));
            }
        }

        let started = Instant::now();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        let read = tokio::time::timeout_at(deadline, async {
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    let room = MAX_BODY.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                    if bytes.len() >= MAX_BODY {
                        break;
                    }
                }
            }
            Ok::<_, hyper::Error>(())
        })
        .await;
        out.add_phase("transfer", started.elapsed());
        match read {
            Err(_) => out.fail(
                Reason::Timeout,
                "http body not complete before the deadline",
            ),
            Ok(Err(e)) => out.fail(Reason::Protocol, format!("http body: {e}")),
            Ok(Ok(())) => {}
        }
        if !self.expect_status.iter().any(|m| m.matches(code)) {
            out.fail(Reason::HttpStatus, format!("status {code} not expected"));
        } else if let Some(re) = &self.expect_body {
            if !re.is_match(&String::from_utf8_lossy(&bytes)) {
                out.fail(Reason::BodyMismatch, "body does not match expect_body");
            }
        }
        Some(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_and_classes() {
        let m = |s: &str| parse_status(&StatusSpec::Text(s.into()));
        assert_eq!(m("2xx"), Some(StatusMatch::Class(2)));
        assert_eq!(m("3XX"), Some(StatusMatch::Class(3)));
        assert_eq!(m("404"), Some(StatusMatch::Code(404)));
        assert_eq!(m("7xx"), None);
        assert_eq!(m("ok"), None);
        assert_eq!(parse_status(&StatusSpec::Code(999)), None);
        assert!(StatusMatch::Class(2).matches(204));
        assert!(!StatusMatch::Class(2).matches(301));
    }
}
