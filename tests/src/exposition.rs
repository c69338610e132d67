//! Reads a Prometheus text exposition (0.0.4 or OpenMetrics) into samples a test can look up
//! by name and labels. It is deliberately independent of the exporter's own encoder, so a
//! test reads what a scraper would see.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name as written (counters with `_total`).
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Samples in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses exposition text; a malformed line is an error naming the line.
    pub fn parse(text: &str) -> Result<Exposition> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).map_err(|e| anyhow!("line {}: {e}: {line}", i + 1))?);
        }
        Ok(Exposition { samples })
    }

    /// Every sample named `name` whose labels include all of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the single sample matching, or `None` when there is none. Several
    /// matches are an error in the test's query, so they panic with the matches listed.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(name, labels);
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} samples: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Whether the text contains `needle` anywhere (labels included), for leak checks.
    pub fn mentions(&self, needle: &str) -> bool {
        self.samples
            .iter()
            .any(|s| s.name.contains(needle) || s.labels.values().any(|v| v.contains(needle)))
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let (name_end, has_labels) = match line.find(['{', ' ']) {
        Some(i) => (i, line.as_bytes()[i] == b'{'),
        None => bail!("no value"),
    };
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if has_labels {
        rest = &rest[1..];
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or_else(|| anyhow!("label without ="))?;
            let key = rest[..eq].to_owned();
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| anyhow!("label value not quoted"))?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("dangling escape"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            };
            rest = &rest[end + 1..];
            labels.insert(key, value);
        }
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| anyhow!("bad value {v}: {e}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// `GET /metrics` from a running exporter, parsed; a non-200 answer is an error.
pub async fn scrape(cw: &crate::harness::Clusterwatch) -> Result<Exposition> {
    let (status, _, body) = cw.get("/metrics").await?;
    if !status.is_success() {
        bail!("GET /metrics answered {status}: {body}");
    }
    Exposition::parse(&body)
}

/// Scrapes `cw` until `check` accepts a scrape, for at most `timeout`; returns that scrape.
/// On timeout the error carries `what` and the last complaint of `check`.
pub async fn scrape_until(
    cw: &crate::harness::Clusterwatch,
    timeout: std::time::Duration,
    what: &str,
    check: impl Fn(&Exposition) -> Result<bool>,
) -> Result<Exposition> {
    let mut last = None;
    crate::harness::wait_until(timeout, what, async || {
        let m = scrape(cw).await?;
        let ok = check(&m)?;
        last = Some(m);
        Ok(ok)
    })
    .await?;
    Ok(last.expect("a successful check stored its scrape"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_escaped_labels_and_values() {
        let e = Exposition::parse(
            "# HELP x y\nx_total{a=\"q\\\"uote\",b=\"n\\nl\"} 3\nup 1.5\n# EOF\n",
        )
        .unwrap();
        assert_eq!(e.value("x_total", &[("a", "q\"uote")]), Some(3.0));
        assert_eq!(e.find("x_total", &[])[0].labels["b"], "n\nl");
        assert_eq!(e.value("up", &[]), Some(1.5));
        assert!(Exposition::parse("x{a=\"1} 2\n").is_err());
    }
}
