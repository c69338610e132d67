//! The SRE platform's per-minute stats files (`counters.csv`, `samples.csv`) parsed into the
//! newest value per (host, stat). Pure: bytes in, a report out; watching the file, caching
//! and metrics belong to `collector::sre_stats`.
//!
//! A line is `host,stat,human time,unix time,v1,…,v15`, newest value first, an empty field
//! meaning no data (runbook, "Stats Monitoring"). Only the newest value is read: it is the
//! one exported, and skipping the fourteen older ones keeps a 100 MB file cheap.
//!
//! Lines are split in place, straight from the read buffer; only a line holding a quote or a
//! lone carriage return goes through `csv-core` (the engine of the csv crate), so every line
//! splits as the csv crate splits it. Names are stored once each, compactly: a stat name
//! shares its host and its group (the part up to the last `.`) with its neighbours.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::{ErrorKind, Read};

use hashbrown::HashTable;

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
    /// The file could not be read to its end, or holds more names than 4 GiB.
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

/// The newest value of one (host, stat) line, as [`Stats::iter`] lends it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat<'a> {
    /// The node that produced the stat.
    pub host: &'a str,
    /// The stat name, e.g. `request.INVITE` or `profiling.cp.CAC test.Start`.
    pub stat: StatName<'a>,
    /// The newest value; `None` when its field is empty (no data for that minute).
    pub value: Option<f64>,
    /// Unix time of the minute the newest value belongs to (the line's timestamp, floored to
    /// the minute: samples.csv timestamps are not aligned).
    pub minute: i64,
    /// How many values the line carried (at most 15 on real files, often fewer).
    pub values: usize,
}

/// A stat name, kept as its group (up to and with the last `.`, shared by the stats of
/// that group) and the rest; compares equal to the whole name as a `&str`.
#[derive(Clone, Copy)]
pub struct StatName<'a> {
    group: &'a str,
    leaf: &'a str,
}

impl StatName<'_> {
    /// Appends the whole name to `out` (a scrape reuses one buffer for every label).
    pub fn push_to(&self, out: &mut String) {
        out.push_str(self.group);
        out.push_str(self.leaf);
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.group.bytes().chain(self.leaf.bytes())
    }
}

impl fmt::Display for StatName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.group)?;
        f.write_str(self.leaf)
    }
}

impl fmt::Debug for StatName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl PartialEq for StatName<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes().eq(other.bytes())
    }
}

impl PartialEq<str> for StatName<'_> {
    fn eq(&self, other: &str) -> bool {
        other.len() == self.group.len() + self.leaf.len()
            && other.starts_with(self.group)
            && other.ends_with(self.leaf)
    }
}

impl PartialEq<&str> for StatName<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

/// One entry per (host, stat), in order of first appearance, stored compactly: a million
/// distinct stats take about 28 MB (16 bytes each plus their names without the shared
/// parts), a file repeating a few thousand a few hundred kilobytes.
#[derive(Clone, Default, PartialEq)]
pub struct Stats {
    hosts: Vec<Box<str>>,
    /// (host, group) pairs; every name in `names` starts with the index of its pair.
    prefixes: Vec<(u32, Box<str>)>,
    /// Per stat, in order: its prefix index (LEB128), then the rest of its name (UTF-8).
    names: Vec<u8>,
    entries: Vec<Entry>,
    /// The (minute, value count) pairs of the lines: a file written at one time has few.
    stamps: Vec<Stamp>,
}

#[derive(Clone, Copy, PartialEq)]
struct Entry {
    /// `f64` bits, or [`NO_DATA`].
    value: u64,
    /// Where the stat's name ends in `names` (it starts where the previous one ends).
    name_end: u32,
    /// Index into `stamps`.
    stamp: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Stamp {
    minute: i64,
    values: u32,
}

/// A NaN no parse produces (values must be finite): an empty field.
const NO_DATA: u64 = 0x7ff8_dead_0000_0000;

impl Stats {
    /// How many distinct (host, stat) pairs there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `i`-th (host, stat) in order of first appearance.
    pub fn get(&self, i: usize) -> Option<Stat<'_>> {
        let entry = self.entries.get(i)?;
        let (prefix, leaf) = self.key(i);
        let (host, group) = &self.prefixes[prefix as usize];
        let stamp = self.stamps[entry.stamp as usize];
        Some(Stat {
            host: &self.hosts[*host as usize],
            stat: StatName {
                group,
                // Stored from a `&str`, split only after a complete LEB128 number.
                leaf: std::str::from_utf8(leaf).expect("names are stored as UTF-8"),
            },
            value: (entry.value != NO_DATA).then(|| f64::from_bits(entry.value)),
            minute: stamp.minute,
            values: stamp.values as usize,
        })
    }

