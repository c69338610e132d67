//! One listener's connections, plain or TLS alike: the cap on open connections (the oldest
//! idle one is shed for a newcomer; refused when every one is busy), the header, idle, body,
//! write and handshake timeouts, and the stop that cuts what is left after a short grace.
//! What a request may do (TLS settings, basic auth, routes) is decided elsewhere.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::snapshot::SampleBuffer;

/// A client gets this long for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request head must arrive whole within this long. hyper starts the same clock when a
/// kept-alive connection goes idle, so it is also the idle (keep-alive) timeout.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body must arrive whole within this long after its head; else the connection
/// is closed without an answer (a client that sees no answer retries; a 4xx would not).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A write to the client may wait this long for room in the socket; a client that stops
/// reading its answer is dropped then.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// After a stop, requests in progress get this long to finish; then every connection left
/// is closed, whatever its client is doing.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the listener closed a connection itself, the `reason` label of
/// `clusterwatch_web_connections_closed_total`. Index = the value in [`Conn::reason`].
pub const CLOSE_REASONS: &[&str] = &[
    "refused",
    "shed",
    "handshake_timeout",
    "header_timeout",
    "idle_timeout",
    "body_timeout",
    "write_timeout",
    "shutdown",
];

#[derive(Clone, Copy)]
enum Reason {
    Refused = 0,
    Shed,
    HandshakeTimeout,
    HeaderTimeout,
    IdleTimeout,
    BodyTimeout,
    WriteTimeout,
    Shutdown,
}

/// No reason recorded (yet): the client closed, or the connection ended normally.
const NO_REASON: u8 = u8::MAX;

/// One listener's open connections, its cap and its counters.
pub struct Connections {
    listener: &'static str,
    max: usize,
    /// Open connections, oldest first.
    open: Mutex<Vec<Arc<Conn>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    closed: [AtomicU64; CLOSE_REASONS.len()],
}

/// What the listener knows of one open connection.
struct Conn {
    id: u64,
    /// Requests being answered now; a connection at 0 is idle and may be shed.
    busy: AtomicUsize,
    /// Bytes read since the connection last went idle: tells a slow head from an idle wait.
    read_since_idle: AtomicU64,
    /// The first [`Reason`] the listener had to close it, or [`NO_REASON`].
    reason: AtomicU8,
    /// Woken to close the connection at once (shed, body timeout).
    cut: Notify,
}

impl Conn {
    /// Records why the connection is closed; the first reason stays.
    fn note(&self, reason: Reason) {
        let _ = self.reason.compare_exchange(
            NO_REASON,
            reason as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Closes the connection from outside its task.
    fn cut(&self, reason: Reason) {
        self.note(reason);
        self.cut.notify_one();
    }
}

impl Connections {
    /// A listener named `listener` (the metrics label) holding at most `max` connections.
    pub fn new(listener: &'static str, max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            listener,
            max: max.max(1),
            open: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            closed: Default::default(),
        })
    }

    /// The cap on open connections.
    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, reason: Reason) {
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Makes room for a new connection: at the cap the oldest idle one is shed; when every
    /// one is busy the newcomer is refused (`None`).
    fn admit(self: &Arc<Self>) -> Option<Registered> {
        let mut open = self.lock();
        if open.len() >= self.max {
            let idle = open
                .iter()
                .position(|c| c.busy.load(Ordering::Relaxed) == 0)?;
            open.remove(idle).cut(Reason::Shed);
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            read_since_idle: AtomicU64::new(0),
            reason: AtomicU8::new(NO_REASON),
            cut: Notify::new(),
        });
        open.push(conn.clone());
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Registered {
            conn,
            connections: self.clone(),
        })
    }

    /// At a stop: closes every connection without a request in progress (idle, or still
    /// sending a head) at once; the others get the grace.
    fn close_idle(&self) {
        for c in self.lock().iter() {
            if c.busy.load(Ordering::Relaxed) == 0 {
                c.cut.notify_one();
            }
        }
    }

    /// Marks every connection still open as cut by the stop, before their tasks are dropped.
    fn cut_all(&self) {
        for c in self.lock().iter() {
            c.note(Reason::Shutdown);
        }
    }

    /// Writes the `clusterwatch_web_connections_*` families for this listener.
    pub fn write_metrics(&self, out: &mut SampleBuffer) {
        let labels = [("listener", self.listener)];
        out.gauge(
            "clusterwatch_web_connections_open",
            "Connections open on the listener now.",
            &labels,
            self.lock().len() as f64,
        );
        out.gauge(
            "clusterwatch_web_connections_max",
            "Connections the listener keeps open at most (sized from the descriptor limit at start).",
            &labels,
            self.max as f64,
        );
        out.counter(
            "clusterwatch_web_connections_accepted_total",
            "Connections the listener took in (not counting refused ones).",
            &labels,
            self.accepted.load(Ordering::Relaxed) as f64,
        );
        for (i, reason) in CLOSE_REASONS.iter().enumerate() {
            out.counter(
                "clusterwatch_web_connections_closed_total",
                "Connections the listener closed itself (refused at the cap, shed when idle, a timeout, the stop), by reason.",
                &[("listener", self.listener), ("reason", reason)],
                self.closed[i].load(Ordering::Relaxed) as f64,
            );
        }
    }
}

