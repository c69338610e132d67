//! The TCP probe: connect (optionally TLS), optionally send a line and wait for an answer
//! matching a regex (`PING` → `+PONG` for Redis). It speaks no protocol beyond that.

use regex::Regex;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::tls::{RawTls, TlsSetup};
use super::{dial, Outcome, Reason};
use crate::config::{compile_regex, Located, Problem, SectionContext};

/// Bytes of answer read at most while waiting for `expect` to match.
const MAX_ANSWER: usize = 64 * 1024;

/// The `tcp:` block of a probe, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcp {
    address: String,
    send: Option<String>,
    expect: Option<String>,
    tls: Option<RawTls>,
}

/// A checked TCP probe.
pub struct TcpProbe {
    host: String,
    port: u16,
    send: Option<Vec<u8>>,
    expect: Option<Regex>,
    tls: Option<TlsSetup>,
}

/// Splits `host:port` or `[v6]:port`; `None` if there is no numeric port.
pub fn split_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

impl RawTcp {
    /// Checks the block; problems are reported at `at`, the `tcp:` block.
    pub fn check(
        self,
        at: &Located,
        ctx: &SectionContext,
        problems: &mut Vec<Problem>,
    ) -> Option<TcpProbe> {
        let before = problems.len();
        let address = split_address(&self.address);
        if address.is_none() {
            problems.push(
                at.problem("address", "expected host:port")
                    .hint("e.g. 127.0.0.1:6379, redis1:9001 or [::1]:8001"),
            );
        }
        let expect = self
            .expect
            .as_deref()
            .and_then(|p| compile_regex(p, at, "expect", problems));
        let tls = self
            .tls
            .and_then(|t| t.check(at, "tls", ctx, &[], problems));
        if problems.len() > before {
            return None;
        }
        let (host, port) = address?;
        Some(TcpProbe {
            host,
            port,
            send: self.send.map(String::into_bytes),
            expect,
            tls,
        })
    }
}

impl TcpProbe {
    /// Runs the probe once; everything it finds is in the outcome.
    pub async fn run(&self, deadline: Instant) -> Outcome {
        let mut out = Outcome::default();
        let Some(mut stream) =
            dial(&self.host, self.port, self.tls.as_ref(), deadline, &mut out).await
        else {
            return out;
        };
        let started = Instant::now();
        let exchange = tokio::time::timeout_at(deadline, async {
            if let Some(data) = &self.send {
                stream.write_all(data).await?;
                stream.flush().await?;
            }
            let Some(re) = &self.expect else {
                return Ok::<_, std::io::Error>(None);
            };
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if re.is_match(&String::from_utf8_lossy(&answer)) {
                    return Ok(Some(true));
                }
                if answer.len() >= MAX_ANSWER {
                    return Ok(Some(false));
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(Some(false));
                }
                answer.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        out.add_phase("processing", started.elapsed());
        match exchange {
            Err(_) => out.fail(Reason::Timeout, "no matching answer before the deadline"),
            Ok(Err(e)) => out.fail(Reason::Protocol, format!("exchange failed: {e}")),
            Ok(Ok(Some(false))) => out.fail(Reason::ExpectMismatch, "answer does not match expect"),
            Ok(Ok(_)) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(split_address("redis1:9001"), Some(("redis1".into(), 9001)));
        assert_eq!(split_address("[::1]:5060"), Some(("::1".into(), 5060)));
        assert_eq!(split_address("redis1"), None);
        assert_eq!(split_address(":80"), None);
        assert_eq!(split_address("h:0"), None);
    }
}
