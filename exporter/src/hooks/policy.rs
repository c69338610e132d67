//! The runner's decisions as pure functions over the journal's state: match, dedupe, kill
//! switch, cooldown and budget per (hook, replication group), the storm breaker, dry run. No I/O and no clock here: the caller passes `now` and
//! whether the kill-switch file exists, so every rule is unit-tested and `hooks replay` can
//! show a decision without acting.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::config::HookRule;
use super::journal::{AlertRef, Event, Evidence, Record, RunResult, UNMATCHED_NAMES_MAX};
use super::payload::{Alert, Notification};

/// How far back unknown runs are reported (the `HookRunUnknown` alert fires this long).
pub const UNKNOWN_WINDOW_SECONDS: f64 = 24.0 * 3600.0;

const HOUR: f64 = 3600.0;

/// A run that was accepted and has not ended.
#[derive(Clone, Debug)]
pub struct OpenRun {
    /// The hook.
    pub hook: String,
    /// The alert it is for.
    pub alert: AlertRef,
    /// Disruptive runs are never re-run after a crash.
    pub disruptive: bool,
    /// Whether an attempt has started (a process may have acted).
    pub started: bool,
    /// Whose payload it gets.
    pub notification: u64,
    /// When it was accepted (unix seconds).
    pub accepted_at: f64,
    /// The alert's `cluster` label: the replication group (empty: none).
    pub cluster: String,
    /// The group's previous acceptance time for this hook, restored if this run is abandoned.
    prev_accepted: Option<f64>,
}

/// Cooldowns and budgets are kept per hook and replication group (the alert's `cluster`
/// label; alerts without one share one group per hook).
type GroupKey = (String, String);

/// A disruptive run accepted in the last hour: its number, time and group.
#[derive(Debug)]
struct DisruptiveRun {
    run: u64,
    ts: f64,
    key: GroupKey,
}

/// `hooks.storm`: more than `max_groups` replication groups starting disruptive runs within
/// `window` seconds trips the breaker; then no disruptive run starts for `window` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Storm {
    /// Groups allowed to start disruptive runs within the window.
    pub max_groups: usize,
    /// The window, in seconds (at most an hour).
    pub window: f64,
}

/// A (hook, alert) pair that was decided, as the dedupe set keeps it: 16 bytes of a SHA-256
/// over the five strings instead of the strings themselves (about 340 bytes). The set only
/// grows (a re-send weeks later is still a repeat), so its size per incident is what a
/// long-running receiver keeps; a collision of 128-bit digests is not a practical concern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Incident([u8; 16]);

impl Incident {
    fn of(hook: &str, alert: &AlertRef) -> Incident {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            hook,
            &alert.fingerprint,
            &alert.starts_at,
            &alert.status,
            &alert.alertname,
        ] {
            // Length first: no two different pairs feed the same bytes.
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        let mut key = [0; 16];
        key.copy_from_slice(&digest.finish().as_ref()[..16]);
        Incident(key)
    }
}

/// Everything the journal says that matters for the next decision.
#[derive(Debug, Default)]
pub struct State {
    taken: HashSet<Incident>,
    open: BTreeMap<u64, OpenRun>,
    accepted: HashMap<GroupKey, f64>,
    disruptive: Vec<DisruptiveRun>,
    /// The storm breaker holds until this unix time.
    storm_until: f64,
    last_success: HashMap<String, f64>,
    unknown: Vec<(String, f64)>,
    next_run: u64,
    next_notification: u64,
    /// Set by `damage_accepted`: incidents that began before it are never run automatically.
    damage_fence: Option<f64>,
}

/// The outside facts a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// Unix time now.
    pub now: f64,
    /// Whether the kill-switch file exists.
    pub kill_switch: bool,
    /// Global dry run.
    pub dry_run: bool,
    /// The hourly budget of disruptive runs, per hook and replication group.
    pub max_disruptive_per_hour: u32,
    /// The storm breaker across groups, if configured.
    pub storm: Option<Storm>,
}

/// What to do about one (hook, alert) pair that matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run it.
    Run,
    /// Already handled this incident.
    Deduped,
    /// The incident began before damaged journal lines were accepted: it may have been
    /// handled, so it does not run.
    JournalDamaged,
    /// The alert's candidate is not this host (`only_if_candidate`).
    NotCandidate,
    /// The kill-switch file exists.
    KillSwitch,
    /// The hook was accepted too recently for this group.
    Cooldown,
    /// The storm breaker holds (or this run would trip it): too many groups failing at once.
    Storm,
    /// The hourly budget of disruptive runs of this hook for this group is spent.
    Budget,
    /// Would run, but dry run is on.
    DryRun,
}

/// A run accepted by [`plan`]: which hook and which alert of the notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The run number.
    pub run: u64,
    /// Index into the configured hooks.
    pub rule: usize,
    /// Index into the notification's alerts.
    pub alert: usize,
}

