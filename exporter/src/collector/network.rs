//! Network interfaces and virtual IPs of this node, from getifaddrs: per configured interface
//! whether it exists, is up and has carrier; per configured address whether this node holds it
//! (0/1), so `max by (address)` across nodes says who owns a VIP. It sends no traffic.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use nix::net::if_::InterfaceFlags;
use serde::Deserialize;

use crate::blocking::InFlight;
use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `network` collector, configured by the `network:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "network",
    section: "network",
    always_on: false,
    configure,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: Option<String>,
    cluster: Option<String>,
    #[serde(default)]
    interfaces: Vec<String>,
    // Parsed item by item below, so each bad address is reported on its own line.
    #[allow(dead_code)]
    addresses: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddress {
    /// What the address is for, e.g. `cluster-ip`: the `name` label.
    name: String,
    address: String,
}

fn configure(at: Located, _ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let Some(raw) = at.parse::<Option<RawNetwork>>(problems).flatten() else {
        return Vec::new();
    };
    let before = problems.len();
    let id = TargetId::check(
        raw.name.unwrap_or_else(|| "network".into()),
        raw.cluster,
        None,
        &at,
        problems,
    );
    let mut addresses = Vec::new();
    if let Some(list) = at.field("addresses") {
        for (a, item) in list.parse_list::<RawAddress>(problems) {
            // An address with a prefix (`10.0.0.5/24`, as `ip addr` prints it) means the
            // address itself.
            let text = a.address.split('/').next().unwrap_or("").trim();
            match text.parse::<IpAddr>() {
                Ok(ip) => addresses.push((a.name, ip)),
                Err(_) => problems.push(
                    item.problem("address", format!("`{}` is not an IP address", a.address))
                        .hint("write e.g. `10.0.161.100` or `fd00::10`"),
                ),
            }
        }
    }
    if raw.interfaces.is_empty() && addresses.is_empty() {
        problems.push(
            at.problem("", "nothing to check")
                .hint("list `interfaces:` and/or `addresses:`"),
        );
    }
    if problems.len() > before {
        return Vec::new();
    }
    vec![Target::new(
        &KIND,
        id,
        NetworkCollector {
            interfaces: raw.interfaces,
            addresses,
            inflight: InFlight::new(),
        },
    )]
}

/// The configured interfaces and addresses of this node.
pub struct NetworkCollector {
    interfaces: Vec<String>,
    addresses: Vec<(String, IpAddr)>,
    inflight: InFlight,
}

/// What getifaddrs says about one interface.
#[derive(Clone, Debug, Default, PartialEq)]
struct Link {
    name: String,
    up: bool,
    carrier: bool,
    addresses: Vec<IpAddr>,
}

fn links() -> Result<Vec<Link>, CollectError> {
    let mut out: Vec<Link> = Vec::new();
    let all =
        nix::ifaddrs::getifaddrs().map_err(|e| CollectError::Io(format!("getifaddrs: {e}")))?;
    for ifa in all {
        let i = match out.iter().position(|l| l.name == ifa.interface_name) {
            Some(i) => i,
            None => {
                out.push(Link {
                    name: ifa.interface_name.clone(),
                    ..Link::default()
                });
                out.len() - 1
            }
        };
        let link = &mut out[i];
        link.up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        // LOWER_UP is the carrier as the driver reports it (`ip link` shows NO-CARRIER
        // without it).
        link.carrier |= ifa.flags.contains(InterfaceFlags::IFF_LOWER_UP);
        if let Some(addr) = ifa.address {
            if let Some(v4) = addr.as_sockaddr_in() {
                link.addresses.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                link.addresses.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    Ok(out)
}

#[async_trait]
impl Collector for NetworkCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        // getifaddrs is one netlink round trip to the local kernel; off the runtime all the
        // same, so a kernel that does not answer costs this target's deadline only.
        let links = self
            .inflight
            .run("getifaddrs", ctx.deadline, links)
            .await
            .map_err(|_| CollectError::Timeout)??;
        for name in &self.interfaces {
            let link = links.iter().find(|l| &l.name == name);
            let labels = [("interface", name.as_str())];
            let flag = |f: fn(&Link) -> bool| if link.is_some_and(f) { 1.0 } else { 0.0 };
            out.gauge(
                "clusterwatch_network_interface_present",
                "Whether the configured interface exists (1) or not (0).",
                &labels,
                flag(|_| true),
            );
            out.gauge(
                "clusterwatch_network_interface_up",
                "Whether the interface is administratively up (1) or not (0).",
                &labels,
                flag(|l| l.up),
            );
            out.gauge(
                "clusterwatch_network_interface_carrier",
                "Whether the interface has carrier (link detected) (1) or not (0).",
                &labels,
                flag(|l| l.carrier),
            );
        }
        for (name, ip) in &self.addresses {
            let held = links.iter().any(|l| l.addresses.contains(ip));
            let text = ip.to_string();
            out.gauge(
                "clusterwatch_network_address_assigned",
                "Whether this node holds the configured address on one of its interfaces (1) or not (0); max by (address) across nodes tells who owns a virtual IP.",
                &[("name", name.as_str()), ("address", text.as_str())],
                if held { 1.0 } else { 0.0 },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration as config;
    use std::path::Path;

    #[test]
    fn bad_address_reported_on_its_line() {
        let err = config::parse(
            "network:\n  interfaces: [eth0]\n  addresses:\n    - { name: vip, address: 10.0.0.5/24 }\n    - { name: bad, address: 10.0.0.256 }\n",
            "c.yml",
            Path::new("."),
        )
        .unwrap_err()
        .render();
        assert!(
            err.contains("c.yml:5:") && err.contains("not an IP address"),
            "{err}"
        );
        assert!(config::parse("network: {}\n", "c.yml", Path::new(".")).is_err());
    }

    #[test]
    fn loopback_is_seen() {
        let links = links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo exists");
        assert!(
            lo.addresses.contains(&"127.0.0.1".parse().unwrap()),
            "{lo:?}"
        );
    }
}
