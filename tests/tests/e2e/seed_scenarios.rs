//! Each seed's feared failure end to end: break a real server or file, a real Prometheus with the
//! shipped rules, a real Alertmanager with the seed's own routing, clusterwatch running the seed's hook rules.
//!
//! The seed files are adapted by program only where a test must: receiver URLs and addresses
//! (hook receivers to the test's clusterwatch, e-mail and SMS receivers to a local recorder that
//! notes which receiver got which alert), `group_wait` (1 s), the hooks' listen address, token,
//! state directory and site paths. Prometheus scrapes and evaluates every second; the `for:` of
//! the alerts a scenario waits for is shortened (the rules README's tuning of `for:`), every other
//! rule runs as shipped. Each scenario checks the alert it expects, the one action it expects in
//! the hook journal, and that no other critical alert fires on the way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clusterwatch_tests::harness::webhook::HookLab;
use clusterwatch_tests::harness::{
    free_port, repo_root, temp_dir, wait_until, Alertmanager, Clusterwatch, EtcdCluster, PgNode,
    Prometheus, PrometheusConfig, RedisNode, ScrapeJob, Sshd,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time for an alert to fire and its notification to arrive, on a busy two-core machine.
const WAIT: Duration = Duration::from_secs(60);
/// Time for a PostgreSQL failover decision and a promotion with repmgr.
const FAILOVER_WAIT: Duration = Duration::from_secs(150);

fn seed_file(seed: &str, file: &str) -> PathBuf {
    repo_root().join("examples").join(seed).join(file)
}

/// A seed's YAML file as JSON (JSON is YAML, so it can be written back as it is).
fn read_seed(seed: &str, file: &str) -> Result<Value> {
    let path = seed_file(seed, file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("could not read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))
}

/// The entry named `name` of a list section (`probes`, `files`, `etcd`, ...) of a seed config.
fn seed_entry(config: &Value, section: &str, name: &str) -> Result<Value> {
    config[section]
        .as_array()
        .and_then(|list| list.iter().find(|entry| entry["name"] == name))
        .cloned()
        .with_context(|| format!("the seed has no `{section}` entry `{name}`"))
}

/// How a scenario runs the shipped rules: the `for:` of some alerts shortened, some windows
/// of a rule file shortened (`(file, shipped text, test text)`), and rule files added.
#[derive(Default)]
struct Tuning<'a> {
    shorter_for: &'a [(&'a str, &'a str)],
    replaced: &'a [(&'a str, &'a str, &'a str)],
    added: Vec<PathBuf>,
}

/// The shipped rule files tuned as `tuning` says, written into `dir`.
fn tuned_rules(dir: &Path, tuning: &Tuning) -> Result<Vec<PathBuf>> {
    let mut shortened = BTreeSet::new();
    let mut replaced = BTreeSet::new();
    let mut files = Vec::new();
    for path in clusterwatch_tests::lab::rule_files()? {
        let name = path.file_name().context("a rule file without a name")?;
        let mut text = std::fs::read_to_string(&path)?;
        for (file, from, to) in tuning.replaced {
            if name == *file && text.contains(from) {
                text = text.replace(from, to);
                replaced.insert((*file, *from));
            }
        }
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut current: Option<(&str, &str)> = None;
        for line in &mut lines {
            let trimmed = line.trim();
            if let Some(alert) = trimmed.strip_prefix("- alert: ") {
                current = tuning
                    .shorter_for
                    .iter()
                    .copied()
                    .find(|(a, _)| *a == alert);
            } else if trimmed.starts_with("- record: ") {
                current = None;
            } else if let (Some((alert, short)), true) = (current, trimmed.starts_with("for: ")) {
                let indent = line.len() - line.trim_start().len();
                *line = format!("{}for: {short}", &line[..indent]);
                shortened.insert(alert);
                current = None;
            }
        }
        let copy = dir.join(name);
        std::fs::write(&copy, lines.join("\n") + "\n")?;
        files.push(copy);
    }
    for (alert, _) in tuning.shorter_for {
        ensure!(
            shortened.contains(alert),
            "the rules give alert {alert} no `for:` to shorten"
        );
    }
    for (file, from, _) in tuning.replaced {
        ensure!(
            replaced.contains(&(*file, *from)),
            "{file} no longer holds `{from}`"
        );
    }
    files.extend(tuning.added.iter().cloned());
    Ok(files)
}

