//! Support code for clusterwatch's end-to-end tests: a harness that starts real servers
//! (PostgreSQL, Redis, Prometheus, Alertmanager, the exporter itself) on loopback.
//! The tests themselves live in `tests/e2e/`; this library holds no test cases.

#![warn(missing_docs)]

pub mod exposition;
pub mod harness;
pub mod lab;
