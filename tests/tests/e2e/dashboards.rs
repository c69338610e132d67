//! The Grafana dashboards in `dashboards/`, checked two ways: statically (a unit on every
//! panel, `${datasource}` everywhere, unique panel ids, template variables, metric names from
//! the README's metric reference) and against a real stack (a PostgreSQL pair watched by
//! clusterwatch and scraped by Prometheus, next to a Redis pair behind HAProxy, a MongoDB
//! stand-in, probes, node checks, etcd, Pacemaker reading a saved CIB and the hook runner),
//! where every panel query must be valid PromQL and return data. No Grafana runs here:
//! rendering and layout are not tested.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use clusterwatch_tests::harness::certs::Ca;
use clusterwatch_tests::harness::haproxy::redis_backend;
use clusterwatch_tests::harness::kamailio::Kamailio;
use clusterwatch_tests::harness::mongo_standin::{Scenario, Version};
use clusterwatch_tests::harness::nginx::Nginx;
use clusterwatch_tests::harness::process::{tail, LOG_TAIL_LINES};
use clusterwatch_tests::harness::repo_root;
use clusterwatch_tests::harness::webhook::{alert, notification, HookLab, TOKEN};
use clusterwatch_tests::harness::{
    free_port, temp_dir, Clusterwatch, EtcdCluster, Haproxy, MongoStandin, PgCluster, Prometheus,
    PrometheusConfig, RedisPair, ScrapeJob, Supervisord,
};

/// How long the stack gets until every panel query has data.
const WAIT: Duration = Duration::from_secs(120);

/// The dashboards the project ships; any other `*.json` in `dashboards/` is checked too.
const EXPECTED: &[&str] = &[
    "clusterwatch-cluster-managers.json",
    "clusterwatch-hooks.json",
    "clusterwatch-host.json",
    "clusterwatch-mongodb.json",
    "clusterwatch-node.json",
    "clusterwatch-overview.json",
    "clusterwatch-postgres.json",
    "clusterwatch-probes.json",
    "clusterwatch-redis.json",
];

/// Grafana's built-in interval variables and what they become in the test's instant queries.
const BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "5m"),
];

/// The datasource reference every panel and query carries.
const DATASOURCE_UID: &str = "${datasource}";

/// Panel queries allowed to return no series on the test stack, as (a substring of the
/// expression, why). Empty on purpose: the fixture creates the states the panels show (an
/// inactive slot, an archived segment, a failing directory target, a firing alert), so a panel
/// without data is a broken query. Add an entry only for a state the stack cannot reach.
const ALLOWED_EMPTY: &[(&str, &str)] = &[];

/// A test-only alert that fires at the first evaluation, so the "Firing alerts" panels have a
/// row to show (the real rules all wait several minutes before firing).
const FIRING_RULE: &str = "groups:
  - name: dashboards-test
    rules:
      - alert: DashboardsTestAlwaysFiring
        expr: vector(1)
        labels:
          severity: info
          cluster: pg
        annotations:
          summary: Fires from the first evaluation so the dashboards' alert panels have data.
";

/// Every `dashboards/*.json`, parsed, by file name.
fn dashboards() -> BTreeMap<String, Value> {
    let dir = repo_root().join("dashboards");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|ext| ext == "json") {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(name, json);
        }
    }
    for name in EXPECTED {
        assert!(out.contains_key(*name), "dashboards/{name} is missing");
    }
    out
}

/// Every panel, with the panels of collapsed rows (nested under the row) included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn title(panel: &Value) -> String {
    panel["title"].as_str().unwrap_or("<untitled>").to_owned()
}

/// The names of a dashboard's template variables other than the datasource one.
fn query_variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] != "datasource")
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// The query text of a Prometheus template variable (a string, or Grafana 10's object form).
fn variable_query(variable: &Value) -> Option<&str> {
    variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())
}

/// One PromQL expression found in a dashboard.
#[derive(Debug, Clone)]
struct Query {
    /// `file: panel title (refId)` or `file: variable NAME`.
    at: String,
    /// The expression as written, with Grafana variables.
    expr: String,
    /// The expression the test runs: variables replaced.
    promql: String,
    /// Panel and variable queries must return data on the test stack; annotation queries
    /// (a failover, a hook run in the last minutes) only have to be valid.
    needs_data: bool,
}

/// Replaces Grafana variables in `expr`: the dashboard's own (`$name`, `${name}`) by `.*`,
/// built-ins by [`BUILTINS`]. A dashboard variable must sit inside a `=~"…"` matcher (a
/// multi-value or All selection is a regex), and an unknown variable is an error.
fn expand(expr: &str, variables: &[String]) -> std::result::Result<String, String> {
    expand_with(expr, variables, &[])
}

