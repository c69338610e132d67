//! Secured listeners: the [`Security`] handle holding a listener's current web settings
//! (swapped whole at run time), and [`serve`], which applies them: TLS per connection, basic
//! auth and headers per request. Without settings a listener is plain axum HTTP, unchanged.

pub mod auth;
pub mod config;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use config::{ClientAuth, Settings};

use crate::config::ConfigError;

/// A client gets this long for its TLS handshake and, after it, for each request's headers;
/// one that connects and says nothing is dropped then.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The web settings a listener serves with. The accept loop reads the current TLS
/// configuration for each new connection and the auth layer the current users for each
/// request, so [`Security::replace`] takes effect without a restart.
pub struct Security {
    current: RwLock<Arc<Settings>>,
    cache: auth::Cache,
}

impl Security {
    /// Reads and checks a web configuration file; nothing changes until [`Security::replace`].
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        config::load(path)
    }

    /// A handle serving `settings`.
    pub fn new(settings: Settings) -> Arc<Security> {
        Arc::new(Security {
            current: RwLock::new(Arc::new(settings)),
            cache: auth::Cache::new(),
        })
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<Settings> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves `settings` from now on: new connections get the new TLS configuration, every
    /// request the new users. Remembered password checks are forgotten.
    pub fn replace(&self, settings: Settings) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        self.cache.clear();
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open requests finish.
/// With `security`, connections are TLS when its settings say so and requests pass its
/// basic auth; without, this is `axum::serve`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    security: Option<Arc<Security>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(security) = security else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
    };
    {
        let s = security.current();
        tracing::info!(
            web_config = %s.origin,
            tls = s.tls.is_some(),
            client_auth = ?s.client_auth,
            basic_auth_users = s.users.len(),
            "web configuration in force"
        );
    }
    let router = router.layer(axum::middleware::from_fn_with_state(
        security.clone(),
        auth::layer,
    ));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let tls = security.current().tls.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let result = match tls {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Some(config) => {
                    let handshake = TlsAcceptor::from(config).accept(stream);
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// `clusterwatch hash-password`: one line from stdin (without its newline) → a bcrypt hash on
/// stdout, for `basic_auth_users`. The password is never echoed.
pub fn hash_password(cost: u32) -> std::process::ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("clusterwatch: cannot read the password from stdin: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("clusterwatch: empty password; type it and press Enter, or pipe it in");
        return std::process::ExitCode::FAILURE;
    }
    match bcrypt::hash(password, cost) {
        Ok(hash) => {
            println!("{hash}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("clusterwatch: cannot hash: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    fn users(user: &str, password: &str) -> Settings {
        let hash = bcrypt::hash(password, 4).unwrap();
        config::parse(
            &format!("basic_auth_users:\n  {user}: '{hash}'\n"),
            "w.yml",
            Path::new("."),
        )
        .unwrap()
    }

    async fn status(url: &str, auth: (&str, &str)) -> u16 {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(url)
            .basic_auth(auth.0, Some(auth.1))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn replaced_settings_apply_to_the_next_request_and_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let security = Security::new(users("alice", "one"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = Router::new().route("/", get(|| async { "ok" }));
        let server = tokio::spawn(serve(
            listener,
            router,
            Some(security.clone()),
            async move {
                let _ = stopped.await;
            },
        ));
        assert_eq!(status(&url, ("alice", "one")).await, 200);
        assert_eq!(status(&url, ("alice", "two")).await, 401);

        security.replace(users("bob", "two"));
        assert_eq!(status(&url, ("alice", "one")).await, 401);
        assert_eq!(status(&url, ("bob", "two")).await, 200);

        // With TLS swapped in, a new plain-HTTP connection no longer gets an answer.
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
        let tls = config::parse(
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n",
            "w.yml",
            dir.path(),
        )
        .unwrap();
        security.replace(tls);
        let plain = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        assert!(plain.get(&url).send().await.is_err());

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
