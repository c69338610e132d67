//! The YAML source of a configuration: a tree of nodes that remember their line and column,
//! and the list of problems found in it. It does not know any section's meaning; sections
//! deserialize their own part through [`Located::parse`] so one bad item never hides another.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A position in the configuration file (1-based).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    /// Line, 1-based; 0 when unknown.
    pub line: u64,
    /// Column, 1-based; 0 when unknown.
    pub column: u64,
}

impl Pos {
    fn of(loc: &serde_saphyr::Location) -> Self {
        Pos {
            line: loc.line(),
            column: loc.column(),
        }
    }
}

/// One YAML value with the position it was defined at.
#[derive(Clone, Debug)]
pub struct Node {
    /// Where the value starts.
    pub pos: Pos,
    /// The value itself.
    pub value: Value,
}

/// A YAML value. Maps keep their keys' positions so problems can point at the key.
#[derive(Clone, Debug)]
pub enum Value {
    /// `~`, `null` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer too large for i64.
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A string scalar.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping with string keys, in document order.
    Map(Vec<(Key, Node)>),
}

/// A mapping key with its position.
#[derive(Clone, Debug)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// Where the key is written.
    pub pos: Pos,
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                Value::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map(Value::Int).unwrap_or(Value::UInt(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Value>>()? {
                    items.push(Node::from(item));
                }
                Ok(Value::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
                    let value = map.next_value::<Spanned<Value>>()?;
                    let name = key.value.0;
                    entries.push((
                        Key {
                            name,
                            pos: Pos::of(&key.defined),
                        },
                        Node::from(value),
                    ));
                }
                Ok(Value::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key: YAML allows numbers and booleans as keys; configuration keys are text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Str(s) => Ok(KeyText(s)),
            Value::Int(i) => Ok(KeyText(i.to_string())),
            Value::UInt(i) => Ok(KeyText(i.to_string())),
            Value::Bool(b) => Ok(KeyText(b.to_string())),
            _ => Err(de::Error::custom("mapping keys must be plain text")),
        }
    }
}

impl From<Spanned<Value>> for Node {
    fn from(s: Spanned<Value>) -> Self {
        Node {
            pos: Pos::of(&s.defined),
            value: s.value,
        }
    }
}

impl Node {
    /// Parses a whole document. A YAML syntax error is the one problem that stops everything.
    pub fn parse_document(text: &str) -> Result<Node, Problem> {
        if text.trim().is_empty() {
            return Ok(Node {
                pos: Pos { line: 1, column: 1 },
                value: Value::Map(Vec::new()),
            });
        }
        match serde_saphyr::from_str::<Spanned<Value>>(text) {
            Ok(doc) => Ok(Node::from(doc)),
            Err(e) => {
                let pos = e.location().map(|l| Pos::of(&l)).unwrap_or_default();
                // The library's message may embed a source snippet; keep the first line.
                let message = e
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid YAML")
                    .to_owned();
                Err(Problem::new("", pos, format!("invalid YAML: {message}"))
                    .hint("check indentation and quoting around this line"))
            }
        }
    }

    /// Converts to a JSON value so serde-derived section types can deserialize it.
    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Finds the position of a dotted path below this node (`mounts[2].threshold`), falling
    /// back to the deepest node that exists so a problem always points somewhere useful.
    fn locate(&self, segments: &[Segment]) -> Pos {
        let Some((first, rest)) = segments.split_first() else {
            return self.pos;
        };
        match (first, &self.value) {
            (Segment::Key(name), Value::Map(entries)) => {
                match entries.iter().find(|(k, _)| &k.name == name) {
                    // An unknown key's problem belongs on the key itself.
                    Some((k, v))
                        if rest.is_empty() && !matches!(v.value, Value::Map(_) | Value::Seq(_)) =>
                    {
                        k.pos
                    }
                    Some((_, v)) => v.locate(rest),
                    None => self.pos,
                }
            }
            (Segment::Index(i), Value::Seq(items)) => match items.get(*i) {
                Some(v) => v.locate(rest),
                None => self.pos,
            },
            _ => self.pos,
        }
    }

    /// The entries of a mapping node, or `None`.
    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// One thing wrong with a configuration, with where it is and how to fix it.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Dotted path of the offending value, e.g. `postgres[1].dsn`.
    pub path: String,
    /// Where it is in the file.
    pub pos: Pos,
    /// What is wrong, lowercase.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
    /// A warning: printed by `check-config`, but the configuration is still accepted.
    pub warning: bool,
}

impl Problem {
    /// A problem at `path`/`pos`.
    pub fn new(path: impl Into<String>, pos: Pos, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            pos,
            message: message.into(),
            hint: None,
            warning: false,
        }
    }

    /// Makes this a warning: reported, but not a reason to refuse the configuration.
    pub fn warning(mut self) -> Self {
        self.warning = true;
        self
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Formats as `FILE:LINE:COL: PATH: MESSAGE (hint: …)`.
    pub fn render(&self, file: &str) -> String {
        let mut s = format!("{file}:{}:{}: ", self.pos.line, self.pos.column);
        if self.warning {
            s.push_str("warning: ");
        }
        if !self.path.is_empty() {
            s.push_str(&self.path);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        if let Some(h) = &self.hint {
            s.push_str(" (hint: ");
            s.push_str(h);
            s.push(')');
        }
        s
    }
}

/// A node with the dotted path it lives at, handed to a section so it can parse itself and
/// report problems with file positions.
#[derive(Clone)]
pub struct Located<'a> {
    /// The node.
    pub node: &'a Node,
    /// Its dotted path from the document root.
    pub path: String,
}

