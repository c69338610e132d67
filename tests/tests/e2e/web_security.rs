//! Secured endpoints as an operator and an intruder meet them: TLS on `/metrics`, mutual TLS,
//! bcrypt basic auth (with the webhook keeping its own credentials on the main listener), the
//! webhook's own TLS listener fed by a real Alertmanager, and a broken web configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::harness::certs::{Ca, Leaf};
use clusterwatch_tests::harness::clusterwatch::{binary, START_TIMEOUT};
use clusterwatch_tests::harness::process::run;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{
    free_port, temp_dir, wait_until, Alertmanager, ChildGuard, Clusterwatch, Prometheus,
    PrometheusConfig,
};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The server certificate and key every test's web configuration names (relative paths: they
/// are resolved against the web configuration's own directory).
const TLS_BLOCK: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";

/// A directory with a CA, the server's pair signed by it, and the web configuration.
struct Site {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Site {
    fn new(web_yaml: &str) -> Result<Site> {
        let dir = temp_dir("cw-web-")?;
        let ca = Ca::create(dir.path())?;
        ca.leaf(dir.path(), "server", 86_400)?;
        std::fs::write(dir.path().join("web.yml"), web_yaml)?;
        Ok(Site { dir, ca })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// A client for loopback that trusts only `ca` and presents `identity` if given.
fn https_client(ca: &Path, identity: Option<&Leaf>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    if let Some(leaf) = identity {
        let mut pem = std::fs::read(&leaf.cert)?;
        pem.extend(std::fs::read(&leaf.key)?);
        builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// `clusterwatch --web.config.file WEB ARGS…` on a free port, ready once `ready` answers 200
/// for `GET {base}/-/ready` (`base` is `https://127.0.0.1:PORT` or `http://…`).
struct Secured {
    guard: ChildGuard,
    port: u16,
    _logs: tempfile::TempDir,
}

impl Secured {
    async fn start(
        web: &Path,
        scheme: &str,
        args: &[&str],
        ready: &reqwest::Client,
        auth: Option<(&str, &str)>,
    ) -> Result<Secured> {
        let logs = temp_dir("cw-web-logs-")?;
        let port = free_port()?;
        let mut command = Command::new(binary()?);
        command
            .arg("--web.config.file")
            .arg(web)
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(["--log.level", "debug"])
            .args(args);
        let mut guard = ChildGuard::spawn("clusterwatch", command, logs.path())?;
        let url = format!("{scheme}://127.0.0.1:{port}/-/ready");
        guard
            .wait_ready(START_TIMEOUT, "clusterwatch /-/ready", async || {
                let mut request = ready.get(&url);
                if let Some((user, password)) = auth {
                    request = request.basic_auth(user, Some(password));
                }
                Ok(request.send().await?.status() == StatusCode::OK)
            })
            .await?;
        Ok(Secured {
            guard,
            port,
            _logs: logs,
        })
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }
}

/// Whether a request failed outright or was answered with anything but success.
async fn refused(request: reqwest::RequestBuilder) -> bool {
    match request.send().await {
        Err(_) => true,
        Ok(response) => !response.status().is_success(),
    }
}

#[tokio::test]
async fn tls_serves_real_metrics_over_https_and_plain_http_gets_nothing() -> Result<()> {
    let site = Site::new(&format!(
        "{TLS_BLOCK}  min_version: TLS12\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    ))?;
    let client = https_client(site.ca.cert_path(), None)?;
    let cw = Secured::start(&site.path("web.yml"), "https", &[], &client, None).await?;

    let response = client.get(cw.url("https", "/metrics")).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let body = response.text().await?;
    assert!(body.contains("clusterwatch_target_up{"), "{body}");

    let plain = clusterwatch_tests::harness::http::client()?;
    assert!(
        refused(plain.get(cw.url("http", "/metrics"))).await,
        "plain HTTP must not reach /metrics on a TLS listener"
    );
    // A client that does not trust the test CA refuses the server's certificate.
    let public_roots = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .build()?;
    assert!(public_roots
        .get(cw.url("https", "/metrics"))
        .send()
        .await
        .is_err());

    // A client that connects and never says anything is dropped after the handshake timeout,
    // and does not stand in the way of others meanwhile.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", cw.port)).await?;
    let response = client.get(cw.url("https", "/-/healthy")).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(40), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection must be closed by the server: {closed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn mutual_tls_accepts_only_client_certificates_from_the_configured_ca() -> Result<()> {
    let site = Site::new(&format!(
        "{TLS_BLOCK}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients/ca.pem\n"
    ))?;
    let clients_dir = site.path("clients");
    std::fs::create_dir(&clients_dir)?;
    let clients_ca = Ca::create(&clients_dir)?;
    let prometheus = clients_ca.client(&clients_dir, "prometheus", "prometheus")?;
    let foreign_dir = temp_dir("cw-web-foreign-")?;
    let foreign =
        Ca::create(foreign_dir.path())?.client(foreign_dir.path(), "intruder", "prometheus")?;

    let good = https_client(site.ca.cert_path(), Some(&prometheus))?;
    let cw = Secured::start(&site.path("web.yml"), "https", &[], &good, None).await?;

    let anonymous = https_client(site.ca.cert_path(), None)?;
    assert!(
        anonymous
            .get(cw.url("https", "/metrics"))
            .send()
            .await
            .is_err(),
        "no client certificate must be refused"
    );
    let intruder = https_client(site.ca.cert_path(), Some(&foreign))?;
    assert!(
        intruder
            .get(cw.url("https", "/metrics"))
            .send()
            .await
            .is_err(),
        "a certificate from another CA must be refused"
    );
    let response = good.get(cw.url("https", "/metrics")).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await?.contains("clusterwatch_target_up{"));
    Ok(())
}

#[tokio::test]
async fn prometheus_scrapes_over_mutual_tls_with_basic_auth() -> Result<()> {
    const PASSWORD: &str = "scrape-pw-41";
    let hash = hash_password(PASSWORD).await?;
    let site = Site::new(&format!(
        "{TLS_BLOCK}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n\
         basic_auth_users:\n  prometheus: '{hash}'\n"
    ))?;
    let identity = site
        .ca
        .client(site.dir.path(), "prometheus", "prometheus")?;
    std::fs::write(site.path("password"), PASSWORD)?;
    let client = https_client(site.ca.cert_path(), Some(&identity))?;
    let cw = Secured::start(
        &site.path("web.yml"),
        "https",
        &[],
        &client,
        Some(("prometheus", PASSWORD)),
    )
    .await?;

    // The job is written by hand: the harness' jobs are plain HTTP.
    let prometheus = Prometheus::start(&PrometheusConfig::default()).await?;
    let mut config: serde_json::Value =
        serde_json::from_str(&PrometheusConfig::default().render())?;
    config["scrape_configs"] = json!([{
        "job_name": "cw-secured",
        "scheme": "https",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{ "targets": [format!("127.0.0.1:{}", cw.port)] }],
        "tls_config": {
            "ca_file": site.ca.cert_path(),
            "cert_file": identity.cert,
            "key_file": identity.key,
        },
        "basic_auth": { "username": "prometheus", "password_file": site.path("password") },
    }]);
    std::fs::write(prometheus.config_path(), config.to_string())?;
    prometheus.reload().await?;
    prometheus.wait_for_target_up("cw-secured", WAIT).await?;
    wait_until(WAIT, "clusterwatch series in Prometheus", async || {
        Ok(prometheus
            .query_f64("count(clusterwatch_target_up{job=\"cw-secured\"})")
            .await?
            .is_some_and(|n| n >= 1.0))
    })
    .await?;
    assert!(!cw.guard.logs().contains(PASSWORD));
    Ok(())
}

/// `clusterwatch hash-password` with `password` on stdin.
async fn hash_password(password: &str) -> Result<String> {
    let mut child = tokio::process::Command::new(binary()?)
        .args(["hash-password", "--cost", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(format!("{password}\n").as_bytes()).await?;
    drop(stdin);
    let output = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .context("hash-password did not finish")??;
    if !output.status.success() {
        bail!(
            "hash-password failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let hash = String::from_utf8(output.stdout)?.trim().to_owned();
    if !hash.starts_with("$2") {
        bail!("hash-password printed {hash:?}");
    }
    Ok(hash)
}

#[tokio::test]
async fn basic_auth_needs_the_right_password_and_leaves_the_webhook_to_its_own_token() -> Result<()>
{
    const PASSWORD: &str = "correct horse battery 7";
    let hash = hash_password(PASSWORD).await?;
    let site = Site::new(&format!("basic_auth_users:\n  prometheus: '{hash}'\n"))?;
    std::fs::write(site.path("token"), format!("{TOKEN}\n"))?;
    std::fs::write(
        site.path("clusterwatch.yml"),
        "hooks:\n  listen: main\n  bearer_token_file: token\n  state_dir: state\n  rules:\n    - name: noop\n      match: { alertname: NeverSent }\n      command: [/bin/true]\n",
    )?;
    let client = clusterwatch_tests::harness::http::client()?;
    let config = site.path("clusterwatch.yml");
    let cw = Secured::start(
        &site.path("web.yml"),
        "http",
        &["--config.file", &config.display().to_string()],
        &client,
        Some(("prometheus", PASSWORD)),
    )
    .await?;
    let metrics = cw.url("http", "/metrics");

    let anonymous = client.get(&metrics).send().await?;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        anonymous.headers()["www-authenticate"],
        "Basic realm=\"clusterwatch\""
    );
    let status = |r: reqwest::RequestBuilder| async move {
        Ok::<_, anyhow::Error>(r.send().await?.status())
    };
    assert_eq!(
        status(
            client
                .get(&metrics)
                .basic_auth("prometheus", Some("correct horse battery 8"))
        )
        .await?,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(client.get(&metrics).basic_auth("grafana", Some(PASSWORD))).await?,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(client.get(cw.url("http", "/-/healthy"))).await?,
        StatusCode::UNAUTHORIZED
    );
    let good = client
        .get(&metrics)
        .basic_auth("prometheus", Some(PASSWORD))
        .send()
        .await?;
    assert_eq!(good.status(), StatusCode::OK);
    assert!(good.text().await?.contains("clusterwatch_target_up{"));
    // A second scrape is answered from the cache of passed checks, with the same result.
    assert_eq!(
        status(
            client
                .get(&metrics)
                .basic_auth("prometheus", Some(PASSWORD))
        )
        .await?,
        StatusCode::OK
    );

    // The webhook on the main listener takes Alertmanager's one Authorization header: its
    // own token, not the web configuration's users.
    let body = notification(
        "firing",
        "{}:{}",
        vec![alert(
            "firing",
            json!({"alertname": "Other"}),
            "f1",
            "2026-01-01T00:00:00Z",
        )],
    )
    .to_string();
    let webhook = cw.url("http", "/hooks/alertmanager");
    let post = |auth: Option<String>| {
        let mut r = client
            .post(&webhook)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r
    };
    assert_eq!(
        status(post(Some(format!("Bearer {TOKEN}")))).await?,
        StatusCode::OK
    );
    assert_eq!(status(post(None)).await?, StatusCode::UNAUTHORIZED);

    let logs = cw.guard.logs();
    assert!(
        logs.contains("basic auth refused"),
        "debug logs should show refusals:\n{logs}"
    );
    assert!(
        !logs.contains(PASSWORD) && !logs.contains("battery"),
        "{logs}"
    );
    assert!(!logs.contains(&hash), "{logs}");
    Ok(())
}

#[tokio::test]
async fn alertmanager_delivers_over_tls_to_the_webhooks_own_listener_and_the_hook_runs(
) -> Result<()> {
    let site = Site::new(TLS_BLOCK)?;
    let lab = HookLab::new()?;
    let promote = lab.recorder("promote", "exit 0")?;
    let rules = format!(
        "    - name: promote\n      match: {{ alertname: TestNoPrimary }}\n      command: [{}]\n",
        promote.display()
    );
    let settings = format!("  web_config_file: {}\n", site.path("web.yml").display());
    let cw = Clusterwatch::start(Some(&lab.config(&settings, &rules)), &[]).await?;

    let webhook = format!("https://127.0.0.1:{}/hooks/alertmanager", lab.port);
    // Plain HTTP to the webhook's port gets nowhere.
    assert!(lab.post(b"{}".to_vec()).await.is_err());
    let am_config = format!(
        "route:\n  receiver: hooks\n  group_by: [alertname]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: hooks\n    webhook_configs:\n      - url: {webhook}\n\
         \x20       http_config:\n          authorization:\n            type: Bearer\n            credentials_file: {dir}/token\n\
         \x20         tls_config:\n            ca_file: {ca}\n",
        dir = lab.dir().display(),
        ca = site.ca.cert_path().display(),
    );
    let am = Alertmanager::start(Some(&am_config)).await?;
    am.post_alerts(&json!([{ "labels": { "alertname": "TestNoPrimary", "cluster": "db" }, "startsAt": "2026-01-01T00:00:00Z" }]))
        .await?;
    wait_until(
        WAIT,
        "the hook to run after a delivery over TLS",
        async || Ok(lab.invocations("promote").len() == 1),
    )
    .await
    .with_context(|| {
        format!(
            "clusterwatch logs:\n{}\nAlertmanager logs:\n{}",
            cw.logs(),
            am.logs()
        )
    })?;
    assert!(lab.invocations("promote")[0].contains("firing"));
    Ok(())
}

#[tokio::test]
async fn a_broken_web_configuration_stops_startup_and_fails_check_config() -> Result<()> {
    let site = Site::new(&format!("{TLS_BLOCK}  min_version: TLS11\n"))?;
    let web = site.path("web.yml");
    let expected = format!(
        "{}:4:3: tls_server_config.min_version: TLS11 is not supported",
        web.display()
    );
    let mut serve = Command::new(binary()?);
    serve.arg("--web.config.file").arg(&web).args([
        "--web.listen-address",
        &format!("127.0.0.1:{}", free_port()?),
    ]);
    let err = format!(
        "{:#}",
        run(serve, CLI_TIMEOUT)
            .await
            .expect_err("serve must refuse to start")
    );
    assert!(err.contains(&expected), "{err}");

    std::fs::write(site.path("clusterwatch.yml"), "")?;
    let check = |web: &Path| {
        let mut c = Command::new(binary().expect("the binary was found above"));
        c.arg("check-config")
            .arg(site.path("clusterwatch.yml"))
            .arg("--web.config.file")
            .arg(web);
        c
    };
    let err = format!(
        "{:#}",
        run(check(&web), CLI_TIMEOUT)
            .await
            .expect_err("check-config must fail")
    );
    assert!(
        err.contains(&expected) && err.contains("use TLS12"),
        "{err}"
    );

    std::fs::write(&web, TLS_BLOCK)?;
    let out = run(check(&web), CLI_TIMEOUT).await?;
    assert!(out.contains(": ok ("), "{out}");

    // The examples shipped in the repository pass together.
    let root = clusterwatch_tests::harness::repo_root();
    let mut examples = Command::new(binary()?);
    examples
        .arg("check-config")
        .arg(root.join("examples/clusterwatch.yml"))
        .arg("--web.config.file")
        .arg(root.join("examples/web.yml"));
    run(examples, CLI_TIMEOUT).await?;
    Ok(())
}

#[tokio::test]
async fn a_reload_rotates_the_password_and_keeps_the_old_one_when_the_new_file_is_broken(
) -> Result<()> {
    const OLD: &str = "old password 1";
    const NEW: &str = "new password 2";
    let site = Site::new(&format!(
        "basic_auth_users:\n  prometheus: '{}'\n",
        hash_password(OLD).await?
    ))?;
    let client = clusterwatch_tests::harness::http::client()?;
    let cw = Secured::start(
        &site.path("web.yml"),
        "http",
        &[],
        &client,
        Some(("prometheus", OLD)),
    )
    .await?;
    let metrics = cw.url("http", "/metrics");
    let status = |password: &'static str| {
        let request = client
            .get(&metrics)
            .basic_auth("prometheus", Some(password));
        async move { Ok::<_, anyhow::Error>(request.send().await?.status()) }
    };

    // A rotated password, put in force by SIGHUP: the old one stops working.
    std::fs::write(
        site.path("web.yml"),
        format!(
            "basic_auth_users:\n  prometheus: '{}'\n",
            hash_password(NEW).await?
        ),
    )?;
    cw.guard.signal(nix::sys::signal::Signal::SIGHUP)?;
    wait_until(WAIT, "the new password accepted", async || {
        Ok(status(NEW).await? == StatusCode::OK)
    })
    .await?;
    assert_eq!(status(OLD).await?, StatusCode::UNAUTHORIZED);

    // A broken web configuration: the reload is refused and names it; the new password stays.
    std::fs::write(
        site.path("web.yml"),
        "basic_auth_users:\n  prometheus: plain-text\n",
    )?;
    let refused = client
        .post(cw.url("http", "/-/reload"))
        .basic_auth("prometheus", Some(NEW))
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = refused.text().await?;
    assert!(body.contains("web.yml:2:"), "{body}");
    assert!(
        !body.contains("plain-text"),
        "the value is not quoted: {body}"
    );
    assert_eq!(status(NEW).await?, StatusCode::OK);
    let exposition = client
        .get(&metrics)
        .basic_auth("prometheus", Some(NEW))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        exposition.contains("clusterwatch_config_last_reload_successful 0"),
        "{exposition}"
    );
    Ok(())
}
