//! SIPp (Debian `sip-tester`) as a SIP peer for the tests: a UAS that answers every OPTIONS
//! with a chosen status, over UDP or TCP on a free loopback port, from a scenario file the
//! harness writes. It answers OPTIONS only; anything else is ignored.

use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::ports::free_port;
use super::process::{find_program, ChildGuard};

/// How long SIPp gets to bind its port.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One running SIPp UAS; dropping it stops the process and removes its directory.
pub struct SippUas {
    guard: ChildGuard,
    port: u16,
    _dir: TempDir,
}

impl SippUas {
    /// Starts a UAS answering OPTIONS with `code reason` on a free port; `tcp` picks the
    /// transport (else UDP). Returns once the port is bound.
    pub async fn start(code: u16, reason: &str, tcp: bool) -> Result<SippUas> {
        SippUas::start_on(free_port()?, code, reason, tcp).await
    }

    /// Like [`start`](Self::start) on a given port (to put a peer back where a probe looks).
    pub async fn start_on(port: u16, code: u16, reason: &str, tcp: bool) -> Result<SippUas> {
        let sipp = find_program("CLUSTERWATCH_SIPP", &["sipp"])?;
        let dir = super::temp_dir("cw-sipp-")?;
        // SIPp's keywords copy the request's Via, From, To, Call-ID and CSeq into the answer.
        let scenario = format!(
            "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n<scenario name=\"options {code}\">\n\
             <recv request=\"OPTIONS\" crlf=\"true\"/>\n<send>\n<![CDATA[\n\n\
             SIP/2.0 {code} {reason}\n[last_Via:]\n[last_From:]\n[last_To:];tag=[pid]SIPpTag01[call_number]\n\
             [last_Call-ID:]\n[last_CSeq:]\nContact: <sip:[local_ip]:[local_port];transport=[transport]>\n\
             Content-Length: 0\n\n]]>\n</send>\n</scenario>\n"
        );
        let path = dir.path().join("uas.xml");
        std::fs::write(&path, scenario)
            .with_context(|| format!("could not write {}", path.display()))?;
        let mut command = Command::new(sipp);
        command
            .arg("-sf")
            .arg(&path)
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", if tcp { "t1" } else { "u1" }])
            .args(["-nostdin", "-trace_err"])
            .current_dir(dir.path());
        let mut guard = ChildGuard::spawn("sipp", command, dir.path())?;
        guard
            .wait_ready(START_TIMEOUT, "sipp to bind its port", async || {
                Ok(bound(port, tcp))
            })
            .await?;
        Ok(SippUas {
            guard,
            port,
            _dir: dir,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIPp's process, to stop it.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

/// Whether something is bound to the port: UDP by failing to bind it ourselves, TCP by
/// connecting.
fn bound(port: u16, tcp: bool) -> bool {
    if tcp {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
    } else {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_err()
    }
}

/// A UDP socket on loopback that receives and never answers: a SIP peer that is silent.
pub fn silent_udp() -> Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("could not bind a silent UDP socket")
}