/// The replication group an alert belongs to: its `cluster` label, empty without one.
pub fn group_of(a: &Alert) -> String {
    a.labels.get("cluster").cloned().unwrap_or_default()
}

/// Alert facts that explain a failover decision: from labels first, then annotations.
const EVIDENCE_FACTS: &[&str] = &["candidate", "failed", "observers", "lag"];
/// Annotations kept as evidence.
const EVIDENCE_ANNOTATIONS: &[&str] = &["description", "value"];

/// What the journal keeps of an alert to explain a decision about it.
pub fn evidence_of(a: &Alert) -> Evidence {
    let mut e = Evidence::new();
    for k in EVIDENCE_FACTS {
        if let Some(v) = a.labels.get(*k).or_else(|| a.annotations.get(*k)) {
            e.insert((*k).to_owned(), v.clone());
        }
    }
    for k in EVIDENCE_ANNOTATIONS {
        if let Some(v) = a.annotations.get(*k) {
            e.insert((*k).to_owned(), v.clone());
        }
    }
    e
}

/// The dedupe key's alert part.
pub fn alert_ref(a: &Alert) -> AlertRef {
    AlertRef {
        fingerprint: a.fingerprint.clone(),
        starts_at: a.starts_at.clone(),
        status: a.status.as_str().to_owned(),
        alertname: a.alertname().to_owned(),
    }
}

/// Decides for one hook and one alert that the hook applies to. The order matters: a repeat
/// is a repeat whatever else holds, the kill switch beats everything that could run, and dry
/// run reports the decision a real run would have got.
pub fn decide(
    state: &State,
    rule: &HookRule,
    alert: &AlertRef,
    cluster: &str,
    candidate: Option<&str>,
    ctx: &Context,
) -> Decision {
    if state.taken.contains(&Incident::of(&rule.name, alert)) {
        return Decision::Deduped;
    }
    if let Some(fence) = state.damage_fence {
        // An unreadable startsAt could be anything: it counts as before.
        if unix_time(&alert.starts_at).is_none_or(|t| t <= fence) {
            return Decision::JournalDamaged;
        }
    }
    if let Some(me) = &rule.only_if_candidate {
        if candidate != Some(me.as_str()) {
            return Decision::NotCandidate;
        }
    }
    if ctx.kill_switch {
        return Decision::KillSwitch;
    }
    let key = (rule.name.clone(), cluster.to_owned());
    if let Some(last) = state.accepted.get(&key) {
        if ctx.now - last < rule.cooldown.as_secs_f64() {
            return Decision::Cooldown;
        }
    }
    if rule.disruptive && state.storm_trips(cluster, ctx).is_some() {
        return Decision::Storm;
    }
    if rule.disruptive
        && state.disruptive_in_group(&key, ctx.now) >= ctx.max_disruptive_per_hour as usize
    {
        return Decision::Budget;
    }
    if ctx.dry_run || rule.dry_run {
        return Decision::DryRun;
    }
    Decision::Run
}

/// The `unmatched` record of a notification whose firing alerts include some that no rule
/// matches. A resolved alert matching nothing is normal: most rules act on firing ones only.
fn unmatched(rules: &[HookRule], n: &Notification, notification: u64) -> Option<Event> {
    let mut alerts = 0;
    let mut names = BTreeSet::new();
    for a in n.alerts.iter() {
        let firing = a.status == super::payload::Status::Firing;
        if firing && !rules.iter().any(|rule| rule.applies(&a.labels, firing)) {
            alerts += 1;
            if names.len() < UNMATCHED_NAMES_MAX {
                names.insert(a.labels.get("alertname").cloned().unwrap_or_default());
            }
        }
    }
    (alerts > 0).then(|| Event::Unmatched {
        notification,
        alerts,
        alertnames: names.into_iter().collect(),
    })
}

