//! Tests of the PostgreSQL collector: its configuration, and the samples made from rows
//! captured from a real PostgreSQL 15 primary and standby in `testdata/pg/NAME.json` (how to
//! re-capture: `tests/tests/e2e/postgres_fixtures.rs`), with a golden exposition per capture.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::rows::{ReplicationRow, Scrape};
use super::samples::{self, Memory, ReplayTracker};
use crate::configuration::parse;
use crate::snapshot::SampleBuffer;

#[test]
fn dsn_is_never_echoed_and_password_file_is_checked() {
    let yaml = "postgres:\n  - name: a\n    dsn: 'postgresql://mon:s3cret@[bad'\n  - name: b\n    dsn: postgresql://mon@127.0.0.1/postgres\n    password_file: /nonexistent/pg.pass\n  - name: b\n    dsn: postgresql://mon@127.0.0.1/postgres\n";
    let err = parse(yaml, "c.yml", Path::new(".")).unwrap_err();
    let text = err.render();
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains("c.yml:3:5: postgres[0].dsn: not a valid PostgreSQL connection string"),
        "{text}"
    );
    assert!(
        text.contains(
            "c.yml:6:5: postgres[1].password_file: cannot read secret file /nonexistent/pg.pass"
        ),
        "{text}"
    );
    assert!(
        text.contains("postgres[2].name: duplicate pg target name `b`"),
        "{text}"
    );
}

#[test]
fn replay_lag_counts_from_when_unreplayed_wal_arrived() {
    let mut t = ReplayTracker::default();
    assert_eq!(t.observe(100.0, 500.0, 500.0), 0.0, "caught up");
    // A small record arrives on an idle standby: seen now, so no lag yet.
    assert_eq!(t.observe(115.0, 600.0, 500.0), 0.0);
    // Replayed by the next scrape.
    assert_eq!(t.observe(130.0, 600.0, 600.0), 0.0);
    // Replay stalls while WAL keeps arriving: lag grows from when it first fell behind.
    assert_eq!(t.observe(145.0, 700.0, 600.0), 0.0);
    assert_eq!(t.observe(160.0, 800.0, 600.0), 15.0);
    assert_eq!(t.observe(175.0, 900.0, 600.0), 30.0);
    // Replay moves on past what had arrived at 145: the oldest unreplayed came at 160.
    assert_eq!(t.observe(190.0, 900.0, 750.0), 30.0);
    assert_eq!(t.observe(205.0, 900.0, 900.0), 0.0);
}

#[test]
fn valid_target_keeps_cluster_and_timeout() {
    let yaml = "postgres:\n  - { name: em1, cluster: sre-db, dsn: 'host=127.0.0.1 user=monitor', timeout: 2s, expected_standbys: 1 }\n";
    let cfg = parse(yaml, "c.yml", Path::new(".")).unwrap();
    let pg = cfg.targets.iter().find(|t| t.name() == "pg").unwrap();
    assert_eq!(pg.target(), "em1");
    assert_eq!(pg.cluster(), Some("sre-db"));
    assert_eq!(pg.timeout(), Some(Duration::from_secs(2)));
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/collector/testdata/pg")
}

