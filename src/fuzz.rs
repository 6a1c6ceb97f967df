//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test, so that
//! CI on stable replays exactly what the fuzzers run.
#![doc(hidden)]

use crate::check::{inspect, Thresholds};
use crate::materials::{Entry, Found, Place, Source};

pub fn certificate_pem(data: &[u8]) {
    if let Ok(c) = crate::pki::parse_certificate(data, "fuzz") {
        let _ = c.is_self_signed();
    }
}

pub fn private_key_pem(data: &[u8]) {
    if let Ok(k) = crate::pki::PrivateKey::from_pem(data, "fuzz") {
        let _ = k.public_key_der();
    }
}

pub fn dhparams_pem(data: &[u8]) {
    let _ = crate::pki::DhParams::validate(data, "fuzz");
}

/// Replies read one after another from the input, as the RESP client reads a server's: each is
/// an error or a value within the reader's limits, never a panic or an allocation beyond them.
pub fn resp_reply(data: &[u8]) {
    use crate::redis::resp::{read_value, Value, MAX_ARRAY, MAX_BULK};
    fn within(v: &Value) -> bool {
        match v {
            Value::Bulk(Some(b)) => b.len() as i64 <= MAX_BULK,
            Value::Array(Some(items)) => {
                items.len() as i64 <= MAX_ARRAY && items.iter().all(within)
            }
            _ => true,
        }
    }
    let mut r = std::io::BufReader::new(data);
    while let Ok(v) = read_value(&mut r, 0) {
        assert!(within(&v), "{v:?}");
        let _ = v.text();
    }
}

pub fn text_inputs(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::pki::Subject::parse(s);
        let _ = crate::cli::parse_duration(s);
        let _ = crate::manifest::validate_namespace(s);
        let _ = crate::restart::parse_selector(s);
        let _ = crate::probe::default_server_name(s);
        let _ = crate::agent::MaintenanceWindow::parse(s);
        let _ = crate::pki::parse_san(s);
        let _ = crate::cli::parse_days(s);
    }
}

/// The whole report over arbitrary contents: the input split on 0xff into the five files.
pub fn check_inspect(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0xff);
    let names = [
        crate::contract::CA_CERT,
        crate::contract::LEAF_CERT,
        crate::contract::LEAF_KEY,
        crate::contract::CA_KEY,
        crate::contract::DH_PARAMS,
    ];
    let entries = names
        .into_iter()
        .map(|n| {
            let found = match parts.next() {
                Some(b) => Found::Bytes(b.to_vec()),
                None => Found::Missing,
            };
            Entry {
                file: n,
                place: Place::File {
                    path: n.to_string(),
                },
                found,
            }
        })
        .collect();
    let source = Source {
        label: "fuzz".into(),
        entries,
    };
    let report = inspect(&source, 1_700_000_000, Thresholds::default());
    let _ = serde_json::to_string(&report);
}

/// /metrics with label values taken from the input (split on 0xff into namespace, two
/// subjects): the exposition must parse strictly and hold exactly the series that were set, with
/// the label values read back unchanged. A forged series or a broken line panics.
pub fn exposition(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0xff).map(String::from_utf8_lossy);
    let namespace = parts.next().unwrap_or_default().into_owned();
    let subjects = [
        parts.next().unwrap_or_default().into_owned(),
        parts
            .next()
            .unwrap_or_else(|| "CN=Server".into())
            .into_owned(),
    ];
    let metrics = crate::metrics::Metrics::new();
    let mut wanted = std::collections::BTreeSet::new();
    for (i, subject) in subjects.iter().enumerate() {
        let labels = crate::metrics::CertLabels {
            namespace: namespace.as_str().into(),
            secret: crate::contract::CERTS_SECRET.into(),
            key: crate::contract::CA_CERT.into(),
            subject: subject.as_str().into(),
            serial: format!("{i:02X}").into(),
        };
        metrics.set_certificate(&labels, 1_700_000_000 + i as i64, 1_600_000_000, true);
        wanted.insert(vec![
            ("namespace".to_string(), namespace.clone()),
            (
                "secret".to_string(),
                crate::contract::CERTS_SECRET.to_string(),
            ),
            ("key".to_string(), crate::contract::CA_CERT.to_string()),
            ("subject".to_string(), subject.clone()),
            ("serial".to_string(), format!("{i:02X}")),
        ]);
    }
    let text = metrics.encode();
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let found: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "dssm_certificate_not_after_timestamp_seconds")
        .map(|s| s.labels.clone())
        .collect();
    assert_eq!(found.len(), wanted.len(), "{text}");
    assert!(found.iter().all(|l| wanted.contains(l)), "{text}");
}

/// One sample line of an exposition, label values unescaped.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A strict reader of the OpenMetrics text format as `/metrics` serves it: `# HELP`, `# TYPE`,
/// `# UNIT` lines, samples of declared families (no exemplars), no duplicate series, and `# EOF`
/// as the last line. Anything else is an error naming the line.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("the exposition does not end with `# EOF`")?;
    let mut families: Vec<String> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    for (n, line) in body.split_terminator('\n').enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(meta) = line.strip_prefix("# ") {
            let (kind, rest) = meta.split_once(' ').ok_or_else(|| bad("bare comment"))?;
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(|e| bad(&e))?;
            match kind {
                "TYPE" => {
                    const TYPES: [&str; 8] = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !TYPES.contains(&arg) {
                        return Err(bad("unknown type"));
                    }
                    if families.iter().any(|f| f == name) {
                        return Err(bad("family declared twice"));
                    }
                    families.push(name.to_string());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(bad("unknown metadata line")),
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| bad(&e))?;
        let declared = families.last().is_some_and(|f| {
            sample.name == *f
                || ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
                    .iter()
                    .any(|suffix| sample.name.strip_suffix(suffix) == Some(f))
        });
        if !declared {
            return Err(bad("sample outside its family"));
        }
        if samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(bad("duplicate series"));
        }
        samples.push(sample);
    }
    Ok(samples)
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("no value after the metric name")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            if !labels.is_empty() {
                rest = rest
                    .strip_prefix(',')
                    .ok_or("labels not separated by a comma")?;
            }
            let (key, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
            if key.is_empty()
                || !key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!("bad label name {key:?}"));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("a bad escape in a label value".into()),
                    },
                    (_, c) => value.push(c),
                }
            };
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label {key:?} twice"));
            }
            labels.push((key.to_string(), value));
            rest = &after[end + 1..];
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = fields.next().unwrap_or_default();
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields (exemplars are not served)".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Every target by the name of its folder under `fuzz/corpus/`.
/// A fuzz entry point.
pub type Target = fn(&[u8]);

pub const TARGETS: [(&str, Target); 7] = [
    ("certificate_pem", certificate_pem),
    ("private_key_pem", private_key_pem),
    ("dhparams_pem", dhparams_pem),
    ("subject", text_inputs),
    ("check_inspect", check_inspect),
    ("exposition", exposition),
    ("resp_reply", resp_reply),
];
