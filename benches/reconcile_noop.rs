//! The weekly CronJob's usual case: a `reconcile` with nothing due, against the test cluster
//! (SPK, both namespaces, under the shipped RBAC). Reports the requests one run makes and the
//! median wall time of the whole process (start, kubeconfig, TLS, reads, plan, exit).
//!
//!   cargo bench --bench reconcile_noop            # 20 runs
//!   BENCH_RUNS=50 cargo bench --bench reconcile_noop

use testkit as support;

use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let env = support::TestEnv::spk();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut times = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..runs {
        env.server.clear_requests();
        let t = Instant::now();
        let (code, out, err) = env.reconcile(&[]);
        times.push(t.elapsed());
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.starts_with("plan: nothing"), "{out}");
        let reqs = env.server.requests();
        assert!(reqs.iter().all(|r| !r.is_write()));
        requests.push(reqs.len());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("no-op reconcile ({runs} runs, SPK): {} requests per run (all reads), wall time median {:.1} ms, min {:.1} ms, max {:.1} ms",
        requests[0], ms(times[runs / 2]), ms(times[0]), ms(times[runs - 1]));
    assert!(requests.iter().all(|r| *r == requests[0]));
}
