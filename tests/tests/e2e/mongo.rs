//! The MongoDB collector through a real clusterwatch process: every replica set scenario in
//! every reply shape the stand-in serves, malformed replies, a standalone server, a server
//! that never answers, and a real `mongod` when one is on PATH.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::Exposition;
use clusterwatch_tests::harness::mongo_standin::{
    Malformed, Scenario, Version, MEMBER_B, MEMBER_C, SET_NAME,
};
use clusterwatch_tests::harness::{wait_until, Clusterwatch, MongoStandin};

/// MongoDB's member states, as the collector labels them.
const STATES: &[&str] = &[
    "STARTUP",
    "PRIMARY",
    "SECONDARY",
    "RECOVERING",
    "STARTUP2",
    "UNKNOWN",
    "ARBITER",
    "DOWN",
    "ROLLBACK",
    "REMOVED",
];

async fn scrape(cw: &Clusterwatch) -> Result<Exposition> {
    let (status, _, body) = cw.get("/metrics").await?;
    if !status.is_success() {
        bail!("GET /metrics answered {status}");
    }
    Exposition::parse(&body)
}

fn target_name(v: Version) -> &'static str {
    match v {
        Version::V4_4 => "mongo44",
        Version::V5_0 => "mongo50",
        Version::V7_0 => "mongo70",
    }
}

/// One member as a scenario should show it: name, state, health, lag (None: no series),
/// sync source (None: no series).
type Expected<'a> = (&'a str, &'a str, f64, Option<f64>, Option<&'a str>);

/// What the collector must report for a scenario, from the stand-in's point of view.
struct Expect<'a> {
    own_state: &'a str,
    members: Vec<Expected<'a>>,
    primary: f64,
    healthy_voting: f64,
    term: f64,
    election_age: Option<f64>,
}

fn expectations<'a>(scenario: Scenario, me: &'a str) -> Expect<'a> {
    let e = |own_state, members, primary, healthy_voting, term, election_age| Expect {
        own_state,
        members,
        primary,
        healthy_voting,
        term,
        election_age,
    };
    match scenario {
        Scenario::Healthy => e(
            "PRIMARY",
            vec![
                (me, "PRIMARY", 1.0, Some(0.0), Some("")),
                (MEMBER_B, "SECONDARY", 1.0, Some(0.0), Some(me)),
                (MEMBER_C, "SECONDARY", 1.0, Some(3.0), Some(MEMBER_B)),
            ],
            1.0,
            3.0,
            3.0,
            Some(86_000.0),
        ),
        Scenario::PrimaryDown => e(
            "PRIMARY",
            vec![
                (me, "PRIMARY", 1.0, Some(0.0), Some("")),
                (MEMBER_B, "DOWN", 0.0, None, Some("")),
                (MEMBER_C, "SECONDARY", 1.0, Some(1.0), Some(me)),
            ],
            1.0,
            2.0,
            4.0,
            Some(20.0),
        ),
        Scenario::NoPrimary => e(
            "SECONDARY",
            vec![
                (me, "SECONDARY", 1.0, None, Some("")),
                (MEMBER_B, "DOWN", 0.0, None, Some("")),
                (MEMBER_C, "DOWN", 0.0, None, Some("")),
            ],
            0.0,
            1.0,
            3.0,
            None,
        ),
        Scenario::Recovering => e(
            "PRIMARY",
            vec![
                (me, "PRIMARY", 1.0, Some(0.0), Some("")),
                (MEMBER_B, "SECONDARY", 1.0, Some(0.0), Some(me)),
                (MEMBER_C, "RECOVERING", 1.0, Some(120.0), Some("")),
            ],
            1.0,
            3.0,
            3.0,
            Some(86_000.0),
        ),
        Scenario::Arbiter => e(
            "PRIMARY",
            vec![
                (me, "PRIMARY", 1.0, Some(0.0), Some("")),
                (MEMBER_B, "SECONDARY", 1.0, Some(0.0), Some(me)),
                (MEMBER_C, "ARBITER", 1.0, None, None),
            ],
            1.0,
            3.0,
            3.0,
            Some(86_000.0),
        ),
        Scenario::EmptySyncSource => e(
            "PRIMARY",
            vec![
                (me, "PRIMARY", 1.0, Some(0.0), Some("")),
                (MEMBER_B, "SECONDARY", 1.0, Some(30.0), Some("")),
                (MEMBER_C, "SECONDARY", 1.0, Some(0.0), Some(me)),
            ],
            1.0,
            3.0,
            3.0,
            Some(86_000.0),
        ),
        other => panic!("no expectations for {other:?}"),
    }
}

