//! The SIP OPTIONS probe (RFC 3261 §11): one well-formed OPTIONS request over UDP (retransmitted
//! with T1 doubling until the deadline) or TCP; any 2xx is up, 503 means the peer was put out of
//! service, any other final code is reported. It is a client only and never answers requests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::tcp::split_address;
use super::{connect, resolve, token, Outcome, Reason};
use crate::config::{Located, Problem};

/// RFC 3261 timer T1: the first UDP retransmission interval.
const T1: Duration = Duration::from_millis(500);
/// RFC 3261 timer T2: retransmission intervals for non-INVITE requests stop doubling here.
const T2: Duration = Duration::from_secs(4);
/// Largest SIP message read.
const MAX_MESSAGE: usize = 64 * 1024;

/// The `sip_options:` block of a probe, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSip {
    address: String,
    transport: Option<String>,
    request_uri: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// A checked SIP OPTIONS probe.
pub struct SipProbe {
    host: String,
    port: u16,
    transport: Transport,
    request_uri: Option<String>,
}

impl RawSip {
    /// Checks the block; problems are reported at `at`, the `sip_options:` block.
    pub fn check(self, at: &Located, problems: &mut Vec<Problem>) -> Option<SipProbe> {
        let before = problems.len();
        let address = split_address(&self.address);
        if address.is_none() {
            problems.push(
                at.problem("address", "expected host:port")
                    .hint("e.g. 10.0.161.182:5060"),
            );
        }
        let transport = match self
            .transport
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("udp") => Transport::Udp,
            Some("tcp") => Transport::Tcp,
            Some(_) => {
                problems.push(
                    at.problem("transport", "unknown transport")
                        .hint("use udp or tcp"),
                );
                Transport::Udp
            }
        };
        if let Some(uri) = &self.request_uri {
            if !(uri.starts_with("sip:") || uri.starts_with("sips:"))
                || uri.contains(char::is_whitespace)
            {
                problems.push(
                    at.problem("request_uri", "not a sip: URI")
                        .hint("e.g. sip:ping@10.0.161.182:5060"),
                );
            }
        }
        if problems.len() > before {
            return None;
        }
        let (host, port) = address?;
        Some(SipProbe {
            host,
            port,
            transport,
            request_uri: self.request_uri,
        })
    }
}

/// `ip` as it appears in a SIP header (IPv6 in brackets).
fn host_part(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A final answer to our request.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    code: u16,
}

/// What a received message is to us.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A final response to our request.
    Final(u16),
    /// A provisional (1xx) response to our request: keep waiting.
    Provisional,
    /// Not a response to our request (stray traffic, another Call-ID).
    Other,
    /// Not SIP at all.
    Garbage,
}

/// Reads the status line and checks the Call-ID. Header names are case-insensitive and
/// `i` is Call-ID's compact form (RFC 3261 §7.3.3).
fn parse_response(msg: &[u8], call_id: &str) -> Parsed {
    let text = String::from_utf8_lossy(msg);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    if parts.next() != Some("SIP/2.0") {
        return Parsed::Garbage;
    }
    let Some(code) = parts.next().and_then(|c| c.parse::<u16>().ok()) else {
        return Parsed::Garbage;
    };
    if !(100..700).contains(&code) {
        return Parsed::Garbage;
    }
    let ours = lines.take_while(|l| !l.is_empty()).any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            let name = name.trim();
            (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
                && value.trim() == call_id
        })
    });
    match (ours, code) {
        (false, _) => Parsed::Other,
        (true, 100..=199) => Parsed::Provisional,
        (true, c) => Parsed::Final(c),
    }
}

impl SipProbe {
    fn request(&self, transport: &str, local: SocketAddr, call_id: &str) -> String {
        let peer = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let uri = self
            .request_uri
            .clone()
            .unwrap_or_else(|| format!("sip:{peer}"));
        let me = host_part(local.ip());
        let lower = transport.to_ascii_lowercase();
        let port = local.port();
        format!(
            "OPTIONS {uri} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {me}:{port};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:clusterwatch@{me}>;tag={tag}\r\n\
             To: <{uri}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 OPTIONS\r\n\
             Contact: <sip:clusterwatch@{me}:{port};transport={lower}>\r\n\
             Accept: application/sdp\r\n\
             User-Agent: clusterwatch/{version}\r\n\
             Content-Length: 0\r\n\r\n",
            branch = token(),
            tag = token(),
            version = env!("CARGO_PKG_VERSION"),
        )
    }

    /// Runs the probe once; everything it finds is in the outcome.
    pub async fn run(&self, deadline: Instant) -> Outcome {
        let mut out = Outcome::default();
        let answer = match self.transport {
            Transport::Udp => self.over_udp(deadline, &mut out).await,
            Transport::Tcp => self.over_tcp(deadline, &mut out).await,
        };
        if let Some(Answer { code }) = answer {
            out.status = Some(code);
            out.out_of_service = Some(code == 503);
            if !(200..300).contains(&code) {
                out.fail(Reason::SipStatus, format!("answered {code}"));
            }
        }
        out
    }

