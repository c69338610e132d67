//! The real-server test harness: each submodule starts one kind of server on free loopback
//! ports in its own temporary directory and stops it again when its guard is dropped.
//! Nothing here mocks a server, binds a fixed port, or touches a server it did not start.
//!
//! Conventions shared by every module:
//! - constructors are `async` and return only once the server is ready (or an error that
//!   carries the tail of the server's log);
//! - every wait is a poll against a deadline ([`wait_until`]), never a bare sleep;
//! - dropping a guard stops its processes by PID and removes its directory, also when a
//!   test panics, so tests can run in parallel and clean up after themselves.

pub mod alertmanager;
pub mod blackhole;
pub mod certs;
pub mod clusterwatch;
pub mod etcd;
pub mod failover_rules;
pub mod haproxy;
pub mod http;
pub mod kamailio;
pub mod mongo_standin;
pub mod mongod;
pub mod nginx;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod served;
pub mod sipp;
pub mod sshd;
pub mod supervisord;
pub mod tcp_proxy;
pub mod versions;
pub mod webhook;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::TempDir;

pub use alertmanager::Alertmanager;
pub use blackhole::Blackhole;
pub use clusterwatch::Clusterwatch;
pub use etcd::EtcdCluster;
pub use haproxy::Haproxy;
pub use mongo_standin::MongoStandin;
pub use ports::free_port;
pub use postgres::{PgCluster, PgNode};
pub use process::{wait_until, ChildGuard};
pub use prometheus::{Prometheus, PrometheusConfig, ScrapeJob};
pub use redis::{RedisNode, RedisPair, TestCertificates};
pub use served::HttpServer;
pub use sshd::Sshd;
pub use supervisord::Supervisord;
pub use tcp_proxy::TcpProxy;

/// Creates a fresh temporary directory named `<prefix>XXXXXX` under `$TMPDIR` (default `/tmp`).
///
/// One directory per server keeps parallel tests apart and makes cleanup a single removal.
pub fn temp_dir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| {
            format!(
                "could not create a temporary directory `{prefix}*` in {}",
                std::env::temp_dir().display()
            )
        })
}

/// The repository root: rules, dashboards, examples and packaging are read from there.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the repository")
        .to_owned()
}
