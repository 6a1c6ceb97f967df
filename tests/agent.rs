//! `run`, the long-running agent, through the real binary against the test cluster.

use testkit as support;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::redis::{free_port, wait_for};
use support::*;

struct Agent {
    child: Child,
    addr: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// As the manifests run it: the read-only `dssm-certs-agent` account, or the writer `dssm-certs`
/// when it is given a maintenance window to reconcile in.
fn start(env: &TestEnv, extra: &[&str]) -> Agent {
    // A window's reconcile restarts the test cluster's pods, which run no Redis.
    start_in(env, extra, bin_without_redis())
}

/// `start`, as `cmd`: the binary, or a wrapper that execs it.
fn start_in(env: &TestEnv, extra: &[&str], cmd: std::process::Command) -> Agent {
    let kubeconfig = if extra.contains(&"--maintenance-window") {
        &env.kubeconfig
    } else {
        &env.agent_kubeconfig
    };
    let (child, addr) = support::agent::spawn_as(cmd, env, kubeconfig, extra);
    let agent = Agent { child, addr };
    wait_for("the agent to listen", Duration::from_secs(10), || {
        get(&agent.addr, "/healthz").filter(|(c, _)| *c == 200)
    });
    agent
}

/// A plain HTTP/1.0 GET: (status, body), or None when nothing listens.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// `name{labels} value` lines of a metric whose labels contain all of `with`.
fn series(metrics: &str, name: &str, with: &[&str]) -> Vec<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

fn not_after(env: &TestEnv, ns: &str, idx: usize) -> i64 {
    let copy = env.copy(ns).unwrap();
    dssm_certs::pki::parse_certificate(&copy[idx], "x")
        .unwrap()
        .not_after
}

#[test]
fn metrics_report_every_copy_and_follow_changes_through_the_watch() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // A long interval: anything that changes /metrics quickly came through the watch.
    let agent = start(&env, &["--interval", "1h"]);
    let metrics = wait_for("/readyz", Duration::from_secs(10), || {
        let (code, _) = get(&agent.addr, "/readyz")?;
        (code == 200).then(|| get(&agent.addr, "/metrics").unwrap().1)
    });
    for ns in ["spk-utilities", "spk-ingress"] {
        for (idx, key) in [(0, "dssm-ca.crt"), (1, "dssm-cert.crt")] {
            let ns_label = format!("namespace=\"{ns}\"");
            let key_label = format!("key=\"{key}\"");
            let v = series(
                &metrics,
                "dssm_certificate_not_after_timestamp_seconds",
                &[&ns_label, &key_label],
            );
            assert_eq!(
                v,
                [not_after(&env, ns, idx) as f64],
                "{ns} {key}:\n{metrics}"
            );
            assert_eq!(
                series(&metrics, "dssm_certificate_ready", &[&ns_label, &key_label]),
                [1.0]
            );
        }
    }
    assert_eq!(series(&metrics, "dssm_secrets_in_sync", &[]), [1.0]);
    for name in [
        "dssm_certificate_not_before_timestamp_seconds",
        "dssm_reconcile_duration_seconds_count",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    // A rotation written by someone else shows up without waiting for the interval.
    let changed = Instant::now();
    let (code, out, err) = env.run(&[
        "rotate",
        "--key-algorithm",
        "ecdsa-p256",
        "--days",
        "100",
        "--no-restart",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let want = not_after(&env, "spk-ingress", 1) as f64;
    wait_for(
        "the new notAfter in /metrics",
        Duration::from_secs(10),
        || {
            let m = get(&agent.addr, "/metrics")?.1;
            (series(
                &m,
                "dssm_certificate_not_after_timestamp_seconds",
                &["namespace=\"spk-ingress\"", "key=\"dssm-cert.crt\""],
            ) == [want])
            .then_some(())
        },
    );
    eprintln!(
        "a Secret change reached /metrics {:?} after the rotate command started",
        changed.elapsed()
    );
}

#[test]
fn readyz_waits_for_the_first_inspection_and_drops_when_the_api_server_goes_away() {
    let mut env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // The first reads are slow: /readyz must say "not ready" meanwhile.
    env.server.add_fault(dssm_testcluster::Fault::delay(
        "GET",
        "/secrets/dssm-certs-secret",
        1,
        Duration::from_secs(2),
    ));
    let agent = start(&env, &["--interval", "1s"]);
    assert_eq!(get(&agent.addr, "/readyz").unwrap().0, 503);
    wait_for("ready", Duration::from_secs(10), || {
        (get(&agent.addr, "/readyz")?.0 == 200).then_some(())
    });
    env.server.stop();
    wait_for(
        "not ready once the API server is gone",
        Duration::from_secs(15),
        || (get(&agent.addr, "/readyz")?.0 == 503).then_some(()),
    );
    assert_eq!(get(&agent.addr, "/healthz").unwrap().0, 200, "still alive");
}

#[test]
fn events_are_not_repeated_while_nothing_changes() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart", "--days", "20"]).0, 0);
    let agent = start(&env, &["--interval", "1s"]);
    let count = || {
        env.server
            .list("events.k8s.io", "events", "spk-utilities")
            .iter()
            .filter(|e| e["reason"] == "CertificateExpiringSoon")
            .count()
    };
    wait_for(
        "a CertificateExpiringSoon event",
        Duration::from_secs(10),
        || (count() > 0).then_some(()),
    );
    // Several more inspections (1 s apart) happen: watch their requests, then count again.
    let before = env.server.requests().len();
    wait_for("three more inspections", Duration::from_secs(20), || {
        (env.server.requests().len() >= before + 18).then_some(())
    });
    assert_eq!(count(), 1, "the event was repeated");
    drop(agent);
}

#[test]
fn inside_the_maintenance_window_a_due_certificate_is_renewed_and_restarted() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    env.server.with_state(|s| s.faults.clear());
    let before = env.copy("spk-utilities").unwrap();
    let agent = start(&env, support::agent::RENEW_IN_THE_WINDOW);
    wait_for("the renewal", Duration::from_secs(30), || {
        (env.copy("spk-utilities").unwrap() != before).then_some(())
    });
    wait_for("the restart to finish", Duration::from_secs(30), || {
        let d = env
            .server
            .get("apps", "deployments", "spk-ingress", "f5-tmm")
            .unwrap();
        (d["metadata"]["annotations"]
            .get("dssm-certs.f5.com/restart-needed")
            .is_none()
            && d["spec"]["replicas"] == 3
            && d["status"]["availableReplicas"] == 3)
            .then_some(())
    });
    let m = wait_for("a rotation counted", Duration::from_secs(10), || {
        let m = get(&agent.addr, "/metrics")?.1;
        (!series(&m, "dssm_rotation_total", &["result=\"success\""]).is_empty()).then_some(m)
    });
    assert!(
        series(&m, "dssm_rotation_total", &["result=\"success\""])[0] >= 1.0,
        "{m}"
    );
}

#[test]
fn outside_the_maintenance_window_or_without_one_nothing_is_written() {
    for window in [Some("0 3 29 2 * 1m"), None] {
        let env = TestEnv::spk();
        assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
        env.server.clear_requests();
        let mut args = vec![
            "--interval",
            "1s",
            "--renew-before",
            "400d",
            "--days",
            "730",
        ];
        if let Some(w) = window {
            args.extend(["--maintenance-window", w]);
        }
        let agent = start(&env, &args);
        wait_for("a few inspections", Duration::from_secs(20), || {
            (env.server.requests().len() >= 20).then_some(())
        });
        let writes: Vec<_> = env
            .writes()
            .into_iter()
            .filter(|w| !w.path.contains("/events"))
            .collect();
        assert!(writes.is_empty(), "{window:?}: {writes:?}");
        drop(agent);
    }
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = bin()
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["run", "--listen", &addr, "--interval", "1h"])
        .args([
            "--dssm-namespace",
            &env.dssm_ns,
            "--tmm-namespace",
            &env.tmm_ns,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("ready", Duration::from_secs(10), || {
        (get(&addr, "/readyz")?.0 == 200).then_some(())
    });
    // A scale-to-zero restart left in flight: TMM at 0 with its count recorded. Only the
    // agent's SIGTERM path restores it (nothing else runs for an hour).
    let mut d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    d["spec"]["replicas"] = serde_json::json!(0);
    d["metadata"]["annotations"]["dssm-certs.f5.com/tmm-replicas"] = serde_json::json!("3");
    env.server.put("apps", "deployments", "spk-ingress", d);
    let sent = Instant::now();
    unsafe { kill(child.id() as i32, 15) };
    let status = wait_for("the agent to exit", Duration::from_secs(10), || {
        child.try_wait().ok().flatten()
    });
    // A process without a handler dies of the signal (no exit code); ours exits 0, promptly,
    // after doing its shutdown work.
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("restored TMM to 3 replicas before exiting (an orphaned restart)"),
        "{err}"
    );
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 3);
    assert!(d["metadata"]["annotations"]
        .get("dssm-certs.f5.com/tmm-replicas")
        .is_none());
    assert!(get(&addr, "/healthz").is_none(), "no longer serving");
}

