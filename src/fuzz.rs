//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test, so that
//! CI on stable replays exactly what the fuzzers run.
#![doc(hidden)]

use crate::check::{inspect, Found, Source, Thresholds};

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

pub fn text_inputs(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::pki::Subject::parse(s);
        let _ = crate::cli::parse_duration(s);
        let _ = crate::manifest::validate_namespace(s);
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
            (n, n.to_string(), found)
        })
        .collect();
    let source = Source {
        label: "fuzz".into(),
        entries,
    };
    let report = inspect(&source, 1_700_000_000, Thresholds::default());
    let _ = serde_json::to_string(&report);
}

/// Every target by the name of its folder under `fuzz/corpus/`.
/// A fuzz entry point.
pub type Target = fn(&[u8]);

pub const TARGETS: [(&str, Target); 5] = [
    ("certificate_pem", certificate_pem),
    ("private_key_pem", private_key_pem),
    ("dhparams_pem", dhparams_pem),
    ("subject", text_inputs),
    ("check_inspect", check_inspect),
];
