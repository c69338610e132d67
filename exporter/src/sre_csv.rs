//! The SRE platform's per-minute stats files (`counters.csv`, `samples.csv`) parsed into the
//! newest value per (host, stat). Pure: bytes in, a report out; watching the file, caching
//! and metrics belong to `collector::sre_stats`.
//!
//! A line is `host,stat,human time,unix time,v1,…,v15`, newest value first, an empty field
//! meaning no data (runbook, "Stats Monitoring"). Only the newest value is read: it is the
//! one exported, and skipping the fourteen older ones keeps a 100 MB file cheap.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

/// Why a line was not used. The label value of `clusterwatch_sre_file_lines_rejected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Fewer than the four leading fields (host, stat, human time, unix time).
    TooFewFields,
    /// Host or stat name empty.
    EmptyName,
    /// The unix timestamp is not a number, or more than 10^15 seconds from 1970.
    BadTimestamp,
    /// The newest value is present but not a finite number.
    BadValue,
    /// The last line has no line end yet: the writer is still writing it.
    PartialLine,
    /// The CSV itself is broken (an unterminated quote, …).
    Malformed,
}

/// Every reject reason, in label order, so each series exists from the first parse.
pub const REJECT_REASONS: &[Reject] = &[
    Reject::TooFewFields,
    Reject::EmptyName,
    Reject::BadTimestamp,
    Reject::BadValue,
    Reject::PartialLine,
    Reject::Malformed,
];

impl Reject {
    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Reject::TooFewFields => "too_few_fields",
            Reject::EmptyName => "empty_name",
            Reject::BadTimestamp => "bad_timestamp",
            Reject::BadValue => "bad_value",
            Reject::PartialLine => "partial_line",
            Reject::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        REJECT_REASONS
            .iter()
            .position(|r| *r == self)
            .expect("every reason is listed")
    }
}

/// The newest value of one (host, stat) line.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    /// The node that produced the stat (shared: a file holds few hosts and many stats).
    pub host: Arc<str>,
    /// The stat name, e.g. `request.INVITE` or `profiling.cp.CAC test.Start`.
    pub stat: String,
    /// The newest value; `None` when its field is empty (no data for that minute).
    pub value: Option<f64>,
    /// Unix time of the minute the newest value belongs to (the line's timestamp, floored to
    /// the minute: samples.csv timestamps are not aligned).
    pub minute: i64,
    /// How many values the line carried (at most 15 on real files, often fewer).
    pub values: usize,
}

/// What one parse of a file found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// One entry per (host, stat), in order of first appearance; a later duplicate line
    /// replaces the earlier one's values.
    pub stats: Vec<Stat>,
    /// Lines used.
    pub accepted: u64,
    /// Lines not used, by [`REJECT_REASONS`] index.
    pub rejected: [u64; 6],
    /// Lines that repeated an earlier (host, stat); the last one wins.
    pub duplicates: u64,
    /// Bytes read.
    pub bytes: u64,
}

impl Parsed {
    /// Lines rejected for `reason`.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason.index()]
    }

    fn reject(&mut self, reason: Reject, line: u64, source: &str) {
        self.rejected[reason.index()] += 1;
        // Line numbers only at debug level: a broken writer would otherwise flood the log
        // once a minute with the same complaint.
        tracing::debug!(
            file = source,
            line,
            reason = reason.label(),
            "stats line rejected"
        );
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses a whole stats file. `ends_with_newline` says whether the file's last byte is a line
/// end; when it is not, the last line is still being written and is set aside. `source` names
/// the file in debug logs.
pub fn parse<R: Read>(input: R, ends_with_newline: bool, source: &str) -> Parsed {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(256 * 1024)
        .from_reader(input);
    let mut out = Parsed::default();
    let mut hosts = Hosts::default();
    let mut record = csv::ByteRecord::new();
    // A line is only known to be the last one once the next read finds nothing, so each
    // line is handled one step late; two records swapped in turn avoid an allocation a line.
    let mut prev = csv::ByteRecord::new();
    let mut prev_line: Option<u64> = None;
    let mut first = true;
    loop {
        let more = match reader.read_byte_record(&mut record) {
            Ok(more) => more,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                out.reject(Reject::Malformed, line, source);
                // Only an I/O error stops the csv reader; nothing after it can be trusted.
                prev_line = None;
                break;
            }
        };
        if !more {
            break;
        }
        if let Some(line) = prev_line.take() {
            take_line(&prev, line, &mut out, &mut hosts, source);
        }
        if first {
            first = false;
            strip_bom(&mut record);
        }
        prev_line = Some(record.position().map_or(0, |p| p.line()));
        std::mem::swap(&mut prev, &mut record);
    }
    if let Some(line) = prev_line {
        if ends_with_newline {
            take_line(&prev, line, &mut out, &mut hosts, source);
        } else {
            out.reject(Reject::PartialLine, line, source);
        }
    }
    out.bytes = reader.position().byte();
    out
}