    /// Every (host, stat) in order of first appearance.
    pub fn iter(&self) -> impl Iterator<Item = Stat<'_>> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// The prefix index and the rest of the name of entry `i`.
    fn key(&self, i: usize) -> (u32, &[u8]) {
        let start = match i {
            0 => 0,
            _ => self.entries[i - 1].name_end as usize,
        };
        let name = &self.names[start..self.entries[i].name_end as usize];
        let (prefix, n) = leb128(name);
        (prefix, &name[n..])
    }

    fn shrink_to_fit(&mut self) {
        self.names.shrink_to_fit();
        self.entries.shrink_to_fit();
        self.stamps.shrink_to_fit();
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

fn push_leb128(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The number at the start of `bytes` and its length.
fn leb128(bytes: &[u8]) -> (u32, usize) {
    let mut v = 0u32;
    for (i, b) in bytes.iter().enumerate() {
        v |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, bytes.len())
}

/// What one parse of a file found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// One entry per (host, stat), in order of first appearance; a later duplicate line
    /// replaces the earlier one's values.
    pub stats: Stats,
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

/// The read buffer's starting size; a longer record grows it.
const BUFFER: usize = 256 * 1024;

/// Parses a whole stats file. `ends_with_newline` says whether the file's last byte is a line
/// end; when it is not, the last line is still being written and is set aside. `source` names
/// the file in debug logs.
pub fn parse<R: Read>(input: R, ends_with_newline: bool, source: &str) -> Parsed {
    let mut input = Input::new(input);
    let mut b = Builder::new(source);
    let mut slow = Slow::new();
    // The line the next record starts on, for debug logs.
    let mut line = 1u64;
    let mut first = true;
    loop {
        if slow.active {
            let data = &input.buf[input.pos..input.end];
            if data.is_empty() && !input.eof {
                if let Err(e) = input.fill() {
                    b.read_failed(line, &e);
                    break;
                }
                continue;
            }
            let (result, used) = slow.read(data);
            input.pos += used;
            match result {
                csv_core::ReadRecordResult::Record => {
                    // Read with no input left: the record runs to the end of the file.
                    let complete = !data.is_empty();
                    b.record(&slow.fields(), complete || ends_with_newline, line, first);
                    first = false;
                    slow.finish();
                }
                csv_core::ReadRecordResult::End => slow.finish(),
                _ => {}
            }
            line += memchr::memchr_iter(b'\n', &data[..used]).count() as u64;
            continue;
        }
        let data = &input.buf[input.pos..input.end];
        let (text, used, newline) = match memchr::memchr(b'\n', data) {
            Some(i) => (&data[..i], i + 1, true),
            None if !input.eof => {
                if let Err(e) = input.fill() {
                    b.read_failed(line, &e);
                    break;
                }
                continue;
            }
            None if data.is_empty() => break,
            None => (data, data.len(), false),
        };
        let (text, cr) = match text.strip_suffix(b"\r") {
            Some(t) => (t, true),
            None => (text, false),
        };
        if text.is_empty() {
            // A blank line: the csv crate skips it too.
            input.pos += used;
            line += u64::from(newline);
            continue;
        }
        if memchr::memchr2(b'"', b'\r', text).is_some() {
            // Quoting, or a carriage return ending a record mid-line: the full CSV rules,
            // from this line's start.
            slow.active = true;
            continue;
        }
        b.record(
            &Fields::split(text),
            newline || cr || ends_with_newline,
            line,
            first,
        );
        first = false;
        input.pos += used;
        line += 1;
    }
    b.finish(input.read)
}

/// The reader and its buffer: `buf[pos..end]` is read and not used yet.
struct Input<R> {
    reader: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Bytes read so far.
    read: u64,
}

impl<R: Read> Input<R> {
    fn new(reader: R) -> Self {
        let mut input = Input {
            reader,
            buf: vec![0; BUFFER],
            pos: 0,
            end: 0,
            eof: false,
            read: 0,
        };
        // The csv crate drops a byte order mark at the very start of the input.
        if input.fill().is_ok() && input.buf[..input.end].starts_with(UTF8_BOM) {
            input.pos = UTF8_BOM.len();
        }
        input
    }

    /// Reads more after the unused bytes (moved to the front; the buffer grows when they
    /// fill it); sets `eof` when there is no more.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    self.read += n as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Nothing after a failed read can be trusted.
                    self.eof = true;
                    self.pos = self.end;
                    return Err(e);
                }
            }
        }
    }
}

