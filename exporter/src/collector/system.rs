//! Host statistics from sysinfo: CPU count and usage, memory, swap, load averages, uptime.
//! It reports the machine clusterwatch runs on; per-process numbers belong to `process`.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::blocking::InFlight;
use crate::collector::{
    named_local_target, CollectError, Collector, CollectorKind, ScrapeContext, Target,
};
use crate::config::{Located, Problem, SectionContext};
use crate::snapshot::SampleBuffer;

/// The `system` collector, configured by the `system:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "system",
    section: "system",
    always_on: false,
    configure,
};

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    named_local_target(&at, "local", problems)
        .map(|id| Target::new(&KIND, id, SystemCollector::new()))
        .into_iter()
        .collect()
}

/// Keeps one sysinfo `System` so CPU usage is measured between two scrapes.
pub struct SystemCollector {
    /// Created on first use: sysinfo can fail where /proc is missing, and that is a scrape
    /// failure to report, not a reason to refuse to start.
    system: Arc<Mutex<Option<System>>>,
    inflight: InFlight,
}

impl SystemCollector {
    fn new() -> Self {
        SystemCollector {
            system: Arc::new(Mutex::new(None)),
            inflight: InFlight::new(),
        }
    }
}

/// One reading of the host.
struct Reading {
    cpus: usize,
    cpu_usage: f64,
    mem_total: u64,
    mem_available: u64,
    swap_total: u64,
    swap_used: u64,
    load: (f64, f64, f64),
    uptime: Option<u64>,
    boot_time: Option<u64>,
}

fn read(system: &Mutex<Option<System>>) -> Result<Reading, String> {
    let mut guard = crate::sync::lock(system);
    if guard.is_none() {
        let kinds = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::everything());
        *guard = Some(System::new_with_specifics(kinds).map_err(|e| e.to_string())?);
    }
    let Some(s) = guard.as_mut() else {
        return Err("system statistics unavailable".into());
    };
    s.refresh_cpu_usage();
    s.refresh_memory();
    let load = System::load_average()
        .map(|l| (l.one, l.five, l.fifteen))
        .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
    Ok(Reading {
        cpus: s.cpus().len(),
        cpu_usage: f64::from(s.global_cpu_usage()) / 100.0,
        mem_total: s.total_memory(),
        mem_available: s.available_memory(),
        swap_total: s.total_swap(),
        swap_used: s.used_swap(),
        load,
        uptime: System::uptime().ok(),
        boot_time: System::boot_time().ok(),
    })
}

#[async_trait]
impl Collector for SystemCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let system = Arc::clone(&self.system);
        let r = self
            .inflight
            .run("system", ctx.deadline, move || read(&system))
            .await
            .map_err(|_| CollectError::Timeout)?
            .map_err(CollectError::Io)?;
        out.gauge(
            "clusterwatch_system_cpus",
            "Number of logical CPUs.",
            &[],
            r.cpus as f64,
        );
        out.gauge(
            "clusterwatch_system_cpu_usage_ratio",
            "Fraction of all CPUs busy since the previous scrape, 0..1.",
            &[],
            r.cpu_usage,
        );
        out.gauge(
            "clusterwatch_system_memory_total_bytes",
            "Total memory in bytes.",
            &[],
            r.mem_total as f64,
        );
        out.gauge(
            "clusterwatch_system_memory_available_bytes",
            "Memory available for new work without swapping, in bytes.",
            &[],
            r.mem_available as f64,
        );
        out.gauge(
            "clusterwatch_system_swap_total_bytes",
            "Total swap in bytes.",
            &[],
            r.swap_total as f64,
        );
        out.gauge(
            "clusterwatch_system_swap_used_bytes",
            "Used swap in bytes.",
            &[],
            r.swap_used as f64,
        );
        out.gauge(
            "clusterwatch_system_load1",
            "Load average over 1 minute.",
            &[],
            r.load.0,
        );
        out.gauge(
            "clusterwatch_system_load5",
            "Load average over 5 minutes.",
            &[],
            r.load.1,
        );
        out.gauge(
            "clusterwatch_system_load15",
            "Load average over 15 minutes.",
            &[],
            r.load.2,
        );
        if let Some(u) = r.uptime {
            out.gauge(
                "clusterwatch_system_uptime_seconds",
                "Seconds since the host booted.",
                &[],
                u as f64,
            );
        }
        if let Some(b) = r.boot_time {
            out.gauge(
                "clusterwatch_system_boot_time_seconds",
                "Unix time the host booted.",
                &[],
                b as f64,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_memory_and_cpus() {
        let c = SystemCollector::new();
        let mut out = SampleBuffer::new();
        let ctx = ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        };
        c.collect(&ctx, &mut out).await.unwrap();
        let cpus = out.get("clusterwatch_system_cpus").unwrap().samples[0].value;
        assert!(cpus >= 1.0);
        let total = out
            .get("clusterwatch_system_memory_total_bytes")
            .unwrap()
            .samples[0]
            .value;
        let avail = out
            .get("clusterwatch_system_memory_available_bytes")
            .unwrap()
            .samples[0]
            .value;
        assert!(total > 0.0 && avail <= total);
    }
}
