//! Probes as an operator relies on them: HTTP(S) against a real nginx with generated
//! certificates, TCP against a real Redis, SIP OPTIONS against SIPp, and Kamailio's statistics
//! from a real Kamailio — each failure with the right reason, within its deadline.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use clusterwatch_tests::exposition::{scrape, Exposition};
use clusterwatch_tests::harness::certs::Ca;
use clusterwatch_tests::harness::kamailio::Kamailio;
use clusterwatch_tests::harness::nginx::{Nginx, HOME_BODY};
use clusterwatch_tests::harness::sipp::{silent_udp, SippUas};
use clusterwatch_tests::harness::{
    free_port, temp_dir, wait_until, Blackhole, Clusterwatch, RedisNode,
};

const DAY: i64 = 86_400;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The reason a probe's state-set marks, or `None` when every reason is 0 (success).
fn reason(e: &Exposition, probe: &str) -> Option<String> {
    let set = e.find("clusterwatch_probe_failure_reason", &[("target", probe)]);
    assert!(!set.is_empty(), "no failure_reason series for {probe}");
    let on: Vec<&str> = set
        .iter()
        .filter(|s| s.value == 1.0)
        .map(|s| s.labels["reason"].as_str())
        .collect();
    assert!(on.len() <= 1, "{probe}: several reasons at once: {on:?}");
    on.first().map(|r| r.to_string())
}

fn value(e: &Exposition, name: &str, probe: &str) -> Option<f64> {
    e.value(name, &[("target", probe)])
}

fn success(e: &Exposition, probe: &str) -> f64 {
    value(e, "clusterwatch_probe_success", probe).unwrap_or(-1.0)
}