/// The fields of one record that matter: the first five, how many there are, and whether
/// the last one is empty.
struct Fields<'a> {
    first: [&'a [u8]; 5],
    count: usize,
    last_empty: bool,
}

impl<'a> Fields<'a> {
    /// Splits a line holding no quote and no carriage return.
    fn split(line: &'a [u8]) -> Self {
        let mut first = [&line[..0]; 5];
        let mut start = 0;
        for (count, field) in first.iter_mut().enumerate() {
            let Some(i) = memchr::memchr(b',', &line[start..]) else {
                *field = &line[start..];
                return Fields {
                    first,
                    count: count + 1,
                    last_empty: start == line.len(),
                };
            };
            *field = &line[start..start + i];
            start += i + 1;
        }
        // The older values: only their number matters. (A plain loop: the compiler turns it
        // into vector compares.)
        let rest = &line[start..];
        Fields {
            first,
            count: 6 + rest.iter().filter(|&&c| c == b',').count(),
            last_empty: rest.last().is_none_or(|&c| c == b','),
        }
    }
}

/// A record with a quote or a lone carriage return, read by `csv-core` across as many lines
/// and buffer refills as it takes.
struct Slow {
    core: csv_core::Reader,
    active: bool,
    out: Vec<u8>,
    ends: Vec<usize>,
    nout: usize,
    nend: usize,
}

impl Slow {
    fn new() -> Self {
        let mut core = csv_core::Reader::new();
        // csv-core drops a byte order mark at the start of its first input, and its first
        // input here is some record in the middle: that one is handled in `Input::new`. A
        // line end read at the start of a record changes nothing else.
        let _ = core.read_record(b"\n", &mut [0; 1], &mut [0; 1]);
        Slow {
            core,
            active: false,
            out: vec![0; 1024],
            ends: vec![0; 32],
            nout: 0,
            nend: 0,
        }
    }

    /// Feeds `data` (empty: the end of the file); returns what csv-core says and how many
    /// bytes it used.
    fn read(&mut self, mut data: &[u8]) -> (csv_core::ReadRecordResult, usize) {
        let mut used = 0;
        loop {
            let (result, nin, nout, nend) = self.core.read_record(
                data,
                &mut self.out[self.nout..],
                &mut self.ends[self.nend..],
            );
            (self.nout, self.nend) = (self.nout + nout, self.nend + nend);
            used += nin;
            data = &data[nin..];
            match result {
                csv_core::ReadRecordResult::OutputFull => {
                    self.out.resize(self.out.len() * 2, 0);
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    self.ends.resize(self.ends.len() * 2, 0);
                }
                other => return (other, used),
            }
        }
    }

    fn fields(&self) -> Fields<'_> {
        let field = |i: usize| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.out[start..self.ends[i]]
        };
        let mut first = [&self.out[..0]; 5];
        for (i, f) in first.iter_mut().enumerate().take(self.nend) {
            *f = field(i);
        }
        Fields {
            first,
            count: self.nend,
            last_empty: self.nend == 0 || field(self.nend - 1).is_empty(),
        }
    }

    fn finish(&mut self) {
        (self.active, self.nout, self.nend) = (false, 0, 0);
    }
}