/// Per host (few of them): its shared name and where each of its stats sits in the output.
type Hosts = FnvMap<Box<[u8]>, (Arc<str>, FnvMap<Box<[u8]>, usize>)>;

fn strip_bom(record: &mut csv::ByteRecord) {
    if record.get(0).is_some_and(|f| f.starts_with(UTF8_BOM)) {
        let mut fixed = csv::ByteRecord::new();
        for (i, f) in record.iter().enumerate() {
            fixed.push_field(if i == 0 { &f[UTF8_BOM.len()..] } else { f });
        }
        fixed.set_position(record.position().cloned());
        *record = fixed;
    }
}

fn take_line(
    record: &csv::ByteRecord,
    line: u64,
    out: &mut Parsed,
    hosts: &mut Hosts,
    source: &str,
) {
    // A blank line (an editor's trailing newline) is not a stats line at all.
    if record.len() == 1 && record[0].is_empty() {
        return;
    }
    if record.len() < 4 {
        return out.reject(Reject::TooFewFields, line, source);
    }
    let (host, stat) = (trim(&record[0]), trim(&record[1]));
    if host.is_empty() || stat.is_empty() {
        return out.reject(Reject::EmptyName, line, source);
    }
    let Some(ts) = parse_timestamp(trim(&record[3])) else {
        return out.reject(Reject::BadTimestamp, line, source);
    };
    let value = match record.get(4).map(trim) {
        None | Some(b"") => None,
        Some(v) => match parse_number(v) {
            Some(v) => Some(v),
            None => return out.reject(Reject::BadValue, line, source),
        },
    };
    // A trailing comma (a writer that always writes 15 separators) is not a value.
    let mut values = record.len() - 4;
    if values > 0 && record[record.len() - 1].is_empty() && values > 15 {
        values -= 1;
    }
    // Looked up before inserting: `entry` would allocate the key on every line.
    if !hosts.contains_key(host) {
        let name: Arc<str> = Arc::from(String::from_utf8_lossy(host).as_ref());
        hosts.insert(Box::from(host), (name, FnvMap::default()));
    }
    let (host_name, stats) = hosts.get_mut(host).expect("inserted above");
    let minute = ts - ts.rem_euclid(60);
    out.accepted += 1;
    match stats.get(stat) {
        // Updated in place: a file full of repeated lines costs no allocation per line.
        Some(&i) => {
            out.duplicates += 1;
            let known = &mut out.stats[i];
            known.value = value;
            known.minute = minute;
            known.values = values;
        }
        None => {
            stats.insert(Box::from(stat), out.stats.len());
            out.stats.push(Stat {
                host: Arc::clone(host_name),
                stat: String::from_utf8_lossy(stat).into_owned(),
                value,
                minute,
                values,
            });
        }
    }
}

/// FNV-1a: keys come from a local file, not from an attacker, and SipHash's cost showed up as
/// a tenth of the parse.
#[derive(Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

fn trim(field: &[u8]) -> &[u8] {
    field.trim_ascii()
}

fn parse_timestamp(field: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(field).ok()?;
    if let Ok(v) = text.parse::<i64>() {
        // The floats' bound below holds for integers too: past it a timestamp is garbage,
        // and near i64::MIN flooring it to the minute would overflow.
        return (v.unsigned_abs() < MAX_TIMESTAMP as u64).then_some(v);
    }
    // Some writers print the epoch as a float (`1652193121.0`).
    let v = text.parse::<f64>().ok()?;
    (v.is_finite() && v.abs() < MAX_TIMESTAMP as f64).then_some(v.floor() as i64)
}

/// 10^15 seconds, some 31 million years either side of 1970.
const MAX_TIMESTAMP: i64 = 1_000_000_000_000_000;

