//! The explicit list of collector kinds: adding a collector is one file, one `mod` line in
//! `collector/mod.rs` and one entry here. Nothing registers itself; the engine and the trait
//! do not depend on this list, only the configuration assembler does.

use super::{
    dir, etcd, exporter, file, fs, haproxy, kamailio, mongo, network, pacemaker, pg, probe,
    process, redis, sre_stats, supervisord, system, textfile, CollectorKind,
};

/// Every collector kind, in exposition order.
pub const KINDS: &[CollectorKind] = &[
    exporter::KIND,
    system::KIND,
    fs::KIND,
    dir::KIND,
    pg::KIND,
    etcd::KIND,
    haproxy::KIND,
    pacemaker::KIND,
    probe::KIND,
    kamailio::KIND,
    redis::KIND,
    sre_stats::KIND,
    file::KIND,
    process::KIND,
    supervisord::KIND,
    network::KIND,
    textfile::KIND,
    mongo::KIND,
];
