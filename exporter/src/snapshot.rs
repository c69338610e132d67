//! The sample buffer collectors write into, and its encoding to the exposition format.
//! Collectors never touch prometheus-client: they fill a [`SampleBuffer`]; the engine merges
//! buffers into one [`Snapshot`] per scrape, and only then is it encoded (synchronously).

use std::borrow::Cow;
use std::collections::BTreeMap;

use prometheus_client::collector::Collector as EncodeCollector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The exact Content-Type of the OpenMetrics text exposition prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Content-Type of the classic Prometheus text format (0.0.4), for scrapers that do not
/// ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label name/value pair; names are almost always static strings.
pub type Label = (Cow<'static, str>, String);

/// Whether a family is a gauge or a counter. State-sets are gauges with one series per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value that can go up and down.
    Gauge,
    /// A monotonically increasing count; its name ends in `_total`.
    Counter,
}

/// One series of a family.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label pairs, in the order they are written.
    pub labels: Vec<Label>,
    /// The sample value.
    pub value: f64,
}

/// One metric family: its name (counters including `_total`), help, kind and series.
#[derive(Clone, Debug)]
pub struct Family {
    /// Full metric name as it appears on the wire.
    pub name: String,
    /// HELP text.
    pub help: Cow<'static, str>,
    /// Gauge or counter.
    pub kind: Kind,
    /// The series, in insertion order.
    pub samples: Vec<Sample>,
}

/// What one collector run produced: families keyed by name, so several targets of the same
/// collector merge into one family (OpenMetrics forbids a family appearing twice).
#[derive(Clone, Debug, Default)]
pub struct SampleBuffer {
    families: BTreeMap<String, Family>,
    /// Labels the engine adds to every sample written through this buffer (target, cluster).
    common: Vec<Label>,
}