/// The agent under a pod-like file descriptor limit: without a connection limit, 200 idle
/// connections use up every descriptor and the liveness probe cannot even be accepted.
fn with_fd_limit(n: u32) -> std::process::Command {
    let mut c = std::process::Command::new("prlimit");
    c.arg(format!("--nofile={n}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_dssm-certs"))
        .env_remove("DSSM_CERTS_LOG");
    c
}

/// GET `path` on a fresh connection; the time until the whole response arrived.
fn timed_get(addr: &str, path: &str) -> (Option<(u16, String)>, Duration) {
    let t = Instant::now();
    let r = get(addr, path);
    (r, t.elapsed())
}

/// Whether the server has closed `s` (EOF or reset), without waiting for data.
fn closed_by_server(s: &std::net::TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let closed = match (&mut &*s).read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn idle_connections_and_a_slow_header_client_do_not_starve_healthz() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let agent = start_in(&env, &["--interval", "1h"], with_fd_limit(128));
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(&agent.addr).unwrap())
        .collect();
    // Opened after them, so that it is not the oldest: the header timeout must end it.
    // A slow-header client: one byte every 200 ms, never finishing its headers.
    let mut slow = std::net::TcpStream::connect(&agent.addr).unwrap();
    let slow_started = Instant::now();
    let slow_writer = {
        let mut s = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
            for _ in 0..100 {
                if s.write_all(b"X").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // The requirement: the liveness probe still answers within 1 s (kubelet's default
    // timeoutSeconds). Measured as an upper bound over several probes.
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (r, took) = timed_get(&agent.addr, "/healthz");
        assert_eq!(r.map(|(c, _)| c), Some(200), "/healthz after {took:?}");
        assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
        worst = worst.max(took);
    }
    eprintln!("/healthz with 200 idle connections and a slow client: slowest of 5 {worst:?}");
    let still_open = idle.iter().filter(|s| !closed_by_server(s)).count();
    assert!(
        still_open <= dssm_certs::agent::MAX_CONNECTIONS,
        "{still_open} idle connections kept open"
    );
    // The slow client is cut off by the header read timeout, not served forever.
    slow.set_read_timeout(Some(dssm_certs::agent::HEADER_READ_TIMEOUT * 3))
        .unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let lasted = slow_started.elapsed();
    assert!(
        lasted < dssm_certs::agent::HEADER_READ_TIMEOUT * 2,
        "the slow-header connection lasted {lasted:?}"
    );
    assert!(
        lasted >= dssm_certs::agent::HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {lasted:?}: not by the header timeout"
    );
    drop(slow_writer);
}