impl<'a> Located<'a> {
    /// A node at `path`.
    pub fn new(node: &'a Node, path: impl Into<String>) -> Self {
        Located {
            node,
            path: path.into(),
        }
    }

    /// The value of `field` if this node is a mapping that has it.
    pub fn field(&self, field: &str) -> Option<Located<'a>> {
        let entries = self.node.as_map()?;
        let (_, node) = entries.iter().find(|(k, _)| k.name == field)?;
        Some(Located::new(node, join_path(&self.path, field)))
    }

    /// A problem at `field` of this node.
    pub fn problem(&self, field: &str, message: impl Into<String>) -> Problem {
        Problem::new(join_path(&self.path, field), self.pos_of(field), message)
    }

    /// Deserializes this node into `T` (a raw, `deny_unknown_fields` struct). On failure the
    /// problem names the exact field and line, with a "did you mean" for misspelt keys; every
    /// bad field of the node is reported, not only the first (see [`Located::parse_every`]).
    pub fn parse<T: DeserializeOwned>(&self, problems: &mut Vec<Problem>) -> Option<T> {
        let (value, bad) = self.parse_every::<T>(problems)?;
        bad.is_empty().then_some(value)
    }

    /// Deserializes this node into `T`, going on past bad fields: each one is reported, then
    /// removed (an unknown key) or replaced by a neutral stand-in (a wrongly typed value) and
    /// the node parsed again. Returns the value with the paths of the fields reported, so the
    /// caller can run its own checks on the rest, drop what they say about those fields, and
    /// throw the value away. `None` when no stand-in fits (a missing required field).
    pub fn parse_every<T: DeserializeOwned>(
        &self,
        problems: &mut Vec<Problem>,
    ) -> Option<(T, Vec<String>)> {
        let mut json = self.node.to_json();
        let mut bad = Vec::new();
        // Mappings an unknown key was removed from: a required field then missing there is
        // most likely that key misspelt, already reported with a "did you mean".
        let mut pruned: Vec<Vec<Segment>> = Vec::new();
        // Every round removes or replaces one field, so a node has at most this many rounds.
        for _ in 0..MAX_BAD_FIELDS {
            let err = match serde_path_to_error::deserialize::<_, T>(json.clone()) {
                Ok(value) => return Some((value, bad)),
                Err(err) => err,
            };
            let segments = segments_of(err.path());
            let message = err.inner().to_string();
            if message.starts_with("missing field") && pruned.contains(&segments) {
                return None;
            }
            let path = join_path(&self.path, &render_segments(&segments));
            let mut problem = Problem::new(
                &path,
                self.node.locate(&segments),
                clean_serde_message(&message),
            );
            if let Some(h) = hint_for(&message) {
                problem = problem.hint(h);
            }
            problems.push(problem);
            if segments.is_empty() || message.starts_with("missing field") {
                return None;
            }
            bad.push(path);
            if message.starts_with("unknown field") {
                edit_json(&mut json, &segments, None);
                pruned.push(segments[..segments.len() - 1].to_vec());
                continue;
            }
            let stand_in = STAND_INS.iter().find_map(|candidate| {
                let mut tried = json.clone();
                edit_json(&mut tried, &segments, Some(candidate()));
                match serde_path_to_error::deserialize::<_, T>(tried.clone()) {
                    Err(e) if segments_of(e.path()) == segments => None,
                    _ => Some(tried),
                }
            });
            json = stand_in?;
        }
        None
    }

    /// Parses each item of a sequence separately, so every bad item is reported. A missing or
    /// null section is an empty list.
    pub fn parse_list<T: DeserializeOwned>(
        &self,
        problems: &mut Vec<Problem>,
    ) -> Vec<(T, Located<'a>)> {
        self.parse_list_every(problems)
            .into_iter()
            .filter(|(_, _, bad)| bad.is_empty())
            .map(|(value, at, _)| (value, at))
            .collect()
    }

    /// [`Located::parse_list`] with [`Located::parse_every`] for each item: items with bad
    /// fields are returned too, with those fields' paths.
    pub fn parse_list_every<T: DeserializeOwned>(
        &self,
        problems: &mut Vec<Problem>,
    ) -> Vec<(T, Located<'a>, Vec<String>)> {
        match &self.node.value {
            Value::Null => Vec::new(),
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let at = Located::new(item, format!("{}[{i}]", self.path));
                    let (parsed, bad) = at.parse_every::<T>(problems)?;
                    Some((parsed, at, bad))
                })
                .collect(),
            _ => {
                problems.push(
                    Problem::new(self.path.clone(), self.node.pos, "expected a list")
                        .hint("write one `- name: …` entry per target"),
                );
                Vec::new()
            }
        }
    }

    /// The position of a field of this node (for semantic problems found after parsing).
    pub fn pos_of(&self, field: &str) -> Pos {
        self.node.locate(&[Segment::Key(field.to_owned())])
    }
}