impl SampleBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer whose samples all carry `common` labels first.
    pub fn with_common_labels(common: Vec<Label>) -> Self {
        Self {
            families: BTreeMap::new(),
            common,
        }
    }

    /// Records a gauge sample.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        v: f64,
    ) {
        self.push(name, help, Kind::Gauge, labels, v);
    }

    /// Records a counter sample; `name` must end in `_total`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        v: f64,
    ) {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.push(name, help, Kind::Counter, labels, v);
    }

    /// Records a state-set: one series per possible state, 1 for `current` and 0 for the rest,
    /// so that a change of state never leaves a stale series behind.
    pub fn state_set(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        state_label: &'static str,
        states: &[&str],
        current: Option<&str>,
    ) {
        let mut with_state: Vec<(&'static str, &str)> = labels.to_vec();
        with_state.push((state_label, ""));
        let last = with_state.len() - 1;
        for state in states {
            with_state[last].1 = state;
            let v = if current == Some(*state) { 1.0 } else { 0.0 };
            self.push(name, help, Kind::Gauge, &with_state, v);
        }
    }

    /// Declares a family with no samples yet, so its HELP and TYPE appear even when empty.
    pub fn declare(&mut self, name: &str, help: &'static str, kind: Kind) {
        self.family(name, Cow::Borrowed(help), kind);
    }

    /// Records a sample whose help text and label names are only known at run time (series
    /// re-exported from textfiles). Returns `false`, recording nothing, when a family of that
    /// name already exists with another kind.
    pub fn push_owned(
        &mut self,
        name: &str,
        help: Cow<'static, str>,
        kind: Kind,
        labels: Vec<Label>,
        v: f64,
    ) -> bool {
        if self.families.get(name).is_some_and(|f| f.kind != kind) {
            return false;
        }
        let mut all = Vec::with_capacity(self.common.len() + labels.len());
        all.extend(self.common.iter().cloned());
        all.extend(labels);
        self.family(name, help, kind).samples.push(Sample {
            labels: all,
            value: v,
        });
        true
    }

    fn family(&mut self, name: &str, help: Cow<'static, str>, kind: Kind) -> &mut Family {
        // Look up before inserting: `entry` would allocate the name on every sample, and
        // almost every push goes to a family that already exists.
        if !self.families.contains_key(name) {
            let family = Family {
                name: name.to_owned(),
                help,
                kind,
                samples: Vec::new(),
            };
            self.families.insert(name.to_owned(), family);
        }
        self.families.get_mut(name).expect("inserted above")
    }

    fn push(
        &mut self,
        name: &str,
        help: &'static str,
        kind: Kind,
        labels: &[(&'static str, &str)],
        v: f64,
    ) {
        let mut all = Vec::with_capacity(self.common.len() + labels.len());
        all.extend(self.common.iter().cloned());
        all.extend(
            labels
                .iter()
                .map(|(k, v)| (Cow::Borrowed(*k), (*v).to_owned())),
        );
        self.family(name, Cow::Borrowed(help), kind)
            .samples
            .push(Sample {
                labels: all,
                value: v,
            });
    }

    /// Moves every family of `other` into this buffer, merging families of the same name.
    pub fn merge(&mut self, other: SampleBuffer) {
        for (name, fam) in other.families {
            match self.families.get_mut(&name) {
                Some(existing) => existing.samples.extend(fam.samples),
                None => {
                    self.families.insert(name, fam);
                }
            }
        }
    }

    /// Appends `extra` labels to every sample, except a label whose name the sample already
    /// has: a collector's own label is never overridden nor written twice.
    pub fn add_labels_where_absent(&mut self, extra: &[Label]) {
        if extra.is_empty() {
            return;
        }
        for fam in self.families.values_mut() {
            for s in &mut fam.samples {
                for (k, v) in extra {
                    if !s.labels.iter().any(|(name, _)| name == k) {
                        s.labels.push((k.clone(), v.clone()));
                    }
                }
            }
        }
    }

    /// The families recorded so far, sorted by name.
    pub fn families(&self) -> impl Iterator<Item = &Family> {
        self.families.values()
    }

    /// Looks up one family by its full name (tests and `once` use this).
    pub fn get(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// Finishes the buffer into an encodable snapshot.
    pub fn into_snapshot(self) -> Snapshot {
        Snapshot {
            families: self.families.into_values().collect(),
        }
    }
}

/// A finished, immutable set of families ready to encode.
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Vec<Family>,
}

impl Snapshot {
    /// Encodes as OpenMetrics text (what prometheus-client writes), ending in `# EOF`.
    pub fn encode_openmetrics(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail; a failure here would be a bug in the encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding the exposition failed");
        }
        out
    }

    /// Encodes as the classic Prometheus text format 0.0.4 for scrapers that do not accept
    /// OpenMetrics: counters are typed with their `_total` name and there is no `# EOF`.
    pub fn encode_text(self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for fam in &self.families {
            let kind = match fam.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            let _ = writeln!(out, "# HELP {} {}", fam.name, escape_help(&fam.help));
            let _ = writeln!(out, "# TYPE {} {}", fam.name, kind);
            for s in &fam.samples {
                out.push_str(&fam.name);
                if !s.labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in s.labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{}=\"{}\"", k, escape_label_value(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(s.value));
            }
        }
        out
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        v.to_string()
    }
}

impl EncodeCollector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for fam in &self.families {
            // prometheus-client adds the `_total` suffix to counter samples itself.
            let (base, ty) = match fam.kind {
                Kind::Gauge => (fam.name.as_str(), MetricType::Gauge),
                Kind::Counter => (
                    fam.name.strip_suffix("_total").unwrap_or(&fam.name),
                    MetricType::Counter,
                ),
            };
            let mut metric = encoder.encode_descriptor(base, &fam.help, None, ty)?;
            for s in &fam.samples {
                let labels: &[Label] = &s.labels;
                let series = metric.encode_family(&labels)?;
                match fam.kind {
                    Kind::Gauge => ConstGauge::new(s.value).encode(series)?,
                    // Counters must not be negative or NaN in OpenMetrics; clamp defensively.
                    Kind::Counter => {
                        let v = if s.value.is_finite() && s.value > 0.0 {
                            s.value
                        } else {
                            0.0
                        };
                        ConstCounter::new(v).encode(series)?
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_set_writes_every_state() {
        let mut b = SampleBuffer::new();
        b.state_set(
            "x_role",
            "Role.",
            &[("target", "a")],
            "role",
            &["primary", "standby"],
            Some("standby"),
        );
        let fam = b.get("x_role").unwrap();
        let values: Vec<_> = fam
            .samples
            .iter()
            .map(|s| (s.labels[1].1.clone(), s.value))
            .collect();
        assert_eq!(
            values,
            vec![("primary".into(), 0.0), ("standby".into(), 1.0)]
        );
    }

    #[test]
    fn counters_get_total_once_and_families_merge() {
        let mut a = SampleBuffer::with_common_labels(vec![(Cow::Borrowed("target"), "a".into())]);
        a.counter("x_errors_total", "Errors.", &[], 3.0);
        let mut b = SampleBuffer::with_common_labels(vec![(Cow::Borrowed("target"), "b".into())]);
        b.counter("x_errors_total", "Errors.", &[], 4.0);
        a.merge(b);
        let text = a.into_snapshot().encode_openmetrics();
        assert!(text.contains("# TYPE x_errors counter\n"), "{text}");
        assert!(text.contains("x_errors_total{target=\"a\"} 3"), "{text}");
        assert!(text.contains("x_errors_total{target=\"b\"} 4"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn text_format_escapes_label_values() {
        let mut a = SampleBuffer::new();
        a.gauge("x_info", "Info.", &[("v", "a\"b\\c\nd")], 1.0);
        let text = a.into_snapshot().encode_text();
        assert!(text.contains(r#"x_info{v="a\"b\\c\nd"} 1"#), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