fn parse_number(field: &[u8]) -> Option<f64> {
    let v = std::str::from_utf8(field).ok()?.parse::<f64>().ok()?;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Parsed {
        parse(text.as_bytes(), text.ends_with('\n'), "test.csv")
    }

    fn value(p: &Parsed, host: &str, stat: &str) -> Option<Option<f64>> {
        p.stats
            .iter()
            .find(|s| &*s.host == host && s.stat == stat)
            .map(|s| s.value)
    }

    /// Lines as the runbook prints them in its counters.csv example.
    const RUNBOOK_COUNTERS: &str = "\
sre32-cp2-testbed,custom.fleg_relay,2022-05-10T16:31:00,1652193060,,,,,,,,,,,,,
sre32-cp2-testbed,profiling.cp.CAC test.503,2022-05-10T16:31:00,1652193060,,,,,,,,,,,,,
sre32-cp2-testbed,profiling.cp.CAC test.Extract Contacts,2022-05-10T16:31:00,1652193060,12,11,13,12,12,12,12,12,12,12,12,12,12,12
sre32-cp2-testbed,request.INVITE,2022-05-10T16:31:00,1652193060,12,11,13,12,12,12,12,12,12,12,12,12,12
sre32-cp2-testbed,response.503,2022-05-10T16:31:00,1652193060,,,,,,,,,,,,,
sre32-cp2-testbed,response.relay,2022-05-10T16:31:00,1652193060,12,11,13,12,12,12,12,12,12,12,12,12,12
";

    /// Lines as the runbook prints them in its samples.csv example: unaligned timestamps,
    /// fewer than 15 values, several hosts, stat names with dots and slashes.
    const RUNBOOK_SAMPLES: &str = "\
sre32-cp2-testbed,accounting.openCalls,2022-05-10T16:32:01,1652193121,3800.000,3800.000,3800.000,3700.000,3566.667,3833.333,3833.333,3866.667
sre32-cp2-testbed,profiling.cp.CAC test.503,2022-05-10T16:32:01,1652193121,,,,,,,,,,,,,
sre32-cp2-testbed,profiling.cp.INVITE,2022-05-10T16:32:01,1652193121,13.214,10.280,13.943,13.042,19.519,13.832,19.339,10.739,15.154,16.71
sre32-cp1-testbed,system.cpu,2022-05-10T16:32:01,1652193121,11718.333,11660.000,11665.000,11911.667,12000.000,11545.000,11658.33
sre32-cp2-testbed,system.cpu,2022-05-10T16:32:01,1652193121,11463.333,11186.667,11150.000,11330.000,11451.667,11265.000,11330.00
sre32-em1-testbed,system.disk./data/sre/db/backups,2022-05-10T16:32:01,1652193121,10400.000,10400.000,10400.000,10400.000,10400.000,10400.000,10400.000,10400.000,10400.000,10400.000
";

    #[test]
    fn runbook_counters_example() {
        let p = parse_str(RUNBOOK_COUNTERS);
        assert_eq!(p.accepted, 6);
        assert_eq!(p.rejected, [0; 6]);
        assert_eq!(
            value(&p, "sre32-cp2-testbed", "request.INVITE"),
            Some(Some(12.0))
        );
        assert_eq!(
            value(
                &p,
                "sre32-cp2-testbed",
                "profiling.cp.CAC test.Extract Contacts"
            ),
            Some(Some(12.0))
        );
        assert_eq!(
            value(&p, "sre32-cp2-testbed", "response.503"),
            Some(None),
            "an empty field is no data, not zero and not an error"
        );
        assert!(p.stats.iter().all(|s| s.minute == 1652193060));
        let invite = p.stats.iter().find(|s| s.stat == "request.INVITE").unwrap();
        assert_eq!(invite.values, 13);
    }

    #[test]
    fn runbook_samples_example_with_unaligned_timestamps() {
        let p = parse_str(RUNBOOK_SAMPLES);
        assert_eq!(p.accepted, 6);
        assert_eq!(
            value(&p, "sre32-cp2-testbed", "profiling.cp.INVITE"),
            Some(Some(13.214))
        );
        assert_eq!(
            value(&p, "sre32-cp1-testbed", "system.cpu"),
            Some(Some(11718.333))
        );
        assert_eq!(
            value(&p, "sre32-em1-testbed", "system.disk./data/sre/db/backups"),
            Some(Some(10400.0))
        );
        // 1652193121 is 16:32:01; the value belongs to the minute starting 16:32:00.
        assert!(p.stats.iter().all(|s| s.minute == 1652193120));
        let open = p
            .stats
            .iter()
            .find(|s| s.stat == "accounting.openCalls")
            .unwrap();
        assert_eq!(open.values, 8);
    }

    #[test]
    fn crlf_bom_and_lossy_names() {
        let mut bytes = UTF8_BOM.to_vec();
        bytes.extend_from_slice(b"cp1,request.INVITE,t,1652193060,5,4\r\n");
        bytes.extend_from_slice(b"cp1,caf\xE9 stat,t,1652193060,7\r\n");
        let p = parse(&bytes[..], true, "bom.csv");
        assert_eq!(p.accepted, 2, "{p:?}");
        assert_eq!(value(&p, "cp1", "request.INVITE"), Some(Some(5.0)));
        assert_eq!(value(&p, "cp1", "caf\u{FFFD} stat"), Some(Some(7.0)));
        assert_eq!(p.bytes, bytes.len() as u64);
    }

    #[test]
    fn partial_last_line_is_set_aside_until_finished() {
        let whole = "cp1,request.INVITE,t,1652193060,120,4\ncp1,response.503,t,1652193060,3,4\n";
        let cut = &whole[..whole.len() - 6]; // "…,3," minus the rest: the writer is mid-line
        let p = parse(cut.as_bytes(), false, "partial.csv");
        assert_eq!(p.accepted, 1);
        assert_eq!(p.rejected(Reject::PartialLine), 1);
        assert_eq!(value(&p, "cp1", "response.503"), None);
        let p = parse(whole.as_bytes(), true, "whole.csv");
        assert_eq!((p.accepted, p.rejected(Reject::PartialLine)), (2, 0));
    }

    #[test]
    fn bad_lines_are_rejected_with_a_reason_and_the_rest_kept() {
        let p = parse_str(
            "cp1,request.INVITE,t,1652193060,10\n\
             cp1,request.OPTIONS\n\
             cp1,response.503,t,yesterday,1\n\
             cp1,response.604,t,1652193060,lots,1\n\
             cp1,response.500,t,1652193060,NaN\n\
             ,request.INVITE,t,1652193060,1\n\
             \n\
             cp1,request.BYE,t,1652193060.0,2\n",
        );
        assert_eq!(p.accepted, 2);
        assert_eq!(p.rejected(Reject::TooFewFields), 1);
        assert_eq!(p.rejected(Reject::BadTimestamp), 1);
        assert_eq!(p.rejected(Reject::BadValue), 2);
        assert_eq!(p.rejected(Reject::EmptyName), 1);
        assert_eq!(value(&p, "cp1", "request.BYE"), Some(Some(2.0)));
    }

    #[test]
    fn duplicate_lines_last_wins_and_are_counted() {
        let p = parse_str(
            "cp1,request.INVITE,t,1652193060,10\n\
             cp2,request.INVITE,t,1652193060,20\n\
             cp1,request.INVITE,t,1652193120,30\n",
        );
        assert_eq!(p.stats.len(), 2);
        assert_eq!(p.duplicates, 1);
        assert_eq!(value(&p, "cp1", "request.INVITE"), Some(Some(30.0)));
        assert_eq!(p.stats[0].minute, 1652193120);
    }

    #[test]
    fn quoted_names_and_an_unterminated_quote() {
        let p = parse_str("cp1,\"a, b\",t,1652193060,1\n");
        assert_eq!(value(&p, "cp1", "a, b"), Some(Some(1.0)));
        let p = parse_str("cp1,ok,t,1652193060,1\ncp1,\"broken,t,1652193060,1\n");
        assert_eq!(p.accepted, 1);
        assert!(p.rejected(Reject::Malformed) + p.rejected(Reject::TooFewFields) >= 1);
    }

    /// Found by fuzzing with overflow checks on: a timestamp near i64::MIN overflowed when
    /// floored to the minute (a panic in debug builds, a minute near i64::MAX in release).
    #[test]
    fn timestamp_near_i64_min_is_rejected_not_overflowed() {
        let p = parse_str(
            "c,r,,-9223372036854775808\n\
             cp1,b,t,1000000000000000,1\n\
             cp1,c,t,-999999999999999,1\n",
        );
        assert_eq!(p.rejected(Reject::BadTimestamp), 2);
        assert_eq!(p.accepted, 1);
        assert_eq!(p.stats[0].minute, -1_000_000_000_000_020);
    }

    #[test]
    fn empty_input() {
        let p = parse_str("");
        assert_eq!(p, Parsed::default());
    }
}
