//! A TCP proxy on loopback that a test can cut: the network path between one client and one
//! server, made breakable without touching either. Cutting closes the listening socket (new
//! connections are refused) and every connection it relays (both ends see the close).
//! It does not delay, drop or reorder bytes: a cut path is gone, a live one is transparent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy from [`addr`](Self::addr) to an upstream address. Dropping it cuts it.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Tasks>>,
}

/// The accept loop and every relay it started; aborting a task drops its sockets.
#[derive(Debug, Default)]
struct Tasks {
    cut: bool,
    running: Vec<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and relays every connection to `upstream`. Must be
    /// called inside a tokio runtime, which runs the relays.
    pub async fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("could not bind the proxy's listening socket")?;
        let addr = listener.local_addr()?;
        let tasks: Arc<Mutex<Tasks>> = Arc::default();
        let relays = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    // An upstream that refuses, or either side closing, ends this relay;
                    // the client then sees its connection closed, as over a real path.
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                // A connection accepted while the proxy was being cut is cut too.
                let mut state = relays.lock().expect("proxy task list");
                if state.cut {
                    relay.abort();
                } else {
                    state.running.push(relay);
                }
            }
        });
        tasks.lock().expect("proxy task list").running.push(accept);
        Ok(TcpProxy {
            addr,
            upstream,
            tasks,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where it relays to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Cuts the path: the port stops accepting (connections are refused) and every relayed
    /// connection is closed. Cutting twice is harmless.
    pub fn cut(&self) {
        let mut tasks = self.tasks.lock().expect("proxy task list");
        tasks.cut = true;
        for task in tasks.running.drain(..) {
            task.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