/// A small HTTP server on loopback: answers 200 to everything and keeps the body of every
/// POST with its path. It stands in for the people a seed notifies (one path per receiver) and
/// for a front page a node serves; dropping it closes the port.
struct Recorder {
    port: u16,
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Result<Recorder> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let kept = posts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    if let Ok((path, body)) = read_request(&mut sock).await {
                        if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                            kept.lock().expect("recorder lock").push((path, value));
                        }
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsounz\n")
                        .await;
                });
            }
        });
        Ok(Recorder { port, posts, task })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// `alertname{target}` of every alert of every notification `receiver` got so far.
    fn notified(&self, receiver: &str) -> BTreeSet<String> {
        let posts = self.posts.lock().expect("recorder lock");
        posts
            .iter()
            .filter(|(path, _)| path.trim_start_matches('/') == receiver)
            .flat_map(|(_, body)| body["alerts"].as_array().cloned().unwrap_or_default())
            .map(|alert| alert_key(&alert["labels"]))
            .collect()
    }

    /// The receivers that got any notification so far.
    fn receivers(&self) -> BTreeSet<String> {
        let posts = self.posts.lock().expect("recorder lock");
        posts
            .iter()
            .map(|(path, _)| path.trim_start_matches('/').to_owned())
            .collect()
    }
}

/// Reads one HTTP request: its path and body (Content-Length bodies only).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((path, body))
}

/// The seed's `alertmanager.yml`, adapted: every address of `addresses` (seed text, test
/// value) replaced, hook webhooks (URLs ending in `/hooks/alertmanager`) given `token_file`,
/// every other receiver (e-mail, SMS gateway) sent to `people` under its own name, and every
/// `group_wait` cut to 1 s.
fn seed_alertmanager(
    seed: &str,
    addresses: &[(String, String)],
    token_file: &Path,
    people: &Recorder,
) -> Result<String> {
    let path = seed_file(seed, "alertmanager.yml");
    let mut text = std::fs::read_to_string(&path)?;
    for (from, to) in addresses {
        text = text.replace(from.as_str(), to);
    }
    let mut config: Value = serde_saphyr::from_str(&text)?;
    config["global"] = json!({ "resolve_timeout": "5m" });
    fn cut_group_wait(route: &mut Value) {
        if route.get("group_wait").is_some() || route.get("receiver").is_some() {
            route["group_wait"] = json!("1s");
        }
        for child in route["routes"].as_array_mut().into_iter().flatten() {
            cut_group_wait(child);
        }
    }
    cut_group_wait(&mut config["route"]);
    for receiver in config["receivers"].as_array_mut().context("no receivers")? {
        let name = receiver["name"]
            .as_str()
            .context("a receiver without a name")?;
        let mut webhooks = Vec::new();
        let mut people_told = false;
        for hook in receiver["webhook_configs"].as_array().into_iter().flatten() {
            let url = hook["url"].as_str().unwrap_or_default();
            if url.ends_with("/hooks/alertmanager") && url.starts_with("http://127.0.0.1:") {
                let mut hook = hook.clone();
                hook["http_config"]["authorization"]["credentials_file"] = json!(token_file);
                webhooks.push(hook);
            } else {
                people_told = true;
            }
        }
        if people_told || receiver.get("email_configs").is_some() {
            webhooks.push(json!({ "url": people.url(name), "send_resolved": false }));
        }
        let object = receiver
            .as_object_mut()
            .context("a receiver is not a map")?;
        object.remove("email_configs");
        object.remove("webhook_configs");
        if !webhooks.is_empty() {
            object.insert("webhook_configs".into(), Value::Array(webhooks));
        }
    }
    Ok(serde_json::to_string_pretty(&config)?)
}

/// A seed node's `hooks:` section for `lab`: its listener, token and state directory, the
/// recipes' relative paths made absolute, and `env` merged into every rule's environment
/// (site paths and addresses).
fn seed_hooks(seed: &str, config: &Value, lab: &HookLab, env: &[(&str, String)]) -> Result<Value> {
    let mut hooks = config["hooks"].clone();
    ensure!(hooks.is_object(), "the seed node has no hooks section");
    hooks["listen"] = json!(format!("127.0.0.1:{}", lab.port));
    hooks["bearer_token_file"] = json!(lab.dir().join("token"));
    hooks["state_dir"] = json!(lab.state_dir());
    hooks["kill_switch_file"] = json!(lab.dir().join("hooks.disabled"));
    let base = seed_file(seed, "");
    for rule in hooks["rules"].as_array_mut().context("no hook rules")? {
        for key in ["command", "validate"] {
            for word in rule[key].as_array_mut().into_iter().flatten() {
                if let Some(relative) = word.as_str().filter(|w| w.starts_with("../")) {
                    *word = json!(std::fs::canonicalize(base.join(relative))?);
                }
            }
        }
        for (key, value) in env {
            rule["env"][*key] = json!(value);
        }
    }
    Ok(hooks)
}

/// Prometheus and Alertmanager wired as a seed's monitoring host, and the seed's people.
struct Monitoring {
    prometheus: Prometheus,
    _alertmanager: Alertmanager,
    people: Recorder,
    _rules: tempfile::TempDir,
}

