//! Pacemaker cluster state from `crm_mon --output-as=xml`: nodes, where each resource runs and
//! in which role, failures, fail counts, quorum and DC. It runs crm_mon read-only (argv, no
//! shell, killed at the deadline) and never calls crm_resource or cibadmin.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{HumanDuration, Located, Problem, SectionContext, TargetId};
use crate::snapshot::SampleBuffer;

/// The `pacemaker` collector, configured by the `pacemaker:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "pacemaker",
    section: "pacemaker",
    always_on: false,
    configure,
};

/// Node states, most serious last; a node is in exactly one.
pub const NODE_STATES: &[&str] = &[
    "online",
    "standby",
    "maintenance",
    "pending",
    "unclean",
    "offline",
];

/// Resource roles as crm_mon names them since Pacemaker 2.1 (older `Master`/`Slave` are
/// mapped to `promoted`/`unpromoted`), lowercased.
pub const ROLES: &[&str] = &[
    "started",
    "promoted",
    "unpromoted",
    "starting",
    "stopping",
    "migrating",
    "promoting",
    "demoting",
    "stopped",
    "unknown",
];

/// How much of crm_mon's stderr an error quotes.
const STDERR_TAIL: usize = 400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacemaker {
    name: Option<String>,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    crm_mon: Option<PathBuf>,
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let Some(raw) = at.parse::<Option<RawPacemaker>>(problems) else {
        return Vec::new();
    };
    let raw = raw.unwrap_or(RawPacemaker {
        name: None,
        cluster: None,
        timeout: None,
        crm_mon: None,
    });
    let before = problems.len();
    let name = raw.name.unwrap_or_else(|| "local".into());
    let id = TargetId::check(name, raw.cluster, raw.timeout, &at, problems);
    // A bare program name is looked up on PATH at run time, as a shell would.
    let crm_mon = match raw.crm_mon {
        Some(p) if p.components().count() > 1 => ctx.resolve(&p),
        Some(p) => p,
        None => PathBuf::from("crm_mon"),
    };
    if crm_mon.is_absolute() && !crm_mon.is_file() {
        problems.push(
            at.problem("crm_mon", format!("{} does not exist", crm_mon.display()))
                .hint("install pacemaker-cli-utils, or give the path of crm_mon"),
        );
    }
    if problems.len() > before {
        return Vec::new();
    }
    vec![Target::new(&KIND, id, PacemakerCollector { crm_mon })]
}

/// The Pacemaker cluster as seen from this node.
pub struct PacemakerCollector {
    crm_mon: PathBuf,
}

impl PacemakerCollector {
    /// Runs crm_mon once. `CIB_file` in clusterwatch's environment is passed on: crm_mon then
    /// reads a saved CIB instead of the live cluster.
    async fn run(&self, ctx: &ScrapeContext) -> Result<String, CollectError> {
        let child = tokio::process::Command::new(&self.crm_mon)
            .arg("--output-as=xml")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The engine drops this future at the deadline; the child must not outlive it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CollectError::Io(format!("cannot run {}: {e}", self.crm_mon.display())))?;
        let wait = async {
            child
                .wait_with_output()
                .await
                .map_err(|e| CollectError::Io(format!("{}: {e}", self.crm_mon.display())))
        };
        let output = ctx.within(wait).await?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // crm_mon explains itself in the XML status element even when it fails.
            let why = parse_status(&stdout)
                .unwrap_or_else(|| tail(&stderr, STDERR_TAIL).trim().to_owned());
            return Err(CollectError::Connect(format!(
                "crm_mon exited with {}: {why}",
                output.status
            )));
        }
        Ok(stdout)
    }
}

/// The last `n` bytes of `s` or a little less, on a character boundary.
fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `<status code message>` of a failed crm_mon run.
pub(crate) fn parse_status(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let status = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("status"))?;
    Some(format!(
        "{} (code {})",
        status.attribute("message").unwrap_or("?"),
        status.attribute("code").unwrap_or("?")
    ))
}