#[test]
fn oversized_headers_and_request_bodies_are_refused() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let agent = start(&env, &["--interval", "1h"]);
    let exchange = |request: &[u8]| -> String {
        let mut s = std::net::TcpStream::connect(&agent.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(request);
        let mut text = Vec::new();
        let _ = s.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    };
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = exchange(big_header.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let post = "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";
    assert!(exchange(post.as_bytes()).starts_with("HTTP/1.1 405"));
    let body = "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";
    assert!(exchange(body.as_bytes()).starts_with("HTTP/1.1 413"));
    assert_eq!(
        get(&agent.addr, "/healthz").unwrap().0,
        200,
        "still serving"
    );
}

/// A CN made to close the label, end the line and add a forged `not_after` series.
const HOSTILE_CN: &str = "evil\\\"} 1\ndssm_certificate_not_after_timestamp_seconds{namespace=\"spk-ingress\",secret=\"dssm-certs-secret\",key=\"dssm-cert.crt\",subject=\"forged\"} 1\n# EOF\n";

#[test]
fn a_hostile_certificate_subject_cannot_forge_metrics_series() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // A self-signed CA whose subject is the attack, deployed as the TMM copy's dssm-ca.crt.
    let hostile = self_signed_ca_pem(HOSTILE_CN);
    let [_, leaf, _, dh] = env.copy("spk-ingress").unwrap();
    env.put_secret(
        "spk-ingress",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", hostile.as_bytes()),
            ("dssm-cert.crt", &leaf),
            ("dhparam2048.pem", &dh),
        ],
    );
    let agent = start(&env, &["--interval", "1h"]);
    let text = wait_for("/readyz", Duration::from_secs(10), || {
        let (code, _) = get(&agent.addr, "/readyz")?;
        (code == 200).then(|| get(&agent.addr, "/metrics").unwrap().1)
    });
    let samples = dssm_certs::fuzz::parse_exposition(&text)
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    let not_after: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "dssm_certificate_not_after_timestamp_seconds")
        .collect();
    assert_eq!(not_after.len(), 4, "2 namespaces x 2 certificates:\n{text}");
    let label = |s: &dssm_certs::fuzz::Sample, k: &str| {
        s.labels
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(
        not_after.iter().all(|s| label(s, "subject") != "forged"),
        "a forged series:\n{text}"
    );
    let theirs = not_after
        .iter()
        .find(|s| label(s, "namespace") == "spk-ingress" && label(s, "key") == "dssm-ca.crt")
        .expect("the hostile certificate's series");
    let cert = dssm_certs::pki::parse_certificate(hostile.as_bytes(), "x").unwrap();
    assert!(cert.subject.contains(HOSTILE_CN), "{}", cert.subject);
    assert_eq!(
        label(theirs, "subject"),
        cert.subject,
        "read back unchanged"
    );
    assert_eq!(theirs.value as i64, cert.not_after);
}