impl Monitoring {
    async fn start(
        seed: &str,
        clusterwatches: &[&Clusterwatch],
        tuning: &Tuning<'_>,
        addresses: &[(String, String)],
        token_file: &Path,
    ) -> Result<Monitoring> {
        let people = Recorder::start().await?;
        let alertmanager = Alertmanager::start(Some(&seed_alertmanager(
            seed, addresses, token_file, &people,
        )?))
        .await
        .with_context(|| format!("Alertmanager with {seed}'s routing"))?;
        let rules = temp_dir("cw-seed-rules-")?;
        let targets: Vec<String> = clusterwatches.iter().map(|cw| cw.addr()).collect();
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let prometheus = Prometheus::start(&PrometheusConfig {
            jobs: vec![ScrapeJob::new("clusterwatch", &targets)],
            rule_files: tuned_rules(rules.path(), tuning)?,
            alertmanagers: vec![alertmanager.addr()],
            evaluation_interval: Duration::from_secs(1),
        })
        .await?;
        prometheus.wait_for_target_up("clusterwatch", WAIT).await?;
        Ok(Monitoring {
            prometheus,
            _alertmanager: alertmanager,
            people,
            _rules: rules,
        })
    }

    /// `alertname{target}` of every firing alert of `severity`.
    async fn firing(&self, severity: &str) -> Result<BTreeSet<String>> {
        let alerts = self.prometheus.alerts().await?;
        Ok(alerts
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing" && a["labels"]["severity"] == severity)
            .map(|a| alert_key(&a["labels"]))
            .collect())
    }

    /// Waits until `done` holds, checking on every round that only `allowed` critical alerts
    /// fire; returns every critical alert seen firing meanwhile.
    async fn watch_until(
        &self,
        what: &str,
        allowed: &[&str],
        seen: &mut BTreeSet<String>,
        done: impl AsyncFnMut(&BTreeSet<String>) -> Result<bool>,
    ) -> Result<()> {
        self.watch_within(WAIT, what, allowed, seen, done).await
    }

    /// [`watch_until`](Self::watch_until) with its own deadline.
    async fn watch_within(
        &self,
        deadline: Duration,
        what: &str,
        allowed: &[&str],
        seen: &mut BTreeSet<String>,
        mut done: impl AsyncFnMut(&BTreeSet<String>) -> Result<bool>,
    ) -> Result<()> {
        wait_until(deadline, what, async || {
            let firing = self.firing("critical").await?;
            // Kept before judging, so one that fires only for a moment is still reported.
            seen.extend(firing.iter().cloned());
            let unexpected: Vec<&String> = firing
                .iter()
                .filter(|a| !allowed.contains(&a.as_str()))
                .collect();
            ensure!(
                unexpected.is_empty(),
                "critical alerts nobody expected fire: {unexpected:?}"
            );
            done(&firing).await
        })
        .await
    }
}

/// An alert as the scenarios name it: `alertname`, or `alertname{target}` when it has one.
fn alert_key(labels: &Value) -> String {
    let name = labels["alertname"].as_str().unwrap_or("?");
    match labels["target"].as_str() {
        Some(target) => format!("{name}{{{target}}}"),
        None => name.to_owned(),
    }
}

/// Hook journal events of one kind for one hook.
fn events(lab: &HookLab, event: &str, hook: &str) -> Vec<Value> {
    lab.events(event)
        .into_iter()
        .filter(|r| r["hook"] == hook)
        .collect()
}

/// One SOUNZ node: its status file, its menu script and its clusterwatch with the seed's
/// `files:` entry and `hooks:` section.
struct SounzNode {
    lab: HookLab,
    status: PathBuf,
    clusterwatch: Clusterwatch,
    /// The node's `switch-to-production` hook rule, as clusterwatch runs it.
    switch: Value,
}

