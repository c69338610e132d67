//! What each subcommand does: `serve`, `check-config`, `once`. Startup errors are reported
//! here, once, in plain words; nothing below this module exits the process.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{Cli, Command, HooksCommand};
use crate::collector::Engine;
use crate::config;
use crate::configuration::{self, Config};
use crate::hooks::config::Listen;
use crate::hooks::lock::EtcdLock;
use crate::hooks::{Hooks, LocalGate, RunGate};
use crate::http::{app, AppState};
use crate::reload::{reload_on_sighup, Reloader};
use crate::routes::WEBHOOK_PATH;

/// Runs the command the user asked for and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match &cli.command {
        Some(Command::CheckConfig { file }) => check_config(file, cli.web_config_file.as_deref()),
        Some(Command::HashPassword { cost }) => crate::web::hash_password(*cost),
        Some(Command::Once) => run_async(once(&cli)),
        Some(Command::Status { once }) => run_async(status(&cli, *once)),
        Some(Command::Hooks { command }) => hooks_command(&cli, command),
        Some(Command::Serve) | None => run_async(serve(&cli)),
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    // Two workers at most: an exporter mostly waits on sockets, and every worker more costs
    // a stack and, under contention, allocator pages (blocking calls have their own pool).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(2));
    // tokio's blocking pool keeps its defaults: only the journal's payload writes, reloads
    // and password checks use it. Collectors' file and /proc reads run on blocking.rs's own
    // threads, which end when a load spike is over (tokio wakes its idle threads in turn, so
    // ten scrapes a second kept every thread it ever started alive).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clusterwatch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "clusterwatch stopped");
            eprintln!("clusterwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &Path, web_config: Option<&Path>) -> ExitCode {
    // Both files are checked, so one run shows every problem.
    let web_ok = web_config.is_none_or(|web| {
        report(crate::web::Security::load(web).map(|_| format!("{}: ok", web.display())))
    });
    let config_ok = report(configuration::load_file(file).map(|cfg| {
        // Warnings do not fail the check: what they point at is accepted as written.
        for w in &cfg.warnings {
            eprintln!("{}", w.render(&file.display().to_string()));
        }
        let hooks = cfg.hooks.as_ref().map_or(0, |h| h.rules.len());
        format!(
            "{}: ok ({} targets, {hooks} hooks)",
            file.display(),
            cfg.targets.len()
        )
    }));
    if web_ok && config_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints a checked file's summary, or its problems; whether it was fine.
fn report(checked: Result<String, config::ConfigError>) -> bool {
    match checked {
        Ok(summary) => {
            println!("{summary}");
            true
        }
        Err(e) => {
            eprintln!("{}", e.render());
            let errors = e.problems.iter().filter(|p| !p.warning).count();
            eprintln!("{}: {errors} problem(s) found", e.file);
            false
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let cfg = configuration::load(cli.config_file.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{}", e.render()))?;
    for w in &cfg.warnings {
        tracing::warn!(
            warning = w.render(&cfg.origin),
            "configuration accepted with a warning"
        );
    }
    Ok(cfg)
}

async fn once(cli: &Cli) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    let engine = Engine::new(cfg.targets, cfg.global.timeout);
    print!(
        "{}",
        engine
            .scrape(None)
            .await
            .into_snapshot()
            .encode_openmetrics()
    );
    Ok(())
}

/// `clusterwatch status`: the running instance's status page as text, or a one-time run.
async fn status(cli: &Cli, once: bool) -> anyhow::Result<()> {
    if once {
        let cfg = load(cli)?;
        let engine = Engine::new(cfg.targets, cfg.global.timeout);
        let buffer = engine.scrape(None).await;
        let lines = crate::status::summarize(&crate::status::from_buffer(&buffer));
        let decisions = cfg
            .hooks
            .as_ref()
            .map(|h| crate::status::last_decisions(&h.state_dir));
        print!(
            "{}",
            crate::status::render_text(&lines, decisions.as_deref())
        );
        return Ok(());
    }
    // A wildcard listen address is reached on loopback.
    let mut addr = cli.listen_address;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/");
    let answer = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .context("cannot build an HTTP client")?
        .get(&url)
        .header(reqwest::header::ACCEPT, "text/plain")
        .send()
        .await
        .with_context(|| {
            format!("cannot reach clusterwatch at {url} (is it running there? `clusterwatch status --once` runs the collectors here instead)")
        })?;
    let code = answer.status();
    let body = answer.text().await.context("reading the status page")?;
    if !code.is_success() {
        anyhow::bail!("{url} answered {code}: {}", body.trim());
    }
    print!("{body}");
    Ok(())
}

/// With `hooks.lock`, disruptive runs take an etcd lock first; without, every run may start.
fn gate(h: &crate::hooks::config::HooksConfig) -> Box<dyn RunGate> {
    match &h.lock {
        Some(lock) => Box::new(EtcdLock::new(lock.clone())),
        None => Box::new(LocalGate),
    }
}

/// With `hooks.lease`, one holder per configured server keeps its group's leader key while
/// the server is primary (a reload that changes the section is refused: restart).
fn start_leader_leases(hooks: &Arc<Hooks>, engine: &Arc<Engine>) {
    let cfg = hooks.config();
    let (Some(lease), Some(lock)) = (&cfg.lease, &cfg.lock) else {
        return;
    };
    // Checked with the configuration; nothing is left to refuse here.
    let servers = crate::hooks::lease::servers(lease, &engine.targets()).unwrap_or_default();
    crate::hooks::lease::spawn_holders(
        hooks.clone(),
        engine.clone(),
        lock.clone(),
        lease.clone(),
        servers,
    );
}

async fn serve(cli: &Cli) -> anyhow::Result<()> {
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP for reloads")?;
    let stop = stop_on_signal().context("cannot watch SIGTERM")?;
    let cfg = load(cli)?;
    if !cli.telemetry_path.starts_with('/') || cli.telemetry_path.len() < 2 {
        anyhow::bail!("--web.telemetry-path must start with / and not be / itself");
    }
    let security = match &cli.web_config_file {
        Some(path) => Some(crate::web::Security::new(
            crate::web::Security::load(path)
                .map_err(|e| anyhow::anyhow!("invalid web configuration:\n{}", e.render()))?,
        )),
        None => None,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %cfg.origin,
        targets = cfg.targets.len(),
        "starting clusterwatch"
    );
    let hooks = match cfg.hooks {
        Some(h) => Some({
            let gate = gate(&h);
            Hooks::start(h, gate)
                .await
                .context("cannot start the hook runner")?
        }),
        None => None,
    };
    let own_webhook = hooks.as_ref().and_then(|h| match h.config().listen {
        Listen::Own(addr) => Some(addr),
        Listen::Main => None,
    });
    let caps = connection_caps(if own_webhook.is_some() { 2 } else { 1 });
    let main_connections = crate::web::Connections::new("main", caps);
    let mut listeners = vec![main_connections.clone()];
    // The webhook's own listener is bound before the main one, so a ready main listener
    // means the webhook is reachable too.
    let mut webhook_server = None;
    let mut hooks_security = None;
    if let (Some(h), Some(addr)) = (&hooks, own_webhook) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the webhook (hooks.listen)"))?;
        tracing::info!(address = %addr, path = WEBHOOK_PATH, hooks = h.config().rules.len(), max_connections = caps, "webhook listening");
        let router = crate::hooks::receiver::routes(h.clone());
        hooks_security = h.config().web.clone().map(crate::web::Security::new);
        let connections = crate::web::Connections::new("webhook", caps);
        listeners.push(connections.clone());
        webhook_server = Some(tokio::spawn(crate::web::serve(
            listener,
            router,
            hooks_security.clone(),
            connections,
            stopped(stop.clone()),
        )));
    }
    let engine = Arc::new(Engine::with_fingerprints(
        cfg.targets,
        cfg.fingerprints,
        cfg.global.timeout,
    ));
    if let Some(h) = &hooks {
        start_leader_leases(h, &engine);
    }
    let mut reloader = Reloader::new(cli.config_file.clone(), engine.clone(), hooks.clone());
    if let (Some(path), Some(security)) = (&cli.web_config_file, &security) {
        reloader = reloader.with_main_web(path.clone(), security.clone());
    }
    if let Some(security) = &hooks_security {
        reloader = reloader.with_hooks_web(security.clone());
    }
    let reloader = Arc::new(reloader);
    reload_on_sighup(hangup, reloader.clone());
    let state = AppState {
        engine,
        telemetry_path: cli.telemetry_path.clone(),
        config_origin: cfg.origin,
        hooks: hooks.clone(),
        reloader,
        listeners,
    };
    let listener = tokio::net::TcpListener::bind(cli.listen_address)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen_address))?;
    tracing::info!(address = %cli.listen_address, path = %cli.telemetry_path, max_connections = caps, "listening");
    crate::memory::spawn_upkeep();
    crate::web::serve(
        listener,
        app(state),
        security,
        main_connections,
        stopped(stop.clone()),
    )
    .await;
    if let Some(server) = webhook_server {
        let _ = server.await;
    }
    if let Some(h) = hooks {
        tokio::select! {
            _ = drain_hooks(&h) => {}
            _ = stopped_after(stop.clone(), 2) => {}
        }
    }
    tracing::info!("clusterwatch stopped");
    Ok(())
}

