//! Entry points for the fuzz targets in `fuzz/`: each feeds arbitrary bytes to one parser of
//! input clusterwatch does not control. Not an API: thin wrappers, hidden from the docs.

use crate::collector::{haproxy, kamailio, mongo, pacemaker, redis, supervisord, textfile};

/// A SRE stats CSV file, read whole; the last byte decides whether its last line is complete.
/// Every entry point returns whether the input was read as valid.
pub fn sre_csv(data: &[u8]) -> bool {
    crate::sre_csv::parse(data, data.last() == Some(&b'\n'), "fuzz").accepted > 0
}

/// An Alertmanager webhook body.
pub fn webhook_payload(data: &[u8]) -> bool {
    match crate::hooks::payload::decode(data) {
        Ok(n) => n.alerts.iter().all(|a| !a.alertname().is_empty()),
        Err(_) => false,
    }
}

/// `crm_mon --output-as=xml`, both as a cluster status and as a failed run's status element.
pub fn crm_mon(data: &[u8]) -> bool {
    let Ok(xml) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = pacemaker::parse_status(xml);
    pacemaker::parse_crm_mon(xml).is_ok()
}

/// A supervisord `getAllProcessInfo` XML-RPC response.
pub fn supervisord(data: &[u8]) -> bool {
    supervisord::parse_process_info(data).is_ok()
}

/// HAProxy's CSV statistics.
pub fn haproxy(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(|text| haproxy::parse_stats(text).is_ok())
}

/// A Redis `INFO` reply.
pub fn redis_info(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(|text| redis::Info::parse(text).is_ok())
}

/// A `replSetGetStatus` reply as a BSON document, read as the collector reads it.
pub fn mongo_status(data: &[u8]) -> bool {
    let Ok(doc) = mongodb::bson::Document::from_reader(data) else {
        return false;
    };
    let parsed = match mongo::parse_status(&doc) {
        Ok(status) => {
            let _ = (status.primary(), status.lags(), status.majority());
            let _ = (status.healthy_voting_members(), status.voting_members());
            true
        }
        Err(_) => false,
    };
    let _ = mongo::interpret(Ok(doc));
    parsed
}

/// A textfile-collector `.prom` file.
pub fn textfile(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(|text| textfile::parse_textfile(text).is_ok())
}

/// A Kamailio `stats.get_statistics` JSON-RPC result: a list of `group:name = value` lines.
pub fn kamailio_stats(data: &[u8]) -> bool {
    let Ok(serde_json::Value::Array(lines)) = serde_json::from_slice(data) else {
        return false;
    };
    let mut read = 0;
    for line in lines.iter().filter_map(serde_json::Value::as_str) {
        if let Some((group, name, _)) = kamailio::parse_stat(line) {
            let _ = kamailio::is_level(group, name);
            read += 1;
        }
    }
    read > 0
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every target's seed corpus goes through its entry point, so the wrappers the fuzz
    /// crate calls keep compiling and the seeds keep meaning what their names say without
    /// the fuzz toolchain.
    #[test]
    fn seed_corpora_run_through_every_entry_point() {
        type EntryPoint = fn(&[u8]) -> bool;
        let targets: [(&str, EntryPoint); 9] = [
            ("sre_csv", super::sre_csv),
            ("webhook_payload", super::webhook_payload),
            ("crm_mon", super::crm_mon),
            ("supervisord", super::supervisord),
            ("haproxy", super::haproxy),
            ("redis_info", super::redis_info),
            ("mongo_status", super::mongo_status),
            ("textfile", super::textfile),
            ("kamailio_stats", super::kamailio_stats),
        ];
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut wrong = Vec::new();
        for (target, run) in targets {
            let seeds: Vec<_> = std::fs::read_dir(corpus.join(target))
                .unwrap_or_else(|e| panic!("{target}: {e}"))
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("seed-")
                })
                .collect();
            assert!(!seeds.is_empty(), "{target}: no seeds");
            for seed in seeds {
                // Seeds named `seed-bad-*` are inputs the parser must refuse; the rest are
                // real outputs it must read.
                let bad = seed
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-bad-");
                let accepted = run(&std::fs::read(&seed).unwrap());
                if accepted == bad {
                    wrong.push(seed.display().to_string());
                }
            }
        }
        assert!(wrong.is_empty(), "read against their names: {wrong:#?}");
    }
}
