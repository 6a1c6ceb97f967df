//! Compares `dssm-certs generate` with the seeds' openssl commands on this machine, in one run.
//!
//!   cargo bench --bench vs_openssl                 # keys + certs (5 runs), DH params (5 runs)
//!   BENCH_RUNS=9 BENCH_DH_RUNS=0 cargo bench --bench vs_openssl
//!
//! Prints the median wall time of each side and their ratio. DH parameter search is a random
//! walk, so its spread is wide: read the medians over several runs, not one.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_it(runs: usize, mut f: impl FnMut(&Path)) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let t = Instant::now();
            f(dir.path());
            t.elapsed()
        })
        .collect()
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
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

const SEED_KEYS_AND_CERTS: &str = "
openssl genrsa -out dssm-ca.key 4096 2>/dev/null
openssl req -x509 -new -nodes -sha384 -key dssm-ca.key -days 365 \
    -subj '/O=Redis Test/CN=Certificate Authority' -out dssm-ca.crt
openssl genrsa -out dssm-key.key 4096 2>/dev/null
openssl req -new -sha384 -key dssm-key.key -subj '/O=Redis Test/CN=Server' | \
    openssl x509 -req -sha384 -CA dssm-ca.crt -CAkey dssm-ca.key -CAserial dssm-ca.txt \
        -CAcreateserial -days 365 -out dssm-cert.crt 2>/dev/null
";

fn report(what: &str, ours: Vec<Duration>, theirs: Vec<Duration>) {
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    println!(
        "{what}: dssm-certs median {:.2}s (runs {:?}), openssl CLI median {:.2}s (runs {:?}), ratio ours/openssl {:.2}",
        o.as_secs_f64(),
        ours.iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        t.as_secs_f64(),
        theirs.iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        o.as_secs_f64() / t.as_secs_f64()
    );
}

fn main() {
    // `cargo test --all-targets` runs benches as tests: do nothing then.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (runs, dh_runs) = (env("BENCH_RUNS", 5), env("BENCH_DH_RUNS", 5));
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if runs > 0 {
        let ours_t = time_it(runs, |d| ours(d, "ffdhe2048"));
        let theirs_t = time_it(runs, |d| sh(d, SEED_KEYS_AND_CERTS));
        report("CA + leaf (2x RSA 4096, SHA-384)", ours_t, theirs_t);
    }
    if dh_runs > 0 {
        // Ours includes the two RSA keys made while the DH search runs.
        let ours_t = time_it(dh_runs, |d| ours(d, "generate"));
        let theirs_t = time_it(dh_runs, |d| {
            sh(d, "openssl dhparam -out dhparam2048.pem 2048 2>/dev/null")
        });
        report(
            "full generate vs openssl dhparam 2048 alone",
            ours_t,
            theirs_t,
        );
    }
}