    async fn over_udp(&self, deadline: Instant, out: &mut Outcome) -> Option<Answer> {
        let peer = resolve(&self.host, self.port, deadline, out).await?;
        let bind: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let socket = match UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(e) => {
                out.fail(Reason::ConnectFailed, format!("udp bind: {e}"));
                return None;
            }
        };
        // A connected socket learns the local address the peer sees (for Via and Contact) and
        // reports ICMP port unreachable as a refused connection.
        if let Err(e) = socket.connect(peer).await {
            out.fail(Reason::ConnectFailed, format!("udp connect to {peer}: {e}"));
            return None;
        }
        let local = socket.local_addr().ok()?;
        let call_id = format!("{}@{}", token(), host_part(local.ip()));
        let request = self.request("UDP", local, &call_id);
        let started = Instant::now();
        let mut interval = T1;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let answer = 'send: loop {
            if let Err(e) = socket.send(request.as_bytes()).await {
                break 'send Err(e);
            }
            let retransmit = (Instant::now() + interval).min(deadline);
            loop {
                match tokio::time::timeout_at(retransmit, socket.recv(&mut buf)).await {
                    Err(_) if retransmit >= deadline => break 'send Ok(None),
                    Err(_) => break,
                    Ok(Err(e)) => break 'send Err(e),
                    Ok(Ok(n)) => match parse_response(&buf[..n], &call_id) {
                        Parsed::Final(code) => break 'send Ok(Some(code)),
                        Parsed::Provisional | Parsed::Other => {}
                        Parsed::Garbage => {
                            out.fail(
                                Reason::Protocol,
                                "the peer answered something that is not SIP",
                            );
                            return None;
                        }
                    },
                }
            }
            interval = (interval * 2).min(T2);
        };
        out.add_phase("processing", started.elapsed());
        match answer {
            Ok(Some(code)) => Some(Answer { code }),
            Ok(None) => {
                out.fail(Reason::Timeout, "no SIP answer before the deadline");
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                out.fail(Reason::ConnectRefused, format!("{peer}: port unreachable"));
                None
            }
            Err(e) => {
                out.fail(Reason::ConnectFailed, format!("udp to {peer}: {e}"));
                None
            }
        }
    }

    async fn over_tcp(&self, deadline: Instant, out: &mut Outcome) -> Option<Answer> {
        let (mut stream, _) = connect(&self.host, self.port, deadline, out).await?;
        let local = stream.local_addr().ok()?;
        let call_id = format!("{}@{}", token(), host_part(local.ip()));
        let request = self.request("TCP", local, &call_id);
        let started = Instant::now();
        let exchange = tokio::time::timeout_at(deadline, async {
            stream.write_all(request.as_bytes()).await?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                // Messages on a stream are framed by the blank line and Content-Length.
                while let Some(end) = message_end(&buf) {
                    let parsed = parse_response(&buf[..end], &call_id);
                    buf.drain(..end);
                    match parsed {
                        Parsed::Final(code) => return Ok(Ok(code)),
                        Parsed::Garbage => return Ok(Err(())),
                        Parsed::Provisional | Parsed::Other => {}
                    }
                }
                if buf.len() > MAX_MESSAGE {
                    return Ok(Err(()));
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        out.add_phase("processing", started.elapsed());
        match exchange {
            Ok(Ok(Ok(code))) => return Some(Answer { code }),
            Ok(Ok(Err(()))) => out.fail(
                Reason::Protocol,
                "the peer answered something that is not SIP",
            ),
            Ok(Err(e)) => out.fail(Reason::Protocol, format!("sip over tcp: {e}")),
            Err(_) => out.fail(Reason::Timeout, "no SIP answer before the deadline"),
        }
        None
    }
}

/// Where the first complete message in `buf` ends (headers, blank line, Content-Length body).
fn message_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let length: usize = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| {
            n.trim().eq_ignore_ascii_case("content-length") || n.trim().eq_ignore_ascii_case("l")
        })
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_final_provisional_and_foreign_answers() {
        let ok = b"SIP/2.0 200 OK\r\nVia: x\r\ni: abc@1.2.3.4\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(ok, "abc@1.2.3.4"), Parsed::Final(200));
        assert_eq!(parse_response(ok, "other"), Parsed::Other);
        let trying = b"SIP/2.0 100 Trying\r\nCall-ID: abc\r\n\r\n";
        assert_eq!(parse_response(trying, "abc"), Parsed::Provisional);
        let oos = b"SIP/2.0 503 Service Unavailable\r\ncall-id: abc\r\n\r\n";
        assert_eq!(parse_response(oos, "abc"), Parsed::Final(503));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n", "abc"),
            Parsed::Garbage
        );
    }

    #[test]
    fn request_is_well_formed() {
        let p = SipProbe {
            host: "10.0.0.1".into(),
            port: 5060,
            transport: Transport::Udp,
            request_uri: None,
        };
        let r = p.request("UDP", "127.0.0.1:40000".parse().unwrap(), "cid@127.0.0.1");
        assert!(
            r.starts_with("OPTIONS sip:10.0.0.1:5060 SIP/2.0\r\n"),
            "{r}"
        );
        assert!(
            r.contains("\r\nVia: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bK"),
            "{r}"
        );
        for h in [
            "Max-Forwards: 70",
            "CSeq: 1 OPTIONS",
            "Call-ID: cid@127.0.0.1",
            "Content-Length: 0",
            "To: <sip:10.0.0.1:5060>",
        ] {
            assert!(r.contains(&format!("\r\n{h}\r\n")), "{h} missing in {r}");
        }
        assert!(r.contains("From: <sip:clusterwatch@127.0.0.1>;tag="), "{r}");
        assert!(r.ends_with("\r\n\r\n"));
        let v6 = p.request("TCP", "[::1]:5061".parse().unwrap(), "c");
        assert!(v6.contains("Via: SIP/2.0/TCP [::1]:5061;"), "{v6}");
    }

    #[test]
    fn stream_framing_uses_content_length() {
        let two = b"SIP/2.0 100 Trying\r\nContent-Length: 3\r\n\r\nabcSIP/2.0 200 OK\r\n\r\n";
        assert_eq!(message_end(two), Some(44));
        assert_eq!(message_end(b"SIP/2.0 200 OK\r\nl: 5\r\n\r\nab"), None);
    }
}
