//! Reachability probes (HTTP(S), TCP, SIP OPTIONS): what one probe run found, the fixed set of
//! failure reasons, and the resolve → connect → TLS steps the kinds share. Probes never
//! return errors: every failure is an [`Outcome`] with a [`Reason`], reported as metrics.

pub mod http;
pub mod sip;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use tls::TlsSetup;

/// Why a probe failed: a bounded set, exported as a state-set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The name did not resolve (or resolving did not finish in time).
    Dns,
    /// Nothing listens there (TCP RST, or ICMP port unreachable for SIP over UDP).
    ConnectRefused,
    /// The TCP connection was not established before the deadline.
    ConnectTimeout,
    /// Connecting failed otherwise (unreachable network or host).
    ConnectFailed,
    /// The TLS handshake failed: untrusted, expired or mismatched certificate, protocol.
    Tls,
    /// Connected, but the answer did not come before the deadline.
    Timeout,
    /// An HTTP status outside `expect_status`.
    HttpStatus,
    /// The HTTP body did not match `expect_body`.
    BodyMismatch,
    /// A TCP answer did not match `expect`.
    ExpectMismatch,
    /// A SIP answer other than 2xx (503: the peer is out of service).
    SipStatus,
    /// The peer answered something that is not the protocol spoken.
    Protocol,
}

/// Every reason label value, in a fixed order, so the state-set is always complete.
pub const REASONS: &[&str] = &[
    "dns",
    "connect_refused",
    "connect_timeout",
    "connect_failed",
    "tls",
    "timeout",
    "http_status",
    "body_mismatch",
    "expect_mismatch",
    "sip_status",
    "protocol",
];

impl Reason {
    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Dns => "dns",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::ConnectFailed => "connect_failed",
            Reason::Tls => "tls",
            Reason::Timeout => "timeout",
            Reason::HttpStatus => "http_status",
            Reason::BodyMismatch => "body_mismatch",
            Reason::ExpectMismatch => "expect_mismatch",
            Reason::SipStatus => "sip_status",
            Reason::Protocol => "protocol",
        }
    }
}

/// What one run of a probe found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// `None` when the probe succeeded.
    pub failure: Option<Reason>,
    /// The last HTTP or SIP status code received.
    pub status: Option<u16>,
    /// Earliest `notAfter` (unix seconds) in the certificate chain the server presented.
    pub cert_expiry: Option<f64>,
    /// Time spent per phase (`resolve`, `connect`, `tls`, `processing`, `transfer`), summed
    /// over redirects.
    pub phases: Vec<(&'static str, Duration)>,
    /// SIP only: whether the peer said 503 Service Unavailable.
    pub out_of_service: Option<bool>,
    /// A short description of the failure for the debug log (never contains secrets).
    pub detail: String,
}

impl Outcome {
    /// Marks the outcome failed with `reason`, keeping the first failure's reason.
    pub fn fail(&mut self, reason: Reason, detail: impl Into<String>) {
        if self.failure.is_none() {
            self.failure = Some(reason);
            self.detail = detail.into();
        }
    }

    /// Adds `d` to phase `name`.
    pub fn add_phase(&mut self, name: &'static str, d: Duration) {
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += d,
            None => self.phases.push((name, d)),
        }
    }
}

/// A byte stream to a peer, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Resolves `host` and connects to its addresses in the resolver's order until one accepts
/// (`localhost` may come back as `::1` first while the server listens on 127.0.0.1 only);
/// records `resolve` and `connect`.
pub async fn connect(
    host: &str,
    port: u16,
    deadline: Instant,
    out: &mut Outcome,
) -> Option<(TcpStream, SocketAddr)> {
    let addrs = resolve_all(host, port, deadline, out).await?;
    let started = Instant::now();
    let mut last = (Reason::ConnectFailed, String::new());
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => {
                last = (
                    Reason::ConnectTimeout,
                    format!("connect to {addr} timed out"),
                );
                break;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = (Reason::ConnectRefused, format!("connect to {addr}: {e}"));
            }
            Ok(Err(e)) => last = (Reason::ConnectFailed, format!("connect to {addr}: {e}")),
            Ok(Ok(s)) => {
                out.add_phase("connect", started.elapsed());
                let _ = s.set_nodelay(true);
                return Some((s, addr));
            }
        }
    }
    out.add_phase("connect", started.elapsed());
    out.fail(last.0, last.1);
    None
}

/// Resolves `host:port` to the first address the resolver returns; records `resolve`.
pub async fn resolve(
    host: &str,
    port: u16,
    deadline: Instant,
    out: &mut Outcome,
) -> Option<SocketAddr> {
    resolve_all(host, port, deadline, out)
        .await?
        .into_iter()
        .next()
}

async fn resolve_all(
    host: &str,
    port: u16,
    deadline: Instant,
    out: &mut Outcome,
) -> Option<Vec<SocketAddr>> {
    let started = Instant::now();
    // A bracketed IPv6 literal from a URL resolves without its brackets.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let looked_up = tokio::time::timeout_at(deadline, tokio::net::lookup_host((bare, port))).await;
    out.add_phase("resolve", started.elapsed());
    match looked_up {
        Err(_) => out.fail(Reason::Dns, format!("resolving {bare} timed out")),
        Ok(Err(e)) => out.fail(Reason::Dns, format!("resolving {bare}: {e}")),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if !addrs.is_empty() {
                return Some(addrs);
            }
            out.fail(Reason::Dns, format!("{bare} has no address"));
        }
    }
    None
}

/// Connects, then (with `tls`) runs a TLS handshake naming `host`; records every phase and the
/// certificate expiry. `None` means the outcome already says why.
pub async fn dial(
    host: &str,
    port: u16,
    tls: Option<&TlsSetup>,
    deadline: Instant,
    out: &mut Outcome,
) -> Option<Box<dyn Stream>> {
    let (tcp, _) = connect(host, port, deadline, out).await?;
    let Some(setup) = tls else {
        return Some(Box::new(tcp));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(name) = rustls::pki_types::ServerName::try_from(bare.to_owned()) else {
        out.fail(
            Reason::Tls,
            format!("{bare} is not a valid TLS server name"),
        );
        return None;
    };
    let (config, expiry) = match setup.connection_config() {
        Ok(c) => c,
        Err(e) => {
            out.fail(Reason::Tls, format!("tls configuration: {e}"));
            return None;
        }
    };
    let started = Instant::now();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let result = tokio::time::timeout_at(deadline, handshake).await;
    out.add_phase("tls", started.elapsed());
    out.cert_expiry = expiry.get();
    match result {
        Err(_) => out.fail(Reason::Timeout, "tls handshake timed out"),
        Ok(Err(e)) => out.fail(Reason::Tls, format!("tls handshake: {e}")),
        Ok(Ok(stream)) => return Some(Box::new(stream)),
    }
    None
}

/// A random-enough token for SIP branch, tag and Call-ID values: std's hasher keys are
/// random per process and per call, which is all these need (uniqueness, not secrecy).
pub fn token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(crate::clock::unix_now().as_nanos());
    format!("{:016x}", h.finish())
}
