//! clusterwatch's own process: build info, start time, memory, CPU time and open files, so
//! the exporter's cost is visible next to what it watches. Always on; needs no section.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::blocking::InFlight;
use crate::collector::{
    named_local_target, CollectError, Collector, CollectorKind, ScrapeContext, Target,
};
use crate::config::{Located, Problem, SectionContext};
use crate::snapshot::SampleBuffer;

/// The `exporter` collector; its optional `exporter:` section only renames the target.
pub const KIND: CollectorKind = CollectorKind {
    name: "exporter",
    section: "exporter",
    always_on: true,
    configure,
};

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let collector = || ExporterCollector {
        system: Arc::new(Mutex::new(None)),
        inflight: InFlight::new(),
    };
    named_local_target(&at, "clusterwatch", problems)
        .map(|id| Target::new(&KIND, id, collector()))
        .into_iter()
        .collect()
}

/// Reads this process's own statistics.
pub struct ExporterCollector {
    /// Created on first use (see `system.rs` for why).
    system: Arc<Mutex<Option<System>>>,
    inflight: InFlight,
}

struct SelfStats {
    rss: u64,
    virt: u64,
    cpu_seconds: f64,
    start_time: u64,
    open_fds: Option<usize>,
    max_fds: Option<usize>,
}

fn read_self(system: &Mutex<Option<System>>) -> Option<SelfStats> {
    let pid = Pid::from_u32(std::process::id());
    let mut guard = crate::sync::lock(system);
    if guard.is_none() {
        *guard = System::new().ok();
    }
    let s = guard.as_mut()?;
    s.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_memory().with_cpu(),
    );
    let p = s.process(pid)?;
    Some(SelfStats {
        rss: p.memory(),
        virt: p.virtual_memory(),
        cpu_seconds: p.accumulated_cpu_time() as f64 / 1000.0,
        start_time: p.start_time(),
        open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count()),
        max_fds: p.open_files_limit(),
    })
}

#[async_trait]
impl Collector for ExporterCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        out.gauge(
            "clusterwatch_exporter_build_info",
            "Always 1; labels say which clusterwatch build is running.",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        let system = Arc::clone(&self.system);
        let stats = self
            .inflight
            .run("self", ctx.deadline, move || read_self(&system))
            .await
            .map_err(|_| CollectError::Timeout)?
            .ok_or_else(|| CollectError::Io("own process not found in /proc".into()))?;
        out.gauge(
            "clusterwatch_exporter_resident_memory_bytes",
            "Resident memory of clusterwatch in bytes.",
            &[],
            stats.rss as f64,
        );
        out.gauge(
            "clusterwatch_exporter_virtual_memory_bytes",
            "Virtual memory of clusterwatch in bytes.",
            &[],
            stats.virt as f64,
        );
        out.counter(
            "clusterwatch_exporter_cpu_seconds_total",
            "CPU time used by clusterwatch, user and system, in seconds.",
            &[],
            stats.cpu_seconds,
        );
        out.gauge(
            "clusterwatch_exporter_start_time_seconds",
            "Unix time clusterwatch started.",
            &[],
            stats.start_time as f64,
        );
        if let Some(n) = stats.open_fds {
            out.gauge(
                "clusterwatch_exporter_open_fds",
                "Open file descriptors of clusterwatch.",
                &[],
                n as f64,
            );
        }
        if let Some(n) = stats.max_fds {
            out.gauge(
                "clusterwatch_exporter_max_fds",
                "Limit on open file descriptors of clusterwatch.",
                &[],
                n as f64,
            );
        }
        Ok(())
    }
}
