//! The listeners: [`serve`] runs one (connections, timeouts and stop in `listener`), and the
//! [`Security`] handle holds its current web settings (swapped whole at run time): TLS per
//! connection, basic auth and headers per request. Without settings a listener is plain HTTP
//! with the same limits.

pub mod auth;
pub mod config;
pub mod descriptors;
pub mod listener;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::Router;
use tokio::net::TcpListener;

pub use config::{ClientAuth, Settings};
pub use listener::{Connections, SHUTDOWN_GRACE};

use crate::config::ConfigError;

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

/// Serves `router` on `listener` until `shutdown` resolves, within the limits of
/// `connections`; then lets open requests finish for at most [`SHUTDOWN_GRACE`]. With
/// `security`, connections are TLS when its settings say so and requests pass its basic auth.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    security: Option<Arc<Security>>,
    connections: Arc<Connections>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Some(security) = security else {
        return listener::run(listener, router, connections, || None, shutdown).await;
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
    let tls = move || security.current().tls.clone();
    listener::run(listener, router, connections, tls, shutdown).await;
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
            Connections::new("main", 8),
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
        server.await.unwrap();
    }
}
