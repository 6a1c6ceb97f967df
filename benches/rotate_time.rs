//! How long a full `rotate` takes against the test cluster, and how soon after the last pod
//! becomes Ready it returns (the slack: waits watch, so it should be small). Pod delays are set
//! like a slow cluster: 1 s to terminate, 2 s to become Ready.
//!
//!   cargo bench --bench rotate_time             # 5 runs

use testkit as support;

use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let env = support::TestEnv::spk();
    env.server.with_state(|s| {
        s.timing.pod_grace = Duration::from_secs(1);
        s.timing.pod_start = Duration::from_secs(2);
    });
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut totals = Vec::new();
    let mut slacks = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let (code, out, err) = env.run(&[
            "rotate",
            "--key-algorithm",
            "ecdsa-p256",
            "--probe-endpoint",
            "127.0.0.1:1",
        ]);
        let end = Instant::now();
        // The probe endpoint refuses connections: rotate reports it; the timing is what counts.
        assert!(out.contains("3 available replicas"), "{code} {out}{err}");
        let last_ready = env.server.with_state(|s| {
            s.list(support::apiserver::resource("", "pods"), None)
                .iter()
                .filter_map(|p| {
                    s.ready_at
                        .get(p["metadata"]["uid"].as_str().unwrap())
                        .copied()
                })
                .max()
                .unwrap()
        });
        totals.push(end - start);
        slacks.push(end - last_ready);
    }
    totals.sort();
    slacks.sort();
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "rotate with restart ({runs} runs, pods: 1 s to terminate, 2 s to be Ready): total median {:.2} s (min {:.2}, max {:.2}); slack after the last pod became Ready: median {:.3} s (max {:.3})",
        s(totals[runs / 2]), s(totals[0]), s(totals[runs - 1]), s(slacks[runs / 2]), s(slacks[runs - 1])
    );
}
