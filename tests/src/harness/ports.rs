//! Free loopback TCP ports for the servers the harness starts.
//! It only promises that one test process never hands out the same port twice; it cannot
//! reserve a port against other processes between handing it out and the server binding it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// Every port handed out so far in this process. Ports are never returned to the pool: a
/// stopped server may be restarted on its old port, and that port must still be its own.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(Default::default)
}

/// Returns a loopback TCP port that was free a moment ago and that no earlier call in this
/// process returned.
///
/// The kernel picks the port (bind to `127.0.0.1:0`); Linux gives `bind(0)` odd ports and
/// outgoing connections even ones, so a client's source port rarely steals it before the
/// server binds.
pub fn free_port() -> Result<u16> {
    // A few hundred tries is far more than enough: a repeat needs the kernel to hand back a
    // port we already gave out and that its server has since released.
    for _ in 0..500 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("could not bind 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("could not read the address of a bound listener")?
            .port();
        drop(listener);
        let mut ports = handed_out()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ports.insert(port) {
            return Ok(port);
        }
    }
    bail!("found no free loopback port that this process had not handed out already")
}

/// Like [`free_port`], as a `127.0.0.1:PORT` socket address.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}