/// Raises the descriptor limit and sizes each listener's connection cap from it.
fn connection_caps(listeners: usize) -> usize {
    let limit = crate::web::descriptors::raise_limit();
    let caps = crate::web::descriptors::per_listener(limit, listeners);
    if limit < 1024 {
        tracing::warn!(limit, max_connections = caps, "few file descriptors (RLIMIT_NOFILE); each listener keeps at most max_connections open");
    }
    caps
}

/// Waits for the hook runs in flight at a stop, each within its own bounds: validation and
/// command under their timeout, plus the kill grace of each, plus a margin for the journal.
async fn drain_hooks(hooks: &Hooks) {
    let cfg = hooks.config();
    let longest = cfg
        .rules
        .iter()
        .map(|r| {
            let validate = if r.validate.is_some() {
                r.timeout
            } else {
                Duration::ZERO
            };
            validate
                .saturating_add(r.timeout)
                .saturating_add(cfg.kill_grace.saturating_mul(2))
        })
        .max()
        .unwrap_or_default();
    let limit = longest.saturating_add(DRAIN_MARGIN);
    let started = std::time::Instant::now();
    let left = hooks.drain(limit).await;
    if left > 0 {
        tracing::error!(runs = left, waited = ?started.elapsed(), "hook runs still going after their longest timeout; their effect will be unknown");
    } else if started.elapsed() > Duration::from_millis(200) {
        tracing::info!(waited = ?started.elapsed(), "hook runs in flight at the stop have finished");
    }
}