/// Builds [`Parsed`] record by record; the lookups it needs are dropped at the end.
struct Builder<'s> {
    out: Parsed,
    source: &'s str,
    /// Entry indices by (prefix, rest of the name), in shards: growing a shard copies a
    /// sixteenth of the index, where one table would hold the old and the new whole.
    index: Vec<HashTable<u32>>,
    host_ids: FnvMap<Box<str>, u32>,
    /// Per host: its groups' prefix indices.
    group_ids: Vec<FnvMap<Box<str>, u32>>,
    stamp_ids: FnvMap<Stamp, u32>,
    /// The last host's and prefix's raw bytes: consecutive lines mostly share them.
    last_host: Option<(Vec<u8>, u32)>,
    last_prefix: Option<(u32, Vec<u8>, u32)>,
    last_stamp: Option<(Stamp, u32)>,
}

const SHARDS: usize = 16;

impl<'s> Builder<'s> {
    fn new(source: &'s str) -> Self {
        Builder {
            out: Parsed::default(),
            source,
            index: (0..SHARDS).map(|_| HashTable::new()).collect(),
            host_ids: FnvMap::default(),
            group_ids: Vec::new(),
            stamp_ids: FnvMap::default(),
            last_host: None,
            last_prefix: None,
            last_stamp: None,
        }
    }

    fn reject(&mut self, reason: Reject, line: u64) {
        self.out.reject(reason, line, self.source);
    }

    fn read_failed(&mut self, line: u64, e: &std::io::Error) {
        tracing::debug!(file = self.source, line, error = %e, "stats file read failed");
        self.reject(Reject::Malformed, line);
    }

    /// One record; `complete` is false for a last line still being written.
    fn record(&mut self, f: &Fields<'_>, complete: bool, line: u64, first: bool) {
        if !complete {
            return self.reject(Reject::PartialLine, line);
        }
        let mut host = f.first[0];
        if first {
            host = host.strip_prefix(UTF8_BOM).unwrap_or(host);
        }
        // A blank line (an editor's trailing newline) is not a stats line at all.
        if f.count == 1 && host.is_empty() {
            return;
        }
        if f.count < 4 {
            return self.reject(Reject::TooFewFields, line);
        }
        let (host, stat) = (trim(host), trim(f.first[1]));
        if host.is_empty() || stat.is_empty() {
            return self.reject(Reject::EmptyName, line);
        }
        let Some(ts) = parse_timestamp(trim(f.first[3])) else {
            return self.reject(Reject::BadTimestamp, line);
        };
        let value = match trim(f.first[4]) {
            v if f.count < 5 || v.is_empty() => None,
            v => match parse_number(v) {
                Some(v) => Some(v),
                None => return self.reject(Reject::BadValue, line),
            },
        };
        // A trailing comma (a writer that always writes 15 separators) is not a value.
        let mut values = f.count - 4;
        if values > 15 && f.last_empty {
            values -= 1;
        }
        let stamp = Stamp {
            minute: ts - ts.rem_euclid(60),
            values: u32::try_from(values).unwrap_or(u32::MAX),
        };
        if self.add(host, stat, value, stamp).is_none() {
            // Only past 4 GiB of names or 4 billion distinct stamps.
            return self.reject(Reject::Malformed, line);
        }
        self.out.accepted += 1;
    }

