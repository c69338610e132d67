//! A TCP "black hole" on loopback: it accepts every connection and never reads or answers,
//! so a client sees a connected socket that hangs. It proves a hung target costs the
//! exporter only that target's deadline. It does not simulate refused connections.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// The listener and its accept thread; dropping it closes every accepted connection.
///
/// A std thread rather than a tokio task: it must keep accepting even when a test blocks its
/// runtime thread, and it outlives no runtime.
pub struct Blackhole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Blackhole {
    /// Binds `127.0.0.1:0` and starts accepting.
    pub fn start() -> Result<Blackhole> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("could not bind the black hole listener")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("blackhole-{}", addr.port()))
            .spawn({
                let accepted = Arc::clone(&accepted);
                let stopping = Arc::clone(&stopping);
                move || swallow(listener, &accepted, &stopping)
            })
            .context("could not start the black hole thread")?;
        Ok(Blackhole {
            addr,
            accepted,
            stopping,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it has accepted (and is holding open) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Accepts until told to stop, holding every connection open and never reading from it.
fn swallow(listener: TcpListener, accepted: &AtomicUsize, stopping: &AtomicBool) {
    let mut held: Vec<TcpStream> = Vec::new();
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(stream) => {
                held.push(stream);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => {
                eprintln!("harness: black hole accept failed: {err}");
                break;
            }
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // The thread is blocked in accept(); one more connection wakes it up to see the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Blackhole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blackhole")
            .field("addr", &self.addr)
            .field("accepted", &self.accepted())
            .finish()
    }
}