/// The rows captured in state `name`.
fn load(name: &str) -> Scrape {
    let path = testdata().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The samples of consecutive scrapes of one server, as the collector keeps its memory.
fn scrape_in_turn(scrapes: &[Scrape]) -> Vec<SampleBuffer> {
    let mut memory = Memory::default();
    scrapes
        .iter()
        .map(|scrape| {
            let mut out = SampleBuffer::new();
            samples::write(scrape, &mut memory, Some(1), &mut out);
            out
        })
        .collect()
}

/// The samples of the first scrape of a server in state `name`.
fn first_scrape(name: &str) -> SampleBuffer {
    scrape_in_turn(&[load(name)]).remove(0)
}

/// The value of the one series of `family` carrying all of `labels`.
fn value(out: &SampleBuffer, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = out
        .get(family)?
        .samples
        .iter()
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .collect();
    assert!(
        matching.len() <= 1,
        "{family} {labels:?} matches {matching:?}"
    );
    matching.first().copied()
}

fn query_ok(out: &SampleBuffer, group: &str) -> Option<f64> {
    value(out, "clusterwatch_pg_query_success", &[("query", group)])
}

/// The one state of a state-set at 1, checking that every other state is present at 0.
fn current_state(out: &SampleBuffer, family: &str, state_label: &str) -> Option<String> {
    let samples = &out.get(family)?.samples;
    let on: Vec<&str> = samples
        .iter()
        .filter(|s| s.value == 1.0)
        .flat_map(|s| s.labels.iter().filter(|(k, _)| k == state_label))
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(samples.iter().all(|s| s.value == 0.0 || s.value == 1.0));
    assert!(on.len() <= 1, "{family}: {on:?} all at 1");
    on.first().map(|s| s.to_string())
}

#[test]
fn a_primary_reports_its_role_identity_and_position() {
    let primary = first_scrape("primary-streaming");
    let standby = first_scrape("standby-streaming");
    assert_eq!(
        current_state(&primary, "clusterwatch_pg_role", "role").as_deref(),
        Some("primary")
    );
    assert_eq!(
        current_state(&standby, "clusterwatch_pg_role", "role").as_deref(),
        Some("standby")
    );
    let identity = |out: &SampleBuffer| {
        out.get("clusterwatch_pg_info").unwrap().samples[0]
            .labels
            .iter()
            .find(|(k, _)| k == "system_identifier")
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert!(!identity(&primary).is_empty());
    assert_eq!(identity(&primary), identity(&standby), "one cluster");
    assert_eq!(
        value(&primary, "clusterwatch_pg_timeline_id", &[]),
        Some(1.0)
    );
    assert!(value(&primary, "clusterwatch_pg_wal_lsn_bytes", &[]).unwrap() > 0.0);
    assert_eq!(
        value(&primary, "clusterwatch_pg_wal_receive_lsn_bytes", &[]),
        None
    );
    assert_eq!(
        value(&primary, "clusterwatch_pg_expected_standbys", &[]),
        Some(1.0)
    );
}

#[test]
fn an_idle_pair_shows_zero_lag_from_both_sides() {
    let primary = first_scrape("primary-streaming");
    let standby = first_scrape("standby-streaming");
    let standby1 = [
        ("application_name", "standby1"),
        ("client_addr", "127.0.0.1"),
    ];
    assert_eq!(
        current_state(&primary, "clusterwatch_pg_replication_state", "state").as_deref(),
        Some("streaming")
    );
    assert_eq!(
        value(&primary, "clusterwatch_pg_walsenders", &[]),
        Some(1.0)
    );
    for stage in ["sent", "write", "flush", "replay"] {
        let mut labels = standby1.to_vec();
        labels.push(("stage", stage));
        assert_eq!(
            value(&primary, "clusterwatch_pg_replication_lag_bytes", &labels),
            Some(0.0),
            "{stage}"
        );
    }
    assert_eq!(
        value(&standby, "clusterwatch_pg_replay_lag_bytes", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&standby, "clusterwatch_pg_replay_lag_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(
        current_state(&standby, "clusterwatch_pg_wal_receiver_status", "status").as_deref(),
        Some("streaming")
    );
    assert_eq!(
        value(
            &standby,
            "clusterwatch_pg_upstream_info",
            &[("upstream_host", "127.0.0.1")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &primary,
            "clusterwatch_pg_slot_active",
            &[("slot_name", "standby1")]
        ),
        Some(1.0)
    );
}

#[test]
fn lag_seconds_cleared_by_an_idle_streaming_standby_read_as_zero() {
    // PostgreSQL sets write/flush/replay_lag to NULL once a standby has caught up and gone
    // idle for a while; the capture caught the moment before.
    let mut scrape = load("primary-streaming");
    let row = &mut scrape.replication.as_mut().unwrap()[0];
    (
        row.write_lag_seconds,
        row.flush_lag_seconds,
        row.replay_lag_seconds,
    ) = (None, None, None);
    let out = scrape_in_turn(&[scrape]).remove(0);
    for stage in ["write", "flush", "replay"] {
        assert_eq!(
            value(
                &out,
                "clusterwatch_pg_replication_lag_seconds",
                &[("stage", stage)]
            ),
            Some(0.0),
            "{stage}"
        );
    }
}

#[test]
fn two_sender_rows_for_one_standby_make_one_series_set_preferring_streaming() {
    let mut scrape = load("primary-streaming");
    let rows = scrape.replication.as_mut().unwrap();
    let stale = ReplicationRow {
        state: "catchup".into(),
        sent_lag_bytes: Some(4096.0),
        ..rows[0].clone()
    };
    rows.insert(0, stale);
    let out = scrape_in_turn(&[scrape]).remove(0);
    assert_eq!(value(&out, "clusterwatch_pg_walsenders", &[]), Some(2.0));
    assert_eq!(
        current_state(&out, "clusterwatch_pg_replication_state", "state").as_deref(),
        Some("streaming")
    );
    assert_eq!(
        value(
            &out,
            "clusterwatch_pg_replication_lag_bytes",
            &[("stage", "sent")]
        ),
        Some(0.0)
    );
}

#[test]
fn lag_grows_while_the_upstream_link_is_down() {
    let names = [
        "standby-streaming",
        "standby-repmgr",
        "standby-link-down",
        "standby-link-down-later",
    ];
    let scrapes: Vec<Scrape> = names.iter().map(|n| load(n)).collect();
    let outs = scrape_in_turn(&scrapes);
    let (before, down, later) = (&scrapes[1], &scrapes[2], &scrapes[3]);
    let last_heard = before.wal_receiver.as_ref().unwrap()[0]
        .last_msg_receipt_time
        .unwrap();
    assert_eq!(
        current_state(&outs[2], "clusterwatch_pg_wal_receiver_status", "status").as_deref(),
        Some("stopped")
    );
    let lag = |i: usize| value(&outs[i], "clusterwatch_pg_replay_lag_seconds", &[]).unwrap();
    let age = |i: usize| {
        value(
            &outs[i],
            "clusterwatch_pg_wal_receiver_last_message_age_seconds",
            &[],
        )
        .unwrap()
    };
    assert_eq!(lag(1), 0.0, "streaming and caught up");
    assert_eq!(lag(2), down.status.server_time - last_heard);
    assert_eq!(age(2), lag(2));
    let elapsed = later.status.server_time - down.status.server_time;
    assert!(elapsed >= 3.0, "{elapsed}");
    assert!(
        (lag(3) - lag(2) - elapsed).abs() < 1e-6,
        "{} {}",
        lag(2),
        lag(3)
    );
    assert!((age(3) - age(2) - elapsed).abs() < 1e-6);
    assert_eq!(
        value(&outs[3], "clusterwatch_pg_replay_lag_bytes", &[]),
        Some(0.0)
    );
}

#[test]
fn a_link_found_down_counts_from_the_last_replayed_transaction() {
    let scrape = load("standby-link-down");
    let out = scrape_in_turn(std::slice::from_ref(&scrape)).remove(0);
    let replayed = scrape.status.last_replay_time.unwrap();
    assert_eq!(
        value(&out, "clusterwatch_pg_replay_lag_seconds", &[]),
        Some(scrape.status.server_time - replayed)
    );
    assert_eq!(value(&out, "clusterwatch_pg_upstream_info", &[]), None);
    // No receiver: the timeline comes from the last checkpoint.
    assert_eq!(value(&out, "clusterwatch_pg_timeline_id", &[]), Some(1.0));
}

#[test]
fn a_failing_archive_command_shows_as_failures_and_a_backlog() {
    let failing = first_scrape("primary-archiver-failing");
    let healthy = first_scrape("primary-streaming");
    assert!(value(&failing, "clusterwatch_pg_archiver_failed_total", &[]).unwrap() >= 1.0);
    assert!(value(&failing, "clusterwatch_pg_archiver_ready_files", &[]).unwrap() >= 1.0);
    assert!(value(
        &failing,
        "clusterwatch_pg_archiver_last_failed_age_seconds",
        &[]
    )
    .is_some());
    assert!(
        value(
            &failing,
            "clusterwatch_pg_archiver_oldest_ready_age_seconds",
            &[]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        value(&healthy, "clusterwatch_pg_archiver_failed_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&healthy, "clusterwatch_pg_archiver_ready_files", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &healthy,
            "clusterwatch_pg_archiver_last_failed_age_seconds",
            &[]
        ),
        None
    );
    assert_eq!(
        value(&healthy, "clusterwatch_pg_archiver_enabled", &[]),
        Some(1.0)
    );
}

#[test]
fn repmgr_node_table_gives_role_activity_and_upstream_per_node() {
    for name in ["primary-repmgr", "standby-repmgr"] {
        let out = first_scrape(name);
        assert_eq!(query_ok(&out, "repmgr"), Some(1.0), "{name}");
        let role = |node: &str, role: &str| {
            value(
                &out,
                "clusterwatch_pg_repmgr_node_role",
                &[("node_name", node), ("role", role)],
            )
        };
        assert_eq!(role("node1", "primary"), Some(1.0), "{name}");
        assert_eq!(role("node1", "standby"), Some(0.0), "{name}");
        assert_eq!(role("node2", "standby"), Some(1.0), "{name}");
        assert_eq!(role("node2", "witness"), Some(0.0), "{name}");
        assert_eq!(
            value(
                &out,
                "clusterwatch_pg_repmgr_node_active",
                &[("node_name", "node2")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &out,
                "clusterwatch_pg_repmgr_node_upstream_info",
                &[("node_name", "node2"), ("upstream", "node1")]
            ),
            Some(1.0)
        );
    }
    // No repmgr schema: no series, not even a failing query.
    assert_eq!(query_ok(&first_scrape("primary-streaming"), "repmgr"), None);
}

#[test]
fn an_unreadable_repmgr_table_is_a_failed_group_not_a_failed_scrape() {
    let scrape = load("primary-repmgr-not-granted");
    assert!(scrape
        .repmgr
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap_err()
        .is_permission());
    let out = scrape_in_turn(&[scrape]).remove(0);
    assert_eq!(query_ok(&out, "repmgr"), Some(0.0));
    assert!(out.get("clusterwatch_pg_repmgr_node_role").is_none());
    assert_eq!(query_ok(&out, "replication"), Some(1.0));
    assert_eq!(
        current_state(&out, "clusterwatch_pg_role", "role").as_deref(),
        Some("primary")
    );
}

#[test]
fn a_role_without_pg_monitor_gets_what_it_may_read_and_the_failures_named() {
    for name in ["primary-no-pg-monitor", "standby-no-pg-monitor"] {
        let scrape = load(name);
        for failed in [
            &scrape.wal_dir.as_ref().err(),
            &scrape.archive_status.as_ref().err(),
        ] {
            assert!(failed.is_some_and(|e| e.is_permission()), "{name}");
        }
        let out = scrape_in_turn(&[scrape]).remove(0);
        for group in ["wal_dir", "archive_status", "sizes"] {
            assert_eq!(query_ok(&out, group), Some(0.0), "{name} {group}");
        }
        for group in ["archiver", "replication", "slots", "connections", "control"] {
            assert_eq!(query_ok(&out, group), Some(1.0), "{name} {group}");
        }
        assert!(value(&out, "clusterwatch_pg_archiver_archived_total", &[]).is_some());
        assert!(out.get("clusterwatch_pg_wal_dir_bytes").is_none());
        assert!(out.get("clusterwatch_pg_database_size_bytes").is_none());
        assert!(out.get("clusterwatch_pg_role").is_some());
    }
}

#[test]
fn groups_skipped_on_a_later_scrape_keep_their_cached_values_and_count_as_working() {
    let first = load("primary-streaming");
    let mut later = first.clone();
    later.control = Ok(Vec::new());
    later.sizes = None;
    let mut memory = Memory::default();
    let refreshed = samples::write(&first, &mut memory, None, &mut SampleBuffer::new());
    assert!(refreshed.control && refreshed.sizes);
    let mut out = SampleBuffer::new();
    let refreshed = samples::write(&later, &mut memory, None, &mut out);
    assert_eq!(refreshed, samples::Refreshed::default());
    assert_eq!(query_ok(&out, "control"), Some(1.0));
    assert_eq!(query_ok(&out, "sizes"), Some(1.0));
    assert!(
        value(
            &out,
            "clusterwatch_pg_database_size_bytes",
            &[("database", "postgres")]
        )
        .unwrap()
            > 0.0
    );
    let info = &out.get("clusterwatch_pg_info").unwrap().samples[0].labels;
    assert!(info
        .iter()
        .any(|(k, v)| k == "system_identifier" && !v.is_empty()));
    assert_eq!(value(&out, "clusterwatch_pg_expected_standbys", &[]), None);
}

#[test]
fn connections_are_counted_by_database_user_and_state() {
    let out = first_scrape("primary-streaming");
    assert_eq!(
        value(
            &out,
            "clusterwatch_pg_connections",
            &[
                ("database", "postgres"),
                ("user", "monitor"),
                ("state", "active")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &out,
            "clusterwatch_pg_oldest_idle_in_transaction_seconds",
            &[]
        ),
        Some(0.0)
    );
}

/// The first row of group `name` in a capture, as JSON (sizes: a database row).
fn first_row(
    capture: &serde_json::Value,
    name: &str,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let rows = match name {
        "status" => return capture["status"].as_object().cloned(),
        "sizes" => &capture["sizes"]["Ok"]["databases"],
        _ => &capture[name]["Ok"],
    };
    rows.get(0)?.as_object().cloned()
}

#[test]
fn every_row_field_is_a_column_its_sql_names() {
    let text = std::fs::read_to_string(testdata().join("primary-repmgr.json")).unwrap();
    let primary: serde_json::Value = serde_json::from_str(&text).unwrap();
    let text = std::fs::read_to_string(testdata().join("standby-streaming.json")).unwrap();
    let standby: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (group, sql) in super::queries::SQL_BY_GROUP {
        let row = first_row(&primary, group)
            .or_else(|| first_row(&standby, group))
            .unwrap_or_else(|| panic!("no captured row of {group}"));
        for field in row.keys() {
            let named = regex::Regex::new(&format!(r"(AS|\bn\.|SELECT|,) *{field}\b")).unwrap();
            assert!(named.is_match(sql), "{group}: no column `{field}` in {sql}");
        }
    }
}

/// Every capture's exposition, byte for byte, against `NAME.prom` (OpenMetrics, first scrape
/// of a fresh collector with `expected_standbys: 1`). `UPDATE_GOLDEN=1` rewrites them instead.
#[test]
fn golden_expositions() {
    let mut names: Vec<String> = std::fs::read_dir(testdata())
        .expect("testdata/pg exists")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let failures: Vec<String> = names
        .iter()
        .filter_map(|name| {
            let actual = first_scrape(name).into_snapshot().encode_openmetrics();
            crate::collector::golden::check(&testdata().join(format!("{name}.prom")), &actual).err()
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{}\nrun with UPDATE_GOLDEN=1 if the change is intended",
        failures.join("\n")
    );
}
