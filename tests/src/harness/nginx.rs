//! nginx for the tests: one `nginx` child in the foreground (`master_process off`, `-p` prefix
//! in a temporary directory) serving fixed locations over HTTP and over HTTPS with test
//! certificates, each on its own free loopback port. It serves only what the probes need.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::ports::free_port;
use super::process::{find_program, ChildGuard};

/// How long nginx gets to answer on its HTTP port.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Body of `/` (and of `/old`'s target), for body checks.
pub const HOME_BODY: &str = "clusterwatch test page: all good";

/// One running nginx; dropping it stops the process and removes its directory.
pub struct Nginx {
    guard: ChildGuard,
    http_port: u16,
    tls_ports: Vec<u16>,
    _dir: TempDir,
}

impl Nginx {
    /// Starts nginx with a plain HTTP server and one HTTPS server per `(cert, key)` pair.
    /// Every server answers `/` with 200 and [`HOME_BODY`], `/down` with 503 and `/old` with
    /// a 301 to `/`.
    pub async fn start(tls: &[(&Path, &Path)]) -> Result<Nginx> {
        Nginx::start_with_client_ca(tls, None).await
    }

    /// Like [`start`](Self::start); with `client_ca`, every HTTPS server requires a client
    /// certificate signed by it (nginx answers 400 without one).
    pub async fn start_with_client_ca(
        tls: &[(&Path, &Path)],
        client_ca: Option<&Path>,
    ) -> Result<Nginx> {
        let nginx = find_program("CLUSTERWATCH_NGINX", &["nginx", "/usr/sbin/nginx"])?;
        let dir = super::temp_dir("cw-nginx-")?;
        let http_port = free_port()?;
        let tls_ports: Vec<u16> = tls.iter().map(|_| free_port()).collect::<Result<_>>()?;
        let locations = format!(
            "location = / {{ default_type text/plain; return 200 \"{HOME_BODY}\"; }}\n\
             location = /down {{ default_type text/plain; return 503 \"maintenance\"; }}\n\
             location = /old {{ return 301 /; }}\n"
        );
        let mut servers = format!("server {{ listen 127.0.0.1:{http_port}; {locations} }}\n");
        let client_auth = client_ca
            .map(|ca| {
                format!(
                    "ssl_client_certificate {}; ssl_verify_client on;",
                    ca.display()
                )
            })
            .unwrap_or_default();
        for ((cert, key), port) in tls.iter().zip(&tls_ports) {
            servers.push_str(&format!(
                "server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {}; {client_auth} {locations} }}\n",
                cert.display(),
                key.display()
            ));
        }
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             keepalive_requests 100000;\n{servers}}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("could not write {}", conf_path.display()))?;
        let mut command = Command::new(nginx);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let mut guard = ChildGuard::spawn("nginx", command, dir.path())?;
        let url = format!("http://127.0.0.1:{http_port}/");
        let client = super::http::client()?;
        guard
            .wait_ready(START_TIMEOUT, "nginx to answer", async || {
                Ok(client.get(&url).send().await?.status().is_success())
            })
            .await
            .with_context(|| super::process::read_lossy(&dir.path().join("error.log")))?;
        Ok(Nginx {
            guard,
            http_port,
            tls_ports,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT` of the plain server (no trailing slash).
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The plain HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `https://localhost:PORT` of the `i`th HTTPS server, in the order given to `start`.
    pub fn https_base(&self, i: usize) -> String {
        format!("https://localhost:{}", self.tls_ports[i])
    }

    /// nginx's own process, to stop or pause it.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
