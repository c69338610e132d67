//! The five seed scenarios under `examples/<seed>/` as their operators would use them: every
//! configuration passes `check-config`, every Alertmanager file passes `amtool` and routes
//! each alert where the seed's page says, and the seeds' hook recipes act on real servers
//! (Redis behind two real HAProxies, a menu-driven switch script) or refuse when they must.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use clusterwatch_tests::harness::haproxy::redis_backend;
use clusterwatch_tests::harness::process::{describe, find_program, run};
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab};
use clusterwatch_tests::harness::{
    free_port, repo_root, temp_dir, wait_until, Clusterwatch, Haproxy, RedisNode,
};
use serde_json::{json, Value};

const SEEDS: &[&str] = &["rapidpro", "sounz", "clearwater", "sre", "whiskymedia"];
const WAIT: Duration = Duration::from_secs(60);

fn seed_dir(seed: &str) -> PathBuf {
    repo_root().join("examples").join(seed)
}

pub(crate) fn hook(name: &str) -> PathBuf {
    repo_root().join("alertmanager/hooks").join(name)
}

/// The files of a seed whose names end in `suffix`, sorted.
fn seed_files(seed: &str, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(seed_dir(seed))
        .unwrap_or_else(|e| panic!("examples/{seed}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// The clusterwatch configurations of a seed: every `*.yml` but the Alertmanager file and
/// Prometheus rule files (`*.rules.yml`).
fn seed_configs(seed: &str) -> Vec<PathBuf> {
    seed_files(seed, ".yml")
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name != "alertmanager.yml" && !name.ends_with(".rules.yml")
        })
        .collect()
}

/// Exit status (None: killed by a signal), stdout and stderr of a finished command.
fn output(mut command: Command) -> (Option<i32>, String, String) {
    let description = describe(&command);
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("could not run `{description}`: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn amtool() -> PathBuf {
    find_program("CLUSTERWATCH_AMTOOL", &["amtool"]).unwrap_or_else(|e| {
        panic!("amtool is missing: install the Debian package `prometheus-alertmanager`: {e:#}")
    })
}

// ---- configurations and routing ----------------------------------------------------------

#[test]
fn every_seed_configuration_passes_check_config() {
    let binary = clusterwatch_tests::harness::clusterwatch::binary().expect("clusterwatch binary");
    let mut problems = Vec::new();
    for seed in SEEDS {
        let configs = seed_configs(seed);
        if configs.len() < 2 && *seed != "clearwater" {
            problems.push(format!(
                "examples/{seed} has {} configuration(s), expected one per node type",
                configs.len()
            ));
        }
        for config in configs {
            let mut command = Command::new(&binary);
            command.arg("check-config").arg(&config);
            let (code, stdout, stderr) = output(command);
            if code != Some(0) || !stdout.contains(": ok (") {
                problems.push(format!(
                    "{}: exit {code:?}\n{stdout}{stderr}",
                    config.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A seed's own recording rules (SRE's failover settings) load in Prometheus.
#[test]
fn every_seed_rules_file_passes_promtool() {
    let promtool = find_program("CLUSTERWATCH_PROMTOOL", &["promtool"]).expect("promtool");
    for seed in SEEDS {
        for rules in seed_files(seed, ".rules.yml") {
            let mut command = Command::new(&promtool);
            command.args(["check", "rules"]).arg(&rules);
            let (code, stdout, stderr) = output(command);
            assert_eq!(code, Some(0), "{}: {stdout}{stderr}", rules.display());
        }
    }
}

#[test]
fn every_seed_alertmanager_file_passes_amtool() {
    let amtool = amtool();
    for seed in SEEDS {
        let mut command = Command::new(&amtool);
        command
            .arg("check-config")
            .arg(seed_dir(seed).join("alertmanager.yml"));
        let (code, stdout, stderr) = output(command);
        assert_eq!(
            code,
            Some(0),
            "examples/{seed}/alertmanager.yml:\n{stdout}{stderr}"
        );
    }
}

/// The receivers Alertmanager would notify for an alert with `labels`.
fn receivers(seed: &str, labels: &[&str]) -> BTreeSet<String> {
    let mut command = Command::new(amtool());
    command
        .args(["config", "routes", "test"])
        .arg(format!(
            "--config.file={}",
            seed_dir(seed).join("alertmanager.yml").display()
        ))
        .args(labels);
    let (code, stdout, stderr) = output(command);
    assert_eq!(code, Some(0), "{seed} {labels:?}: {stdout}{stderr}");
    stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split(',')
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Which receiver gets which alert, seed by seed: critical component failures reach the hook
/// receiver (and people), alert-only checks reach people only, and no seed sends an alert to
/// a hook that its page does not name.
#[test]
fn seed_routes_send_critical_failures_to_hooks_and_alert_only_checks_to_people() {
    const SMS1: &str = "instance=10.172.20.201:9469";
    const SMS2: &str = "instance=10.172.20.202:9469";
    let cases: &[(&str, &[&str], &[&str])] = &[
        // RapidPro: each node's critical components go to that node's record-failure.
        (
            "rapidpro",
            &[
                "alertname=ProbeFailing",
                "target=uwsgi",
                "severity=critical",
                SMS1,
            ],
            &["sms1-record-failure", "admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=ProbeFailing",
                "target=sms-gateway",
                "severity=critical",
                SMS1,
            ],
            &["sms1-record-failure", "admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=ProcessMissing",
                "target=celerybeat",
                "severity=critical",
                SMS1,
            ],
            &["sms1-record-failure", "admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=PostgresDown",
                "target=sms1",
                "cluster=rapidpro-db",
                "severity=critical",
                SMS1,
            ],
            &["sms1-record-failure", "admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=ProbeFailing",
                "target=redis",
                "severity=critical",
                SMS2,
            ],
            &["sms2-record-failure", "admins-email-and-sms"],
        ),
        // ... and the alert-only checks only notify.
        (
            "rapidpro",
            &[
                "alertname=ProbeFailing",
                "target=internet-https",
                "severity=critical",
                SMS1,
            ],
            &["admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=VipMissing",
                "cluster=rapidpro",
                "severity=critical",
            ],
            &["admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=NetworkInterfaceDown",
                "interface=eth0",
                "severity=critical",
                SMS1,
            ],
            &["admins-email-and-sms"],
        ),
        (
            "rapidpro",
            &[
                "alertname=HostFilesystemAboveThreshold",
                "mountpoint=/var",
                "severity=warning",
                SMS1,
            ],
            &["admins-email"],
        ),
        (
            "rapidpro",
            &["alertname=HostLoadHigh", "severity=warning", SMS1],
            &["admins-email"],
        ),
        (
            "rapidpro",
            &["alertname=TextfileStale", "severity=warning", SMS1],
            &["admins-email"],
        ),
        // A witness's view of a node never tilts it.
        (
            "rapidpro",
            &[
                "alertname=PostgresDown",
                "target=sms1",
                "severity=critical",
                "instance=witness:9469",
            ],
            &["admins-email-and-sms"],
        ),
        // Pacemaker fails over: the pack's failover-labelled alerts are for people here.
        (
            "rapidpro",
            &[
                "alertname=PostgresFailoverNeeded",
                "cluster=rapidpro-db",
                "severity=critical",
                "action=failover",
            ],
            &["admins-email-and-sms"],
        ),
        // SOUNZ: only "no production" reaches the switch recipe on both nodes.
        (
            "sounz",
            &[
                "alertname=StatusFileNoProduction",
                "cluster=sounz",
                "severity=critical",
            ],
            &["sounz-switch", "ops-page"],
        ),
        (
            "sounz",
            &[
                "alertname=StatusFileMultipleProduction",
                "cluster=sounz",
                "severity=critical",
            ],
            &["ops-page"],
        ),
        (
            "sounz",
            &[
                "alertname=ProbeFailing",
                "target=front-page",
                "severity=critical",
            ],
            &["ops-page"],
        ),
        (
            "sounz",
            &[
                "alertname=TextfileStale",
                "file=sounz-dump.prom",
                "severity=warning",
            ],
            &["ops-email"],
        ),
        // Clearwater: no hook at all; quorum pages.
        (
            "clearwater",
            &[
                "alertname=EtcdQuorumLost",
                "cluster=site1",
                "severity=critical",
            ],
            &["ops-page"],
        ),
        (
            "clearwater",
            &[
                "alertname=EtcdMemberDown",
                "cluster=site1",
                "severity=warning",
            ],
            &["ops-email"],
        ),
        // SRE: a failover decision goes to both EMs' repmgr-promote.
        (
            "sre",
            &[
                "alertname=PostgresFailoverNeeded",
                "cluster=sre-db",
                "severity=critical",
                "action=failover",
            ],
            &["sre-em-hooks", "noc-page"],
        ),
        (
            "sre",
            &[
                "alertname=SreInviteRateZero",
                "host=cp1",
                "severity=critical",
            ],
            &["noc-page"],
        ),
        (
            "sre",
            &[
                "alertname=SupervisordProgramNotRunning",
                "program=sre-broker",
                "severity=critical",
            ],
            &["noc-page"],
        ),
        (
            "sre",
            &[
                "alertname=MongodbNoPrimary",
                "cluster=sre_location",
                "severity=critical",
                "action=failover",
            ],
            &["noc-page"],
        ),
        (
            "sre",
            &["alertname=CpOutOfServiceTooLong", "severity=warning"],
            &["noc-email"],
        ),
        // Whiskymedia: the failover decision and HAProxy down reach the recipes; RedisNoMaster,
        // a backend without servers and the application probes only page.
        (
            "whiskymedia",
            &[
                "alertname=RedisFailoverNeeded",
                "cluster=redis-9001",
                "candidate=redis2-9001",
                "severity=critical",
                "action=failover",
            ],
            &["clusterwatch-hooks", "ops-page"],
        ),
        (
            "whiskymedia",
            &[
                "alertname=HaproxyDown",
                "target=haproxy2",
                "severity=critical",
            ],
            &["clusterwatch-hooks", "ops-page"],
        ),
        (
            "whiskymedia",
            &[
                "alertname=ProbeFailing",
                "target=app-7001",
                "severity=critical",
            ],
            &["ops-page"],
        ),
        (
            "whiskymedia",
            &[
                "alertname=RedisNoMaster",
                "cluster=redis-9001",
                "severity=critical",
            ],
            &["ops-page"],
        ),
        (
            "whiskymedia",
            &[
                "alertname=HaproxyBackendNoServerUp",
                "backend=redis-9001",
                "severity=critical",
            ],
            &["ops-page"],
        ),
    ];
    let mut problems = Vec::new();
    for (seed, labels, expected) in cases {
        let got = receivers(seed, labels);
        let want: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        if got != want {
            problems.push(format!(
                "{seed} {labels:?}: routed to {got:?}, expected {want:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The hooks each seed's own configuration would run for an alert, as `clusterwatch hooks
/// replay` decides them (nothing runs): pairs of (alert index, hook name).
fn replayed_hooks(config: &str, alerts: &[Value]) -> BTreeSet<(usize, String)> {
    let dir = temp_dir("cw-seed-replay-").expect("temp dir");
    let payload = dir.path().join("payload.json");
    let body = notification(
        "firing",
        "replay",
        alerts
            .iter()
            .enumerate()
            .map(|(i, labels)| {
                alert(
                    "firing",
                    labels.clone(),
                    &format!("fp{i}"),
                    "2026-01-01T00:00:00Z",
                )
            })
            .collect(),
    );
    std::fs::write(&payload, body.to_string()).expect("payload");
    let mut command =
        Command::new(clusterwatch_tests::harness::clusterwatch::binary().expect("binary"));
    command
        .arg("--config.file")
        .arg(repo_root().join("examples").join(config))
        .args(["hooks", "replay"])
        .arg(&payload);
    let (code, stdout, stderr) = output(command);
    assert_eq!(
        code,
        Some(0),
        "hooks replay with {config}: {stdout}{stderr}"
    );
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    stdout
        .lines()
        .filter(|l| l.contains(" matched "))
        .filter_map(|l| {
            let index = field(l, "fingerprint=fp")?.parse().ok()?;
            Some((index, field(l, "hook=")?))
        })
        .collect()
}

/// Each seed's hook rules pick the recipe its page names, and nothing for the alerts that
/// only notify: the hook runner's own `match`, checked apart from Alertmanager's routing.
#[test]
fn seed_hook_rules_run_the_right_recipe_and_nothing_for_alert_only_checks() {
    /// A configuration, the alerts of one notification, and (alert index, hook) expected.
    type Case<'a> = (&'a str, Vec<Value>, &'a [(usize, &'a str)]);
    let cases: &[Case] = &[
        (
            "rapidpro/master.yml",
            vec![
                json!({"alertname": "ProbeFailing", "target": "uwsgi"}),
                json!({"alertname": "ProbeFailing", "target": "internet-https"}),
                json!({"alertname": "PostgresDown", "target": "sms1"}),
                json!({"alertname": "ProcessMissing", "target": "celerybeat"}),
                json!({"alertname": "VipMissing", "cluster": "rapidpro"}),
                json!({"alertname": "HostFilesystemAboveThreshold", "mountpoint": "/var"}),
            ],
            &[
                (0, "record-failure"),
                (2, "record-failure-postgresql"),
                (3, "record-failure"),
            ],
        ),
        (
            "rapidpro/slave.yml",
            vec![
                json!({"alertname": "ProbeFailing", "target": "postgresql"}),
                json!({"alertname": "ProbeFailing", "target": "internet-http"}),
                json!({"alertname": "ProbeFailing", "target": "nginx-http"}),
            ],
            &[(0, "record-failure")],
        ),
        (
            "sounz/node-b.yml",
            vec![
                json!({"alertname": "StatusFileNoProduction", "cluster": "sounz", "candidate": "megadeth-status"}),
                json!({"alertname": "StatusFileMultipleProduction", "cluster": "sounz"}),
                json!({"alertname": "ProbeFailing", "target": "front-page"}),
                // Not this node's to switch: slayer is the standby, or there is no single one.
                json!({"alertname": "StatusFileNoProduction", "cluster": "sounz", "candidate": "slayer-status"}),
                json!({"alertname": "StatusFileNoProduction", "cluster": "sounz"}),
            ],
            &[(0, "switch-to-production")],
        ),
        (
            "sre/em.yml",
            vec![
                json!({"alertname": "PostgresFailoverNeeded", "cluster": "sre-db", "action": "failover", "candidate": "em1"}),
                json!({"alertname": "MongodbNoPrimary", "cluster": "sre_location", "action": "failover"}),
                json!({"alertname": "PostgresFailoverNeeded", "cluster": "another-db", "action": "failover", "candidate": "em1"}),
                // The rules chose the other EM.
                json!({"alertname": "PostgresFailoverNeeded", "cluster": "sre-db", "action": "failover", "candidate": "em2"}),
            ],
            &[(0, "repmgr-promote")],
        ),
        (
            "whiskymedia/monitor.yml",
            vec![
                json!({"alertname": "RedisFailoverNeeded", "cluster": "redis-9001", "failed": "redis1-9001", "candidate": "redis2-9001", "action": "failover"}),
                json!({"alertname": "RedisFailoverNeeded", "cluster": "redis-9003", "failed": "redis2-9003", "candidate": "redis1-9003", "action": "failover"}),
                json!({"alertname": "HaproxyDown", "target": "haproxy1"}),
                json!({"alertname": "ProbeFailing", "target": "app-7001"}),
                json!({"alertname": "RedisNoMaster", "cluster": "redis-9001"}),
                json!({"alertname": "HaproxyBackendNoServerUp", "backend": "redis-9001"}),
            ],
            &[
                (0, "failed-redis-9001"),
                (1, "failed-redis-9003"),
                (2, "failed-haproxy"),
            ],
        ),
    ];
    let mut problems = Vec::new();
    for (config, alerts, expected) in cases {
        let got = replayed_hooks(config, alerts);
        let want: BTreeSet<(usize, String)> = expected
            .iter()
            .map(|(i, h)| (*i, (*h).to_owned()))
            .collect();
        if got != want {
            problems.push(format!("{config}: runs {got:?}, expected {want:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_hook_recipe_parses_and_has_a_check_mode() {
    for name in [
        "record-failure",
        "switch-to-production",
        "repmgr-promote",
        "failed-redis",
        "failed-haproxy",
    ] {
        let path = hook(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            text.starts_with("#!/bin/sh\n"),
            "{name} is not a POSIX sh script"
        );
        assert!(text.contains("--check"), "{name} has no --check mode");
        let mut command = Command::new("sh");
        command.arg("-n").arg(&path);
        let (code, _, stderr) = output(command);
        assert_eq!(code, Some(0), "{name}: {stderr}");
    }
}

/// Each seed's page maps the runbook row by row, ends every row with its status, and states
/// the counts its table actually has; every alert and hook it names exists.
#[test]
fn every_seed_page_counts_its_rows_and_names_real_alerts_and_hooks() {
    let rules: String = std::fs::read_dir(repo_root().join("rules"))
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .map(|p| std::fs::read_to_string(p).expect("rules file"))
        .collect();
    let mut problems = Vec::new();
    for seed in SEEDS {
        let page = std::fs::read_to_string(seed_dir(seed).join("README.md"))
            .unwrap_or_else(|e| panic!("examples/{seed}/README.md: {e}"));
        let mut counts = [0usize; 3];
        for row in page
            .lines()
            .filter(|l| l.starts_with("| ") && l.ends_with(" |"))
        {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
            let Some(last) = cells.last() else { continue };
            let word = last.split_whitespace().next().unwrap_or_default();
            if let Some(i) = ["covered", "partial", "missing"]
                .iter()
                .position(|w| *w == word)
            {
                counts[i] += 1;
                // The alert column (fourth of seven) names alerts of the pack, or says none.
                if cells.len() == 7 {
                    for name in cells[3].split(|c: char| !c.is_ascii_alphanumeric()) {
                        let camel = name.len() > 6
                            && name.starts_with(|c: char| c.is_ascii_uppercase())
                            && name.chars().skip(1).any(|c| c.is_ascii_uppercase());
                        if camel && !rules.contains(&format!("alert: {name}\n")) {
                            problems.push(format!(
                                "{seed}: `{name}` is not an alert of the pack: {row}"
                            ));
                        }
                    }
                    for name in cells[5].split(|c: char| c == ',' || c == '(' || c.is_whitespace())
                    {
                        let name = name.trim_matches('`');
                        if (name.contains('-') && !name.starts_with('-'))
                            && [
                                "record-failure",
                                "switch-to-production",
                                "repmgr-promote",
                                "failed-redis",
                                "failed-haproxy",
                            ]
                            .iter()
                            .any(|h| name.starts_with(h))
                            && !hook(name.split(' ').next().unwrap_or(name)).exists()
                            && !name.starts_with("record-failure-")
                        {
                            problems.push(format!(
                                "{seed}: hook `{name}` is not in alertmanager/hooks: {row}"
                            ));
                        }
                    }
                }
            }
        }
        let stated = format!(
            "**Coverage: {} covered, {} partial, {} missing** ({} items).",
            counts[0],
            counts[1],
            counts[2],
            counts.iter().sum::<usize>()
        );
        if counts.iter().sum::<usize>() < 15 {
            problems.push(format!(
                "{seed}: only {} mapped items",
                counts.iter().sum::<usize>()
            ));
        }
        if !page.contains(&stated) {
            problems.push(format!("{seed}: the page must say `{stated}`"));
        }
        if !page.contains("## What clusterwatch cannot do here") {
            problems.push(format!("{seed}: no section on what clusterwatch cannot do"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- the recipes on real servers ------------------------------------------------------------

/// Posts `alerts` (labels, fingerprint) as one firing notification, twice (Alertmanager
/// re-sends), and waits until every matched run has ended.
async fn fire_twice(lab: &HookLab, alerts: &[(Value, &str)]) -> Result<()> {
    let body = notification(
        "firing",
        "seed",
        alerts
            .iter()
            .map(|(labels, fp)| alert("firing", labels.clone(), fp, "2026-01-01T00:00:00Z"))
            .collect(),
    )
    .to_string();
    for _ in 0..2 {
        ensure!(
            lab.post(body.clone()).await? == 200,
            "the receiver refused the notification"
        );
    }
    wait_until(WAIT, "every matched run to end", async || {
        let runs: BTreeSet<String> = lab
            .events("matched")
            .iter()
            .map(|r| r["run"].to_string())
            .collect();
        let ended: BTreeSet<String> = lab
            .journal()
            .iter()
            .filter(|r| r["event"] == "finished" || r["event"] == "validate_failed")
            .map(|r| r["run"].to_string())
            .collect();
        Ok(!runs.is_empty() && runs.is_subset(&ended))
    })
    .await
}

/// Whiskymedia: a Redis master and replica behind two HAProxies. While the master answers,
/// failed-redis refuses; once it is killed, a candidate that is not a replica of the group is
/// refused, then one run (despite a re-send) puts it in maintenance on both HAProxies through
/// their runtime API and promotes the replica, and both HAProxies carry writes to the new
/// master.
#[tokio::test(flavor = "multi_thread")]
async fn failed_redis_takes_the_dead_master_out_of_both_haproxies_and_promotes_once() -> Result<()>
{
    let mut redis1 = RedisNode::standalone("redis1-9001", None).await?;
    let redis2 = RedisNode::replica_of("redis2-9001", &redis1).await?;
    redis2.wait_link_up(WAIT).await?;
    let (front1, front2) = (free_port()?, free_port()?);
    let ha1 = Haproxy::start(&redis_backend("redis-9001", front1, &[&redis1, &redis2])).await?;
    let ha2 = Haproxy::start(&redis_backend("redis-9001", front2, &[&redis1, &redis2])).await?;
    for front in [front1, front2] {
        wait_until(WAIT, "HAProxy to send traffic to the master", async || {
            Ok(RedisNode::cli_at(front, &["SET", "k", "before"]).await? == "OK")
        })
        .await?;
    }

    let lab = HookLab::new()?;
    let script = hook("failed-redis");
    let rules = format!(
        "    - name: failed-redis-9001\n      match: {{ alertname: ProbeFailing, cluster: redis-9001 }}\n\
         \x20     validate: [{s}, --check]\n      command: [{s}]\n      disruptive: true\n\
         \x20     env: {{ REDIS_NODES: \"redis1-9001={a1} redis2-9001={a2}\", HAPROXY_SOCKETS: \"{h1} {h2}\" }}\n",
        s = script.display(),
        a1 = redis1.addr(),
        a2 = redis2.addr(),
        h1 = ha1.socket().display(),
        h2 = ha2.socket().display(),
    );
    let _cw = Clusterwatch::start(
        Some(&lab.config("  max_disruptive_per_hour: 5\n", &rules)),
        &[],
    )
    .await?;
    let failed =
        json!({"alertname": "ProbeFailing", "target": "redis1-9001", "cluster": "redis-9001"});

    // The master still answers: a wrong alert must not take it out.
    fire_twice(&lab, &[(failed.clone(), "early")]).await?;
    let refused = lab.events("validate_failed");
    ensure!(
        refused.len() == 1 && refused[0]["outcome"] == "exit 3",
        "{refused:?}"
    );
    ensure!(lab.events("started").is_empty());
    ensure!(ha1.server_status("redis-9001", "redis1-9001").await? == "UP");

    redis1.kill9()?;
    // A failover decision naming a candidate that is not a reachable replica of the group is
    // refused before anything changes (the recipe never second-guesses the decision).
    let mut command = Command::new(&script);
    command
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CW_LABEL_FAILED", "redis1-9001")
        .env("CW_LABEL_CANDIDATE", "redis3-9001")
        .env("CW_LABEL_CLUSTER", "redis-9001")
        .env(
            "REDIS_NODES",
            format!(
                "redis1-9001={} redis2-9001={}",
                redis1.addr(),
                redis2.addr()
            ),
        )
        .env(
            "HAPROXY_SOCKETS",
            format!("{} {}", ha1.socket().display(), ha2.socket().display()),
        );
    let (code, _, stderr) = output(command);
    ensure!(
        code == Some(5) && stderr.contains("redis3-9001 is not a reachable replica"),
        "exit {code:?}: {stderr}"
    );
    ensure!(
        redis2
            .info("replication")
            .await?
            .get("role")
            .map(String::as_str)
            == Some("slave")
    );
    ensure!(ha1.server_status("redis-9001", "redis1-9001").await? != "MAINT");
    fire_twice(&lab, &[(failed, "dead")]).await?;
    let started = lab.events("started");
    let finished = lab.events("finished");
    ensure!(started.len() == 1, "one incident, one run: {started:?}");
    ensure!(
        finished.len() == 1 && finished[0]["result"] == "ok",
        "{finished:?}"
    );

    for ha in [&ha1, &ha2] {
        let status = ha.server_status("redis-9001", "redis1-9001").await?;
        ensure!(
            status == "MAINT",
            "redis1-9001 is {status} on {ha:?}, expected MAINT"
        );
    }
    let role = redis2.info("replication").await?.get("role").cloned();
    ensure!(role.as_deref() == Some("master"), "redis2-9001 is {role:?}");
    for front in [front1, front2] {
        wait_until(
            WAIT,
            "HAProxy to carry writes to the new master",
            async || Ok(RedisNode::cli_at(front, &["SET", "k", "after"]).await? == "OK"),
        )
        .await?;
    }
    // The dead master coming back is never used again: it stays in maintenance.
    redis1.start().await?;
    ensure!(ha1.server_status("redis-9001", "redis1-9001").await? == "MAINT");
    Ok(())
}

/// RapidPro: several components fail at once. record-failure runs once per critical
/// component, with its name, and the tilt runs once; the alert-only check in the same
/// notification runs nothing, and the recipe refuses it even when called directly.
#[tokio::test(flavor = "multi_thread")]
async fn record_failure_records_each_critical_component_once_and_tilts_once() -> Result<()> {
    let lab = HookLab::new()?;
    let tilt = lab.recorder("tilt", "echo \"$1\" >> \"$(dirname \"$0\")/tilt.args\"")?;
    let log = lab.dir().join("failures.log");
    let script = hook("record-failure");
    let rules = format!(
        "    - name: record-failure\n      match_re: {{ alertname: ProbeFailing|ProcessMissing, target: \"nginx-http|uwsgi|celery-worker\" }}\n\
         \x20     validate: [{s}, --check]\n      command: [{s}]\n      disruptive: true\n\
         \x20     env: {{ CRITICAL_COMPONENTS: \"nginx-http uwsgi celery-worker\", FAILURE_LOG: \"{log}\", TILT_COMMAND: \"{tilt}\" }}\n",
        s = script.display(),
        log = log.display(),
        tilt = tilt.display(),
    );
    let _cw = Clusterwatch::start(
        Some(&lab.config("  max_disruptive_per_hour: 6\n", &rules)),
        &[],
    )
    .await?;
    fire_twice(
        &lab,
        &[
            (
                json!({"alertname": "ProbeFailing", "target": "uwsgi"}),
                "c1",
            ),
            (
                json!({"alertname": "ProcessMissing", "target": "celery-worker"}),
                "c2",
            ),
            (
                json!({"alertname": "ProbeFailing", "target": "internet-https"}),
                "c3",
            ),
        ],
    )
    .await?;
    ensure!(lab.events("started").len() == 2, "{:?}", lab.journal());
    let recorded = std::fs::read_to_string(&log)?;
    let components: BTreeSet<&str> = recorded
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    ensure!(
        recorded.lines().count() == 2 && components == BTreeSet::from(["uwsgi", "celery-worker"]),
        "failures recorded:\n{recorded}"
    );
    let tilts = lab.invocations("tilt");
    ensure!(tilts.len() == 1, "the tilt ran {} times", tilts.len());

    // Called directly for an alert-only check, it refuses and records nothing.
    let mut command = Command::new(&script);
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("CW_LABEL_TARGET", "internet-https")
        .env("CRITICAL_COMPONENTS", "nginx-http uwsgi celery-worker")
        .env("FAILURE_LOG", &log);
    let (code, _, stderr) = output(command);
    ensure!(code == Some(2), "exit {code:?}: {stderr}");
    ensure!(std::fs::read_to_string(&log)?.lines().count() == 2);
    Ok(())
}

/// A tiny HTTP server that answers 200 to anything, standing in for a live production front
/// page; it stops when dropped.
struct LiveProduction {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LiveProduction {
    fn start() -> Result<LiveProduction> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        let _ = sock.set_nonblocking(false);
                        let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = sock.read(&mut buf);
                        let _ = sock.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(LiveProduction { port, stop })
    }
}

impl Drop for LiveProduction {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A menu-driven switch script like the site's: it asks for a mode, then whether to fetch
/// data, logs the answers it read and writes the new status.
pub(crate) fn fake_switch_script(dir: &Path, status: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("switch-to-production.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo '1) EMERGENCY  2) Normal  3) Recovery'; printf 'Choice: '\n\
             read choice || exit 9\n\
             echo \"choice=$choice\" >> answers.log\n\
             case $choice in\n\
             1) printf 'Grab the latest data from production? [y/n] '\n\
                read grab || exit 9\n\
                echo \"grab=$grab\" >> answers.log\n\
                echo production_alone > {status} ;;\n\
             2) echo production > {status} ;;\n\
             3) echo standby_as_production > {status} ;;\n\
             *) exit 8 ;;\n\
             esac\n\
             echo \"status now $(cat {status})\"\n",
            status = status.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// SOUNZ: the switch recipe refuses on the production node, refuses while production still
/// answers, refuses when it cannot confirm anything, and otherwise drives the menu on stdin
/// (EMERGENCY, no data fetch) and leaves this node `production_alone`.
#[test]
fn switch_to_production_refuses_unless_standby_and_production_down_then_drives_the_menu(
) -> Result<()> {
    let dir = temp_dir("cw-sounz-")?;
    let status = dir.path().join("sounz.status");
    let menu = fake_switch_script(dir.path(), &status)?;
    let answers = dir.path().join("answers.log");
    let live = LiveProduction::start()?;
    let dead = format!("http://127.0.0.1:{}/", free_port()?);
    let switch = |url: Option<&str>, check: bool| -> (Option<i32>, String) {
        let mut command = Command::new(hook("switch-to-production"));
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("STATUS_FILE", &status)
            .env("SWITCH_SCRIPT", &menu)
            .env("SWITCH_TIMEOUT", "20");
        if let Some(url) = url {
            command.env("PRODUCTION_URL", url);
        }
        if check {
            command.arg("--check");
        }
        let (code, _, stderr) = output(command);
        (code, stderr)
    };

    // On the production node: refused, the menu never runs.
    std::fs::write(&status, "production\n")?;
    let (code, stderr) = switch(Some(&dead), false);
    ensure!(code == Some(2), "production node: exit {code:?}: {stderr}");
    // On the standby while production answers: refused.
    std::fs::write(&status, "standby\n")?;
    let live_url = format!("http://127.0.0.1:{}/", live.port);
    let (code, stderr) = switch(Some(&live_url), false);
    ensure!(
        code == Some(4),
        "production answers: exit {code:?}: {stderr}"
    );
    // Nothing to confirm with: refused.
    let (code, stderr) = switch(None, false);
    ensure!(code == Some(3), "no confirmation: exit {code:?}: {stderr}");
    // --check on an allowed node changes nothing.
    let (code, stderr) = switch(Some(&dead), true);
    ensure!(code == Some(0), "--check: exit {code:?}: {stderr}");
    ensure!(
        !answers.exists(),
        "the menu ran before the switch was allowed"
    );
    ensure!(std::fs::read_to_string(&status)?.trim() == "standby");

    // Standby, production confirmed down: the menu is driven without a terminal.
    let (code, stderr) = switch(Some(&dead), false);
    ensure!(code == Some(0), "switch: exit {code:?}: {stderr}");
    ensure!(std::fs::read_to_string(&answers)? == "choice=1\ngrab=n\n");
    ensure!(std::fs::read_to_string(&status)?.trim() == "production_alone");
    // Run again (a re-send): this node is no longer standby, nothing runs twice.
    let (code, _) = switch(Some(&dead), false);
    ensure!(code == Some(2));
    ensure!(std::fs::read_to_string(&answers)?.lines().count() == 2);
    drop(live);
    Ok(())
}

/// Whiskymedia: failed-haproxy changes nothing and says what is left to do by hand, with the
/// state of the HAProxy that still runs (read through its runtime API).
#[tokio::test(flavor = "multi_thread")]
async fn failed_haproxy_only_notifies_with_the_survivors_state_and_the_manual_steps() -> Result<()>
{
    let redis = RedisNode::standalone("redis1-9001", None).await?;
    let ha = Haproxy::start(&redis_backend("redis-9001", free_port()?, &[&redis])).await?;
    wait_until(WAIT, "the backend server to be UP", async || {
        Ok(ha.server_status("redis-9001", "redis1-9001").await? == "UP")
    })
    .await?;
    let mut command = Command::new(hook("failed-haproxy"));
    command
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CW_LABEL_TARGET", "haproxy1")
        .env(
            "PEER_SOCKETS",
            format!(
                "haproxy1=/nonexistent.sock haproxy2={}",
                ha.socket().display()
            ),
        );
    let (code, stdout, stderr) = output(command);
    if code != Some(0) {
        bail!("exit {code:?}: {stderr}");
    }
    for needle in [
        "HAProxy haproxy1 has failed",
        "haproxy2 answers and serves",
        "redis-9001: 1 of 1 servers up",
        "Nothing was changed automatically",
        "DNS",
    ] {
        ensure!(stdout.contains(needle), "no `{needle}` in:\n{stdout}");
    }
    ensure!(
        !stdout.contains("haproxy1 does not answer"),
        "the failed HAProxy is listed as a peer:\n{stdout}"
    );
    ensure!(ha.server_status("redis-9001", "redis1-9001").await? == "UP");
    Ok(())
}

/// Writes a repmgr configuration for `node` into its directory (readable by `postgres`, who
/// runs repmgr) and returns its path. `name` is the node's name in repmgr, which for a
/// standby must be its `application_name` upstream; `extra` are more lines of settings.
pub(crate) fn repmgr_conf(
    node: &clusterwatch_tests::harness::PgNode,
    id: u32,
    name: &str,
    extra: &str,
) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = node.dir().join("repmgr.conf");
    std::fs::write(
        &path,
        format!(
            "node_id={id}\nnode_name='{name}'\n\
             conninfo='host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2'\n\
             data_directory='{data}'\nlog_level=INFO\n{extra}",
            port = node.port(),
            data = node.data_dir().display(),
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path)
}

/// Runs `repmgr -f CONF ARGS…` as the hook would (as `postgres` when we are root).
pub(crate) async fn repmgr(conf: &Path, args: &[&str]) -> Result<String> {
    let program = repmgr_program()?;
    let mut command = if nix::unistd::Uid::effective().is_root() {
        let mut c = Command::new(find_program("CLUSTERWATCH_RUNUSER", &["runuser"])?);
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    command.arg("-f").arg(conf).args(args);
    run(command, Duration::from_secs(60)).await
}

/// Debian's `repmgr` for the PostgreSQL version the harness runs.
pub(crate) fn repmgr_program() -> Result<PathBuf> {
    let initdb = find_program("CLUSTERWATCH_PG_BINDIR", &["initdb"])?;
    let beside = std::fs::canonicalize(&initdb)?.with_file_name("repmgr");
    if beside.is_file() {
        return Ok(beside);
    }
    find_program("CLUSTERWATCH_REPMGR", &["repmgr"])
}

/// SRE: a real primary and standby registered with repmgr. `repmgr-promote --check` (repmgr's
/// `--dry-run`) refuses while the primary is active; once it is stopped the dry run is clean,
/// and the recipe promotes the standby with `standby promote --siblings-follow`.
/// Waits until the primary's registration has replicated to `standby`: repmgr's `standby
/// register` reads the node table there.
pub(crate) async fn repmgr_primary_registered_on(
    standby: &clusterwatch_tests::harness::PgNode,
) -> Result<()> {
    wait_until(
        WAIT,
        "repmgr's node table to reach the standby",
        async || {
            Ok(standby
                .psql("SELECT count(*) FROM repmgr.nodes")
                .await
                .ok()
                .as_deref()
                == Some("1"))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn repmgr_promote_dry_run_refuses_while_the_primary_lives_then_promotes() -> Result<()> {
    let pair = clusterwatch_tests::harness::PgCluster::start_pair().await?;
    pair.wait_streaming(WAIT).await?;
    let primary_conf = repmgr_conf(&pair.primary, 1, "primary", "")?;
    let standby_conf = repmgr_conf(
        &pair.standby,
        2,
        clusterwatch_tests::harness::postgres::STANDBY_NAME,
        "",
    )?;
    repmgr(&primary_conf, &["primary", "register"]).await?;
    repmgr_primary_registered_on(&pair.standby).await?;
    repmgr(&standby_conf, &["standby", "register"]).await?;

    let promote = |check: bool| {
        let mut command = Command::new(hook("repmgr-promote"));
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("REPMGR", repmgr_program().expect("repmgr"))
            .env("REPMGR_CONF", &standby_conf);
        if check {
            command.arg("--check");
        }
        output(command)
    };

    let (code, _, stderr) = promote(true);
    ensure!(
        code == Some(3) && stderr.contains("active primary"),
        "dry run with a live primary: exit {code:?}\n{stderr}"
    );
    ensure!(pair.standby.psql("SELECT pg_is_in_recovery()").await? == "t");

    pair.primary.stop().await?;
    let (code, _, stderr) = promote(true);
    ensure!(
        code == Some(0),
        "dry run with the primary gone: exit {code:?}\n{stderr}"
    );
    ensure!(
        pair.standby.psql("SELECT pg_is_in_recovery()").await? == "t",
        "--check promoted"
    );
    let (code, _, stderr) = promote(false);
    ensure!(code == Some(0), "promotion: exit {code:?}\n{stderr}");
    ensure!(pair.standby.psql("SELECT pg_is_in_recovery()").await? == "f");
    Ok(())
}