    fn add(&mut self, host: &[u8], stat: &[u8], value: Option<f64>, stamp: Stamp) -> Option<()> {
        let host = self.host(host)?;
        let (group, leaf) = match memchr::memrchr(b'.', stat) {
            Some(i) => stat.split_at(i + 1),
            None => (&stat[..0], stat),
        };
        let prefix = self.prefix(host, group)?;
        let stamp = self.stamp(stamp)?;
        // Names are kept as text: invalid UTF-8 becomes U+FFFD here (split at an ASCII `.`,
        // the parts convert as the whole would), so two names alike once printed are one.
        let leaf = text(leaf);
        let leaf = leaf.as_bytes();
        let value = value.map_or(NO_DATA, f64::to_bits);
        let hash = key_hash(prefix, leaf);
        let stats = &mut self.out.stats;
        let shard = &mut self.index[(hash >> 40) as usize % SHARDS];
        if let Some(&i) = shard.find(hash, |&i| stats.key(i as usize) == (prefix, leaf)) {
            // Updated in place: a file full of repeated lines costs no allocation per line.
            self.out.duplicates += 1;
            stats.entries[i as usize] = Entry {
                value,
                stamp,
                ..stats.entries[i as usize]
            };
            return Some(());
        }
        let start = stats.names.len();
        push_leb128(&mut stats.names, prefix);
        stats.names.extend_from_slice(leaf);
        let Ok(name_end) = u32::try_from(stats.names.len()) else {
            stats.names.truncate(start);
            return None;
        };
        let i = stats.entries.len() as u32;
        stats.entries.push(Entry {
            value,
            name_end,
            stamp,
        });
        shard.insert_unique(hash, i, |&i| {
            let (prefix, leaf) = stats.key(i as usize);
            key_hash(prefix, leaf)
        });
        Some(())
    }

    fn host(&mut self, raw: &[u8]) -> Option<u32> {
        if let Some((last, id)) = &self.last_host {
            if last == raw {
                return Some(*id);
            }
        }
        let name = text(raw);
        let id = match self.host_ids.get(name.as_ref()) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(self.out.stats.hosts.len()).ok()?;
                self.out.stats.hosts.push(name.as_ref().into());
                self.host_ids.insert(name.into(), id);
                self.group_ids.push(FnvMap::default());
                id
            }
        };
        self.last_host = Some((raw.to_vec(), id));
        Some(id)
    }

    fn prefix(&mut self, host: u32, raw: &[u8]) -> Option<u32> {
        if let Some((last_host, last, id)) = &self.last_prefix {
            if *last_host == host && last == raw {
                return Some(*id);
            }
        }
        let group = text(raw);
        let groups = &mut self.group_ids[host as usize];
        let id = match groups.get(group.as_ref()) {
            Some(&id) => id,
            None => {
                let prefixes = &mut self.out.stats.prefixes;
                let id = u32::try_from(prefixes.len()).ok()?;
                prefixes.push((host, group.as_ref().into()));
                groups.insert(group.into(), id);
                id
            }
        };
        self.last_prefix = Some((host, raw.to_vec(), id));
        Some(id)
    }

    fn stamp(&mut self, stamp: Stamp) -> Option<u32> {
        if let Some((last, id)) = self.last_stamp {
            if last == stamp {
                return Some(id);
            }
        }
        let stamps = &mut self.out.stats.stamps;
        let id = match self.stamp_ids.get(&stamp) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(stamps.len()).ok()?;
                stamps.push(stamp);
                self.stamp_ids.insert(stamp, id);
                id
            }
        };
        self.last_stamp = Some((stamp, id));
        Some(id)
    }

    fn finish(mut self, read: u64) -> Parsed {
        self.out.bytes = read;
        self.out.stats.shrink_to_fit();
        self.out
    }
}