/// A connection's place in its listener: dropping it (the task ended or was aborted)
/// takes the connection off the list and counts why the listener closed it, if it did.
struct Registered {
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let id = self.conn.id;
        self.connections.lock().retain(|c| c.id != id);
        let reason = self.conn.reason.load(Ordering::Relaxed);
        if let Some(counter) = self.connections.closed.get(reason as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Serves `router` on accepted TCP connections until `shutdown` resolves; then accepts no
/// more, lets requests in progress finish for [`SHUTDOWN_GRACE`] and closes the rest. `tls`
/// is asked per connection (a reload may change it); `None` serves plain HTTP.
pub async fn run(
    listener: tokio::net::TcpListener,
    router: Router,
    connections: Arc<Connections>,
    tls: impl Fn() -> Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop, stopping) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(listener = connections.listener, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let Some(registered) = connections.admit() else {
            connections.count(Reason::Refused);
            tracing::debug!(listener = connections.listener, %peer, "connection refused: every connection is busy");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tasks.spawn(connection(
            stream,
            tls(),
            service,
            registered,
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    connections.close_idle();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            listener = connections.listener,
            connections = tasks.len(),
            "closing the connections still open after the shutdown grace"
        );
        connections.cut_all();
        tasks.shutdown().await;
    }
}

type Service = TowerToHyperService<Router>;

/// One connection from accept to close: TLS handshake if configured, then HTTP/1.1, both
/// cut short when the listener sheds it or a body times out.
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    service: Service,
    registered: Registered,
    stopping: watch::Receiver<bool>,
) {
    let conn = registered.conn.clone();
    let io = Timed {
        inner: stream,
        conn: conn.clone(),
        stall: None,
    };
    let serve = async {
        match tls {
            None => http(io, service, &conn, stopping).await,
            Some(config) => {
                let handshake = TlsAcceptor::from(config).accept(io);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => {
                        // The handshake's bytes are not part of a request head.
                        conn.read_since_idle.store(0, Ordering::Relaxed);
                        http(stream, service, &conn, stopping).await
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => conn.note(Reason::HandshakeTimeout),
                }
            }
        }
    };
    tokio::select! {
        () = serve => {}
        () = conn.cut.notified() => {}
    }
    drop(registered);
}

/// HTTP/1.1 on one stream, plain or TLS: the same timeouts and the same stop for both.
async fn http<S>(io: S, service: Service, conn: &Arc<Conn>, mut stopping: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            conn.busy.fetch_add(1, Ordering::Relaxed);
            let busy = Busy(conn.clone());
            let request = request.map(|body| Deadline {
                inner: body,
                deadline: Instant::now() + BODY_TIMEOUT,
                sleep: None,
                conn: conn.clone(),
            });
            let response = hyper::service::Service::call(&service, request);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Body::new(Held { body, _busy: busy })),
                )
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
            // Ends keep-alive: the request in progress is answered, then the connection closes.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            conn.note(if conn.read_since_idle.load(Ordering::Relaxed) == 0 {
                Reason::IdleTimeout
            } else {
                Reason::HeaderTimeout
            });
        }
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Held by a request from its head until its answer is written: the connection is busy.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.read_since_idle.store(0, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection marked busy until it is sent or dropped.
struct Held {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Held {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that must be read whole by its deadline; past it, the connection is cut.
struct Deadline {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    conn: Arc<Conn>,
}

impl hyper::body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            // Pending for good: the connection's task drops the request with the connection.
            self.conn.cut(Reason::BodyTimeout);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP stream under TLS and HTTP: counts bytes read (a slow head or an idle wait?) and
/// fails a write that finds no room for [`WRITE_TIMEOUT`].
struct Timed {
    inner: TcpStream,
    conn: Arc<Conn>,
    stall: Option<Pin<Box<Sleep>>>,
}

impl Timed {
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall = None;
            return polled;
        }
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if stall.as_mut().poll(cx).is_ready() {
            self.conn.note(Reason::WriteTimeout);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its answer",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.conn
                .read_since_idle
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    struct Server {
        addr: std::net::SocketAddr,
        connections: Arc<Connections>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn server(max: usize) -> Server {
        serve_with(max, None).await
    }

    async fn serve_with(max: usize, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/hang", get(std::future::pending::<&'static str>))
            .route("/big", get(|| async { vec![b'x'; 64 << 20] }))
            .route(
                "/body",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            );
        let connections = Connections::new("main", max);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            listener,
            router,
            connections.clone(),
            move || tls.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            connections,
            stop,
            task,
        }
    }

    fn closed(c: &Connections, reason: Reason) -> u64 {
        c.closed[reason as usize].load(Ordering::Relaxed)
    }

    /// Reads until the server closes the connection; what it sent.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn get_root(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut s).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_head_and_an_idle_connection_are_closed_by_their_timeouts() {
        let srv = server(8).await;
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        let mut slow = TcpStream::connect(srv.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        assert_eq!(until_closed(&mut slow).await, "");
        assert_eq!(until_closed(&mut idle).await, "");
        assert!(started.elapsed() <= HEADER_TIMEOUT + Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert_eq!(closed(&srv.connections, Reason::HeaderTimeout), 1);
        assert_eq!(closed(&srv.connections, Reason::IdleTimeout), 1);
        assert!(get_root(srv.addr).await.ends_with("ok"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_body_is_cut_without_an_answer() {
        let srv = server(8).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123")
            .await
            .unwrap();
        let started = Instant::now();
        assert_eq!(until_closed(&mut s).await, "");
        assert!(started.elapsed() >= BODY_TIMEOUT);
        assert!(started.elapsed() <= BODY_TIMEOUT + Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert_eq!(closed(&srv.connections, Reason::BodyTimeout), 1);
        // A whole body is answered.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(
            b"POST /body HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 4\r\n\r\nabcd",
        )
        .await
        .unwrap();
        assert!(until_closed(&mut s).await.ends_with("\r\n\r\n4"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_is_dropped() {
        let srv = server(8).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(srv.connections.lock().len(), 1);
        let started = Instant::now();
        while srv.connections.lock().len() == 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(started.elapsed() < WRITE_TIMEOUT * 2);
        }
        assert!(started.elapsed() >= WRITE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(closed(&srv.connections, Reason::WriteTimeout), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_client_that_never_finishes_its_handshake_is_dropped() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let srv = serve_with(8, Some(Arc::new(config))).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let started = Instant::now();
        assert_eq!(until_closed(&mut s).await, "");
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert_eq!(closed(&srv.connections, Reason::HandshakeTimeout), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let srv = server(2).await;
        let mut busy = TcpStream::connect(srv.addr).await.unwrap();
        busy.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        // Let the server take both in before the newcomer.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(get_root(srv.addr).await.ends_with("ok"));
        assert_eq!(until_closed(&mut idle).await, "");
        assert_eq!(closed(&srv.connections, Reason::Shed), 1);
        // Now every connection is busy: a newcomer is refused at once.
        let mut busy2 = TcpStream::connect(srv.addr).await.unwrap();
        busy2
            .write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(get_root(srv.addr).await, "");
        assert_eq!(closed(&srv.connections, Reason::Refused), 1);
        assert_eq!(srv.connections.lock().len(), 2);
        drop((busy, busy2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_within_the_grace_whatever_the_clients_do() {
        let srv = server(8).await;
        let mut hanging = TcpStream::connect(srv.addr).await.unwrap();
        hanging
            .write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut half = TcpStream::connect(srv.addr).await.unwrap();
        half.write_all(b"POST /body HTTP/1.1\r\ncontent-length: 9\r\n\r\n1")
            .await
            .unwrap();
        let mut head = TcpStream::connect(srv.addr).await.unwrap();
        head.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = Instant::now();
        srv.stop.send(()).unwrap();
        // Without a request in progress, a connection is closed at once.
        assert_eq!(until_closed(&mut head).await, "");
        assert!(started.elapsed() < Duration::from_secs(1));
        srv.task.await.unwrap();
        assert!(started.elapsed() <= SHUTDOWN_GRACE + Duration::from_millis(100));
        assert_eq!(until_closed(&mut hanging).await, "");
        assert_eq!(until_closed(&mut half).await, "");
        assert_eq!(closed(&srv.connections, Reason::Shutdown), 2);
        assert!(TcpStream::connect(srv.addr).await.is_err());
    }
}