#[test]
fn secrets_in_sync_is_absent_until_the_first_successful_read() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // Every read of the Secrets fails for a while: the agent cannot tell whether they are in sync.
    env.server.add_fault(support::apiserver::Fault::delay(
        "GET",
        "/secrets/dssm-certs-secret",
        1,
        Duration::from_secs(3),
    ));
    let agent = start(&env, &["--interval", "1s"]);
    let before = get(&agent.addr, "/metrics").unwrap().1;
    assert_eq!(get(&agent.addr, "/readyz").unwrap().0, 503, "{before}");
    let samples = dssm_certs::fuzz::parse_exposition(&before).unwrap();
    assert!(
        !samples.iter().any(|s| s.name == "dssm_secrets_in_sync"),
        "reported before anything was read:\n{before}"
    );
    let after = wait_for("ready", Duration::from_secs(15), || {
        (get(&agent.addr, "/readyz")?.0 == 200).then(|| get(&agent.addr, "/metrics").unwrap().1)
    });
    assert_eq!(
        series(&after, "dssm_secrets_in_sync", &[]),
        [1.0],
        "{after}"
    );
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// The restart-safety issue: the agent ignored SIGTERM while a reconcile in its maintenance
/// window was restarting TMM, so a node drain killed it after the grace period with TMM at 0. It
/// stops the restart and restores TMM before it exits.
#[test]
fn sigterm_during_a_restart_in_the_window_restores_tmm_promptly() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // TMM pods that take long to go: the restart sits at zero replicas.
    env.server
        .with_state(|s| s.stuck_terminating.push("f5-tmm".into()));
    let mut agent = start(&env, support::agent::RENEW_IN_THE_WINDOW);
    wait_for("TMM at zero", Duration::from_secs(30), || {
        let d = env
            .server
            .get("apps", "deployments", "spk-ingress", "f5-tmm")?;
        (d["spec"]["replicas"] == 0).then_some(())
    });
    let sent = Instant::now();
    unsafe { kill(agent.child.id() as i32, 15) };
    let status = wait_for("the agent to exit", Duration::from_secs(20), || {
        agent.child.try_wait().ok().flatten()
    });
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 3, "{d}");
    assert!(d["metadata"]["annotations"]
        .get("dssm-certs.f5.com/tmm-replicas")
        .is_none());
}

