//! The network collector inside a network namespace the test creates: a virtual IP added to
//! and removed from an interface, a link brought up and given carrier. The exporter runs in
//! the namespace (`ip netns exec … clusterwatch once`); no packet leaves it.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clusterwatch_tests::exposition::Exposition;
use clusterwatch_tests::harness::clusterwatch::binary;
use clusterwatch_tests::harness::{temp_dir, wait_until};

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, or says why it cannot (not root, no `ip`, no namespaces).
    fn create() -> std::result::Result<Netns, String> {
        let name = format!("cw-test-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run `ip`: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Netns { name })
    }

    /// Runs `ip ARGS…` inside the namespace.
    fn ip(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `clusterwatch once` inside the namespace, parsed.
    fn once(&self, config: &std::path::Path) -> Result<Exposition> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(binary()?)
            .arg("--config.file")
            .arg(config)
            .arg("once")
            .output()?;
        if !out.status.success() {
            bail!(
                "clusterwatch once: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Exposition::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn vip_and_link_follow_changes_inside_a_namespace() -> Result<()> {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: network namespaces are not available here ({why})");
            return Ok(());
        }
    };
    // A loopback-range address stands in for the VIP: nothing is ever sent to it.
    let vip = "127.0.10.10";
    ns.ip(&[
        "link", "add", "cwv0", "type", "veth", "peer", "name", "cwv1",
    ])
    .context("creating a veth pair in the namespace")?;
    let dir = temp_dir("cw-netns-")?;
    let config = dir.path().join("clusterwatch.yml");
    std::fs::write(
        &config,
        format!("network:\n  interfaces: [cwv0, eth9]\n  addresses:\n    - {{ name: cluster-ip, address: {vip} }}\n"),
    )?;
    let vip_held = |e: &Exposition| {
        e.value(
            "clusterwatch_network_address_assigned",
            &[("name", "cluster-ip"), ("address", vip)],
        )
    };
    let link = |e: &Exposition, what: &str| {
        e.value(
            &format!("clusterwatch_network_interface_{what}"),
            &[("interface", "cwv0")],
        )
    };

    let e = ns.once(&config)?;
    assert_eq!(vip_held(&e), Some(0.0));
    assert_eq!(link(&e, "present"), Some(1.0));
    assert_eq!(link(&e, "up"), Some(0.0));
    assert_eq!(
        e.value(
            "clusterwatch_network_interface_present",
            &[("interface", "eth9")]
        ),
        Some(0.0)
    );

    ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "cwv0"])?;
    ns.ip(&["link", "set", "cwv0", "up"])?;
    let e = ns.once(&config)?;
    assert_eq!(vip_held(&e), Some(1.0), "VIP added");
    assert_eq!(link(&e, "up"), Some(1.0));
    assert_eq!(
        link(&e, "carrier"),
        Some(0.0),
        "peer still down: no carrier"
    );

    ns.ip(&["link", "set", "cwv1", "up"])?;
    ns.ip(&["addr", "del", &format!("{vip}/32"), "dev", "cwv0"])?;
    // The kernel reports carrier a moment after the peer comes up.
    wait_until(
        Duration::from_secs(10),
        "carrier on cwv0 and the VIP gone",
        async || {
            let e = ns.once(&config)?;
            Ok(vip_held(&e) == Some(0.0) && link(&e, "carrier") == Some(1.0))
        },
    )
    .await?;
    Ok(())
}
