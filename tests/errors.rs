//! Each command that changes the cluster says, when it fails, what happened for that command:
//! `restart` writes no Secret, so it never says it did; `reconcile` and `rotate` say whether the
//! Secrets were written. Through the real binary against the test cluster.

use testkit as support;

use std::time::Duration;

use serde_json::json;
use support::*;

fn make_not_ready(env: &TestEnv, ns: &str, pod: &str) {
    env.server
        .with_state(|s| s.never_ready.push(pod.to_string()));
    let mut p = env.server.get("", "pods", ns, pod).unwrap();
    p["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    env.server.put("", "pods", ns, p);
}

/// Published once, nothing pending: what every test starts from.
fn published() -> TestEnv {
    let env = TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    env
}

/// Regression: `restart` mapped its pre-flight refusal to the rotation's message ("pre-flight
/// refused the rotation, nothing was written"), though it rotates and writes nothing.
#[test]
fn restart_refused_by_the_preflight_says_it_touched_nothing_and_wrote_nothing() {
    let env = published();
    make_not_ready(&env, "spk-utilities", "f5-dssm-db-1");
    env.server.clear_requests();
    let (code, out, err) = env.run(&["restart", "--wait-timeout", "2s"]);
    assert_eq!(code, 6, "{out}{err}");
    assert!(
        err.contains("pre-flight refused the restart, nothing was touched")
            && err.contains("pod spk-utilities/f5-dssm-db-1 not Ready"),
        "{err}"
    );
    assert!(
        !err.contains("rotation") && !err.contains("written"),
        "{err}"
    );
    env.assert_wrote_only_lease_and_events();
}

/// Regression: a failed `restart` said "new materials are written, but the restart failed …
/// TMM was restored", though `restart` writes no Secret.
#[test]
fn a_failed_restart_says_no_secret_changed() {
    let env = published();
    let before = env.copy("spk-utilities").unwrap();
    // New pods take longer to start than the restart may wait.
    env.server.with_state(|s| {
        s.timing.pod_start = Duration::from_secs(30);
    });
    let (code, out, err) = env.run(&[
        "restart",
        "--strategy",
        "scale-to-zero",
        "--wait-timeout",
        "2s",
    ]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("the restart failed: timed out after 2s")
            && err.contains("No Secret was changed"),
        "{err}"
    );
    assert!(!err.contains("materials are written"), "{err}");
    assert_eq!(env.copy("spk-utilities").unwrap(), before);
}

/// `reconcile` with a TMM target gone: refused before any write, and it says so.
#[test]
fn reconcile_with_a_missing_workload_says_nothing_was_written() {
    let env = TestEnv::spk();
    env.server
        .delete("apps", "deployments", "spk-ingress", "f5-tmm")
        .expect("the fixture has a TMM Deployment");
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("deployment spk-ingress/f5-tmm not found")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert!(!err.contains("materials are written"), "{err}");
    env.assert_wrote_only_lease_and_events();
    assert!(env.secret("spk-utilities", "dssm-certs-secret").is_none());
}

/// `rotate` whose restart fails after the writes: it says the Secrets are written (they are)
/// and that the pods did not all come onto them, and TMM has its replicas back.
#[test]
fn rotate_whose_restart_fails_says_the_secrets_are_written() {
    let env = published();
    let before = env.copy("spk-utilities").unwrap();
    env.server.with_state(|s| {
        s.timing.pod_start = Duration::from_secs(30);
    });
    let (code, out, err) = env.run(&[
        "rotate",
        "--key-algorithm",
        "ecdsa-p256",
        "--strategy",
        "scale-to-zero",
        "--wait-timeout",
        "2s",
    ]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("the new Secrets are written, but bringing the pods onto them failed")
            && err.contains("timed out after 2s"),
        "{err}"
    );
    assert_ne!(
        env.copy("spk-utilities").unwrap(),
        before,
        "written, as it says"
    );
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert_ne!(d["spec"]["replicas"], 0, "TMM given back its replicas: {d}");
}
