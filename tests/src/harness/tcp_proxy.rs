//! A TCP proxy on loopback that a test can cut: the network path between one client and one
//! server, made breakable without touching either. Cutting closes the listening socket (new
//! connections are refused) and every connection it relays (both ends see the close);
//! restoring listens on the same port again. It does not delay, drop or reorder bytes: a cut
//! path is gone, a live one is transparent.

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
        let proxy = TcpProxy {
            addr: listener.local_addr()?,
            upstream,
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        Ok(proxy)
    }

    /// Runs the accept loop on `listener`, relaying to the upstream.
    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let relays = Arc::clone(&self.tasks);
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
        let mut tasks = self.tasks.lock().expect("proxy task list");
        tasks.cut = false;
        tasks.running.push(accept);
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

    /// Mends a cut path: listens on the same port again (clients reconnect as after a network
    /// outage). Restoring a live path is harmless.
    pub async fn restore(&self) -> Result<()> {
        if !self.tasks.lock().expect("proxy task list").cut {
            return Ok(());
        }
        // The aborted accept loop drops its socket when the runtime next polls it: retry the
        // bind briefly instead of assuming the port is already free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("could not listen on {} again", self.addr))
                }
            }
        };
        self.serve(listener);
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
