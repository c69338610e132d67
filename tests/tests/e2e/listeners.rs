//! The listeners and the service stop as an operator meets them: SIGTERM while clients hold
//! half-sent requests (plain and TLS), an idle-connection flood under 128 descriptors, a hook
//! running at SIGTERM, and the systemd units' stop and descriptor settings.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::certs::Ca;
use clusterwatch_tests::harness::clusterwatch::{binary, START_TIMEOUT};
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{free_port, temp_dir, wait_until, ChildGuard};
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hook no test notification matches: the section needs one.
const NO_HOOK: &str =
    "    - { name: never, match: { alertname: NeverSent }, command: [/bin/true] }\n";

const WAIT: Duration = Duration::from_secs(30);

/// What the brief allows between SIGTERM and the process gone, with clients misbehaving.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// clusterwatch with a hooks section (its own webhook listener) on a free main port.
struct Service {
    guard: ChildGuard,
    port: u16,
    _logs: tempfile::TempDir,
}

impl Service {
    /// Starts it with `args`, under a descriptor limit of `nofile` (soft and hard) if given,
    /// and waits for `/-/ready` through `ready`.
    async fn start(
        config: &str,
        args: &[&str],
        nofile: Option<u64>,
        scheme: &str,
        ready: &reqwest::Client,
    ) -> Result<Service> {
        let logs = temp_dir("cw-listeners-")?;
        let config_path = logs.path().join("clusterwatch.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let mut command = Command::new(binary()?);
        command
            .arg("--config.file")
            .arg(&config_path)
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(["--log.level", "debug"])
            .args(args);
        if let Some(n) = nofile {
            // SAFETY: only setrlimit between fork and exec, no allocation.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut guard = ChildGuard::spawn("clusterwatch", command, logs.path())?;
        let url = format!("{scheme}://127.0.0.1:{port}/-/ready");
        guard
            .wait_ready(START_TIMEOUT, "clusterwatch /-/ready", async || {
                Ok(ready.get(&url).send().await?.status() == reqwest::StatusCode::OK)
            })
            .await?;
        Ok(Service {
            guard,
            port,
            _logs: logs,
        })
    }

    /// Sends SIGTERM and returns how long the process took to exit; fails if it did not
    /// within `bound` or exited unsuccessfully.
    async fn terminate(&mut self, bound: Duration) -> Result<Duration> {
        let started = Instant::now();
        self.guard.signal(Signal::SIGTERM)?;
        loop {
            if let Some(status) = self.guard.exit_status()? {
                ensure!(
                    status.success(),
                    "clusterwatch exited with {status}:\n{}",
                    self.guard.log_tail(30)
                );
                return Ok(started.elapsed());
            }
            if started.elapsed() > bound {
                bail!(
                    "clusterwatch still runs {bound:?} after SIGTERM:\n{}",
                    self.guard.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A notification no hook matches: stored and answered 200, nothing runs.
fn unmatched() -> String {
    notification(
        "firing",
        "g",
        vec![alert(
            "firing",
            json!({"alertname": "NothingMatches"}),
            "f0",
            "2026-01-01T00:00:00Z",
        )],
    )
    .to_string()
}

/// A metric's value in an exposition, if present.
fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A request head cut short on the metrics listener, and a webhook request whose body
/// stops after its first byte; both held open on `S` streams.
async fn half_sent<S: AsyncRead + AsyncWrite + Unpin>(
    metrics: &mut S,
    webhook: &mut S,
) -> Result<()> {
    metrics
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n")
        .await?;
    metrics.flush().await?;
    webhook
        .write_all(
            format!(
                "POST /hooks/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await?;
    webhook.flush().await?;
    Ok(())
}

/// Waits until the server has taken in the held connections: each listener accepts in turn,
/// so once a request on a later connection is answered, the earlier one is being served.
async fn wait_held(client: &reqwest::Client, base: &str, webhook: &str) -> Result<()> {
    let healthy = client.get(format!("{base}/-/healthy")).send().await?;
    ensure!(
        healthy.status() == reqwest::StatusCode::OK,
        "{}",
        healthy.status()
    );
    let posted = client
        .post(webhook)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(unmatched())
        .send()
        .await?;
    ensure!(
        posted.status() == reqwest::StatusCode::OK,
        "{}",
        posted.status()
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_the_process_within_10s_while_clients_hold_half_sent_requests() -> Result<()> {
    let lab = HookLab::new()?;
    // A new connection per request, so `wait_held` comes after the held ones.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let config = lab.config("", NO_HOOK);
    let mut cw = Service::start(&config, &[], None, "http", &client).await?;
    let mut metrics = TcpStream::connect(("127.0.0.1", cw.port)).await?;
    let mut webhook = TcpStream::connect(("127.0.0.1", lab.port)).await?;
    half_sent(&mut metrics, &mut webhook).await?;
    wait_held(
        &client,
        &format!("http://127.0.0.1:{}", cw.port),
        &lab.url(),
    )
    .await?;
    let took = cw.terminate(STOP_BOUND).await?;
    println!("plain listeners: exit {took:?} after SIGTERM");
    drop((metrics, webhook));
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_the_process_within_10s_with_half_sent_requests_over_tls() -> Result<()> {
    let lab = HookLab::new()?;
    let ca = Ca::create(lab.dir())?;
    ca.leaf(lab.dir(), "server", 86_400)?;
    let web = lab.dir().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n",
    )?;
    let settings = format!("  web_config_file: {}\n", web.display());
    let config = lab.config(&settings, NO_HOOK);
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            ca.cert_path(),
        )?)?)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let web_arg = web.to_string_lossy().into_owned();
    let mut cw = Service::start(
        &config,
        &["--web.config.file", &web_arg],
        None,
        "https",
        &client,
    )
    .await?;
    let connector = tls_connector(ca.cert_path())?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut metrics = connector
        .connect(
            name.clone(),
            TcpStream::connect(("127.0.0.1", cw.port)).await?,
        )
        .await
        .context("TLS handshake with the main listener")?;
    let mut webhook = connector
        .connect(name, TcpStream::connect(("127.0.0.1", lab.port)).await?)
        .await
        .context("TLS handshake with the webhook listener")?;
    half_sent(&mut metrics, &mut webhook).await?;
    let webhook = format!("https://127.0.0.1:{}/hooks/alertmanager", lab.port);
    wait_held(&client, &format!("https://127.0.0.1:{}", cw.port), &webhook).await?;
    let took = cw.terminate(STOP_BOUND).await?;
    println!("TLS listeners: exit {took:?} after SIGTERM");
    drop((metrics, webhook));
    Ok(())
}

fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[tokio::test]
async fn three_hundred_idle_connections_under_128_descriptors_leave_metrics_and_the_webhook_answering(
) -> Result<()> {
    const IDLE: usize = 300;
    let lab = HookLab::new()?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()?;
    let config = lab.config("", NO_HOOK);
    let mut cw = Service::start(&config, &[], Some(128), "http", &client).await?;
    let pid = cw.guard.pid().context("clusterwatch runs")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    ensure!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("128")),
        "the descriptor limit did not apply:\n{limits}"
    );

    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        held.push(TcpStream::connect(("127.0.0.1", cw.port)).await?);
    }
    let flooded = Instant::now();
    let metrics_url = format!("http://127.0.0.1:{}/metrics", cw.port);
    let mut exposition = String::new();
    wait_until(
        Duration::from_secs(15),
        "/metrics on a fresh connection",
        async || {
            let response = client.get(&metrics_url).send().await?;
            ensure!(
                response.status() == reqwest::StatusCode::OK,
                "{}",
                response.status()
            );
            exposition = response.text().await?;
            Ok(true)
        },
    )
    .await?;
    let metrics_after = flooded.elapsed();
    let body = unmatched();
    wait_until(Duration::from_secs(15), "the webhook", async || {
        let response = client
            .post(lab.url())
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        ensure!(
            response.status() == reqwest::StatusCode::OK,
            "{}",
            response.status()
        );
        Ok(true)
    })
    .await?;
    let webhook_after = flooded.elapsed();
    ensure!(
        webhook_after <= Duration::from_secs(15),
        "the webhook answered only after {webhook_after:?}"
    );
    println!("{IDLE} idle connections under 128 descriptors: /metrics after {metrics_after:?}, webhook after {webhook_after:?}");

    let max = value(
        &exposition,
        "clusterwatch_web_connections_max{listener=\"main\"}",
    )
    .context("no connection cap in /metrics")?;
    let shed = value(
        &exposition,
        "clusterwatch_web_connections_closed_total{listener=\"main\",reason=\"shed\"}",
    )
    .context("no shed counter in /metrics")?;
    let open = value(
        &exposition,
        "clusterwatch_web_connections_open{listener=\"main\"}",
    )
    .context("no open gauge in /metrics")?;
    ensure!(max < 128.0 && open <= max, "cap {max}, open {open}");
    ensure!(
        shed >= IDLE as f64 - max,
        "{shed} connections shed with a cap of {max}:\n{exposition}"
    );
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    ensure!(descriptors < 128, "{descriptors} descriptors open");
    ensure!(
        cw.guard.is_running(),
        "clusterwatch died:\n{}",
        cw.guard.log_tail(30)
    );
    drop(held);
    cw.terminate(STOP_BOUND).await?;
    Ok(())
}

/// A receiver whose disruptive `promote` hook has been started by a notification and runs
/// `then` (e.g. `sleep 3`).
struct RunningHook {
    lab: HookLab,
    rules: String,
    client: reqwest::Client,
    cw: Service,
    /// The hook's PID.
    pid: i32,
}

impl RunningHook {
    async fn start(then: &str) -> Result<RunningHook> {
        let lab = HookLab::new()?;
        let hook = lab.recorder("promote", then)?;
        let rules = format!(
            "    - {{ name: promote, match: {{ alertname: NoPrimary }}, command: [{}], disruptive: true, timeout: 120s }}\n",
            hook.display()
        );
        let client = clusterwatch_tests::harness::http::client()?;
        let cw = Service::start(&lab.config("", &rules), &[], None, "http", &client).await?;
        let body = notification(
            "firing",
            "g",
            vec![alert(
                "firing",
                json!({"alertname": "NoPrimary"}),
                "fp-stop",
                "2026-01-01T00:00:00Z",
            )],
        )
        .to_string();
        assert_eq!(lab.post(body).await?, 200);
        wait_until(WAIT, "the hook to start", async || {
            Ok(lab.invocations("promote").len() == 1)
        })
        .await?;
        let pid = String::from_utf8(lab.read("promote.pid")?)?
            .trim()
            .parse()?;
        Ok(RunningHook {
            lab,
            rules,
            client,
            cw,
            pid,
        })
    }
}

#[tokio::test]
async fn a_hook_running_at_sigterm_finishes_and_is_journaled_before_the_process_exits() -> Result<()>
{
    let running = RunningHook::start("sleep 3").await?;
    let (lab, rules, client, hook_pid) =
        (&running.lab, &running.rules, &running.client, running.pid);
    let mut cw = running.cw;
    let took = cw.terminate(Duration::from_secs(60)).await?;
    let finished = lab.events("finished");
    ensure!(
        finished.len() == 1 && finished[0]["result"] == "ok" && finished[0]["exit_code"] == 0,
        "the hook was not journaled as finished ok: {:?}",
        lab.journal()
    );
    ensure!(
        !clusterwatch_tests::harness::process::pid_alive(hook_pid),
        "the hook outlived clusterwatch"
    );
    println!("clusterwatch waited {took:?} for the running hook");
    // Started again, it finds nothing open: the run is not `unknown` and runs no more.
    let mut again = Service::start(&lab.config("", rules), &[], None, "http", client).await?;
    ensure!(lab.events("unknown").is_empty(), "{:?}", lab.journal());
    ensure!(lab.invocations("promote").len() == 1);
    again.terminate(STOP_BOUND).await?;
    Ok(())
}

#[tokio::test]
async fn a_second_sigterm_stops_without_waiting_and_the_run_is_unknown_after_restart() -> Result<()>
{
    let running = RunningHook::start("sleep 60").await?;
    let (lab, rules, client, hook_pid) =
        (&running.lab, &running.rules, &running.client, running.pid);
    let mut cw = running.cw;
    // The first SIGTERM: clusterwatch waits for the 60 s hook.
    cw.guard.signal(Signal::SIGTERM)?;
    wait_until(WAIT, "clusterwatch to start its stop", async || {
        Ok(cw.guard.log_tail(50).contains("SIGTERM received"))
    })
    .await?;
    ensure!(cw.guard.is_running(), "exited without waiting for the hook");
    // The second: it exits now, and the hook, in its own process group, goes on.
    let took = cw.terminate(STOP_BOUND).await?;
    ensure!(
        clusterwatch_tests::harness::process::pid_alive(hook_pid),
        "the hook was killed with clusterwatch"
    );
    println!("second SIGTERM: exit after {took:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(hook_pid), Signal::SIGKILL)?;
    // Started again: the run is `unknown`, never run again.
    let mut again = Service::start(&lab.config("", rules), &[], None, "http", client).await?;
    ensure!(lab.events("unknown").len() == 1, "{:?}", lab.journal());
    ensure!(lab.invocations("promote").len() == 1);
    again.terminate(STOP_BOUND).await?;
    Ok(())
}

/// `Key=value` settings of a unit file, in order.
fn unit_settings(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect())
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The longest `timeout:` of the example configuration's hooks.
fn example_hook_timeout(root: &Path) -> Result<Duration> {
    let text = std::fs::read_to_string(root.join("examples/clusterwatch.yml"))?;
    let hooks = text
        .split("\nhooks:\n")
        .nth(1)
        .context("the example has a hooks section")?;
    let section: String = hooks
        .lines()
        .take_while(|l| l.starts_with(' ') || l.starts_with('#') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let re = regex::Regex::new(r"(?m)^\s+timeout:\s*(\S+)")?;
    let mut longest = Duration::ZERO;
    for c in re.captures_iter(&section) {
        longest = longest.max(humantime::parse_duration(&c[1])?);
    }
    Ok(longest)
}

#[test]
fn the_units_wait_for_running_hooks_and_give_enough_descriptors() -> Result<()> {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let main = unit_settings(&root.join("packaging/clusterwatch.service"))?;
    let hooks = unit_settings(&root.join("packaging/clusterwatch-hooks.service"))?;
    for (name, unit) in [("clusterwatch", &main), ("clusterwatch-hooks", &hooks)] {
        let nofile: u64 = setting(unit, "LimitNOFILE")
            .with_context(|| format!("{name}.service sets no LimitNOFILE"))?
            .parse()?;
        // Equal soft and hard limits: clusterwatch needs no setrlimit under the seccomp filter.
        ensure!(nofile >= 8192, "{name}.service: LimitNOFILE={nofile}");
        let stop = humantime::parse_duration(
            setting(unit, "TimeoutStopSec")
                .with_context(|| format!("{name}.service sets no TimeoutStopSec"))?,
        )?;
        ensure!(
            stop > clusterwatch::web::SHUTDOWN_GRACE * 2,
            "{name}.service: TimeoutStopSec {stop:?} leaves no room for the listeners' grace"
        );
    }
    // SIGTERM to clusterwatch alone, so it can wait for its hooks; the rest only at the end.
    ensure!(
        setting(&hooks, "KillMode") == Some("mixed"),
        "clusterwatch-hooks.service must use KillMode=mixed"
    );
    ensure!(
        setting(&main, "KillMode").is_none_or(|m| m != "none"),
        "clusterwatch.service must not leave processes behind"
    );
    // The stop waits for validate + command (each timeout + kill_grace, 5s by default), plus
    // the listeners' grace and a margin: the unit must outlast that for the example's hooks.
    let timeout = example_hook_timeout(&root)?;
    let needed = 2 * (timeout + Duration::from_secs(5))
        + clusterwatch::web::SHUTDOWN_GRACE
        + Duration::from_secs(5);
    let stop = humantime::parse_duration(setting(&hooks, "TimeoutStopSec").unwrap_or("0s"))?;
    ensure!(
        stop >= needed,
        "clusterwatch-hooks.service: TimeoutStopSec {stop:?} < {needed:?} the example's hooks may take"
    );
    Ok(())
}
