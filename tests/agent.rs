//! `run`, the long-running agent, through the real binary against the test cluster.

mod support;

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
    let kubeconfig = if extra.contains(&"--maintenance-window") {
        &env.kubeconfig
    } else {
        &env.agent_kubeconfig
    };
    let (child, addr) = support::agent::spawn(env, kubeconfig, extra);
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
    // Always open: every minute, for an hour. --renew-before makes the 365-day leaf due now,
    // and not its 730-day successor (else every renewal would trigger the next one).
    let agent = start(
        &env,
        &[
            "--interval",
            "1h",
            "--maintenance-window",
            "* * * * * 1h",
            "--renew-before",
            "400d",
            "--days",
            "730",
            "--key-algorithm",
            "ecdsa-p256",
        ],
    );
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
        let mut args = vec!["--interval", "1s", "--renew-before", "400d"];
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

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