/// At most this many bad fields are reported for one node.
const MAX_BAD_FIELDS: usize = 64;

/// Neutral values tried in place of a wrongly typed field, in order: the first one its type
/// accepts lets parsing go on to the next field.
const STAND_INS: &[fn() -> serde_json::Value] = &[
    || serde_json::Value::Null,
    || serde_json::Value::String(String::new()),
    || serde_json::Value::Array(Vec::new()),
    || serde_json::Value::Object(serde_json::Map::new()),
    || serde_json::Value::Bool(false),
    || serde_json::Value::from(0),
];

/// Replaces (or with `None`, removes) the value at `segments` in `json`.
fn edit_json(json: &mut serde_json::Value, segments: &[Segment], with: Option<serde_json::Value>) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut here = json;
    for seg in parents {
        let next = match (seg, here) {
            (Segment::Key(k), serde_json::Value::Object(m)) => m.get_mut(k),
            (Segment::Index(i), serde_json::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        let Some(next) = next else {
            return;
        };
        here = next;
    }
    match (last, here, with) {
        (Segment::Key(k), serde_json::Value::Object(m), Some(v)) => {
            m.insert(k.clone(), v);
        }
        (Segment::Key(k), serde_json::Value::Object(m), None) => {
            m.remove(k);
        }
        (Segment::Index(i), serde_json::Value::Array(a), Some(v)) if *i < a.len() => a[*i] = v,
        _ => {}
    }
}

fn segments_of(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    path.iter()
        .filter_map(|s| match s {
            S::Map { key } => Some(Segment::Key(key.clone())),
            S::Seq { index } => Some(Segment::Index(*index)),
            _ => None,
        })
        .collect()
}

fn render_segments(segments: &[Segment]) -> String {
    let mut s = String::new();
    for seg in segments {
        match seg {
            Segment::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Segment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Joins a base path and a relative one (`postgres[0]` + `dsn`).
pub fn join_path(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_owned(),
        (_, true) => base.to_owned(),
        _ if rel.starts_with('[') => format!("{base}{rel}"),
        _ => format!("{base}.{rel}"),
    }
}

/// serde's messages mention Rust types; say it in the operator's words instead.
fn clean_serde_message(msg: &str) -> String {
    msg.replace("invalid type: ", "wrong type: ")
        .replace("a sequence", "a list")
        .replace("a map", "a mapping")
        .replace("struct ", "")
}

/// Offers "did you mean" for a misspelt key, from the list serde gives in its message.
fn hint_for(msg: &str) -> Option<String> {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (unknown, tail) = rest.split_once('`')?;
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let best = expected
            .iter()
            .map(|e| (strsim::jaro_winkler(unknown, e), *e))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        return Some(match best {
            Some((_, e)) => format!("did you mean `{e}`?"),
            None => format!("remove `{unknown}`; known keys are listed above"),
        });
    }
    if msg.starts_with("missing field") {
        return Some("add the field; see the configuration reference in the README".into());
    }
    None
}

/// Offers "did you mean" for an unknown name among `known`.
pub fn suggest(unknown: &str, known: &[&str]) -> Option<String> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), *k))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        port: u16,
    }

    #[test]
    fn every_bad_item_is_reported_with_its_line() {
        let doc = Node::parse_document("items:\n  - name: a\n    port: 1\n  - name: b\n    prot: 2\n  - name: c\n    port: nope\n").unwrap();
        let items = &doc.as_map().unwrap()[0].1;
        let mut problems = Vec::new();
        let parsed = Located::new(items, "items").parse_list::<Item>(&mut problems);
        assert_eq!(parsed.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].pos.line, 5);
        assert!(problems[0].message.contains("unknown field `prot`"));
        assert_eq!(problems[0].hint.as_deref(), Some("did you mean `port`?"));
        assert_eq!(problems[1].path, "items[2].port");
        assert_eq!(problems[1].pos.line, 7);
    }

    #[test]
    fn every_bad_field_of_one_item_is_reported_at_once() {
        let doc =
            Node::parse_document("items:\n  - name: [a]\n    port: nope\n    extra: 1\n").unwrap();
        let items = &doc.as_map().unwrap()[0].1;
        let mut problems = Vec::new();
        let parsed = Located::new(items, "items").parse_list_every::<Item>(&mut problems);
        let mut paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            ["items[0].extra", "items[0].name", "items[0].port"],
            "{problems:?}"
        );
        // The item is still returned (for further checks), marked with what was replaced.
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].2.len(), 3);
        assert!(Located::new(items, "items")
            .parse_list::<Item>(&mut Vec::new())
            .is_empty());
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = Node::parse_document("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.pos.line >= 2, "{err:?}");
        assert!(err.message.starts_with("invalid YAML"));
    }
}
