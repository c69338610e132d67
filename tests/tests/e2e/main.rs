//! The single end-to-end test binary: each module drives real servers started by
//! `clusterwatch_tests::harness` on loopback. Add one `mod` line per test module.

mod dashboards;
mod foundation;
mod harness_selftest;
mod mongo;
mod postgres;
mod rules_pack;
