//! The offline commands: `hooks journal` (print, `--check`, `--accept-damage`) and
//! `hooks replay` (the decisions a payload would get, their evidence, and the argv and `CW_*`
//! environment of each step a run would start). They read the journal and decide with
//! `policy`; they never run a hook.

use std::path::Path;

use super::config::HooksConfig;
use super::journal::{Event, Record};
use super::policy::State;
use super::{context, env, journal, now, payload, policy};

/// `clusterwatch hooks journal [--check | --accept-damage]`: the journal as lines (damaged
/// lines in place), only its damage, or the damage dropped. `Err` when a check finds damage.
pub fn journal_command(
    cfg: &HooksConfig,
    check: bool,
    accept: bool,
) -> Result<Vec<String>, String> {
    let dir = &cfg.state_dir;
    if accept {
        return accept_damage(dir);
    }
    let file = dir.join(journal::FILE_NAME);
    let scan = journal::scan(dir).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if check {
        return check_scan(&file, &scan);
    }
    let mut out: Vec<(u64, String)> = scan
        .records
        .iter()
        .zip(&scan.lines)
        .map(|(r, l)| (*l, journal::render(r)))
        .collect();
    let damaged = scan.damage.iter();
    out.extend(damaged.map(|d| (d.line, format!("!! damaged {d}"))));
    out.sort_by_key(|(l, _)| *l);
    Ok(out.into_iter().map(|(_, l)| l).collect())
}

/// `--check`: one line when the journal is sound, every damaged line as the error otherwise.
fn check_scan(file: &Path, scan: &journal::Scan) -> Result<Vec<String>, String> {
    if scan.damage.is_empty() {
        let torn = match scan.len - scan.good_len {
            0 => String::new(),
            n => format!(" ({n} bytes of torn tail, cut at the next start)"),
        };
        let records = scan.records.len();
        return Ok(vec![format!(
            "{}: {records} records, no damage{torn}",
            file.display()
        )]);
    }
    let mut msg: Vec<String> = scan
        .damage
        .iter()
        .map(|d| format!("{}: damaged {d}", file.display()))
        .collect();
    msg.push("clusterwatch will not start on this journal: recover with `hooks journal --accept-damage` (keeps the readable records) or by moving it aside (README, \"The journal\")".into());
    Err(msg.join("\n"))
}

/// `--accept-damage`: drops the damaged lines; every run still open becomes `unknown`.
fn accept_damage(dir: &Path) -> Result<Vec<String>, String> {
    let file = dir.join(journal::FILE_NAME);
    let dropped = journal::accept_damage(dir, now(), |records| {
        State::replay(records).close_all_unknown(now())
    })
    .map_err(|e| e.to_string())?;
    if dropped.is_empty() {
        return Ok(vec![format!(
            "{}: no damaged line; nothing changed",
            file.display()
        )]);
    }
    let mut lines: Vec<String> = dropped.iter().map(|d| format!("dropped {d}")).collect();
    lines.push(format!(
        "{}: {} damaged line(s) dropped; incidents that began before now will not run automatically",
        file.display(),
        dropped.len()
    ));
    Ok(lines)
}

/// `clusterwatch hooks replay`: the decisions for `body` against the current journal, as
/// lines, without journaling or running anything.
pub fn replay(cfg: &HooksConfig, body: &[u8]) -> Result<Vec<String>, String> {
    let n = payload::decode(body).map_err(|e| e.to_string())?;
    let records =
        journal::read(&cfg.state_dir).map_err(|e| format!("cannot read the journal: {e}"))?;
    let mut state = State::replay(&records);
    let (decided, planned) = policy::plan(&mut state, &cfg.rules, &n, &context(cfg));
    let notification = match decided.first() {
        Some(Record {
            event: Event::Received { notification, .. },
            ..
        }) => *notification,
        _ => 0,
    };
    let payload_file = cfg
        .state_dir
        .join("payloads")
        .join(format!("{notification}.json"));
    let mut lines = Vec::new();
    for r in decided.iter().skip(1) {
        lines.push(journal::render(r));
        let Event::Matched { run, .. } = &r.event else {
            continue;
        };
        let Some(p) = planned.iter().find(|p| p.run == *run) else {
            continue;
        };
        let rule = &cfg.rules[p.rule];
        if let (true, Some(lock), Some(lease)) = (rule.wait_for_lease, &cfg.lock, &cfg.lease) {
            let cluster = n.alerts[p.alert]
                .labels
                .get("cluster")
                .map_or("", String::as_str);
            lines.push(match cluster {
                "" => {
                    "  would refuse: the alert has no `cluster` label, so no leader key to wait for"
                        .to_owned()
                }
                _ => format!(
                    "  would first wait up to {} until no host holds {}",
                    crate::status::human(lease.wait),
                    super::lease::key(&lock.prefix, cluster)
                ),
            });
        }
        let facts = |step| env::RunFacts {
            rule,
            run: *run,
            attempt: 1,
            alert: &n.alerts[p.alert],
            payload_file: &payload_file,
            fencing_token: None,
            step,
        };
        let mut would = |what: String, argv: &[String], f: env::RunFacts<'_>| {
            lines.push(format!("  would run {what}: {}", shell_words(argv)));
            for (k, v) in env::build(&f).vars {
                if k.starts_with("CW_") {
                    lines.push(format!("    {k}={}", v.escape_debug()));
                }
            }
            if rule.disruptive && cfg.lock.is_some() {
                lines.push("    CW_FENCING_TOKEN=(the etcd claim's revision, at run time)".into());
            }
        };
        if rule.steps.is_empty() {
            would("command".into(), &rule.command, facts(None));
        }
        for (i, step) in rule.steps.iter().enumerate() {
            let what = format!("step {i} {}", step.name);
            would(what, &step.command, facts(Some((step.name.as_str(), i))));
        }
    }
    if lines.is_empty() {
        lines.push("no hook matches any alert of this notification".into());
    }
    Ok(lines)
}

/// An argv as one line: words with blanks, quotes or escapes are quoted.
fn shell_words(argv: &[String]) -> String {
    let word = |w: &String| match w.is_empty()
        || w.contains(|c: char| c.is_whitespace() || "'\"\\".contains(c))
    {
        true => format!("{w:?}"),
        false => w.clone(),
    };
    argv.iter().map(word).collect::<Vec<_>>().join(" ")
}
