//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test, so that
//! CI on stable replays exactly what the fuzzers run.
#![doc(hidden)]

use crate::inspect::{inspect, Thresholds};
use crate::materials::{Entry, Found, Place, ReadCopy};
pub use crate::metrics::{parse_exposition, Sample};

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
    let source = ReadCopy {
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
