//! clusterwatch: a Prometheus exporter for small high-availability stacks. See ARCHITECTURE.md
//! for the map; this crate root only lists the modules.

pub mod blocking;
pub mod cli;
pub mod clock;
pub mod collector;
pub mod commands;
pub mod config;
pub mod configuration;
pub mod etcd_v3;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod http;
pub mod logging;
pub mod memory;
pub mod probe;
pub mod reload;
pub mod routes;
pub mod snapshot;
pub mod sre_csv;
pub mod status;
pub mod sync;
#[cfg(test)]
mod test_support;
pub mod web;