/// [`expand`], with the variables named in `chosen` set to a value (a regex, as Grafana
/// writes a selection) instead of All.
fn expand_with(
    expr: &str,
    variables: &[String],
    chosen: &[(&str, &str)],
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        let (before, from_dollar) = rest.split_at(at);
        out.push_str(before);
        let after = &from_dollar[1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{expr}`"))?;
            let inner = &braced[..end];
            // `${name:format}`: the format does not change what the name refers to.
            (inner.split(':').next().unwrap_or(inner), end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if let Some((_, value)) = BUILTINS.iter().find(|(builtin, _)| *builtin == name) {
            out.push_str(value);
        } else if variables.iter().any(|v| v == name) {
            if !out.ends_with("=~\"") {
                return Err(format!(
                    "`${name}` is not inside a `=~\"…\"` matcher (multi-select and All are regexes): `{expr}`"
                ));
            }
            let value = chosen
                .iter()
                .find(|(chosen, _)| *chosen == name)
                .map_or(".*", |(_, value)| value);
            out.push_str(value);
        } else {
            return Err(format!("unknown variable `${name}` in `{expr}`"));
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every panel query and every variable query of a dashboard; problems (unknown variables,
/// variables outside a regex matcher, unreadable `label_values`) go to `problems`.
fn queries(file: &str, dashboard: &Value, problems: &mut Vec<String>) -> Vec<Query> {
    let variables = query_variables(dashboard);
    let mut out = Vec::new();
    // Panel targets must return data on the test stack; annotation queries (a failover, a
    // hook run in the last minutes) only have to be valid.
    let panel_targets = panels(dashboard).into_iter().flat_map(|panel| {
        panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(move |target| {
                let at = format!(
                    "{file}: {} ({})",
                    title(panel),
                    target["refId"].as_str().unwrap_or("?")
                );
                (at, target, true)
            })
    });
    let annotation_queries = annotations(dashboard).into_iter().map(|annotation| {
        let at = format!(
            "{file}: annotation {}",
            annotation["name"].as_str().unwrap_or("?")
        );
        (at, annotation, false)
    });
    for (at, holder, needs_data) in panel_targets.chain(annotation_queries) {
        let Some(expr) = holder["expr"].as_str() else {
            problems.push(format!("{at}: no `expr`"));
            continue;
        };
        match expand(expr, &variables) {
            Ok(promql) => out.push(Query {
                at,
                expr: expr.to_owned(),
                promql,
                needs_data,
            }),
            Err(e) => problems.push(format!("{at}: {e}")),
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or("?");
        let at = format!("{file}: variable {name}");
        let Some(query) = variable_query(variable) else {
            problems.push(format!("{at}: no query"));
            continue;
        };
        // label_values(SELECTOR, LABEL) lists LABEL over SELECTOR's series: as PromQL,
        // `count by (LABEL) (SELECTOR)`.
        let parsed = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','));
        let Some((selector, label)) = parsed else {
            problems.push(format!(
                "{at}: `{query}` is not label_values(SELECTOR, LABEL)"
            ));
            continue;
        };
        match expand(selector.trim(), &variables) {
            Ok(selector) => out.push(Query {
                at,
                expr: query.to_owned(),
                promql: format!("count by ({}) ({selector})", label.trim()),
                needs_data: true,
            }),
            Err(e) => problems.push(format!("{at}: {e}")),
        }
    }
    out
}

/// The dashboard's annotation queries.
fn annotations(dashboard: &Value) -> Vec<&Value> {
    dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// The database dashboards, which also filter by Prometheus `job` and `instance`.
const DATABASE_DASHBOARDS: &[&str] = &[
    "clusterwatch-postgres.json",
    "clusterwatch-redis.json",
    "clusterwatch-mongodb.json",
];

/// Where panel links to runbooks point: the rules pack's `runbook_url` prefix.
const RUNBOOK_PREFIX: &str = "https://clusterwatch.invalid/runbooks/";

/// The alert names the rules pack defines (`- alert: Name` in `rules/*.rules.yml`).
fn pack_alerts() -> BTreeSet<String> {
    let rules = repo_root().join("rules");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&rules).expect("rules/") {
        let path = entry.expect("directory entry").path();
        if path.to_string_lossy().ends_with(".rules.yml") {
            let text = std::fs::read_to_string(&path).expect("rules file");
            names.extend(text.lines().filter_map(|line| {
                line.trim_start()
                    .strip_prefix("- alert:")
                    .map(|name| name.trim().to_owned())
            }));
        }
    }
    names
}

/// Every `clusterwatch_…{…}` selector in `expr`, with its braces.
fn selectors(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("clusterwatch_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let after = &tail[name_len..];
        if after.starts_with('{') {
            let end = after.find('}').map_or(after.len(), |i| i + 1);
            out.push(&tail[..name_len + end]);
            rest = &after[end..];
        } else {
            out.push(&tail[..name_len]);
            rest = after;
        }
    }
    out
}

/// Runbook links: every link into the runbooks names an existing page, and every panel whose
/// description names an alert of the pack links that alert's runbook.
fn runbook_links(
    file: &str,
    dashboard: &Value,
    alerts: &BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let runbooks = repo_root().join("rules/runbooks");
    for panel in panels(dashboard) {
        let name = title(panel);
        let mut urls: Vec<String> = panel["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["url"].as_str().map(str::to_owned))
            .collect();
        for override_ in panel["fieldConfig"]["overrides"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for property in override_["properties"].as_array().into_iter().flatten() {
                if property["id"] == "links" {
                    urls.extend(
                        property["value"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|l| l["url"].as_str().map(str::to_owned)),
                    );
                }
            }
        }
        for url in &urls {
            let Some(page) = url.strip_prefix(RUNBOOK_PREFIX) else {
                continue;
            };
            // A data link per alert name (the firing alerts table) is checked by its form.
            if page == "${__value.raw}.md" {
                continue;
            }
            if !runbooks.join(page).is_file() {
                problems.push(format!(
                    "{file}: panel `{name}` links {url}, which is no page of rules/runbooks/"
                ));
            }
        }
        let description = panel["description"].as_str().unwrap_or_default();
        for alert in alerts {
            let named = description.match_indices(alert.as_str()).any(|(at, _)| {
                let next = description[at + alert.len()..].chars().next();
                !next.is_some_and(|c| c.is_ascii_alphanumeric())
            });
            let expected = format!("{RUNBOOK_PREFIX}{alert}.md");
            if named && !urls.contains(&expected) {
                problems.push(format!(
                    "{file}: panel `{name}` names {alert} but does not link {expected}"
                ));
            }
        }
    }
}

/// Every match of `clusterwatch_[a-z0-9_]+` in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "clusterwatch_";
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let tail = &rest[at + PREFIX.len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if len > 0 {
            out.insert(format!("{PREFIX}{}", &tail[..len]));
        }
        rest = &tail[len..];
    }
    out
}

/// Metric names a dashboard may use: the README's "Metric reference" section and the names
/// inside the recording rules of `rules/*.yml`.
fn known_metrics() -> BTreeSet<String> {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find("## Metric reference")
        .expect("README.md has a `## Metric reference` section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut known = metric_names(&section[..end]);
    let rules = root.join("rules");
    for entry in std::fs::read_dir(&rules).expect("rules/") {
        let path = entry.expect("directory entry").path();
        if path
            .extension()
            .is_some_and(|ext| ext == "yml" || ext == "yaml")
        {
            let text = std::fs::read_to_string(&path).expect("rules file");
            for line in text.lines() {
                if let Some(record) = line.trim_start().strip_prefix("- record:") {
                    known.extend(metric_names(record));
                } else if let Some(record) = line.trim_start().strip_prefix("record:") {
                    known.extend(metric_names(record));
                }
            }
        }
    }
    known
}

/// Every `datasource` member anywhere in `value` that is not `{type: prometheus, uid:
/// ${datasource}}`, by JSON path.
fn foreign_datasources(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                if key == "datasource" {
                    let ok = child["uid"] == DATASOURCE_UID && child["type"] == "prometheus";
                    if !ok {
                        out.push(format!("{child_path} = {child}"));
                    }
                }
                foreign_datasources(child, &child_path, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                foreign_datasources(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Everything about one dashboard that can be checked without a server.
fn conventions(file: &str, dashboard: &Value, problems: &mut Vec<String>) {
    let mut complain = |what: String| problems.push(format!("{file}: {what}"));
    if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 38) {
        complain(format!(
            "schemaVersion {} (Grafana 10 needs 38 or later)",
            dashboard["schemaVersion"]
        ));
    }
    for key in ["uid", "title"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            complain(format!("no `{key}`"));
        }
    }
    if !dashboard["tags"]
        .as_array()
        .is_some_and(|tags| tags.iter().any(|t| t == "clusterwatch"))
    {
        complain("`tags` lacks \"clusterwatch\"".to_owned());
    }

    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let find = |name: &str| variables.iter().find(|v| v["name"] == name);
    match find("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => complain(format!(
            "needs a `datasource` variable of type datasource, query prometheus; found {other:?}"
        )),
    }
    for name in ["cluster", "target"] {
        if find(name).is_none() {
            complain(format!("no `{name}` template variable"));
        }
    }
    if DATABASE_DASHBOARDS.contains(&file) {
        for name in ["job", "instance"] {
            if find(name).is_none() {
                complain(format!("no `{name}` template variable"));
            }
        }
        let exprs = panels(dashboard)
            .into_iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .chain(annotations(dashboard).into_iter().cloned())
            .filter_map(|t| t["expr"].as_str().map(str::to_owned))
            .collect::<Vec<_>>();
        for expr in &exprs {
            for selector in selectors(expr) {
                // Hook runs come from the receiver's clusterwatch, which need not be the one
                // watching the database: they are narrowed by job only.
                let hook = selector.starts_with("clusterwatch_hook_");
                let filtered = selector.contains(r#"job=~"$job""#)
                    && (hook || selector.contains(r#"instance=~"$instance""#));
                if !filtered {
                    complain(format!(
                        "`{selector}` does not filter on job=~\"$job\" and instance=~\"$instance\""
                    ));
                }
            }
        }
    }
    let all_exprs: String = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .chain(variables.iter().filter_map(variable_query))
        .collect::<Vec<_>>()
        .join("\n");
    for v in variables.iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().unwrap_or("?");
        if v["multi"] != true || v["includeAll"] != true {
            complain(format!("variable `{name}` must be multi-select with All"));
        }
        if v["allValue"] != ".*" {
            complain(format!(
                "variable `{name}` needs allValue `.*` so All also matches series without the label"
            ));
        }
        let used = all_exprs.contains(&format!("${name}\""))
            || all_exprs.contains(&format!("${{{name}}}"));
        if !used {
            complain(format!("variable `{name}` is used by no query"));
        }
    }

    let mut ids = BTreeSet::new();
    for panel in panels(dashboard) {
        let name = title(panel);
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => complain(format!("panel id {id} used twice ({name})")),
            Some(_) => {}
            None => complain(format!("panel `{name}` has no numeric id")),
        }
        if is_row(panel) {
            continue;
        }
        if panel["title"].as_str().is_none_or(str::is_empty) {
            complain(format!("panel {} has no title", panel["id"]));
        }
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            complain(format!("panel `{name}` has no fieldConfig.defaults.unit"));
        }
        if panel["datasource"]["uid"] != DATASOURCE_UID {
            complain(format!("panel `{name}` does not use ${{datasource}}"));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            complain(format!("panel `{name}` has no query"));
        }
        for target in &targets {
            if target["datasource"]["uid"] != DATASOURCE_UID {
                complain(format!(
                    "a query of panel `{name}` does not use ${{datasource}}"
                ));
            }
        }
    }

    for annotation in annotations(dashboard) {
        if annotation["datasource"]["uid"] != DATASOURCE_UID {
            complain(format!(
                "annotation `{}` does not use ${{datasource}}",
                annotation["name"]
            ));
        }
    }

    let mut foreign = Vec::new();
    foreign_datasources(dashboard, "", &mut foreign);
    for f in foreign {
        complain(format!("datasource other than ${{datasource}}: {f}"));
    }
}

#[test]
fn dashboards_follow_the_conventions() {
    let known = known_metrics();
    let alerts = pack_alerts();
    assert!(
        !alerts.is_empty(),
        "no `- alert:` found in rules/*.rules.yml"
    );
    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    let mut annotated = 0;
    for (file, dashboard) in &dashboards() {
        conventions(file, dashboard, &mut problems);
        runbook_links(file, dashboard, &alerts, &mut problems);
        annotated += usize::from(!annotations(dashboard).is_empty());
        if let Some(previous) = uids.insert(dashboard["uid"].to_string(), file.clone()) {
            problems.push(format!("{file}: same uid as {previous}"));
        }
        queries(file, dashboard, &mut problems);
        let exprs = panels(dashboard)
            .into_iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten())
            .filter_map(|t| t["expr"].as_str())
            .chain(
                annotations(dashboard)
                    .into_iter()
                    .filter_map(|a| a["expr"].as_str()),
            )
            .chain(
                dashboard["templating"]["list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(variable_query),
            );
        for metric in exprs.flat_map(metric_names) {
            if !known.contains(&metric) {
                problems.push(format!(
                    "{file}: `{metric}` is neither in README.md's metric reference nor a recording rule in rules/"
                ));
            }
        }
    }
    assert!(
        annotated >= 4,
        "the overview, database and hooks dashboards carry hook-run and failover annotations"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn selectors_are_found_with_their_matchers() {
    assert_eq!(
        selectors(r#"max(clusterwatch_pg_role{role="primary"}) + clusterwatch_fs_used_ratio"#),
        vec![
            r#"clusterwatch_pg_role{role="primary"}"#,
            "clusterwatch_fs_used_ratio"
        ]
    );
}

#[test]
fn variables_are_expanded_only_inside_regex_matchers() {
    let vars = vec!["cluster".to_owned(), "target".to_owned()];
    assert_eq!(
        expand(
            r#"rate(x{cluster=~"$cluster", target=~"${target}"}[$__rate_interval])"#,
            &vars
        ),
        Ok(r#"rate(x{cluster=~".*", target=~".*"}[1m])"#.to_owned())
    );
    assert!(expand(r#"x{cluster="$cluster"}"#, &vars).is_err());
    assert!(expand(r#"x{cluster=~"$clusters"}"#, &vars).is_err());
    assert_eq!(
        expand_with(
            r#"x{cluster=~"$cluster", target=~"$target"}"#,
            &vars,
            &[("target", "em1")]
        ),
        Ok(r#"x{cluster=~".*", target=~"em1"}"#.to_owned())
    );
}

#[test]
fn metric_names_are_found_like_the_regex_would() {
    assert_eq!(
        metric_names("cluster:clusterwatch_pg_primaries:count + clusterwatch_fs_used_ratio"),
        BTreeSet::from([
            "clusterwatch_fs_used_ratio".to_owned(),
            "clusterwatch_pg_primaries".to_owned()
        ])
    );
}

/// Number of series (or 1 for a scalar) in a query's `data`.
fn series_count(data: &Value) -> usize {
    match data["resultType"].as_str() {
        Some("scalar") | Some("string") => 1,
        _ => data["result"].as_array().map_or(0, Vec::len),
    }
}

/// `label value → sample value` of a vector result.
fn values_by(data: &Value, label: &str) -> BTreeMap<String, f64> {
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let key = s["metric"][label].as_str().unwrap_or("").to_owned();
            let value = s["value"][1].as_str()?.parse::<f64>().ok()?;
            Some((key, value))
        })
        .collect()
}

/// What some panels must show on the healthy pair: the state encodings add up.
/// (panel title, label, label value, expected value)
const EXPECTED_VALUES: &[(&str, &str, &str, f64)] = &[
    ("Primaries per cluster", "cluster", "pg", 1.0),
    ("Standbys streaming", "cluster", "pg", 1.0),
    ("Role now", "target", "primary", 2.0),
    ("Role now", "target", "standby", 1.0),
    ("WAL receiver", "target", "standby", 1.0),
    (
        "Standby state (pg_stat_replication)",
        "target",
        "primary",
        1.0,
    ),
    ("Standbys missing", "target", "primary", 0.0),
    ("Masters per group", "cluster", "redis", 1.0),
    ("Redis masters per group", "cluster", "redis", 1.0),
    ("MongoDB primaries per set", "cluster", "rs0", 1.0),
    // A member and a status file configured without `cluster:` are one group of their own.
    ("MongoDB primaries per set", "cluster", "(no cluster)", 1.0),
    (
        "Production nodes per cluster",
        "cluster",
        "(no cluster)",
        1.0,
    ),
    ("Production nodes per cluster", "cluster", "cp", 1.0),
    ("Nodes holding each VIP", "name", "vip", 1.0),
    ("Out of service now", "target", "cp1-out-of-service", 1.0),
    ("etcd quorum", "target", "etcd", 1.0),
    ("Backends", "backend", "redis", 1.0),
    ("Pacemaker quorum", "target", "sre", 1.0),
    ("Stats file present", "target", "counters", 1.0),
    ("Status file unrecognised", "target", "cp1-status", 0.0),
    ("Program state now", "program", "idle", 1.0),
    ("Interfaces", "interface", "lo", 3.0),
    ("Textfile rejected", "file", "backup.prom", 0.0),
    // `sh -c 'exit 3'` ends as exit_nonzero, the second result of the encoding.
    ("Failing check programs", "target", "check-fails", 2.0),
    ("Log file present", "target", "app-log", 1.0),
    ("Runs of unknown outcome", "hook", "promote", 0.0),
];

/// SRE stats files in the call processors' format (host, stat, time, unix time, then the
/// newest per-minute value first): traffic with some error answers, and a processing time.
const COUNTERS_CSV: &str = "cp1,request.INVITE,2022-05-10T16:31:00,1652193060,120,118,121\n\
                            cp1,response.genericError,2022-05-10T16:31:00,1652193060,2,0,1\n\
                            cp1,response.serviceDown,2022-05-10T16:31:00,1652193060,1,0,0\n\
                            cp1,response.serviceLogicError,2022-05-10T16:31:00,1652193060,0,0,0\n";
const SAMPLES_CSV: &str =
    "cp1,profiling.cp.INVITE,2022-05-10T16:31:00,1652193060,12.500,11.000,13.250\n";

/// The node checks' files: SRE stats, a status file saying production, an out-of-service
/// flag, a textfile directory with one file, and a log that exists before clusterwatch starts
/// (so it is followed from its end: [`APP_LOG_LINES`] go in once it is scraped). Two program
/// checks, one passing and one failing. Returns the configuration sections and the log's path.
fn node_checks(dir: &Path) -> Result<(String, PathBuf)> {
    let counters = dir.join("counters.csv");
    let samples = dir.join("samples.csv");
    std::fs::write(&counters, COUNTERS_CSV)?;
    std::fs::write(&samples, SAMPLES_CSV)?;
    let status = dir.join("node.status");
    std::fs::write(&status, "production\n")?;
    let flag = dir.join("cp1-out-of-service");
    std::fs::write(&flag, "")?;
    let textfiles = dir.join("textfile");
    std::fs::create_dir(&textfiles)?;
    std::fs::write(
        textfiles.join("backup.prom"),
        "# TYPE backup_last_ok gauge\nbackup_last_ok 1\n",
    )?;
    let log = dir.join("app.log");
    std::fs::write(&log, "written before clusterwatch started: not counted\n")?;
    let sections = format!(
        "sre_stats:\n  counters: '{}'\n  samples: '{}'\n  cluster: cp\n\
         files:\n\
         \x20 - {{ name: cp1-status, cluster: cp, path: '{}', states: [down, production, standby, production_alone, standby_as_production, production_as_standby] }}\n\
         \x20 - {{ name: cp1-out-of-service, cluster: cp, path: '{}' }}\n\
         \x20 - {{ name: solo-status, path: '{}', states: [down, production, standby] }}\n\
         processes:\n  - {{ name: postgres, cluster: pg, process_name: '^postgres$', min: 2 }}\n\
         network:\n  cluster: cp\n  interfaces: [lo]\n  addresses:\n    - {{ name: vip, address: 127.0.0.1 }}\n\
         textfile:\n  directory: '{}'\n\
         programs:\n\
         \x20 - {{ name: check-ok, cluster: cp, command: ['true'], interval: 5s }}\n\
         \x20 - {{ name: check-fails, cluster: cp, command: [sh, -c, 'exit 3'], interval: 5s }}\n\
         logs:\n\
         \x20 - {{ name: app-log, cluster: cp, path: '{}', patterns: {{ error: 'ERROR', panic: 'panic' }} }}\n",
        counters.display(),
        samples.display(),
        status.display(),
        flag.display(),
        status.display(),
        textfiles.display(),
        log.display(),
    );
    Ok((sections, log))
}

/// Appended to the followed log once clusterwatch has looked at it: one line for each
/// pattern and one for none, so the log panels have matches and a last-match time.
const APP_LOG_LINES: &str = "2026-01-01 ERROR disk quota exceeded\n\
                             2026-01-01 thread main panic: index out of range\n\
                             2026-01-01 INFO request served\n";

#[tokio::test]
async fn every_panel_query_returns_data_from_a_real_stack() -> Result<()> {
    let started = Instant::now();
    let mut problems = Vec::new();
    let mut all = Vec::new();
    for (file, dashboard) in &dashboards() {
        all.extend(queries(file, dashboard, &mut problems));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let pair = PgCluster::start_pair().await?;
    // An inactive slot next to the standby's active one, so the slot panels show both states.
    pair.primary
        .psql("SELECT pg_create_physical_replication_slot('spare')")
        .await?;
    // At least one archived segment, so the archive directory and archiver ages have values.
    let segment = pair.primary.switch_wal().await?;
    pair.primary.wait_archived(&segment, WAIT).await?;
    // Probes: HTTPS with a certificate, a SIP peer, and one that always fails (closed port).
    let certs = temp_dir("cw-dashboards-certs-")?;
    let ca = Ca::create(certs.path())?;
    let leaf = ca.leaf(certs.path(), "web", 30 * 86_400)?;
    let nginx = Nginx::start(&[(&leaf.cert, &leaf.key)]).await?;
    let kamailio = Kamailio::start().await?;
    let probes = format!(
        "probes:\n\
         \x20 - {{ name: web, http: {{ url: '{}/', tls: {{ ca_file: '{}' }} }} }}\n\
         \x20 - {{ name: sbc-sip, sip_options: {{ address: '{}' }} }}\n\
         \x20 - {{ name: gone, tcp: {{ address: '127.0.0.1:{}' }} }}\n\
         kamailio:\n  - {{ name: sbc, url: '{}' }}\n",
        nginx.https_base(0),
        ca.cert_path().display(),
        kamailio.sip_addr(),
        free_port()?,
        kamailio.rpc_url(),
    );
    // A Redis pair with a memory limit, so the maxmemory panels have a ratio to show.
    let redis = RedisPair::start().await?;
    redis
        .master
        .cli(&["CONFIG", "SET", "maxmemory", "104857600"])
        .await?;
    // A healthy three-member set, as the stand-in plays it, for the MongoDB dashboard.
    let mongo = MongoStandin::start(Version::V7_0, Scenario::Healthy)?;
    // HAProxy in front of the Redis pair: the master's server UP, the replica's DOWN.
    let haproxy = Haproxy::start(&redis_backend(
        "redis",
        free_port()?,
        &[&redis.master, &redis.replica],
    ))
    .await?;
    let etcd = EtcdCluster::start(1).await?;
    // A sleep length no other process uses (node.rs's program sleeps 3600.PID), so no other
    // test's process target counts this program.
    let supervisord = Supervisord::start(&format!(
        "[program:idle]\ncommand=/bin/sleep 7200.{}\nstartsecs=0\n",
        std::process::id()
    ))
    .await?;
    let node = temp_dir("cw-dashboards-node-")?;
    let (node_sections, app_log) = node_checks(node.path())?;
    // The hook runner on the main listener: one hook that runs (and succeeds), one dry-run.
    let hooks = HookLab::new()?;
    let ok_hook = hooks.script("ok-hook", "exit 0")?;
    // With the leader lease on the primary, so the lease panels have a holder.
    let hooks_section = format!(
        "hooks:\n  listen: main\n  bearer_token_file: '{dir}/token'\n  state_dir: '{dir}/state'\n\
         \x20 lock: {{ etcd: {{ endpoints: ['{etcd}'] }} }}\n\
         \x20 lease: {{ targets: [primary], self_fence: [/bin/true] }}\n  rules:\n\
         \x20   - {{ name: promote, match: {{ alertname: DashboardsTest }}, command: ['{ok}'] }}\n\
         \x20   - {{ name: rehearse, match: {{ alertname: DashboardsTest }}, dry_run: true, command: ['{ok}'] }}\n",
        dir = hooks.dir().display(),
        ok = ok_hook.display(),
        etcd = etcd.endpoints()[0],
    );
    let cluster_managers = format!(
        "etcd:\n  - {{ name: etcd, cluster: ce, endpoints: ['{}'] }}\n\
         haproxy:\n  - {{ name: lb, cluster: redis, url: '{}' }}\n\
         pacemaker:\n  name: sre\n  cluster: em\n\
         supervisord:\n  - {{ name: node-supervisor, cluster: cp, url: '{}' }}\n",
        etcd.endpoints().join("', '"),
        haproxy.stats_url(),
        supervisord.url(),
    );
    let stack_ready = started.elapsed();

    // `missing-dir` fails on every scrape, so the panels about failed collections have data.
    let config = format!(
        "global:\n  timeout: 3s\n\
         postgres:\n\
         \x20 - {{ name: primary, cluster: pg, dsn: '{}', expected_standbys: 1 }}\n\
         \x20 - {{ name: standby, cluster: pg, dsn: '{}' }}\n\
         filesystems:\n  mounts:\n    - {{ path: '{}', threshold: 0.9 }}\n\
         system: {{}}\n\
         directories:\n\
         \x20 - {{ name: wal-archive, cluster: pg, path: '{}' }}\n\
         \x20 - {{ name: missing-dir, path: '{}' }}\n\
         redis:\n\
         \x20 - {{ name: redis-master, cluster: redis, address: '{}' }}\n\
         \x20 - {{ name: redis-replica, cluster: redis, address: '{}' }}\n\
         mongodb:\n\
         \x20 - {{ name: mongo, cluster: rs0, uri: '{}' }}\n\
         \x20 - {{ name: mongo-solo, uri: '{}' }}\n",
        pair.primary.monitor_dsn(),
        pair.standby.monitor_dsn(),
        pair.primary.dir().display(),
        pair.primary.archive_dir().display(),
        pair.primary.dir().join("no-such-directory").display(),
        redis.master.url(),
        redis.replica.url(),
        mongo.uri(),
        mongo.uri(),
    ) + &probes
        + &node_sections
        + &cluster_managers
        + &hooks_section;
    // crm_mon reads the saved CIB of a two-node cluster instead of a live one.
    let cib = repo_root().join("tests/fixtures/pacemaker/mixed.xml");
    let cw =
        Clusterwatch::start_with_env(Some(&config), &[], &[("CIB_file", cib.as_os_str())]).await?;
    // One notification, so the hook panels have a run, a dry-run skip and an accepted request.
    let status = cw
        .client()
        .post(cw.url("/hooks/alertmanager"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&notification(
            "firing",
            "{}:{alertname=\"DashboardsTest\"}",
            vec![alert(
                "firing",
                serde_json::json!({"alertname": "DashboardsTest", "cluster": "pg"}),
                "d45b0a2d00000001",
                "2026-01-01T00:00:00Z",
            )],
        ))?)
        .send()
        .await
        .context("posting to the webhook")?
        .status();
    assert!(status.is_success(), "the webhook answered {status}");

    let rules = temp_dir("cw-dashboards-rules-")?;
    let rule_file = rules.path().join("always-firing.rules.yml");
    std::fs::write(&rule_file, FIRING_RULE).context("writing the test rule file")?;
    // Two seconds leave each PostgreSQL collection 1.5 s under the scrape-timeout header, room
    // enough on a busy two-core machine.
    let mut job = ScrapeJob::new("clusterwatch", &[&cw.addr()]);
    job.scrape_interval = Duration::from_secs(2);
    job.scrape_timeout = Duration::from_secs(2);
    let prometheus = Prometheus::start(&PrometheusConfig {
        jobs: vec![job],
        rule_files: vec![rule_file],
        ..PrometheusConfig::default()
    })
    .await?;
    prometheus
        .wait_for_target_up("clusterwatch", Duration::from_secs(60))
        .await?;
    let scraping = started.elapsed();
    // A scrape has looked at the log (from its end), so these lines count as new ones.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&app_log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, APP_LOG_LINES.as_bytes()))
        .context("appending to the followed log")?;

    // Rates and derivatives need two samples and sizes come on their own cadence, so poll
    // until every query has data; an invalid query fails at once.
    let deadline = Instant::now() + WAIT;
    let mut pending: Vec<&Query> = all.iter().collect();
    let mut invalid = Vec::new();
    let mut answers: BTreeMap<String, Value> = BTreeMap::new();
    loop {
        let mut still = Vec::new();
        for query in pending {
            match prometheus.query(&query.promql).await {
                Err(e) => invalid.push(format!("{}: {e:#}\n    {}", query.at, query.promql)),
                Ok(data) if series_count(&data) > 0 || !query.needs_data => {
                    answers.insert(query.at.clone(), data);
                }
                Ok(_) => still.push(query),
            }
        }
        pending = still;
        if !invalid.is_empty() || pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        invalid.is_empty(),
        "queries Prometheus rejects:\n{}",
        invalid.join("\n")
    );

    let mut empty = Vec::new();
    for query in &pending {
        match ALLOWED_EMPTY
            .iter()
            .find(|(needle, _)| query.expr.contains(needle))
        {
            Some((_, reason)) => eprintln!("allowed without data: {} ({reason})", query.at),
            None => empty.push(format!("{}:\n    {}", query.at, query.promql)),
        }
    }
    for (needle, reason) in ALLOWED_EMPTY {
        if all
            .iter()
            .filter(|q| q.expr.contains(needle))
            .all(|q| answers.contains_key(&q.at))
        {
            eprintln!("ALLOWED_EMPTY entry `{needle}` ({reason}) is no longer needed");
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data after {WAIT:?} (exporter log tail below):\n{}\n\n{}",
        empty.join("\n"),
        tail(&cw.logs(), LOG_TAIL_LINES)
    );

    for (panel, label, value, expected) in EXPECTED_VALUES {
        let mut seen = false;
        for (at, data) in answers
            .iter()
            .filter(|(at, _)| at.contains(&format!(": {panel} (")))
        {
            seen = true;
            let got = values_by(data, label);
            assert_eq!(
                got.get(*value),
                Some(expected),
                "{at}: expected {label}={value} to be {expected}, got {got:?}"
            );
        }
        assert!(seen, "no panel titled `{panel}` answered");
    }

    // The database dashboards' `job` and `instance` variables set to this stack's values
    // still show every panel; set to a job that does not exist, no panel shows anything.
    let instance = cw.addr().to_string();
    let mut filtered = 0;
    for (file, dashboard) in &dashboards() {
        if !DATABASE_DASHBOARDS.contains(&file.as_str()) {
            continue;
        }
        let variables = query_variables(dashboard);
        let panel_queries = all.iter().filter(|q| {
            q.needs_data && q.at.starts_with(&format!("{file}: ")) && !q.at.contains(": variable ")
        });
        for query in panel_queries {
            for (job, expect_data) in [("clusterwatch", true), ("no-such-job", false)] {
                let promql = expand_with(
                    &query.expr,
                    &variables,
                    &[("job", job), ("instance", &instance)],
                )
                .map_err(anyhow::Error::msg)?;
                let data = prometheus.query(&promql).await?;
                let count = series_count(&data);
                assert_eq!(
                    count > 0,
                    expect_data,
                    "{} with job {job} and instance {instance}: {count} series\n    {promql}",
                    query.at
                );
                filtered += 1;
            }
        }
    }
    assert!(
        filtered > 0,
        "no database dashboard query was run with job and instance set"
    );

    eprintln!(
        "{} queries checked; stack ready after {:.0?}, scraped after {:.0?}, all data after {:.0?}",
        all.len(),
        stack_ready,
        scraping,
        started.elapsed()
    );
    drop(prometheus);
    drop(cw);
    drop(pair);
    drop(haproxy);
    drop(redis);
    drop(etcd);
    drop(supervisord);
    Ok(())
}
