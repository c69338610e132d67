//! The single end-to-end test binary: each module drives real servers started by
//! `clusterwatch_tests::harness` on loopback. Add one `mod` line per test module.

mod dashboards;
mod foundation;
mod harness_selftest;
mod network;
mod node;
mod postgres;
mod rules_pack;
mod sre_stats;
