//! Compares `dssm-certs generate` with the seeds' openssl commands on this machine, in one run,
//! as paired runs (ours, then theirs, alternately, so drift hits both sides alike).
//!
//!   cargo bench --bench vs_openssl                       # 10 pairs of each comparison
//!   BENCH_PAIRS=20 cargo bench --bench vs_openssl
//!   BENCH_DH_PAIRS=0 cargo bench --bench vs_openssl      # skip the slow full-sequence pairs
//!
//! Prints the median wall time of each side and the ratio of the medians. DH parameter search
//! is a random walk: read the medians over many pairs, never one run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(f: impl FnOnce(&Path)) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    f(dir.path());
    t.elapsed()
}

fn sh(dir: &Path, script: &str) {
    let ok = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "{script}");
}

fn ours(dir: &Path, dhparam: &str) {
    let ok = Command::new(env!("CARGO_BIN_EXE_dssm-certs"))
        .args([
            "generate",
            "--out",
            dir.join("o").to_str().unwrap(),
            "--dhparam",
            dhparam,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Steps 3 and 4 of the seeds, verbatim.
const SEED_KEYS_AND_CERTS: &str = "
openssl genrsa -out dssm-ca.key 4096 2>/dev/null
openssl req -x509 -new -nodes -sha384 -key dssm-ca.key -days 365 \
    -subj '/O=Redis Test/CN=Certificate Authority' -out dssm-ca.crt
openssl genrsa -out dssm-key.key 4096 2>/dev/null
openssl req -new -sha384 -key dssm-key.key -subj '/O=Redis Test/CN=Server' | \
    openssl x509 -req -sha384 -CA dssm-ca.crt -CAkey dssm-ca.key -CAserial dssm-ca.txt \
        -CAcreateserial -days 365 -out dssm-cert.crt 2>/dev/null
";

fn compare(what: &str, pairs: usize, mut ours_f: impl FnMut(&Path), theirs_script: &str) {
    let (mut o, mut t) = (Vec::new(), Vec::new());
    for _ in 0..pairs {
        o.push(timed(&mut ours_f));
        t.push(timed(|d| sh(d, theirs_script)));
    }
    let fmt = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (mo, mt) = (median(o.clone()), median(t.clone()));
    println!("{what} ({pairs} pairs)");
    println!(
        "  dssm-certs   median {:>6.2}s   runs: {}",
        mo.as_secs_f64(),
        fmt(&o)
    );
    println!(
        "  openssl CLI  median {:>6.2}s   runs: {}",
        mt.as_secs_f64(),
        fmt(&t)
    );
    println!(
        "  ratio of medians (ours / openssl): {:.2}",
        mo.as_secs_f64() / mt.as_secs_f64()
    );
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode: do nothing then.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (pairs, dh_pairs) = (env("BENCH_PAIRS", 10), env("BENCH_DH_PAIRS", 10));
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if pairs > 0 {
        let theirs = format!("{SEED_KEYS_AND_CERTS}\nopenssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048 -out dhparam2048.pem");
        compare(
            "generate --dhparam ffdhe2048 vs the seed sequence with ffdhe2048 params",
            pairs,
            |d| ours(d, "ffdhe2048"),
            &theirs,
        );
    }
    if dh_pairs > 0 {
        let theirs =
            format!("{SEED_KEYS_AND_CERTS}\nopenssl dhparam -out dhparam2048.pem 2048 2>/dev/null");
        compare(
            "generate (defaults, fresh DH params) vs the seed sequence (genrsa x2 + dhparam 2048)",
            dh_pairs,
            |d| ours(d, "generate"),
            &theirs,
        );
    }
}