/// Checks one target's view of the set against what the scenario should show.
fn check_set(m: &Exposition, target: &str, me: &str, scenario: Scenario) -> Result<()> {
    let x = expectations(scenario, me);
    let t = ("target", target);
    let ctx = || format!("{target} in {scenario:?}");
    let value = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![t];
        all.extend_from_slice(labels);
        m.value(name, &all)
    };
    assert_eq!(value("clusterwatch_target_up", &[]), Some(1.0), "{}", ctx());
    assert_eq!(
        value("clusterwatch_mongo_replset_enabled", &[]),
        Some(1.0),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_replset_info", &[("set", SET_NAME)]),
        Some(1.0),
        "{}",
        ctx()
    );
    for state in STATES {
        let want = if *state == x.own_state { 1.0 } else { 0.0 };
        assert_eq!(
            value("clusterwatch_mongo_state", &[("state", state)]),
            Some(want),
            "own state {state}, {}",
            ctx()
        );
    }
    assert_eq!(
        value("clusterwatch_mongo_members", &[]),
        Some(3.0),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_primary_present", &[]),
        Some(x.primary),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_majority_vote_count", &[]),
        Some(2.0),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_voting_members", &[]),
        Some(3.0),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_healthy_voting_members", &[]),
        Some(x.healthy_voting),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_term", &[]),
        Some(x.term),
        "{}",
        ctx()
    );
    assert_eq!(
        value("clusterwatch_mongo_status_anomalies", &[]),
        Some(0.0),
        "{}",
        ctx()
    );
    let election = value("clusterwatch_mongo_election_date_seconds", &[]);
    match x.election_age {
        Some(age) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs_f64();
            let seen = now - election.with_context(|| format!("no election date, {}", ctx()))?;
            assert!(
                (seen - age).abs() < 60.0,
                "election {seen} s ago, want {age}, {}",
                ctx()
            );
        }
        None => assert_eq!(election, None, "{}", ctx()),
    }
    for (member, state, health, lag, sync) in &x.members {
        let mm = ("member", *member);
        for s in STATES {
            let want = if s == state { 1.0 } else { 0.0 };
            assert_eq!(
                value("clusterwatch_mongo_member_state", &[mm, ("state", s)]),
                Some(want),
                "{member} state {s}, {}",
                ctx()
            );
        }
        assert_eq!(
            value("clusterwatch_mongo_member_health", &[mm]),
            Some(*health),
            "{member}, {}",
            ctx()
        );
        assert_eq!(
            value("clusterwatch_mongo_member_replication_lag_seconds", &[mm]),
            *lag,
            "{member} lag, {}",
            ctx()
        );
        let sources = m.find("clusterwatch_mongo_member_sync_source_info", &[t, mm]);
        let seen: Option<&str> = sources.first().map(|s| s.labels["sync_source"].as_str());
        assert_eq!(seen, *sync, "{member} sync source, {}", ctx());
        let ping = value("clusterwatch_mongo_member_ping_seconds", &[mm]);
        if *member == me {
            assert_eq!(ping, None, "no ping to itself, {}", ctx());
        } else {
            assert!(
                ping.is_some_and(|p| (0.0..1.0).contains(&p)),
                "{member} ping {ping:?}, {}",
                ctx()
            );
        }
    }
    Ok(())
}

/// Three stand-ins (4.4, 5.0, 7.0 shapes) behind one exporter, switched together.
struct Rig {
    standins: Vec<(Version, MongoStandin)>,
    cw: Clusterwatch,
}

impl Rig {
    async fn start(timeout: &str, extra_yaml: &str) -> Result<Rig> {
        let mut standins = Vec::new();
        let mut yaml = format!("global:\n  timeout: {timeout}\nmongodb:\n");
        for v in Version::ALL {
            let s = MongoStandin::start(v, Scenario::Healthy)?;
            yaml.push_str(&format!(
                "  - {{ name: {}, cluster: rs0, uri: '{}' }}\n",
                target_name(v),
                s.uri()
            ));
            standins.push((v, s));
        }
        yaml.push_str(extra_yaml);
        let cw = Clusterwatch::start(Some(&yaml), &[]).await?;
        Ok(Rig { standins, cw })
    }

