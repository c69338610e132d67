//! The single end-to-end test binary: each module drives real servers started by
//! `clusterwatch_tests::harness` on loopback. Add one `mod` line per test module.

mod checks;
mod cluster_managers;
mod dashboards;
mod failover;
mod failover_drills;
mod failover_quorum;
mod foundation;
mod harness_selftest;
mod hooks;
mod hooks_faults;
mod hooks_lock;
mod leader_lease;
mod listeners;
mod mongo;
mod network;
mod node;
mod packaging;
mod postgres;
mod postgres_fixtures;
mod probes;
mod redis;
mod redis_drills;
mod reload;
mod rules_pack;
mod seed_scenarios;
mod seeds;
mod sre_stats;
mod status;
mod targets;
mod versions;
mod web_security;