/// What crm_mon reported, reduced to what the metrics need.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ClusterState {
    dc_present: bool,
    quorum: bool,
    nodes: Vec<(String, &'static str)>,
    resources: Vec<Resource>,
    /// (resource, node, fail count) from the node history.
    fail_counts: Vec<(String, String, f64)>,
    failed_actions: usize,
}

/// One resource, its instances merged (a clone appears once per instance in crm_mon).
#[derive(Debug, Default, PartialEq)]
struct Resource {
    id: String,
    agent: String,
    /// (node, role) for every active instance.
    running: Vec<(String, &'static str)>,
    failed: bool,
    managed: bool,
    disabled: bool,
}

fn node_state(n: roxmltree::Node) -> &'static str {
    let yes = |a: &str| n.attribute(a) == Some("true");
    if yes("unclean") {
        "unclean"
    } else if !yes("online") {
        "offline"
    } else if yes("pending") {
        "pending"
    } else if yes("maintenance") {
        "maintenance"
    } else if yes("standby") {
        "standby"
    } else {
        "online"
    }
}

fn role(text: &str) -> &'static str {
    match text.to_ascii_lowercase().as_str() {
        "started" => "started",
        "promoted" | "master" => "promoted",
        "unpromoted" | "slave" => "unpromoted",
        "starting" => "starting",
        "stopping" => "stopping",
        "migrating" => "migrating",
        "promoting" => "promoting",
        "demoting" => "demoting",
        "stopped" => "stopped",
        _ => "unknown",
    }
}

/// Parses `crm_mon --output-as=xml` (Pacemaker 2.x `pacemaker-result`; 1.1's `crm_mon` root
/// with the same elements is read too).
pub(crate) fn parse_crm_mon(xml: &str) -> Result<ClusterState, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    if !matches!(root.tag_name().name(), "pacemaker-result" | "crm_mon") {
        return Err(format!(
            "unexpected root element <{}>",
            root.tag_name().name()
        ));
    }
    let mut state = ClusterState::default();
    let dc = child(root, "summary").and_then(|s| child(s, "current_dc"));
    state.dc_present = dc.is_some_and(|d| d.attribute("present") == Some("true"));
    state.quorum = dc.is_some_and(|d| d.attribute("with_quorum") == Some("true"));
    if let Some(nodes) = child(root, "nodes") {
        for n in nodes.children().filter(|n| n.has_tag_name("node")) {
            state
                .nodes
                .push((n.attribute("name").unwrap_or("").to_owned(), node_state(n)));
        }
    }
    if let Some(resources) = child(root, "resources") {
        // Groups, clones and bundles nest primitives; every `resource` element is one.
        for r in resources
            .descendants()
            .filter(|n| n.has_tag_name("resource"))
        {
            let id = r.attribute("id").unwrap_or("").to_owned();
            let yes = |a: &str| r.attribute(a) == Some("true");
            let idx = match state.resources.iter().position(|x| x.id == id) {
                Some(i) => i,
                None => {
                    state.resources.push(Resource {
                        id,
                        agent: r.attribute("resource_agent").unwrap_or("").to_owned(),
                        managed: true,
                        ..Resource::default()
                    });
                    state.resources.len() - 1
                }
            };
            let res = &mut state.resources[idx];
            res.failed |= yes("failed");
            res.managed &= r.attribute("managed") != Some("false");
            res.disabled |= r
                .attribute("target_role")
                .is_some_and(|t| t.eq_ignore_ascii_case("stopped"));
            if yes("active") {
                let role = role(r.attribute("role").unwrap_or(""));
                for node in r.children().filter(|n| n.has_tag_name("node")) {
                    let name = node.attribute("name").unwrap_or("").to_owned();
                    if !res.running.iter().any(|(n, _)| *n == name) {
                        res.running.push((name, role));
                    }
                }
            }
        }
    }
    if let Some(history) = child(root, "node_history") {
        for node in history.children().filter(|n| n.has_tag_name("node")) {
            let node_name = node.attribute("name").unwrap_or("");
            for rh in node
                .children()
                .filter(|n| n.has_tag_name("resource_history"))
            {
                // crm_mon writes INFINITY for a count at or past the migration threshold.
                let count = match rh.attribute("fail-count") {
                    Some("INFINITY") => 1_000_000.0,
                    Some(v) => v.parse().unwrap_or(0.0),
                    None => continue,
                };
                state.fail_counts.push((
                    rh.attribute("id").unwrap_or("").to_owned(),
                    node_name.to_owned(),
                    count,
                ));
            }
        }
    }
    state.failed_actions = child(root, "failures")
        .map(|f| f.children().filter(|n| n.has_tag_name("failure")).count())
        .unwrap_or(0);
    Ok(state)
}