/// Decides every (hook, alert) pair of a notification, applying each record to `state` as it
/// goes so alerts of one notification see each other (one run per cooldown, one budget).
/// Returns the records to journal, the first being `received`, and the runs to start.
pub fn plan(
    state: &mut State,
    rules: &[HookRule],
    n: &Notification,
    ctx: &Context,
) -> (Vec<Record>, Vec<Planned>) {
    let notification = state.next_notification;
    let mut records = Vec::new();
    let mut runs = Vec::new();
    let push = |state: &mut State, records: &mut Vec<Record>, event| {
        let r = Record { ts: ctx.now, event };
        state.apply(&r);
        records.push(r);
    };
    push(
        state,
        &mut records,
        Event::Received {
            notification,
            receiver: n.receiver.clone(),
            status: n.status.as_str().to_owned(),
            group_key: n.group_key.clone(),
            alerts: n.alerts.len(),
        },
    );
    if let Some(event) = unmatched(rules, n, notification) {
        push(state, &mut records, event);
    }
    for (ai, a) in n.alerts.iter().enumerate() {
        let firing = a.status == super::payload::Status::Firing;
        for (ri, rule) in rules.iter().enumerate() {
            if !rule.applies(&a.labels, firing) {
                continue;
            }
            let alert = alert_ref(a);
            let hook = rule.name.clone();
            let cluster = group_of(a);
            let evidence = evidence_of(a);
            let candidate = a.labels.get("candidate").map(String::as_str);
            let event = match decide(state, rule, &alert, &cluster, candidate, ctx) {
                Decision::Run => {
                    let run = state.next_run;
                    runs.push(Planned {
                        run,
                        rule: ri,
                        alert: ai,
                    });
                    Event::Matched {
                        run,
                        hook,
                        alert,
                        disruptive: rule.disruptive,
                        notification,
                        cluster,
                        evidence,
                    }
                }
                Decision::Deduped => Event::Deduped {
                    hook,
                    alert,
                    evidence,
                },
                Decision::JournalDamaged => Event::JournalDamaged {
                    hook,
                    alert,
                    evidence,
                },
                Decision::NotCandidate => Event::NotCandidate {
                    hook,
                    alert,
                    candidate: candidate.unwrap_or_default().to_owned(),
                    evidence,
                },
                Decision::KillSwitch => Event::KillSwitch {
                    hook,
                    alert,
                    evidence,
                },
                Decision::Cooldown => Event::CooldownSkipped {
                    hook,
                    alert,
                    cluster,
                    evidence,
                },
                Decision::Storm => {
                    let (groups, until) = state.storm_trips(&cluster, ctx).unwrap_or_default();
                    Event::StormBreaker {
                        hook,
                        alert,
                        cluster,
                        groups,
                        until,
                        evidence,
                    }
                }
                Decision::Budget => Event::BudgetSkipped {
                    hook,
                    alert,
                    cluster,
                    evidence,
                },
                Decision::DryRun => Event::DryRun {
                    hook,
                    alert,
                    evidence,
                },
            };
            push(state, &mut records, event);
        }
    }
    (records, runs)
}