#[tokio::test]
async fn http_and_https_probes_report_status_body_certificates_and_failures() -> Result<()> {
    let certs = temp_dir("cw-certs-")?;
    let ca = Ca::create(certs.path())?;
    let valid = ca.leaf(certs.path(), "valid", 90 * DAY)?;
    let expired = ca.leaf(certs.path(), "expired", -2 * DAY)?;
    let soon = ca.leaf(certs.path(), "soon", 5 * DAY)?;
    let nginx = Nginx::start(&[
        (&valid.cert, &valid.key),
        (&expired.cert, &expired.key),
        (&soon.cert, &soon.key),
    ])
    .await?;
    let hole = Blackhole::start()?;
    let closed = free_port()?;
    let (http, ca_file) = (nginx.http_base(), ca.cert_path().display().to_string());
    let tls = format!("tls: {{ ca_file: '{ca_file}' }}");
    let config = format!(
        "global: {{ timeout: 3s }}\nprobes:\n\
         - {{ name: ok, http: {{ url: '{http}/', expect_body: '^{HOME_BODY}$' }} }}\n\
         - {{ name: down, http: {{ url: '{http}/down' }} }}\n\
         - {{ name: body, http: {{ url: '{http}/', expect_body: 'maintenance' }} }}\n\
         - {{ name: moved, http: {{ url: '{http}/old' }} }}\n\
         - {{ name: moved-nofollow, http: {{ url: '{http}/old', follow_redirects: false, expect_status: [301] }} }}\n\
         - {{ name: https-ok, http: {{ url: '{}/', {tls} }} }}\n\
         - {{ name: https-untrusted, http: {{ url: '{}/' }} }}\n\
         - {{ name: https-expired, http: {{ url: '{}/', {tls} }} }}\n\
         - {{ name: https-expired-noverify, http: {{ url: '{}/', tls: {{ verify: false }} }} }}\n\
         - {{ name: https-soon, http: {{ url: '{}/', {tls} }} }}\n\
         - {{ name: refused, http: {{ url: 'http://127.0.0.1:{closed}/' }} }}\n\
         - {{ name: hung, timeout: 2s, http: {{ url: 'http://127.0.0.1:{}/' }} }}\n\
         - {{ name: nxdomain, http: {{ url: 'http://no-such-host.invalid/' }} }}\n\
         - {{ name: tcp-tls, tcp: {{ address: '{}', {tls} }} }}\n",
        nginx.https_base(0),
        nginx.https_base(0),
        nginx.https_base(1),
        nginx.https_base(1),
        nginx.https_base(2),
        hole.port(),
        nginx.https_base(0).trim_start_matches("https://"),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let started = Instant::now();
    let e = scrape(&cw).await?;
    let took = started.elapsed();

    assert_eq!(success(&e, "ok"), 1.0);
    assert_eq!(reason(&e, "ok"), None);
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "ok"),
        Some(200.0)
    );
    for phase in ["resolve", "connect", "processing", "transfer"] {
        let d = e
            .value(
                "clusterwatch_probe_phase_duration_seconds",
                &[("target", "ok"), ("phase", phase)],
            )
            .with_context(|| format!("no {phase} phase"))?;
        assert!((0.0..1.0).contains(&d), "{phase} took {d}s");
    }
    assert_eq!(reason(&e, "down").as_deref(), Some("http_status"));
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "down"),
        Some(503.0)
    );
    assert_eq!(reason(&e, "body").as_deref(), Some("body_mismatch"));
    assert_eq!(success(&e, "moved"), 1.0, "redirect followed to /");
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "moved"),
        Some(200.0)
    );
    assert_eq!(success(&e, "moved-nofollow"), 1.0);
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "moved-nofollow"),
        Some(301.0)
    );

    assert_eq!(success(&e, "https-ok"), 1.0, "{:?}", reason(&e, "https-ok"));
    let expiry = value(
        &e,
        "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
        "https-ok",
    )
    .context("no expiry for https-ok")?;
    assert!(
        (expiry - valid.not_after as f64).abs() <= 2.0,
        "expiry {expiry} vs {}",
        valid.not_after
    );
    assert!(e
        .value(
            "clusterwatch_probe_phase_duration_seconds",
            &[("target", "https-ok"), ("phase", "tls")]
        )
        .is_some());
    assert_eq!(
        reason(&e, "https-untrusted").as_deref(),
        Some("tls"),
        "public roots do not know the test CA"
    );
    assert_eq!(reason(&e, "https-expired").as_deref(), Some("tls"));
    let expired_at = value(
        &e,
        "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
        "https-expired",
    )
    .context("an expired certificate still reports its expiry")?;
    assert!(expired_at < now() as f64);
    assert_eq!(success(&e, "https-expired-noverify"), 1.0);
    assert!(
        value(
            &e,
            "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
            "https-expired-noverify"
        )
        .unwrap()
            < now() as f64
    );
    assert_eq!(success(&e, "https-soon"), 1.0);
    let soon_at = value(
        &e,
        "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
        "https-soon",
    )
    .unwrap();
    assert!(soon_at - (now() as f64) < 7.0 * DAY as f64 && soon_at > now() as f64);

    assert_eq!(reason(&e, "refused").as_deref(), Some("connect_refused"));
    assert_eq!(reason(&e, "hung").as_deref(), Some("timeout"));
    let hung = value(&e, "clusterwatch_probe_duration_seconds", "hung").unwrap();
    assert!(
        (1.5..2.0).contains(&hung),
        "the hung probe took {hung}s against a 2s deadline"
    );
    assert_eq!(
        value(&e, "clusterwatch_target_up", "hung"),
        Some(1.0),
        "a failed probe is not a failed scrape"
    );
    assert_eq!(reason(&e, "nxdomain").as_deref(), Some("dns"));
    assert_eq!(success(&e, "tcp-tls"), 1.0, "{:?}", reason(&e, "tcp-tls"));
    let tcp_expiry = value(
        &e,
        "clusterwatch_probe_tls_cert_expiry_timestamp_seconds",
        "tcp-tls",
    );
    assert_eq!(
        tcp_expiry,
        Some(expiry),
        "TCP with TLS reports the same chain"
    );
    assert!(
        took < Duration::from_secs(5),
        "probes run concurrently: the scrape took {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn https_probe_presents_a_client_certificate_when_the_server_requires_one() -> Result<()> {
    let certs = temp_dir("cw-certs-")?;
    let ca = Ca::create(certs.path())?;
    let server = ca.leaf(certs.path(), "server", 90 * DAY)?;
    let client = ca.leaf(certs.path(), "client", 90 * DAY)?;
    let nginx =
        Nginx::start_with_client_ca(&[(&server.cert, &server.key)], Some(ca.cert_path())).await?;
    let (url, ca_file) = (nginx.https_base(0), ca.cert_path().display());
    let config = format!(
        "probes:\n\
         - {{ name: with-cert, http: {{ url: '{url}/', tls: {{ ca_file: '{ca_file}', cert_file: '{}', key_file: '{}' }} }} }}\n\
         - {{ name: without-cert, http: {{ url: '{url}/', tls: {{ ca_file: '{ca_file}' }} }} }}\n",
        client.cert.display(),
        client.key.display(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let e = scrape(&cw).await?;
    assert_eq!(
        success(&e, "with-cert"),
        1.0,
        "{:?}",
        reason(&e, "with-cert")
    );
    assert_eq!(reason(&e, "without-cert").as_deref(), Some("http_status"));
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "without-cert"),
        Some(400.0)
    );
    Ok(())
}