#[test]
fn the_agent_never_reads_the_key_secret_and_a_copy_whose_recorded_key_differs_is_not_ready() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let agent = start(&env, &["--interval", "1s"]);
    let ready = |ns: &str| {
        let m = get(&agent.addr, "/metrics")?.1;
        let ns = format!("namespace=\"{ns}\"");
        let v = series(
            &m,
            "dssm_certificate_ready",
            &[&ns, "key=\"dssm-cert.crt\""],
        );
        v.first().copied()
    };
    wait_for("both copies ready", Duration::from_secs(10), || {
        (ready("spk-utilities") == Some(1.0) && ready("spk-ingress") == Some(1.0)).then_some(())
    });

    // The TMM copy's certificate Secret now records another key: its key does not match.
    let mut certs = env.secret("spk-ingress", "dssm-certs-secret").unwrap();
    let ann = dssm_certs::materials::annotations::KEY_SPKI_SHA256;
    assert_eq!(
        certs["metadata"]["annotations"][ann].as_str().map(str::len),
        Some(64),
        "the writer records the key's SPKI: {certs}"
    );
    certs["metadata"]["annotations"][ann] = "AB".repeat(32).into();
    env.server.put("", "secrets", "spk-ingress", certs);
    wait_for("the TMM copy not ready", Duration::from_secs(10), || {
        (ready("spk-ingress") == Some(0.0)).then_some(())
    });
    assert_eq!(ready("spk-utilities"), Some(1.0));
    wait_for("an InvalidMaterials event", Duration::from_secs(10), || {
        env.server
            .list("events.k8s.io", "events", "spk-ingress")
            .iter()
            .find(|e| e["reason"] == "InvalidMaterials")
            .map(|e| e["note"].as_str().unwrap_or_default().to_string())
            .filter(|n| n.contains("does not match"))
    });

    let agent_user = format!("system:serviceaccount:{}:dssm-certs-agent", env.dssm_ns);
    let key_reads: Vec<_> = env
        .server
        .requests()
        .into_iter()
        .filter(|r| r.user == agent_user && r.path.contains("dssm-keys-secret"))
        .collect();
    assert!(
        key_reads.is_empty(),
        "the agent read the key: {key_reads:?}"
    );
    let watched_keys = env
        .server
        .requests()
        .into_iter()
        .any(|r| r.user == agent_user && r.query.contains("dssm-keys-secret"));
    assert!(!watched_keys, "the agent watched the key Secret");
    drop(agent);
}