impl State {
    /// The state after every record, in order.
    pub fn replay<'a>(records: impl IntoIterator<Item = &'a Record>) -> State {
        let mut s = State::default();
        for r in records {
            s.apply(r);
        }
        s
    }

    /// Applies one record. Live decisions and replay at start go through this one function,
    /// so a restarted runner decides exactly as the one that wrote the journal would have.
    pub fn apply(&mut self, r: &Record) {
        match &r.event {
            Event::Received { notification, .. } => {
                self.next_notification = self.next_notification.max(notification + 1);
            }
            // Nothing was decided for them: they only explain.
            Event::Unmatched { .. } => {}
            Event::Matched {
                run,
                hook,
                alert,
                disruptive,
                notification,
                cluster,
                ..
            } => {
                self.next_run = self.next_run.max(run + 1);
                self.taken.insert(Incident::of(hook, alert));
                let key = (hook.clone(), cluster.clone());
                let prev_accepted = self.accepted.insert(key.clone(), r.ts);
                if *disruptive {
                    let cutoff = r.ts - HOUR;
                    self.disruptive.retain(|d| d.ts > cutoff);
                    self.disruptive.push(DisruptiveRun {
                        run: *run,
                        ts: r.ts,
                        key,
                    });
                }
                self.open.insert(
                    *run,
                    OpenRun {
                        hook: hook.clone(),
                        alert: alert.clone(),
                        disruptive: *disruptive,
                        started: false,
                        notification: *notification,
                        accepted_at: r.ts,
                        cluster: cluster.clone(),
                        prev_accepted,
                    },
                );
            }
            Event::DryRun { hook, alert, .. } => {
                self.taken.insert(Incident::of(hook, alert));
            }
            Event::Deduped { .. }
            | Event::CooldownSkipped { .. }
            | Event::NotCandidate { .. }
            | Event::BudgetSkipped { .. }
            | Event::KillSwitch { .. }
            | Event::JournalDamaged { .. }
            | Event::Resumed { .. } => {}
            Event::StormBreaker { until, .. } => self.storm_until = self.storm_until.max(*until),
            Event::DamageAccepted { .. } => {
                self.damage_fence = Some(self.damage_fence.unwrap_or(r.ts).max(r.ts));
            }
            // A run that never acted gives its incident, cooldown and budget back, so a
            // later re-send of the same alert is decided afresh.
            Event::ValidateFailed { run, .. }
            | Event::Abandoned { run, .. }
            | Event::LockUnavailable { run, .. }
            | Event::LeaseHeld { run, .. }
            | Event::LeaseUnavailable { run, .. } => self.give_back(*run, true),
            // The incident was taken by another receiver: it stays handled here too (a
            // re-send is deduped), but this receiver spent no cooldown or budget on it.
            Event::LockHeldElsewhere { run, .. } => self.give_back(*run, false),
            // Steps happen inside a started run: the run's own records decide.
            Event::LockAcquired { .. }
            | Event::LockLost { .. }
            | Event::LeaseWaited { .. }
            | Event::SelfFenced { .. }
            | Event::StepStarted { .. }
            | Event::StepFinished { .. } => {}
            Event::Started { run, .. } => {
                if let Some(open) = self.open.get_mut(run) {
                    open.started = true;
                }
            }
            Event::Finished {
                run, hook, result, ..
            } => {
                if *result != RunResult::Retry {
                    self.open.remove(run);
                }
                if *result == RunResult::Ok {
                    self.last_success.insert(hook.clone(), r.ts);
                }
            }
            Event::Unknown { run, hook } => {
                self.open.remove(run);
                self.unknown.push((hook.clone(), r.ts));
            }
        }
    }

    /// Closes a run that never acted: its cooldown and budget are returned, and its incident
    /// too if `incident`.
    fn give_back(&mut self, run: u64, incident: bool) {
        if let Some(open) = self.open.remove(&run) {
            if incident {
                self.taken.remove(&Incident::of(&open.hook, &open.alert));
            }
            let key = (open.hook, open.cluster);
            match open.prev_accepted {
                Some(t) => self.accepted.insert(key, t),
                None => self.accepted.remove(&key),
            };
            self.disruptive.retain(|d| d.run != run);
        }
    }

    /// For runs left open by a previous process: `unknown` if an attempt had started (it may
    /// have acted); `resumed` if not and accepted less than `resume_max_age` seconds before
    /// `now` (it will be started now); `abandoned` if older. Journal them before deciding
    /// anything new.
    pub fn interrupted(&self, now: f64, resume_max_age: f64) -> Vec<(Record, OpenRun)> {
        self.open
            .iter()
            .map(|(run, open)| {
                let (run, hook) = (*run, open.hook.clone());
                let age = now - open.accepted_at;
                let event = if open.started {
                    Event::Unknown { run, hook }
                } else if (0.0..resume_max_age).contains(&age) {
                    Event::Resumed { run, hook }
                } else {
                    Event::Abandoned {
                        run,
                        hook,
                        reason: "stopped before start".into(),
                    }
                };
                (Record { ts: now, event }, open.clone())
            })
            .collect()
    }

    /// `unknown` for every open run: after damaged lines are dropped, none of them can be
    /// known not to have started.
    pub fn close_all_unknown(&self, now: f64) -> Vec<Record> {
        self.open
            .iter()
            .map(|(run, open)| Record {
                ts: now,
                event: Event::Unknown {
                    run: *run,
                    hook: open.hook.clone(),
                },
            })
            .collect()
    }

    /// A run that is still open.
    pub fn open_run(&self, run: u64) -> Option<&OpenRun> {
        self.open.get(&run)
    }

    /// The next run number.
    pub fn next_run(&self) -> u64 {
        self.next_run
    }

    /// Disruptive runs accepted in the hour before `now`, over all hooks and groups.
    pub fn disruptive_last_hour(&self, now: f64) -> usize {
        self.disruptive.iter().filter(|d| now - d.ts < HOUR).count()
    }

    /// Disruptive runs of one hook for one group accepted in the hour before `now`.
    fn disruptive_in_group(&self, key: &GroupKey, now: f64) -> usize {
        self.disruptive
            .iter()
            .filter(|d| now - d.ts < HOUR && &d.key == key)
            .count()
    }

    /// The most disruptive runs any one (hook, group) had in the hour before `now`: what
    /// the per-group budget is compared with.
    pub fn disruptive_max_group(&self, now: f64) -> usize {
        let mut per: HashMap<&GroupKey, usize> = HashMap::new();
        for d in self.disruptive.iter().filter(|d| now - d.ts < HOUR) {
            *per.entry(&d.key).or_default() += 1;
        }
        per.into_values().max().unwrap_or(0)
    }

    /// Whether the storm breaker holds at `now`.
    pub fn storm_active(&self, now: f64) -> bool {
        now < self.storm_until
    }

    /// `Some((groups, until))` when a disruptive run for `cluster` must not start: the breaker
    /// holds, or this group would be one more than `max_groups` to start a disruptive run
    /// within the window (which trips it until `now + window`). `groups` are the groups seen
    /// in the window, sorted.
    fn storm_trips(&self, cluster: &str, ctx: &Context) -> Option<(Vec<String>, f64)> {
        let storm = ctx.storm?;
        let mut groups: Vec<String> = self
            .disruptive
            .iter()
            .filter(|d| ctx.now - d.ts < storm.window)
            .map(|d| d.key.1.clone())
            .collect();
        groups.sort();
        groups.dedup();
        if self.storm_active(ctx.now) {
            return Some((groups, self.storm_until));
        }
        let new_group = !groups.iter().any(|g| g == cluster);
        (new_group && groups.len() >= storm.max_groups).then_some((groups, ctx.now + storm.window))
    }

    /// Runs of `hook` found interrupted within [`UNKNOWN_WINDOW_SECONDS`] before `now`.
    pub fn unknown_runs(&self, hook: &str, now: f64) -> usize {
        self.unknown
            .iter()
            .filter(|(h, t)| h == hook && now - t < UNKNOWN_WINDOW_SECONDS)
            .count()
    }

    /// Unix time of the hook's last successful attempt.
    pub fn last_success(&self, hook: &str) -> Option<f64> {
        self.last_success.get(hook).copied()
    }
}