/// Beyond the hooks' own bounds, for journal writes after the last run ends.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);

fn hooks_command(cli: &Cli, command: &HooksCommand) -> ExitCode {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clusterwatch: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let Some(hooks) = cfg.hooks else {
        eprintln!("clusterwatch: {} has no `hooks:` section", cfg.origin);
        return ExitCode::FAILURE;
    };
    let lines = match command {
        HooksCommand::Replay { payload } => std::fs::read(payload)
            .map_err(|e| format!("cannot read {}: {e}", payload.display()))
            .and_then(|body| crate::hooks::replay(&hooks, &body)),
        HooksCommand::Journal {
            check,
            accept_damage,
        } => crate::hooks::journal_command(&hooks, *check, *accept_damage),
    };
    match lines {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("clusterwatch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How many SIGTERMs or SIGINTs have come: the first stops the listeners and drains the
/// hook runs in flight; a second ends the drain at once. Watched from the start, so a signal
/// during start-up is not lost.
fn stop_on_signal() -> std::io::Result<tokio::sync::watch::Receiver<u8>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        for n in 1..=2u8 {
            let signal = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            match n {
                1 => tracing::info!("{signal} received, shutting down (a second one stops without waiting for hook runs)"),
                _ => tracing::warn!("second {signal} received: not waiting for hook runs in flight; their effect will be unknown"),
            }
            let _ = tx.send(n);
        }
    });
    Ok(rx)
}

/// Resolves once `stop` has counted `signals` signals (or its sender is gone).
async fn stopped_after(mut stop: tokio::sync::watch::Receiver<u8>, signals: u8) {
    let _ = stop.wait_for(|n| *n >= signals).await;
}

/// Resolves at the first stop signal.
async fn stopped(stop: tokio::sync::watch::Receiver<u8>) {
    stopped_after(stop, 1).await;
}