#[tokio::test]
async fn tcp_probe_pings_redis_and_reports_a_closed_port() -> Result<()> {
    let redis = RedisNode::standalone("probe", None).await?;
    let closed = free_port()?;
    let config = format!(
        "probes:\n\
         - {{ name: redis, tcp: {{ address: '127.0.0.1:{}', send: \"PING\\r\\n\", expect: '^\\+PONG' }} }}\n\
         - {{ name: redis-wrong, timeout: 2s, tcp: {{ address: '127.0.0.1:{}', send: \"PING\\r\\n\", expect: 'HELLO' }} }}\n\
         - {{ name: closed, tcp: {{ address: '127.0.0.1:{closed}' }} }}\n",
        redis.port(),
        redis.port(),
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let e = scrape(&cw).await?;
    assert_eq!(success(&e, "redis"), 1.0, "{:?}", reason(&e, "redis"));
    assert_eq!(
        reason(&e, "redis-wrong").as_deref(),
        Some("timeout"),
        "Redis keeps the connection open"
    );
    assert_eq!(reason(&e, "closed").as_deref(), Some("connect_refused"));
    assert_eq!(
        value(&e, "clusterwatch_probe_consecutive_failures", "closed"),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test]
async fn sip_options_probe_sees_up_out_of_service_and_silence_and_counts_failures_in_a_row(
) -> Result<()> {
    let silent = silent_udp()?;
    let port = silent.local_addr()?.port();
    let tcp_uas = SippUas::start(200, "OK", true).await?;
    let refused = free_port()?;
    let config = format!(
        "global: {{ timeout: 2s }}\nprobes:\n\
         - {{ name: cp1, interval: 0s, sip_options: {{ address: '127.0.0.1:{port}' }} }}\n\
         - {{ name: cp-tcp, sip_options: {{ address: '{}', transport: tcp }} }}\n\
         - {{ name: cp-gone, sip_options: {{ address: '127.0.0.1:{refused}' }} }}\n",
        tcp_uas.addr()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    for n in 1..=3 {
        let e = scrape(&cw).await?;
        assert_eq!(
            reason(&e, "cp1").as_deref(),
            Some("timeout"),
            "a silent peer"
        );
        assert_eq!(
            value(&e, "clusterwatch_probe_consecutive_failures", "cp1"),
            Some(n as f64)
        );
        let d = value(&e, "clusterwatch_probe_duration_seconds", "cp1").unwrap();
        assert!(
            (1.5..2.0).contains(&d),
            "retransmitted until the deadline: {d}s"
        );
        assert_eq!(success(&e, "cp-tcp"), 1.0, "{:?}", reason(&e, "cp-tcp"));
        assert_eq!(
            value(&e, "clusterwatch_probe_status_code", "cp-tcp"),
            Some(200.0)
        );
        assert_eq!(
            reason(&e, "cp-gone").as_deref(),
            Some("connect_refused"),
            "ICMP port unreachable"
        );
    }

    drop(silent);
    let mut uas = SippUas::start_on(port, 200, "OK", false).await?;
    let e = scrape(&cw).await?;
    assert_eq!(success(&e, "cp1"), 1.0, "{:?}", reason(&e, "cp1"));
    assert_eq!(
        value(&e, "clusterwatch_probe_consecutive_failures", "cp1"),
        Some(0.0),
        "reset by a success"
    );
    assert_eq!(
        value(&e, "clusterwatch_probe_sip_out_of_service", "cp1"),
        Some(0.0)
    );

    uas.process().stop()?;
    drop(uas);
    let _oos = SippUas::start_on(port, 503, "Out Of Service", false).await?;
    let e = scrape(&cw).await?;
    assert_eq!(reason(&e, "cp1").as_deref(), Some("sip_status"));
    assert_eq!(
        value(&e, "clusterwatch_probe_status_code", "cp1"),
        Some(503.0)
    );
    assert_eq!(
        value(&e, "clusterwatch_probe_sip_out_of_service", "cp1"),
        Some(1.0)
    );
    assert_eq!(
        value(&e, "clusterwatch_probe_consecutive_failures", "cp1"),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test]
async fn kamailio_statistics_grow_with_traffic_and_a_stopped_kamailio_is_down() -> Result<()> {
    let mut kamailio = Kamailio::start().await?;
    let config = format!(
        "kamailio:\n  - {{ name: sbc1, cluster: sbc, timeout: 2s, url: '{}' }}\n\
         probes:\n  - {{ name: sbc1-sip, interval: 0s, sip_options: {{ address: '{}' }} }}\n",
        kamailio.rpc_url(),
        kamailio.sip_addr()
    );
    let cw = Clusterwatch::start(Some(&config), &[]).await?;
    let options = |e: &Exposition| {
        e.value(
            "clusterwatch_kamailio_stat_total",
            &[
                ("target", "sbc1"),
                ("group", "core"),
                ("name", "rcv_requests_options"),
            ],
        )
    };
    let e = scrape(&cw).await?;
    assert_eq!(
        e.value("clusterwatch_target_up", &[("target", "sbc1")]),
        Some(1.0)
    );
    assert_eq!(success(&e, "sbc1-sip"), 1.0, "{:?}", reason(&e, "sbc1-sip"));
    let first = options(&e).context("core:rcv_requests_options exported")?;
    let shm = e
        .value(
            "clusterwatch_kamailio_stat_current",
            &[
                ("target", "sbc1"),
                ("group", "shmem"),
                ("name", "used_size"),
            ],
        )
        .context("shmem:used_size is a level")?;
    assert!(shm > 0.0);
    assert!(
        e.value("clusterwatch_kamailio_processes", &[("target", "sbc1")])
            .unwrap_or(0.0)
            >= 3.0
    );
    // Every scrape sends one OPTIONS through the probe; the counter must follow.
    wait_until(
        Duration::from_secs(20),
        "rcv_requests_options to grow",
        async || {
            let e = scrape(&cw).await?;
            Ok(options(&e).unwrap_or(0.0) >= first + 2.0)
        },
    )
    .await?;

    kamailio.process().stop()?;
    let started = Instant::now();
    let e = scrape(&cw).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "a stopped Kamailio costs at most its deadline"
    );
    assert_eq!(
        e.value("clusterwatch_target_up", &[("target", "sbc1")]),
        Some(0.0)
    );
    assert!(e
        .find("clusterwatch_kamailio_stat_total", &[("target", "sbc1")])
        .is_empty());
    assert_eq!(reason(&e, "sbc1-sip").as_deref(), Some("connect_refused"));
    Ok(())
}