/// Unix seconds of an RFC 3339 time as Alertmanager writes it (`Z` or a `±HH:MM` offset).
pub fn unix_time(s: &str) -> Option<f64> {
    let (local, offset) = match s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        Some(l) => (l, 0i64),
        None => {
            let at = s.len().checked_sub(6)?;
            let (l, off) = s.split_at_checked(at)?;
            let sign = match off.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = off[1..].split_once(':')?;
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            (l, sign * (h * 3600 + m * 60))
        }
    };
    let t = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    Some(secs - offset as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::hooks::config::{Matcher, On};
    use crate::hooks::payload::tests::body;
    use crate::hooks::payload::{decode, Status};

    /// A hook on `alertname="NoPrimary"` running /bin/true.
    pub(crate) fn rule(name: &str, disruptive: bool, cooldown: u64) -> HookRule {
        HookRule {
            name: name.into(),
            matchers: vec![Matcher::Eq("alertname".into(), "NoPrimary".into())],
            on: On::Firing,
            command: vec!["/bin/true".into()],
            steps: Vec::new(),
            validate: None,
            timeout: Duration::from_secs(5),
            cooldown: Duration::from_secs(cooldown),
            disruptive,
            dry_run: false,
            retries: 0,
            retry_backoff: Duration::from_secs(1),
            rerun_after_crash: false,
            env: Vec::new(),
            only_if_candidate: None,
            wait_for_lease: false,
        }
    }

    #[test]
    fn incidents_are_told_apart_by_every_part_of_the_key() {
        let alert = |fingerprint: &str, starts_at: &str, status: &str| AlertRef {
            fingerprint: fingerprint.into(),
            starts_at: starts_at.into(),
            status: status.into(),
            alertname: "NoPrimary".into(),
        };
        let one = Incident::of("promote", &alert("ab", "c", "firing"));
        assert_eq!(one, Incident::of("promote", &alert("ab", "c", "firing")));
        // The same bytes split differently are another incident.
        assert_ne!(one, Incident::of("promote", &alert("a", "bc", "firing")));
        assert_ne!(one, Incident::of("promote", &alert("ab", "c", "resolved")));
        assert_ne!(one, Incident::of("fence", &alert("ab", "c", "firing")));
    }

    fn ctx(now: f64) -> Context {
        Context {
            now,
            kill_switch: false,
            dry_run: false,
            max_disruptive_per_hour: 1,
            storm: None,
        }
    }

    /// A `NoPrimary` notification with one alert per cluster.
    fn groups_note(clusters: &[&str], starts: &str) -> Notification {
        let mut n = note("firing", "x", starts);
        let proto = n.alerts.remove(0);
        for c in clusters {
            let mut a = proto.clone();
            a.fingerprint = format!("fp-{c}");
            a.labels.insert("cluster".into(), (*c).into());
            n.alerts.push(a);
        }
        n
    }

    /// A one-alert `NoPrimary` notification.
    pub(crate) fn note(status: &str, fp: &str, starts: &str) -> Notification {
        decode(body(status, r#"{"alertname":"NoPrimary"}"#, fp, starts).as_bytes()).unwrap()
    }

    fn kinds(records: &[Record]) -> Vec<&'static str> {
        records
            .iter()
            .map(|r| match r.event {
                Event::Received { .. } => "received",
                Event::Unmatched { .. } => "unmatched",
                Event::Matched { .. } => "matched",
                Event::Deduped { .. } => "deduped",
                Event::CooldownSkipped { .. } => "cooldown",
                Event::BudgetSkipped { .. } => "budget",
                Event::StormBreaker { .. } => "storm",
                Event::KillSwitch { .. } => "kill_switch",
                Event::DryRun { .. } => "dry_run",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn firing_alerts_no_rule_matches_are_journaled_by_name_and_bounded() {
        let rules = [rule("promote", true, 0)];
        let mut n = note("firing", "f1", "t0");
        let proto = n.alerts[0].clone();
        for (i, (name, status)) in [
            ("DiskFull", Status::Firing),
            ("DiskFull", Status::Firing),
            ("RedisDown", Status::Firing),
            ("Gone", Status::Resolved),
        ]
        .into_iter()
        .enumerate()
        {
            let mut a = proto.clone();
            a.fingerprint = format!("u{i}");
            a.status = status;
            a.labels.insert("alertname".into(), name.into());
            n.alerts.push(a);
        }
        let mut s = State::default();
        let (records, runs) = plan(&mut s, &rules, &n, &ctx(100.0));
        assert_eq!(kinds(&records), ["received", "unmatched", "matched"]);
        assert_eq!(runs.len(), 1, "the matching alert still runs");
        assert_eq!(
            records[1].event,
            Event::Unmatched {
                notification: 0,
                alerts: 3,
                alertnames: vec!["DiskFull".into(), "RedisDown".into()],
            },
            "firing ones only, each name once, sorted"
        );
        // Replaying the record decides nothing: the next notification gets the next number.
        let mut replayed = State::replay(&records);
        let (again, _) = plan(
            &mut replayed,
            &rules,
            &note("firing", "f2", "t1"),
            &ctx(101.0),
        );
        assert!(matches!(
            again[0].event,
            Event::Received {
                notification: 1,
                ..
            }
        ));

        // However many names a notification holds, one record lists a bounded few.
        let mut many = note("firing", "m", "t0");
        for i in 0..3 * UNMATCHED_NAMES_MAX {
            let mut a = proto.clone();
            a.fingerprint = format!("m{i}");
            a.labels.insert("alertname".into(), format!("Other{i:03}"));
            many.alerts.push(a);
        }
        let (records, _) = plan(&mut State::default(), &rules, &many, &ctx(100.0));
        let Event::Unmatched {
            alerts, alertnames, ..
        } = &records[1].event
        else {
            panic!("no unmatched record: {:?}", kinds(&records));
        };
        assert_eq!(*alerts, 3 * UNMATCHED_NAMES_MAX);
        assert_eq!(alertnames.len(), UNMATCHED_NAMES_MAX);
    }

    #[test]
    fn one_incident_is_one_run_across_resends_and_restarts() {
        let rules = [rule("promote", true, 0)];
        let mut s = State::default();
        let (r1, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(100.0));
        assert_eq!(kinds(&r1), ["received", "matched"]);
        assert_eq!(runs.len(), 1);
        let (r2, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(101.0));
        assert_eq!(kinds(&r2), ["received", "deduped"]);
        assert!(runs.is_empty());
        // A restarted runner replays the journal and still knows.
        let mut all = r1.clone();
        all.extend(r2);
        let mut replayed = State::replay(&all);
        let (r3, _) = plan(
            &mut replayed,
            &rules,
            &note("firing", "f1", "t0"),
            &ctx(5000.0),
        );
        assert_eq!(kinds(&r3), ["received", "deduped"]);
        // Resolved alerts do not start a firing-only hook.
        let (r4, _) = plan(
            &mut replayed,
            &rules,
            &note("resolved", "f1", "t0"),
            &ctx(5001.0),
        );
        assert_eq!(kinds(&r4), ["received"]);
    }

    #[test]
    fn cooldown_budget_kill_switch_and_dry_run() {
        let rules = [rule("a", true, 600), rule("b", true, 0)];
        let mut s = State::default();
        let (r, _) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(0.0));
        // Each hook has its own budget for the group: both take their one run of the hour.
        assert_eq!(kinds(&r), ["received", "matched", "matched"]);
        let (r, _) = plan(&mut s, &rules, &note("firing", "f2", "t0"), &ctx(300.0));
        assert_eq!(kinds(&r), ["received", "cooldown", "budget"]);
        let (r, _) = plan(&mut s, &rules, &note("firing", "f3", "t0"), &ctx(3601.0));
        assert_eq!(kinds(&r), ["received", "matched", "matched"]);
        let mut c = ctx(99999.0);
        c.kill_switch = true;
        let (r, _) = plan(&mut s, &rules, &note("firing", "f4", "t0"), &c);
        assert_eq!(kinds(&r), ["received", "kill_switch", "kill_switch"]);
        let mut c = ctx(99999.0);
        c.dry_run = true;
        let (r, runs) = plan(&mut s, &rules, &note("firing", "f4", "t0"), &c);
        // Dry run reports what would happen and spends no budget.
        assert_eq!(kinds(&r), ["received", "dry_run", "dry_run"]);
        assert!(runs.is_empty());
    }

    #[test]
    fn budget_and_cooldown_are_per_replication_group() {
        // Seed 004: one host carries two Redis groups; both fail in one notification.
        let rules = [rule("promote", true, 600)];
        let mut s = State::default();
        let (r, runs) = plan(&mut s, &rules, &groups_note(&["r1", "r2"], "t0"), &ctx(0.0));
        assert_eq!(kinds(&r), ["received", "matched", "matched"]);
        assert_eq!(runs.len(), 2);
        assert!(matches!(&r[2].event, Event::Matched { cluster, .. } if cluster == "r2"));
        // A new incident of the same group is in its cooldown, then over its budget.
        let (r, _) = plan(&mut s, &rules, &groups_note(&["r1"], "t1"), &ctx(300.0));
        assert_eq!(kinds(&r), ["received", "cooldown"]);
        let (r, _) = plan(&mut s, &rules, &groups_note(&["r1"], "t2"), &ctx(900.0));
        assert_eq!(kinds(&r), ["received", "budget"]);
        assert!(matches!(&r[1].event, Event::BudgetSkipped { cluster, .. } if cluster == "r1"));
        // Alerts without `cluster` are one group of their own.
        let (r, _) = plan(&mut s, &rules, &note("firing", "f", "t0"), &ctx(900.0));
        assert_eq!(kinds(&r), ["received", "matched"]);
        // The groups survive a restart.
        let mut s = State::default();
        let (all, _) = plan(&mut s, &rules, &groups_note(&["r1", "r2"], "t0"), &ctx(0.0));
        let mut replayed = State::replay(&all);
        let (r, _) = plan(
            &mut replayed,
            &rules,
            &groups_note(&["r2", "r3"], "t5"),
            &ctx(900.0),
        );
        assert_eq!(kinds(&r), ["received", "budget", "matched"]);
    }

    #[test]
    fn a_candidate_only_hook_runs_on_the_candidates_host_alone() {
        let mut r = rule("promote-here", true, 0);
        r.only_if_candidate = Some("pg2".into());
        let rules = [r];
        let with = |candidate: Option<&str>, fp: &str| {
            let mut n = note("firing", fp, "t0");
            if let Some(c) = candidate {
                n.alerts[0].labels.insert("candidate".into(), c.into());
            }
            n
        };
        let mut s = State::default();
        for (candidate, fp) in [(Some("pg3"), "a"), (None, "b")] {
            let (r, runs) = plan(&mut s, &rules, &with(candidate, fp), &ctx(0.0));
            assert_eq!(kinds(&r), ["received", "other"]);
            assert!(
                matches!(&r[1].event, Event::NotCandidate { candidate: c, .. } if c == candidate.unwrap_or(""))
            );
            assert!(runs.is_empty());
        }
        // Not taken: once the alert names this host, the same incident runs.
        let (r, runs) = plan(&mut s, &rules, &with(Some("pg2"), "a"), &ctx(1.0));
        assert_eq!(kinds(&r), ["received", "matched"]);
        assert_eq!(runs.len(), 1);
    }

    #[test]
    fn the_storm_breaker_stops_every_disruptive_run_for_its_window() {
        let rules = [rule("promote", true, 0), rule("notify", false, 0)];
        let mut c = ctx(0.0);
        c.storm = Some(Storm {
            max_groups: 2,
            window: 600.0,
        });
        let mut s = State::default();
        let (r, runs) = plan(&mut s, &rules, &groups_note(&["a", "b", "c"], "t0"), &c);
        // Two groups start; the third trips the breaker. Non-disruptive hooks still run.
        assert_eq!(
            kinds(&r),
            ["received", "matched", "matched", "matched", "matched", "storm", "matched"]
        );
        assert_eq!(runs.len(), 5);
        let Event::StormBreaker { groups, until, .. } = &r[5].event else {
            unreachable!()
        };
        assert_eq!(groups, &["a", "b"]);
        assert_eq!(*until, 600.0);
        assert!(s.storm_active(599.0));
        // While it holds, even a group that already ran is stopped; a restart keeps it.
        let mut all = r.clone();
        c.now = 300.0;
        let (r, _) = plan(&mut s, &rules, &groups_note(&["a"], "t1"), &c);
        assert_eq!(kinds(&r), ["received", "storm", "matched"]);
        all.extend(r);
        let mut replayed = State::replay(&all);
        c.now = 599.0;
        let (r, _) = plan(&mut replayed, &rules, &groups_note(&["d"], "t1"), &c);
        assert_eq!(kinds(&r), ["received", "storm", "matched"]);
        // After the window, groups start again, up to the limit.
        c.now = 1300.0;
        let (r, _) = plan(&mut replayed, &rules, &groups_note(&["d", "e"], "t2"), &c);
        assert_eq!(
            kinds(&r),
            ["received", "matched", "matched", "matched", "matched"]
        );
        assert!(!replayed.storm_active(1300.0));
    }

    #[test]
    fn interrupted_started_run_is_unknown_and_keeps_its_incident() {
        let rules = [rule("promote", true, 0)];
        let mut s = State::default();
        let (mut journal, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(0.0));
        let run = runs[0].run;
        journal.push(Record {
            ts: 1.0,
            event: Event::Started {
                run,
                hook: "promote".into(),
                attempt: 1,
            },
        });
        let restarted = State::replay(&journal);
        let found = restarted.interrupted(2.0, 600.0);
        assert_eq!(found.len(), 1);
        assert!(matches!(found[0].0.event, Event::Unknown { .. }));
        journal.push(found[0].0.clone());
        let mut after = State::replay(&journal);
        assert_eq!(after.unknown_runs("promote", 3.0), 1);
        let (r, runs) = plan(
            &mut after,
            &rules,
            &note("firing", "f1", "t0"),
            &ctx(7200.0),
        );
        assert_eq!(kinds(&r), ["received", "deduped"]);
        assert!(runs.is_empty());
    }

    #[test]
    fn an_incident_held_elsewhere_stays_handled_but_spends_no_cooldown_here() {
        let rules = [rule("promote", true, 600)];
        let mut s = State::default();
        let (mut journal, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(0.0));
        journal.push(Record {
            ts: 1.0,
            event: Event::LockHeldElsewhere {
                run: runs[0].run,
                hook: "promote".into(),
                owner: "em2/1/2".into(),
            },
        });
        let mut s = State::replay(&journal);
        let (r, _) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(2.0));
        assert_eq!(kinds(&r), ["received", "deduped"]);
        let (r, _) = plan(&mut s, &rules, &note("firing", "f2", "t0"), &ctx(3.0));
        assert_eq!(kinds(&r), ["received", "matched"]);
    }

    #[test]
    fn a_run_that_never_started_gives_its_incident_back() {
        let rules = [rule("promote", true, 600)];
        let mut s = State::default();
        let (mut journal, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(0.0));
        journal.push(Record {
            ts: 1.0,
            event: Event::ValidateFailed {
                run: runs[0].run,
                hook: "promote".into(),
                outcome: "exit 2".into(),
                stderr_tail: String::new(),
            },
        });
        let mut s = State::replay(&journal);
        let (r, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(2.0));
        assert_eq!(kinds(&r), ["received", "matched"]);
        assert_eq!(runs[0].run, 1);
    }

    #[test]
    fn unstarted_runs_resume_when_fresh_and_are_abandoned_when_stale() {
        let rules = [rule("promote", true, 0), rule("notify", false, 0)];
        let mut s = State::default();
        let (mut journal, runs) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(0.0));
        assert_eq!(runs.len(), 2);
        journal.push(Record {
            ts: 1.0,
            event: Event::Started {
                run: runs[1].run,
                hook: "notify".into(),
                attempt: 1,
            },
        });
        let s = State::replay(&journal);
        let found: Vec<_> = s
            .interrupted(300.0, 600.0)
            .into_iter()
            .map(|f| f.0.event)
            .collect();
        assert!(
            matches!(found[0], Event::Resumed { run: 0, .. }),
            "{found:?}"
        );
        assert!(
            matches!(found[1], Event::Unknown { run: 1, .. }),
            "{found:?}"
        );
        let found: Vec<_> = s
            .interrupted(601.0, 600.0)
            .into_iter()
            .map(|f| f.0.event)
            .collect();
        assert!(
            matches!(found[0], Event::Abandoned { run: 0, .. }),
            "{found:?}"
        );
        assert!(
            matches!(found[1], Event::Unknown { run: 1, .. }),
            "{found:?}"
        );
        // A resumed run keeps its incident: a re-send meanwhile is a repeat.
        journal.push(s.interrupted(300.0, 600.0).remove(0).0);
        let mut s = State::replay(&journal);
        assert!(s.open_run(0).is_some());
        let (r, _) = plan(&mut s, &rules, &note("firing", "f1", "t0"), &ctx(301.0));
        assert_eq!(kinds(&r), ["received", "deduped", "deduped"]);
    }

    #[test]
    fn after_accepted_damage_older_incidents_never_run() {
        let rules = [rule("promote", true, 0)];
        let fence = unix_time("2026-01-01T12:00:00Z").unwrap();
        let mut s = State::replay(&[Record {
            ts: fence,
            event: Event::DamageAccepted {
                lines: vec![3],
                saved_as: "x".into(),
            },
        }]);
        let c = ctx(fence + 10.0);
        for starts in [
            "2026-01-01T11:59:59.5Z",
            "2026-01-01T13:30:00+02:00",
            "garbage",
        ] {
            let (r, runs) = plan(&mut s, &rules, &note("firing", starts, starts), &c);
            assert_eq!(kinds(&r), ["received", "other"], "{starts}");
            assert!(matches!(r[1].event, Event::JournalDamaged { .. }));
            assert!(runs.is_empty());
        }
        let (r, _) = plan(
            &mut s,
            &rules,
            &note("firing", "f", "2026-01-01T12:00:01Z"),
            &c,
        );
        assert_eq!(kinds(&r), ["received", "matched"]);
        assert_eq!(unix_time("1970-01-01T01:00:00+01:00"), Some(0.0));
        assert_eq!(unix_time("1970-01-01T00:00:00-00:30"), Some(1800.0));
    }
}