/// The index's hash of a (prefix, rest of the name) key, eight bytes a step: FNV's byte
/// steps showed up as a tenth of a parse. Keys come from a local file, not from an attacker.
fn key_hash(prefix: u32, leaf: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let step = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = step(u64::from(prefix), leaf.len() as u64);
    let mut words = leaf.chunks_exact(8);
    for word in &mut words {
        h = step(h, u64::from_le_bytes(word.try_into().expect("eight bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(last));
    }
    // The table takes its slot from the low bits: fold the well-mixed high ones in.
    h ^ (h >> 29)
}

/// `bytes` as text; invalid UTF-8 becomes U+FFFD (valid text, the usual case, is borrowed).
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// FNV-1a for the small maps (hosts, groups, stamps): keys come from a local file, not from
/// an attacker, and SipHash's cost showed up as a tenth of the parse.
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

/// Up to 18 ASCII digits (the common case, read without the standard parsers' checks).
fn parse_digits(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 18 {
        return None;
    }
    field.iter().try_fold(0u64, |v, &c| {
        let d = c.wrapping_sub(b'0');
        (d < 10).then(|| v * 10 + u64::from(d))
    })
}

fn parse_timestamp(field: &[u8]) -> Option<i64> {
    if let Some(v) = parse_digits(field) {
        return (v < MAX_TIMESTAMP as u64).then_some(v as i64);
    }
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
    // Fifteen digits at most: every such integer is exact as an f64, as the standard
    // parser would give it.
    if field.len() <= 15 {
        if let Some(v) = parse_digits(field) {
            return Some(v as f64);
        }
    }
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
            .find(|s| s.host == host && s.stat == stat)
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
        assert_eq!(p.stats.get(0).unwrap().minute, 1652193120);
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
        assert_eq!(p.stats.get(0).unwrap().minute, -1_000_000_000_000_020);
    }

    /// Quoting and carriage returns split exactly as the csv crate splits them: a quoted
    /// name may hold commas, line ends and doubled quotes; a lone CR ends a record.
    #[test]
    fn quoted_fields_across_lines_and_lone_carriage_returns() {
        let p = parse_str(
            "cp1,\"multi\nline\",t,1652193060,5\r\n\
             cp1,\"say \"\"hi\"\"\",t,1652193060,7\n\
             cp1,a\rcp1,b,t,1652193060,6\n\
             \r\r\ncp1,c,t,1652193060,8\n",
        );
        assert_eq!(value(&p, "cp1", "multi\nline"), Some(Some(5.0)));
        assert_eq!(value(&p, "cp1", "say \"hi\""), Some(Some(7.0)));
        assert_eq!(value(&p, "cp1", "b"), Some(Some(6.0)));
        assert_eq!(value(&p, "cp1", "c"), Some(Some(8.0)));
        assert_eq!((p.accepted, p.rejected(Reject::TooFewFields)), (4, 1));
    }

    /// A reader that hands out a few bytes at a time: every record crosses refills.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn small_reads_give_the_same_result() {
        let mut text = RUNBOOK_SAMPLES.replace('\n', "\r\n");
        text.push_str("cp1,\"q,\nq\",t,1652193060,1\ncp1,x\rcp2,system.cpu,t,1652193060,2\n\n");
        text.push_str(&"cp3,request.INVITE,t,1652193060,3,2,1\n".repeat(3));
        text.push_str("cp3,response.503,t,165219");
        let whole = parse(text.as_bytes(), false, "whole.csv");
        assert_eq!(whole.rejected(Reject::PartialLine), 1);
        assert_eq!(whole.duplicates, 2);
        for step in [1, 2, 7, 64] {
            assert_eq!(parse(Trickle(text.as_bytes(), step), false, "t.csv"), whole);
        }
        // Longer than the read buffer: a record across a refill that must grow it.
        let long = format!("cp1,{},t,1652193060,4\n", "s".repeat(3 * BUFFER));
        let p = parse(Trickle(long.as_bytes(), 4096), true, "long.csv");
        assert_eq!((p.accepted, p.bytes), (1, long.len() as u64));
    }

    /// A million distinct stats stay compact: the names are stored without their shared
    /// host and group, each stat's numbers in 16 bytes.
    #[test]
    fn stats_are_stored_compactly() {
        let text: String = (0..10_000)
            .map(|i| {
                format!(
                    "cp{},profiling.cp.CAC test.stat {i:06},t,1652193060,1\n",
                    i % 10
                )
            })
            .collect();
        let p = parse_str(&text);
        assert_eq!(p.stats.len(), 10_000);
        assert_eq!(p.stats.prefixes.len(), 10);
        assert_eq!(p.stats.names.len(), 10_000 * (1 + "stat 000000".len()));
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        let s = p.stats.get(12).unwrap();
        assert_eq!(
            (s.host, s.stat.to_string()),
            ("cp2", "profiling.cp.CAC test.stat 000012".into())
        );
    }

    #[test]
    fn empty_input() {
        let p = parse_str("");
        assert_eq!(p, Parsed::default());
    }
}
