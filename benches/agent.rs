//! The agent's footprint against the test cluster (SPK): time from start to ready, steady-state
//! resident memory, CPU while idle, and `/metrics` response time.
//!
//!   cargo bench --bench agent

use testkit as support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn get(addr: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f[11] + f[12]
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let env = support::TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    let addr = format!("127.0.0.1:{}", support::redis::free_port());
    let started = Instant::now();
    let mut child = support::bin()
        .env("KUBECONFIG", &env.kubeconfig)
        .args([
            "run",
            "--listen",
            &addr,
            "--interval",
            "1h",
            "--dssm-namespace",
            "spk-utilities",
            "--tmm-namespace",
            "spk-ingress",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    while get(&addr, "/readyz") != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(20), "never ready");
        std::thread::sleep(Duration::from_millis(2));
    }
    let to_ready = started.elapsed();
    // Idle: nothing changes, the interval is an hour.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = cpu_ticks(pid);
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle);
    let idle_cpu = (cpu_ticks(pid) - t0) as f64 / 100.0 / idle.as_secs_f64() * 100.0;
    let rss_kib = proc_field(pid, "status", "VmRSS:").unwrap();
    let mut lat: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(get(&addr, "/metrics"), Some(200));
            t.elapsed()
        })
        .collect();
    lat.sort();
    let rss_after = proc_field(pid, "status", "VmRSS:").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "agent (release, SPK, 5 watched Secrets): start to ready {:.0} ms; steady-state RSS {:.1} MiB ({:.1} MiB after 200 scrapes); idle CPU {:.2}% of a core over {}s; /metrics median {:.2} ms, p95 {:.2} ms",
        to_ready.as_secs_f64() * 1000.0,
        rss_kib as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        idle_cpu,
        idle.as_secs(),
        lat[100].as_secs_f64() * 1000.0,
        lat[190].as_secs_f64() * 1000.0
    );
}