fn child<'a, 'i>(parent: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    parent.children().find(|n| n.has_tag_name(name))
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn write_samples(state: &ClusterState, out: &mut SampleBuffer) {
    out.gauge(
        "clusterwatch_pacemaker_quorum",
        "Whether the Pacemaker partition this node sees has quorum (1) or not (0).",
        &[],
        flag(state.quorum),
    );
    out.gauge(
        "clusterwatch_pacemaker_dc_present",
        "Whether the Pacemaker cluster has an elected designated controller (1) or not (0).",
        &[],
        flag(state.dc_present),
    );
    out.gauge(
        "clusterwatch_pacemaker_failed_actions",
        "Failed resource actions Pacemaker lists (cleared by `crm_resource --cleanup`).",
        &[],
        state.failed_actions as f64,
    );
    for (node, current) in &state.nodes {
        out.state_set(
            "clusterwatch_pacemaker_node_state",
            "Pacemaker node state (online, standby, maintenance, pending, unclean, offline).",
            &[("node", node)],
            "state",
            NODE_STATES,
            Some(current),
        );
    }
    for r in &state.resources {
        let l: &[(&'static str, &str)] = &[("resource", &r.id)];
        for (node, current) in &r.running {
            out.gauge(
                "clusterwatch_pacemaker_resource_running",
                "1 for each node a Pacemaker resource runs on (where is the VIP?).",
                &[("resource", &r.id), ("node", node), ("type", &r.agent)],
                1.0,
            );
            out.state_set(
                "clusterwatch_pacemaker_resource_role",
                "Role of a Pacemaker resource on each node it runs on.",
                &[("resource", &r.id), ("node", node)],
                "role",
                ROLES,
                Some(current),
            );
        }
        out.gauge(
            "clusterwatch_pacemaker_resource_nodes_running",
            "How many nodes a Pacemaker resource runs on (0 when stopped).",
            &[("resource", &r.id), ("type", &r.agent)],
            r.running.len() as f64,
        );
        out.gauge(
            "clusterwatch_pacemaker_resource_failed",
            "Whether Pacemaker marks the resource failed (1) or not (0).",
            l,
            flag(r.failed),
        );
        out.gauge(
            "clusterwatch_pacemaker_resource_managed",
            "Whether Pacemaker manages the resource (1) or it is unmanaged (0).",
            l,
            flag(r.managed),
        );
        out.gauge(
            "clusterwatch_pacemaker_resource_disabled",
            "Whether the resource is stopped on purpose (target-role Stopped) (1) or not (0).",
            l,
            flag(r.disabled),
        );
    }
    for (resource, node, count) in &state.fail_counts {
        out.gauge(
            "clusterwatch_pacemaker_resource_fail_count",
            "Pacemaker's fail count of a resource on a node (1000000 for INFINITY).",
            &[("resource", resource), ("node", node)],
            *count,
        );
    }
}

#[async_trait]
impl Collector for PacemakerCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let xml = self.run(ctx).await?;
        let state = parse_crm_mon(&xml).map_err(CollectError::Protocol)?;
        write_samples(&state, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of Pacemaker 2.1.5's crm_mon for `tests/fixtures/pacemaker/mixed.xml`.
    const MIXED: &str = r#"<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">
  <summary>
    <stack type="unknown"/>
    <current_dc present="true" version="2.1.5-a3f44794f94" name="em1" id="1" with_quorum="true" mixed_version="false"/>
    <nodes_configured number="3"/>
    <resources_configured number="3" disabled="1" blocked="0"/>
  </summary>
  <nodes>
    <node name="em1" id="1" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" shutdown="false" expected_up="true" is_dc="true" resources_running="1" type="member"/>
    <node name="em2" id="2" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" shutdown="false" expected_up="true" is_dc="false" resources_running="1" type="member"/>
    <node name="em3" id="3" online="true" standby="true" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" shutdown="false" expected_up="true" is_dc="false" resources_running="0" type="member"/>
  </nodes>
  <resources>
    <resource id="vip" resource_agent="ocf:heartbeat:IPaddr2" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="em1" id="1" cached="true"/>
    </resource>
    <resource id="app" resource_agent="systemd:sre-app" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="true" failure_ignored="false" nodes_running_on="1">
      <node name="em2" id="2" cached="true"/>
    </resource>
    <resource id="backup" resource_agent="systemd:sre-backup" role="Stopped" target_role="Stopped" active="false" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="0"/>
  </resources>
  <node_history>
    <node name="em1">
      <resource_history id="app" orphan="false" migration-threshold="1000000" fail-count="2" last-failure="Fri Nov 21 10:01:30 2025"/>
    </node>
    <node name="em2">
      <resource_history id="app" orphan="false" migration-threshold="1000000" fail-count="1" last-failure="Fri Nov 21 10:03:20 2025"/>
    </node>
  </node_history>
  <failures>
    <failure op_key="app_monitor_10000" node="em2" exitstatus="not running" exitreason="not running" exitcode="7" call="22" status="complete" last-rc-change="2025-11-21 10:03:20Z" queued="0" exec="10" interval="10000" task="monitor"/>
  </failures>
  <status code="0" message="OK"/>
</pacemaker-result>"#;

    /// A promotable clone inside a group-less layout, one node offline, no quorum, as
    /// Pacemaker 1.1 and 2.0 still name roles.
    const CLONE: &str = r#"<crm_mon version="2.0.1">
  <summary><current_dc present="false"/></summary>
  <nodes>
    <node name="db1" online="true" standby="false" maintenance="false" pending="false" unclean="false"/>
    <node name="db2" online="false" standby="false" maintenance="false" pending="false" unclean="false"/>
    <node name="db3" online="true" standby="false" maintenance="true" pending="false" unclean="false"/>
  </nodes>
  <resources>
    <clone id="pgsql-clone" multi_state="true">
      <resource id="pgsql" resource_agent="ocf::heartbeat:pgsql" role="Master" active="true" failed="false" managed="true"><node name="db1"/></resource>
      <resource id="pgsql" resource_agent="ocf::heartbeat:pgsql" role="Slave" active="true" failed="false" managed="true"><node name="db3"/></resource>
      <resource id="pgsql" resource_agent="ocf::heartbeat:pgsql" role="Stopped" active="false" failed="false" managed="true"/>
    </clone>
    <group id="web">
      <resource id="web-vip" resource_agent="ocf::heartbeat:IPaddr2" role="Stopped" active="false" failed="false" managed="false"/>
    </group>
  </resources>
  <node_history>
    <node name="db1"><resource_history id="pgsql" fail-count="INFINITY"/></node>
  </node_history>
</crm_mon>"#;

    #[test]
    fn reads_nodes_resources_and_failures() {
        let s = parse_crm_mon(MIXED).unwrap();
        assert!(s.dc_present && s.quorum);
        assert_eq!(
            s.nodes,
            vec![
                ("em1".to_owned(), "online"),
                ("em2".to_owned(), "online"),
                ("em3".to_owned(), "standby"),
            ]
        );
        let vip = &s.resources[0];
        assert_eq!(vip.id, "vip");
        assert_eq!(vip.agent, "ocf:heartbeat:IPaddr2");
        assert_eq!(vip.running, vec![("em1".to_owned(), "started")]);
        assert!(s.resources[1].failed);
        let backup = &s.resources[2];
        assert!(backup.running.is_empty() && backup.disabled && !backup.failed);
        assert_eq!(
            s.fail_counts,
            vec![
                ("app".to_owned(), "em1".to_owned(), 2.0),
                ("app".to_owned(), "em2".to_owned(), 1.0),
            ]
        );
        assert_eq!(s.failed_actions, 1);
    }

    #[test]
    fn merges_clone_instances_and_maps_old_role_names() {
        let s = parse_crm_mon(CLONE).unwrap();
        assert!(!s.dc_present && !s.quorum);
        let states: Vec<&str> = s.nodes.iter().map(|(_, st)| *st).collect();
        assert_eq!(states, vec!["online", "offline", "maintenance"]);
        assert_eq!(s.resources.len(), 2);
        assert_eq!(
            s.resources[0].running,
            vec![
                ("db1".to_owned(), "promoted"),
                ("db3".to_owned(), "unpromoted")
            ]
        );
        assert!(!s.resources[1].managed);
        assert_eq!(s.fail_counts[0].2, 1_000_000.0);
        assert_eq!(s.failed_actions, 0);
    }

    #[test]
    fn where_is_the_vip_is_one_series() {
        let mut out = SampleBuffer::new();
        write_samples(&parse_crm_mon(MIXED).unwrap(), &mut out);
        let running = out.get("clusterwatch_pacemaker_resource_running").unwrap();
        let vip: Vec<&str> = running
            .samples
            .iter()
            .filter(|s| s.labels[0].1 == "vip")
            .map(|s| s.labels[1].1.as_str())
            .collect();
        assert_eq!(vip, vec!["em1"]);
        let nodes = out.get("clusterwatch_pacemaker_node_state").unwrap();
        assert_eq!(nodes.samples.len(), 3 * NODE_STATES.len());
    }

    #[test]
    fn rejects_other_documents_and_reads_failure_status() {
        assert!(parse_crm_mon("<html/>").is_err());
        assert!(parse_crm_mon("not xml").is_err());
        let failed = r#"<pacemaker-result api-version="2.25"><status code="102" message="Not connected"/></pacemaker-result>"#;
        assert_eq!(parse_status(failed).unwrap(), "Not connected (code 102)");
    }

    #[tokio::test]
    async fn a_failing_crm_mon_is_a_connect_error_and_a_hung_one_is_killed_at_the_deadline() {
        let collector = |path: PathBuf| PacemakerCollector { crm_mon: path };
        let within = |d: u64| ScrapeContext {
            deadline: tokio::time::Instant::now() + std::time::Duration::from_millis(d),
        };
        let err = collector("false".into())
            .run(&within(5000))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "connect", "{err}");
        let missing = collector("/nonexistent/crm_mon".into());
        assert_eq!(missing.run(&within(5000)).await.unwrap_err().reason(), "io");

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("crm_mon");
        let pid_file = dir.path().join("pid");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
                pid_file.display()
            ),
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = collector(script).run(&within(500)).await.unwrap_err();
        assert_eq!(err.reason(), "timeout");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        // Killed on drop; tokio reaps it in the background, so wait for that.
        let stat = format!("/proc/{}/stat", pid.trim());
        let gone = async {
            while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), gone)
            .await
            .expect("the hung crm_mon was killed");
    }

    #[test]
    fn golden_exposition_of_captured_crm_mon() {
        for name in ["crm_mon-2.1.5-mixed", "crm_mon-2.1.5-no-quorum"] {
            let xml = crate::collector::golden::input(&format!("{name}.xml"));
            let mut out = SampleBuffer::new();
            write_samples(&parse_crm_mon(&xml).unwrap(), &mut out);
            crate::collector::golden::assert_golden(name, out);
        }
    }
}