    fn set(&self, scenario: Scenario) {
        for (v, s) in &self.standins {
            s.set(*v, scenario);
        }
    }

    /// Scrapes until every stand-in's target is up (the driver notices a changed hello on
    /// its own schedule), returning that scrape.
    async fn scrape_when_up(&self, what: &str) -> Result<Exposition> {
        let mut last = None;
        wait_until(Duration::from_secs(20), what, async || {
            let m = scrape(&self.cw).await?;
            let up = self.standins.iter().all(|(v, _)| {
                m.value("clusterwatch_target_up", &[("target", target_name(*v))]) == Some(1.0)
            });
            last = Some(m);
            Ok(up)
        })
        .await?;
        last.context("no scrape")
    }

    fn assert_no_panic(&mut self) {
        let logs = self.cw.logs();
        assert!(!logs.contains("panicked"), "clusterwatch panicked:\n{logs}");
        assert!(
            self.cw.process().is_running(),
            "clusterwatch exited:\n{logs}"
        );
    }
}

#[tokio::test]
async fn every_scenario_in_every_version_gives_the_right_states_lags_and_counts() -> Result<()> {
    let mut rig = Rig::start("3s", "").await?;
    for scenario in Scenario::SETS {
        rig.set(scenario);
        // replSetGetStatus is read on every scrape, so the first scrape after the switch
        // shows the new scenario.
        let m = rig.scrape_when_up(&format!("{scenario:?}")).await?;
        for (v, s) in &rig.standins {
            check_set(&m, target_name(*v), &s.addr().to_string(), scenario)?;
            assert_eq!(
                m.value(
                    "clusterwatch_mongo_info",
                    &[("target", target_name(*v)), ("version", v.release())]
                ),
                Some(1.0)
            );
        }
    }
    rig.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn malformed_replies_are_reported_without_panics() -> Result<()> {
    let mut rig = Rig::start("3s", "").await?;
    let cases = [
        (Malformed::MissingOptime, 1.0),
        (Malformed::UnknownState, 1.0),
        (Malformed::ExtraFields, 0.0),
        (Malformed::WrongTypes, 3.0),
    ];
    for (kind, anomalies) in cases {
        rig.set(Scenario::Malformed(kind));
        let m = rig.scrape_when_up(&format!("{kind:?}")).await?;
        for (v, s) in &rig.standins {
            let t = ("target", target_name(*v));
            let ctx = format!("{} with {kind:?}", t.1);
            assert_eq!(
                m.value("clusterwatch_mongo_status_anomalies", &[t]),
                Some(anomalies),
                "{ctx}"
            );
            assert_eq!(
                m.value("clusterwatch_mongo_primary_present", &[t]),
                Some(1.0),
                "{ctx}"
            );
            let c = ("member", MEMBER_C);
            let b = ("member", MEMBER_B);
            let me = s.addr().to_string();
            assert_eq!(
                m.value(
                    "clusterwatch_mongo_member_replication_lag_seconds",
                    &[t, ("member", &me)]
                ),
                Some(0.0),
                "{ctx}"
            );
            match kind {
                Malformed::MissingOptime => {
                    assert_eq!(
                        m.value("clusterwatch_mongo_member_replication_lag_seconds", &[t, c]),
                        None,
                        "{ctx}"
                    );
                }
                Malformed::UnknownState => {
                    let states = m.find("clusterwatch_mongo_member_state", &[t, c]);
                    assert_eq!(states.len(), STATES.len(), "{ctx}");
                    assert!(states.iter().all(|s| s.value == 0.0), "{ctx}: {states:?}");
                    assert_eq!(
                        m.value("clusterwatch_mongo_healthy_voting_members", &[t]),
                        Some(2.0),
                        "{ctx}"
                    );
                }
                Malformed::ExtraFields => {
                    assert_eq!(
                        m.value("clusterwatch_mongo_member_replication_lag_seconds", &[t, c]),
                        Some(3.0),
                        "{ctx}"
                    );
                }
                Malformed::WrongTypes => {
                    assert_eq!(m.value("clusterwatch_mongo_term", &[t]), None, "{ctx}");
                    assert_eq!(
                        m.value("clusterwatch_mongo_member_health", &[t, b]),
                        None,
                        "{ctx}"
                    );
                    assert_eq!(
                        m.value("clusterwatch_mongo_member_ping_seconds", &[t, c]),
                        None,
                        "{ctx}"
                    );
                    assert_eq!(
                        m.value(
                            "clusterwatch_mongo_member_state",
                            &[t, c, ("state", "SECONDARY")]
                        ),
                        Some(1.0),
                        "{ctx}"
                    );
                }
                Malformed::NoMembers => unreachable!(),
            }
        }
    }

    // A reply without members cannot be used: the target is down with reason `protocol`.
    rig.set(Scenario::Malformed(Malformed::NoMembers));
    let m = scrape(&rig.cw).await?;
    for (v, _) in &rig.standins {
        let t = ("target", target_name(*v));
        assert_eq!(
            m.value("clusterwatch_target_up", &[t]),
            Some(0.0),
            "{}",
            t.1
        );
        assert!(
            m.find("clusterwatch_mongo_member_state", &[t]).is_empty(),
            "no half target"
        );
        let protocol = m.value(
            "clusterwatch_target_scrape_errors_total",
            &[t, ("reason", "protocol")],
        );
        assert!(protocol.is_some_and(|n| n >= 1.0), "{}: {protocol:?}", t.1);
    }
    rig.set(Scenario::Healthy);
    rig.scrape_when_up("recovery from an unusable reply")
        .await?;
    rig.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn a_standalone_server_is_reported_as_such_not_as_an_error() -> Result<()> {
    let mut rig = Rig::start("3s", "").await?;
    rig.set(Scenario::Standalone);
    // The driver learns from its next hello that the server left the set; until then the
    // target may be up with the old topology, so wait for the new answer.
    let mut last = None;
    wait_until(
        Duration::from_secs(20),
        "every target standalone",
        async || {
            let m = scrape(&rig.cw).await?;
            let all = rig.standins.iter().all(|(v, _)| {
                m.value(
                    "clusterwatch_mongo_replset_enabled",
                    &[("target", target_name(*v))],
                ) == Some(0.0)
            });
            last = Some(m);
            Ok(all)
        },
    )
    .await?;
    let m = last.context("no scrape")?;
    for (v, _) in &rig.standins {
        let t = ("target", target_name(*v));
        assert_eq!(m.value("clusterwatch_target_up", &[t]), Some(1.0));
        assert!(m.find("clusterwatch_mongo_member_state", &[t]).is_empty());
        assert!(m
            .find("clusterwatch_mongo_primary_present", &[t])
            .is_empty());
        for reason in ["query", "protocol"] {
            assert_eq!(
                m.value(
                    "clusterwatch_target_scrape_errors_total",
                    &[t, ("reason", reason)]
                ),
                Some(0.0)
            );
        }
    }
    // Back into a set: the same client picks it up.
    rig.set(Scenario::Healthy);
    wait_until(Duration::from_secs(20), "back in the set", async || {
        let m = scrape(&rig.cw).await?;
        Ok(rig.standins.iter().all(|(v, _)| {
            m.value(
                "clusterwatch_mongo_primary_present",
                &[("target", target_name(*v))],
            ) == Some(1.0)
        }))
    })
    .await?;
    rig.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn a_server_that_never_answers_costs_only_its_deadline() -> Result<()> {
    let silent = MongoStandin::start(Version::V7_0, Scenario::Healthy)?;
    let mut rig = Rig::start(
        "2s",
        &format!(
            "  - {{ name: silent, cluster: rs1, uri: '{}' }}\n",
            silent.uri()
        ),
    )
    .await?;
    // Connected and answering first, then silent mid-conversation: the hard case.
    wait_until(
        Duration::from_secs(20),
        "the silent target up first",
        async || {
            let m = scrape(&rig.cw).await?;
            Ok(m.value("clusterwatch_target_up", &[("target", "silent")]) == Some(1.0))
        },
    )
    .await?;
    silent.set(Version::V7_0, Scenario::Silent);
    for _ in 0..2 {
        let started = Instant::now();
        let m = scrape(&rig.cw).await?;
        let took = started.elapsed();
        assert!(
            took <= Duration::from_millis(2500),
            "scrape took {took:?}, deadline 2 s"
        );
        assert_eq!(
            m.value("clusterwatch_target_up", &[("target", "silent")]),
            Some(0.0)
        );
        assert!(m
            .find("clusterwatch_mongo_state", &[("target", "silent")])
            .is_empty());
        for (v, _) in &rig.standins {
            assert_eq!(
                m.value("clusterwatch_target_up", &[("target", target_name(*v))]),
                Some(1.0),
                "the others are still reported"
            );
        }
        let errors: f64 = m
            .find(
                "clusterwatch_target_scrape_errors_total",
                &[("target", "silent")],
            )
            .iter()
            .map(|s| s.value)
            .sum();
        assert!(errors >= 1.0);
    }
    silent.set(Version::V7_0, Scenario::Healthy);
    wait_until(
        Duration::from_secs(30),
        "the silent target back",
        async || {
            let m = scrape(&rig.cw).await?;
            Ok(m.value("clusterwatch_target_up", &[("target", "silent")]) == Some(1.0))
        },
    )
    .await?;
    rig.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn wrong_credentials_are_an_auth_failure_and_the_password_stays_secret() -> Result<()> {
    let standin = MongoStandin::start(Version::V7_0, Scenario::Healthy)?;
    let dir = tempfile::tempdir()?;
    let password = "mongo-s3cret-pw";
    let pass_file = dir.path().join("mongo.pass");
    std::fs::write(&pass_file, format!("{password}\n"))?;
    let yaml = format!(
        "global:\n  timeout: 3s\nmongodb:\n  - {{ name: authed, uri: '{}', username: monitor, password_file: '{}' }}\n",
        standin.uri(),
        pass_file.display()
    );
    let cw = Clusterwatch::start(Some(&yaml), &[]).await?;
    wait_until(
        Duration::from_secs(20),
        "an auth failure counted",
        async || {
            let m = scrape(&cw).await?;
            Ok(m.value(
                "clusterwatch_target_scrape_errors_total",
                &[("target", "authed"), ("reason", "auth")],
            )
            .is_some_and(|n| n >= 1.0))
        },
    )
    .await?;
    let (_, _, body) = cw.get("/metrics").await?;
    let (_, _, landing) = cw.get("/").await?;
    for text in [body, landing, cw.logs()] {
        assert!(!text.contains(password), "password leaked:\n{text}");
    }
    assert!(
        standin.commands().iter().any(|c| c == "saslstart"),
        "the driver tried to authenticate: {:?}",
        standin.commands()
    );
    Ok(())
}

/// The same checks against a real server, when one is installed. MongoDB is not packaged
/// for Debian, so on most machines this prints why it did not run.
#[tokio::test]
async fn a_real_mongod_single_member_set_is_primary() -> Result<()> {
    use clusterwatch_tests::harness::mongod::Mongod;
    let Some(mongod) = Mongod::find() else {
        eprintln!("SKIPPED: no `mongod` on PATH (or CLUSTERWATCH_MONGOD); the stand-in tests above cover the collector");
        return Ok(());
    };
    let standalone = Mongod::start(&mongod, None).await?;
    let set = Mongod::start(&mongod, Some("rs0")).await?;
    set.initiate().await?;
    let yaml = format!(
        "global:\n  timeout: 5s\nmongodb:\n  - {{ name: standalone, uri: '{}' }}\n  - {{ name: member, cluster: rs0, uri: '{}' }}\n",
        standalone.uri(),
        set.uri()
    );
    let cw = Clusterwatch::start(Some(&yaml), &[]).await?;
    let me = set.addr();
    wait_until(
        Duration::from_secs(60),
        "the real member to be primary",
        async || {
            let m = scrape(&cw).await?;
            Ok(m.value(
                "clusterwatch_mongo_state",
                &[("target", "member"), ("state", "PRIMARY")],
            ) == Some(1.0))
        },
    )
    .await?;
    let m = scrape(&cw).await?;
    let t = ("target", "member");
    assert_eq!(
        m.value("clusterwatch_mongo_replset_info", &[t, ("set", "rs0")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_mongo_primary_present", &[t]),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_mongo_member_state",
            &[t, ("member", &me), ("state", "PRIMARY")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "clusterwatch_mongo_member_replication_lag_seconds",
            &[t, ("member", &me)]
        ),
        Some(0.0)
    );
    assert_eq!(
        m.value("clusterwatch_mongo_majority_vote_count", &[t]),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_mongo_healthy_voting_members", &[t]),
        Some(1.0)
    );
    assert_eq!(
        m.value("clusterwatch_mongo_status_anomalies", &[t]),
        Some(0.0)
    );
    let s = ("target", "standalone");
    assert_eq!(m.value("clusterwatch_target_up", &[s]), Some(1.0));
    assert_eq!(
        m.value("clusterwatch_mongo_replset_enabled", &[s]),
        Some(0.0)
    );
    Ok(())
}