impl SounzNode {
    /// Runs this node's hook `validate` command by hand, with the hook's environment: exit
    /// code and standard error.
    fn validate(&self) -> Result<(Option<i32>, String)> {
        let argv: Vec<&str> = self.switch["validate"]
            .as_array()
            .context("no validate")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut command = std::process::Command::new(argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (key, value) in self.switch["env"].as_object().into_iter().flatten() {
            command.env(key, value.as_str().unwrap_or_default());
        }
        let out = command.output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

async fn sounz_node(file: &str, status: &str, production_url: &str) -> Result<SounzNode> {
    let seed = read_seed("sounz", file)?;
    let lab = HookLab::new()?;
    let status_path = lab.dir().join("sounz.status");
    std::fs::write(&status_path, format!("{status}\n"))?;
    let menu_dir = lab.dir().join("dr");
    std::fs::create_dir(&menu_dir)?;
    let menu = crate::seeds::fake_switch_script(&menu_dir, &status_path)?;
    let mut status_file = seed["files"][0].clone();
    status_file["path"] = json!(status_path);
    let hooks = seed_hooks(
        "sounz",
        &seed,
        &lab,
        &[
            ("STATUS_FILE", status_path.display().to_string()),
            ("SWITCH_SCRIPT", menu.display().to_string()),
            ("PRODUCTION_URL", production_url.to_owned()),
            // The seed confirms with pg_isready against the other machine's name; here the
            // front page is the confirmation.
            ("PRODUCTION_CHECK", String::new()),
            ("SWITCH_TIMEOUT", "20".to_owned()),
        ],
    )?;
    let switch = hooks["rules"][0].clone();
    let config = json!({ "global": { "timeout": "1s" }, "files": [status_file], "hooks": hooks });
    let clusterwatch = Clusterwatch::start(Some(&serde_json::to_string_pretty(&config)?), &[])
        .await
        .with_context(|| format!("clusterwatch for {file}"))?;
    Ok(SounzNode {
        lab,
        status: status_path,
        clusterwatch,
        switch,
    })
}

/// SOUNZ: slayer's status file goes from production to down and its front page stops
/// answering. StatusFileNoProduction fires naming megadeth (the only standby) as candidate;
/// the seed's routing sends it to both nodes; megadeth's switch-to-production runs once and
/// drives the menu (EMERGENCY, no data fetch) to production_alone; slayer skips it as not the
/// candidate (and its recipe, run by hand, refuses: not a standby); the pair ends consistent
/// (down + production_alone) and the alert resolves. The only critical alert on the way is
/// StatusFileNoProduction, and the only page is its own.
#[tokio::test(flavor = "multi_thread")]
async fn sounz_production_down_switches_the_standby_once() -> Result<()> {
    let began = Instant::now();
    let front_page = Recorder::start().await?;
    let dead = format!("http://127.0.0.1:{}/", free_port()?);
    let slayer = sounz_node("node-a.yml", "production", &dead).await?;
    let megadeth = sounz_node("node-b.yml", "standby", &front_page.url("")).await?;
    let hook_url = |lab: &HookLab| lab.url();
    let monitoring = Monitoring::start(
        "sounz",
        &[&slayer.clusterwatch, &megadeth.clusterwatch],
        &Tuning {
            shorter_for: &[
                ("StatusFileNoProduction", "3s"),
                ("StatusFilePairInconsistent", "3s"),
                ("StatusFileMultipleProduction", "3s"),
            ],
            ..Tuning::default()
        },
        &[
            (
                "http://10.0.0.1:9470/hooks/alertmanager".into(),
                hook_url(&slayer.lab),
            ),
            (
                "http://10.0.0.2:9470/hooks/alertmanager".into(),
                hook_url(&megadeth.lab),
            ),
        ],
        &megadeth.lab.dir().join("token"),
    )
    .await?;
    // Both nodes' tokens are the lab's one token.
    let mut seen = BTreeSet::new();
    monitoring
        .watch_until("both status files in Prometheus", &[], &mut seen, async |_| {
            Ok(monitoring
                .prometheus
                .query_f64("count(clusterwatch_file_state{cluster=\"sounz\", state=~\"production|standby\"} == 1)")
                .await?
                == Some(2.0))
        })
        .await?;
    let ready = began.elapsed();

    // Production croaks.
    let broke = Instant::now();
    std::fs::write(&slayer.status, "down\n")?;
    drop(front_page);
    let allowed = ["StatusFileNoProduction"];
    monitoring
        .watch_until(
            "megadeth's switch to finish",
            &allowed,
            &mut seen,
            async |_| Ok(!events(&megadeth.lab, "finished", "switch-to-production").is_empty()),
        )
        .await
        .with_context(|| format!("megadeth's journal: {:?}", megadeth.lab.journal()))?;
    let switched = broke.elapsed();
    ensure!(
        seen.contains("StatusFileNoProduction"),
        "the switch ran without StatusFileNoProduction firing: {seen:?}"
    );
    monitoring
        .watch_until(
            "StatusFileNoProduction to resolve",
            &allowed,
            &mut seen,
            async |firing| Ok(firing.is_empty()),
        )
        .await?;
    // A few more evaluations of the consistent pair, with the pair alert's `for:` at 3 s.
    let settle = Instant::now();
    monitoring
        .watch_until("the pair to stay consistent", &[], &mut seen, async |_| {
            Ok(settle.elapsed() > Duration::from_secs(6))
        })
        .await?;

    ensure!(
        seen == BTreeSet::from(["StatusFileNoProduction".to_owned()]),
        "critical alerts seen: {seen:?}"
    );
    let finished = events(&megadeth.lab, "finished", "switch-to-production");
    ensure!(
        events(&megadeth.lab, "started", "switch-to-production").len() == 1
            && finished.len() == 1
            && finished[0]["result"] == "ok",
        "megadeth's journal: {:?}",
        megadeth.lab.journal()
    );
    ensure!(
        std::fs::read_to_string(&megadeth.status)?.trim() == "production_alone",
        "megadeth's status after the switch"
    );
    ensure!(
        std::fs::read_to_string(megadeth.lab.dir().join("dr/answers.log"))? == "choice=1\ngrab=n\n"
    );
    ensure!(
        events(&slayer.lab, "started", "switch-to-production").is_empty()
            && !events(&slayer.lab, "not_candidate", "switch-to-production").is_empty(),
        "slayer's journal: {:?}",
        slayer.lab.journal()
    );
    ensure!(!slayer.lab.dir().join("dr/answers.log").exists());
    // Had the alert reached slayer's recipe anyway, it refuses there: not a standby.
    let (code, stderr) = slayer.validate()?;
    ensure!(
        code == Some(2) && stderr.contains("not 'standby'"),
        "slayer's validate: exit {code:?}: {stderr}"
    );
    ensure!(std::fs::read_to_string(&slayer.status)?.trim() == "down");
    let warnings = monitoring.firing("warning").await?;
    ensure!(
        !warnings.iter().any(|a| a.starts_with("StatusFile")),
        "status-file warnings after the switch: {warnings:?}"
    );
    let paged = monitoring.people.notified("ops-page");
    ensure!(
        paged == BTreeSet::from(["StatusFileNoProduction".to_owned()]),
        "paged: {paged:?}"
    );
    eprintln!(
        "sounz: ready in {ready:?}; break to finished switch {switched:?}; total {:?}",
        began.elapsed()
    );
    Ok(())
}

/// RapidPro: on sms1, Redis dies (a critical component, monit's TCP check) and the internet
/// stops answering (an alert-only check). The seed's routing sends ProbeFailing for redis to
/// sms1's record-failure hook, which records `redis` once and tilts once; internet-https only
/// reaches the admins. No other critical alert fires.
#[tokio::test(flavor = "multi_thread")]
async fn rapidpro_redis_failure_is_recorded_once_and_internet_only_notifies() -> Result<()> {
    let began = Instant::now();
    let seed = read_seed("rapidpro", "master.yml")?;
    let mut redis = RedisNode::standalone("rapidpro-redis", None).await?;
    let internet = Recorder::start().await?;
    let lab = HookLab::new()?;
    let tilt = lab.recorder("tilt", "echo \"$1\" >> \"$(dirname \"$0\")/tilt.args\"")?;
    let failures = lab.dir().join("failures.log");

    let mut redis_probe = seed_entry(&seed, "probes", "redis")?;
    redis_probe["tcp"]["address"] = json!(redis.addr());
    let mut internet_probe = seed_entry(&seed, "probes", "internet-https")?;
    internet_probe["http"]["url"] = json!(internet.url(""));
    let hooks = seed_hooks(
        "rapidpro",
        &seed,
        &lab,
        &[
            ("FAILURE_LOG", failures.display().to_string()),
            ("TILT_COMMAND", tilt.display().to_string()),
        ],
    )?;
    let config = json!({
        "global": { "timeout": "1s" },
        "probes": [redis_probe, internet_probe],
        "hooks": hooks,
    });
    let sms1 = Clusterwatch::start(Some(&serde_json::to_string_pretty(&config)?), &[]).await?;
    let monitoring = Monitoring::start(
        "rapidpro",
        &[&sms1],
        &Tuning::default(),
        &[
            (
                "http://10.172.20.201:9470/hooks/alertmanager".into(),
                lab.url(),
            ),
            ("10.172.20.201:9469".into(), sms1.addr()),
        ],
        &lab.dir().join("token"),
    )
    .await?;
    let mut seen = BTreeSet::new();
    monitoring
        .watch_until("both probes succeeding", &[], &mut seen, async |_| {
            Ok(monitoring
                .prometheus
                .query_f64("sum(clusterwatch_probe_success)")
                .await?
                == Some(2.0))
        })
        .await?;
    let ready = began.elapsed();

    let broke = Instant::now();
    redis.stop()?;
    drop(internet);
    let allowed = ["ProbeFailing{redis}", "ProbeFailing{internet-https}"];
    monitoring
        .watch_until(
            "record-failure to finish and the admins to hear of both",
            &allowed,
            &mut seen,
            async |_| {
                Ok(!events(&lab, "finished", "record-failure").is_empty()
                    && monitoring.people.notified("admins-email-and-sms").len() == 2)
            },
        )
        .await
        .with_context(|| format!("journal: {:?}", lab.journal()))?;
    let recorded = broke.elapsed();
    // Further evaluations and Alertmanager's repeats run nothing again.
    let settle = Instant::now();
    monitoring
        .watch_until("a few more evaluations", &allowed, &mut seen, async |_| {
            Ok(settle.elapsed() > Duration::from_secs(5))
        })
        .await?;

    let allowed: BTreeSet<String> = allowed.iter().map(|a| (*a).to_owned()).collect();
    ensure!(seen == allowed, "critical alerts seen: {seen:?}");
    let paged = monitoring.people.notified("admins-email-and-sms");
    ensure!(paged == allowed, "paged: {paged:?}");
    ensure!(
        !monitoring
            .people
            .receivers()
            .contains("sms2-record-failure"),
        "sms2's hook receiver was notified"
    );
    let started = events(&lab, "started", "record-failure");
    ensure!(started.len() == 1, "journal: {:?}", lab.journal());
    ensure!(
        lab.journal()
            .iter()
            .all(|r| r["hook"] != "record-failure-postgresql"),
        "journal: {:?}",
        lab.journal()
    );
    let log = std::fs::read_to_string(&failures)?;
    ensure!(
        log.lines().count() == 1 && log.split_whitespace().nth(1) == Some("redis"),
        "failures recorded: {log}"
    );
    ensure!(std::fs::read_to_string(lab.dir().join("tilt.args"))? == "redis\n");
    // Every matched alert of the journal is redis's: internet-https never reached the hooks.
    let matched: BTreeSet<String> = lab
        .events("matched")
        .iter()
        .filter_map(|r| r["labels"]["target"].as_str().map(str::to_owned))
        .collect();
    ensure!(matched.iter().all(|t| t == "redis"), "matched: {matched:?}");
    eprintln!(
        "rapidpro: ready in {ready:?}; break to recorded failure {recorded:?}; total {:?}",
        began.elapsed()
    );
    Ok(())
}

/// Clearwater: one of three etcd members dies. EtcdMemberDown fires for it and reaches the
/// ops e-mail only; the quorum holds (no EtcdQuorumLost), no critical alert fires, and the seed
/// has no hook to run.
#[tokio::test(flavor = "multi_thread")]
async fn clearwater_etcd_member_down_alerts_and_runs_nothing() -> Result<()> {
    let began = Instant::now();
    let seed = read_seed("clearwater", "etcd-node.yml")?;
    ensure!(
        seed.get("hooks").is_none(),
        "the Clearwater seed grew a hook"
    );
    let mut etcd = EtcdCluster::start(3).await?;
    let mut site = seed_entry(&seed, "etcd", "site1-etcd")?;
    site["endpoints"] = json!(etcd.endpoints());
    site["timeout"] = json!("1s");
    let config = json!({ "global": { "timeout": "1s" }, "etcd": [site] });
    let node = Clusterwatch::start(Some(&serde_json::to_string_pretty(&config)?), &[]).await?;
    let token = temp_dir("cw-clearwater-")?;
    std::fs::write(token.path().join("token"), "unused\n")?;
    let monitoring = Monitoring::start(
        "clearwater",
        &[&node],
        &Tuning {
            shorter_for: &[("EtcdMemberDown", "3s")],
            ..Tuning::default()
        },
        &[],
        &token.path().join("token"),
    )
    .await?;
    let mut seen = BTreeSet::new();
    monitoring
        .watch_until(
            "three healthy members in Prometheus",
            &[],
            &mut seen,
            async |_| {
                Ok(monitoring
                    .prometheus
                    .query_f64("sum(clusterwatch_etcd_member_healthy)")
                    .await?
                    == Some(3.0))
            },
        )
        .await?;
    let ready = began.elapsed();

    let broke = Instant::now();
    let down = etcd.endpoints()[2].clone();
    etcd.member(2).process().stop()?;
    monitoring
        .watch_until(
            "EtcdMemberDown to reach the ops e-mail",
            &[],
            &mut seen,
            async |_| {
                Ok(monitoring
                    .people
                    .notified("ops-email")
                    .contains("EtcdMemberDown{site1-etcd}"))
            },
        )
        .await?;
    let alerted = broke.elapsed();
    let alerts = monitoring.prometheus.alerts().await?;
    let member_down: Vec<&Value> = alerts
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == "EtcdMemberDown" && a["state"] == "firing")
        .collect();
    ensure!(
        member_down.len() == 1 && member_down[0]["labels"]["endpoint"] == down.as_str(),
        "EtcdMemberDown: {member_down:?}"
    );
    ensure!(
        monitoring.people.receivers() == BTreeSet::from(["ops-email".to_owned()]),
        "notified: {:?}",
        monitoring.people.receivers()
    );
    ensure!(seen.is_empty(), "critical alerts fired: {seen:?}");
    eprintln!(
        "clearwater: ready in {ready:?}; member stop to e-mail {alerted:?}; total {:?}",
        began.elapsed()
    );
    Ok(())
}

/// One SRE Element Manager's clusterwatch: it watches the three PostgreSQL nodes of `sre-db`
/// (an observer of the failover rules) and runs em.yml's hook, `only_if_candidate` this EM.
async fn sre_em(
    seed: &Value,
    name: &str,
    nodes: &[(&str, &PgNode)],
    repmgr_conf: &Path,
) -> Result<(HookLab, Clusterwatch)> {
    let lab = HookLab::new()?;
    let mut hooks = seed_hooks(
        "sre",
        seed,
        &lab,
        &[
            (
                "REPMGR",
                crate::seeds::repmgr_program()?.display().to_string(),
            ),
            ("REPMGR_CONF", repmgr_conf.display().to_string()),
        ],
    )?;
    hooks["rules"][0]["only_if_candidate"] = json!(name);
    let cluster = seed["postgres"][0]["cluster"].clone();
    let postgres: Vec<Value> = nodes
        .iter()
        .map(|(target, node)| json!({ "name": target, "cluster": cluster, "dsn": node.monitor_dsn() }))
        .collect();
    let config = json!({ "global": { "timeout": "2s" }, "postgres": postgres, "hooks": hooks });
    let clusterwatch = Clusterwatch::start(Some(&serde_json::to_string_pretty(&config)?), &[])
        .await
        .with_context(|| format!("clusterwatch for {name}"))?;
    Ok((lab, clusterwatch))
}

/// SRE: a PostgreSQL primary (em1) with two standbys (em2, the other Element Manager, and
/// cp1, a call processor), all registered with Debian's repmgr, watched by both EMs'
/// clusterwatch. em1 is killed: PostgresFailoverNeeded fires naming em2 (cp1 has priority 0 in
/// the seed's failover settings); the seed's routing sends it to both EMs; em2's
/// repmgr-promote runs once (its `--dry-run` as validate, over SSH to cp1 too), promotes em2
/// with `--siblings-follow`, and cp1 streams from em2; em1's receiver skips it.
#[tokio::test(flavor = "multi_thread")]
async fn sre_primary_killed_promotes_the_standby_em_and_the_cp_follows() -> Result<()> {
    let began = Instant::now();
    let seed = read_seed("sre", "em.yml")?;
    let em1 = PgNode::start_primary("em1").await?;
    // One base backup after the other: two at once can make the primary recycle WAL the other
    // still needs.
    let em2 = PgNode::start_standby("em2", &em1, "em2").await?;
    em1.wait_standby_streaming("em2", WAIT).await?;
    let cp1 = PgNode::start_standby("cp1", &em1, "cp1").await?;
    em1.wait_standby_streaming("cp1", WAIT).await?;

    // repmgr runs as postgres under root (the recipe's REPMGR_USER), else as ourselves; it
    // reaches the sibling over SSH for `standby follow`.
    let user = if nix::unistd::Uid::effective().is_root() {
        "postgres".to_owned()
    } else {
        nix::unistd::User::from_uid(nix::unistd::Uid::effective())?
            .context("who am I")?
            .name
    };
    let sshd = Sshd::start(&user).await?;
    let bindir = crate::seeds::repmgr_program()?
        .parent()
        .context("repmgr has no directory")?
        .to_owned();
    let conf = |node: &PgNode, id: u32| {
        let extra = format!(
            "pg_bindir='{bin}'\nrepmgr_bindir='{bin}'\nssh_options='{ssh}'\n\
             service_restart_command='{bin}/pg_ctl -D {data} -l {log} -w -m fast restart'\n",
            bin = bindir.display(),
            ssh = sshd.client_options(),
            data = node.data_dir().display(),
            log = node.log_path().display(),
        );
        crate::seeds::repmgr_conf(node, id, node.name(), &extra)
    };
    let (em1_conf, em2_conf, cp1_conf) = (conf(&em1, 1)?, conf(&em2, 2)?, conf(&cp1, 3)?);
    crate::seeds::repmgr(&em1_conf, &["primary", "register"]).await?;
    for standby in [&em2, &cp1] {
        crate::seeds::repmgr_primary_registered_on(standby).await?;
    }
    crate::seeds::repmgr(&em2_conf, &["standby", "register"]).await?;
    crate::seeds::repmgr(&cp1_conf, &["standby", "register"]).await?;

    let nodes = [("em1", &em1), ("em2", &em2), ("cp1", &cp1)];
    let (em1_lab, em1_cw) = sre_em(&seed, "em1", &nodes, &em1_conf).await?;
    let (em2_lab, em2_cw) = sre_em(&seed, "em2", &nodes, &em2_conf).await?;
    let monitoring = Monitoring::start(
        "sre",
        &[&em1_cw, &em2_cw],
        &Tuning {
            // The PostgreSQL failover window, 2 minutes shipped (README, Tests).
            replaced: &[
                ("failover.rules.yml", "[2m]", "[20s]"),
                ("failover.rules.yml", "offset 2m", "offset 20s"),
            ],
            added: vec![seed_file("sre", "failover-settings.rules.yml")],
            ..Tuning::default()
        },
        &[
            (
                "http://10.0.161.180:9470/hooks/alertmanager".into(),
                em1_lab.url(),
            ),
            (
                "http://10.0.161.181:9470/hooks/alertmanager".into(),
                em2_lab.url(),
            ),
        ],
        &em2_lab.dir().join("token"),
    )
    .await?;
    let mut seen = BTreeSet::new();
    monitoring
        .watch_until("both observers to see the primary", &[], &mut seen, async |_| {
            Ok(monitoring
                .prometheus
                .query_f64("cluster:clusterwatch_pg_observers_seeing_primary:count{cluster=\"sre-db\"}")
                .await?
                == Some(2.0))
        })
        .await?;
    let ready = began.elapsed();

    // cp1 streams through the slot `cp1`, and `standby follow` keeps that slot name when it
    // re-points cp1 at em2: em2 must hold a slot of that name before it becomes cp1's
    // upstream (repmgr's `use_replication_slots` sites get theirs from repmgr). Without it
    // cp1 retries against a missing slot until something else creates one.
    em2.psql("SELECT pg_create_physical_replication_slot('cp1')")
        .await
        .context("a slot for cp1 on the standby that will be promoted")?;
    let broke = Instant::now();
    em1.kill9()?;
    let allowed = ["PostgresFailoverNeeded", "PostgresDown{em1}"];
    // The failover window (20 s), an evaluation, then the dry run, the promotion and the
    // sibling's follow: about a minute here.
    monitoring
        .watch_within(
            FAILOVER_WAIT,
            "em2's repmgr-promote to finish",
            &allowed,
            &mut seen,
            async |_| Ok(!events(&em2_lab, "finished", "repmgr-promote").is_empty()),
        )
        .await
        .with_context(|| format!("em2's journal: {:?}", em2_lab.journal()))?;
    let promoted = broke.elapsed();
    let finished = events(&em2_lab, "finished", "repmgr-promote");
    ensure!(
        finished.len() == 1 && finished[0]["result"] == "ok",
        "em2's journal: {:?}",
        em2_lab.journal()
    );
    ensure!(
        em2.psql("SELECT pg_is_in_recovery()").await? == "f",
        "em2 is not primary"
    );
    let sibling = format!("streaming|{}", em2.port());
    wait_until(FAILOVER_WAIT, "cp1 to stream from em2", async || {
        let row = cp1
            .psql("SELECT status, sender_port FROM pg_stat_wal_receiver")
            .await?;
        if row == sibling {
            Ok(true)
        } else {
            bail!("cp1's pg_stat_wal_receiver: `{row}`")
        }
    })
    .await
    .with_context(|| {
        let log = cp1.logs();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        format!(
            "repmgr-promote's output: {}\ncp1's log, last lines first:\n{}",
            finished[0]["stderr_tail"],
            tail.join("\n")
        )
    })?;
    let followed = broke.elapsed();
    monitoring
        .watch_until(
            "PostgresFailoverNeeded to resolve",
            &allowed,
            &mut seen,
            async |firing| Ok(!firing.contains("PostgresFailoverNeeded")),
        )
        .await?;

    ensure!(
        seen.contains("PostgresFailoverNeeded"),
        "em2 was promoted without PostgresFailoverNeeded: {seen:?}"
    );
    ensure!(
        seen.iter().all(|a| allowed.contains(&a.as_str())),
        "critical alerts seen: {seen:?}"
    );
    ensure!(
        events(&em2_lab, "started", "repmgr-promote").len() == 1,
        "em2's journal: {:?}",
        em2_lab.journal()
    );
    ensure!(
        events(&em1_lab, "started", "repmgr-promote").is_empty()
            && !events(&em1_lab, "not_candidate", "repmgr-promote").is_empty(),
        "em1's journal: {:?}",
        em1_lab.journal()
    );
    let paged = monitoring.people.notified("noc-page");
    ensure!(
        paged.iter().all(|a| allowed.contains(&a.as_str())),
        "paged: {paged:?}"
    );
    eprintln!(
        "sre: ready in {ready:?}; kill to promotion {promoted:?}; cp1 following {followed:?}; total {:?}",
        began.elapsed()
    );
    Ok(())
}
