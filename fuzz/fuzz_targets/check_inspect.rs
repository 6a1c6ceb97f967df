#![no_main]
// The whole report over arbitrary file contents: splits the input into the five files.
use dssm_certs::check::{inspect, Found, Source, Thresholds};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xff);
    let names = ["dssm-ca.crt", "dssm-cert.crt", "dssm-key.key", "dssm-ca.key", "dhparam2048.pem"];
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
    let report = inspect(&Source { label: "fuzz".into(), entries }, 1_700_000_000, Thresholds::default());
    let _ = serde_json::to_string(&report);
});
