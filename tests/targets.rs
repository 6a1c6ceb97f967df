//! Every TMM that talks to dSSM (issue 14): two SPK ingress namespaces with one `f5-tmm`
//! Deployment each, plus a BIG-IP Next style TMM DaemonSet in a third namespace, all sharing
//! one dSSM. The real binary runs against the test cluster.

use testkit as support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::apiserver::{self, resource, ApiServer};
use support::rbac::{assert_rbac_is_exactly_used, exercise_every_command};
use support::{bin, bin_without_redis, output, tempdir, TestEnv};

const DSSM: &str = "spk-utilities";
const INGRESS_A: &str = "spk-ingress-a";
const INGRESS_B: &str = "spk-ingress-b";
const BNK: &str = "bnk-tmm";
/// The three targets as `--tmm` takes them (the second without a kind: a Deployment).
const TARGETS: [&str; 3] = [
    "spk-ingress-a/deployment/f5-tmm",
    "spk-ingress-b/f5-tmm",
    "bnk-tmm/daemonset/tmm",
];
const NODES: usize = 3;

struct Multi {
    server: ApiServer,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

/// dSSM (3 DBs + 3 sentinels) in spk-utilities, f5-tmm (2 replicas) in each ingress
/// namespace, DaemonSet `tmm` (one pod on each of the 3 nodes) in bnk-tmm, every pod Ready.
fn multi() -> Multi {
    let sa = format!("system:serviceaccount:{DSSM}:dssm-certs");
    let server = ApiServer::start(&[DSSM, INGRESS_A, INGRESS_B, BNK], &sa);
    server.install_dssm(DSSM, INGRESS_A, 2);
    server.put("apps", "deployments", INGRESS_B, json!({
        "metadata": {"name": "f5-tmm", "labels": {"app": "f5-tmm"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "f5-tmm"}},
                 "template": {"metadata": {"labels": {"app": "f5-tmm"}}, "spec": {"containers": [{"name": "f5-tmm", "image": "tmm"}]}}},
    }));
    server.install_tmm_daemonset(BNK, "tmm");
    server.wait_until("every pod Ready", Duration::from_secs(30), |s| {
        let pods = s.list(resource("", "pods"), None);
        pods.len() == 6 + 2 + 2 + NODES && pods.iter().all(|p| ready(p))
    });
    let dir = tempdir();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig(apiserver::SA_TOKEN, DSSM)).unwrap();
    Multi {
        server,
        dir,
        kubeconfig,
    }
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    }) && p["metadata"]["deletionTimestamp"].is_null()
}

impl Multi {
    fn cmd(&self, args: &[&str], targets: &[&str]) -> std::process::Command {
        let mut cmd = bin_without_redis();
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env("POD_NAME", "targets-test")
            .args(args)
            .args(["--dssm-namespace", DSSM]);
        for t in targets {
            cmd.args(["--tmm", t]);
        }
        cmd
    }

    fn run_with(&self, args: &[&str], targets: &[&str]) -> (i32, String, String) {
        output(&mut self.cmd(args, targets))
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_with(args, &TARGETS)
    }

    fn fast<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut v = args.to_vec();
        v.extend(["--key-algorithm", "ecdsa-p256", "--dhparam", "ffdhe2048"]);
        v
    }

    fn secret(&self, ns: &str, name: &str) -> Option<Value> {
        self.server.get("", "secrets", ns, name)
    }

    /// The data of both Secrets of a namespace's copy.
    fn copy(&self, ns: &str) -> Option<(Value, Value)> {
        Some((
            self.secret(ns, "dssm-certs-secret")?["data"].clone(),
            self.secret(ns, "dssm-keys-secret")?["data"].clone(),
        ))
    }

    fn assert_identical_copies(&self, namespaces: &[&str]) {
        let dssm = self.copy(DSSM).expect("the dSSM copy");
        for ns in namespaces {
            let copy = self.copy(ns).unwrap_or_else(|| panic!("no copy in {ns}"));
            assert!(copy == dssm, "the copy in {ns} differs from the dSSM one");
        }
    }

    fn workload(&self, plural: &str, ns: &str, name: &str) -> Value {
        self.server.get("apps", plural, ns, name).unwrap()
    }

    /// (namespace, pod name, uid) of every TMM pod of the three targets.
    fn tmm_pods(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (ns, app) in [(INGRESS_A, "f5-tmm"), (INGRESS_B, "f5-tmm"), (BNK, "tmm")] {
            for p in self.server.list("", "pods", ns) {
                if p["metadata"]["labels"]["app"] == app
                    && p["metadata"]["deletionTimestamp"].is_null()
                {
                    out.push((
                        ns.to_string(),
                        p["metadata"]["uid"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        out
    }

    /// Every target back at its count, rolled out, with none of our marks or records left, and
    /// the DaemonSet without the stop nodeSelector (its own nodeSelector kept).
    fn assert_restored(&self, what: &str) {
        self.server
            .wait_until("every TMM pod back", Duration::from_secs(30), |s| {
                [(INGRESS_A, "f5-tmm"), (INGRESS_B, "f5-tmm"), (BNK, "tmm")]
                    .iter()
                    .all(|(ns, app)| {
                        s.list(resource("", "pods"), Some(ns))
                            .iter()
                            .filter(|p| p["metadata"]["labels"]["app"] == *app && ready(p))
                            .count()
                            == if *ns == BNK { NODES } else { 2 }
                    })
            });
        for (plural, ns, name) in [
            ("deployments", INGRESS_A, "f5-tmm"),
            ("deployments", INGRESS_B, "f5-tmm"),
            ("daemonsets", BNK, "tmm"),
        ] {
            let w = self.workload(plural, ns, name);
            let ours = support::our_annotations(&w);
            assert!(ours.is_empty(), "{what}: {ns}/{name} keeps {ours:?}");
            if plural == "deployments" {
                assert_eq!(w["spec"]["replicas"], 2, "{what}: {ns}/{name}");
            } else {
                assert_eq!(
                    w["spec"]["template"]["spec"]["nodeSelector"],
                    json!({"kubernetes.io/os": "linux"}),
                    "{what}: the DaemonSet's own nodeSelector is kept, ours is gone"
                );
                assert_eq!(w["status"]["desiredNumberScheduled"], NODES, "{what}");
            }
        }
    }

    fn writes(&self) -> Vec<String> {
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.is_write() && !r.path.contains("/events"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

/// No pod of `before` is still running.
fn all_replaced(before: &[(String, String)], after: &[(String, String)]) -> bool {
    before.iter().all(|p| !after.contains(p))
}

#[test]
fn reconcile_publishes_identical_copies_into_every_tmm_namespace_and_restarts_every_target() {
    let env = multi();
    let before = env.tmm_pods();
    // A first publication with restarts restarts nothing (its pods wait for the Secrets, or run
    // without them: tests/reconcile.rs); published with --no-restart, every target is marked,
    // and the next reconcile restarts them.
    let (code, out, err) = env.run(&Multi::fast(&["reconcile", "--no-restart"]));
    assert_eq!(code, 0, "{out}{err}");
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    for t in [
        "deployment spk-ingress-a/f5-tmm",
        "deployment spk-ingress-b/f5-tmm",
        "daemonset bnk-tmm/tmm",
    ] {
        assert!(out.contains(&format!("marked {t}")), "{t}: {out}");
    }
    let (code, out, err) = env.run(&Multi::fast(&["reconcile"]));
    assert_eq!(code, 0, "{out}{err}");
    env.assert_restored("after the first publish");
    assert!(
        all_replaced(&before, &env.tmm_pods()),
        "every TMM pod restarted: {out}"
    );

    // `check` reports one copy per namespace, all in sync.
    let (code, out, err) = env.run(&["check", "-o", "json"]);
    assert!(code <= 1, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let sources: Vec<&str> = r["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["source"].as_str().unwrap())
        .collect();
    for ns in [DSSM, INGRESS_A, INGRESS_B, BNK] {
        assert!(
            sources.contains(&format!("namespace/{ns}").as_str()),
            "{sources:?}"
        );
    }
    assert_eq!(r["in_sync"], true, "{r:#}");
    let targets: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "tmm-target" && c["status"] == "ok")
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    for t in [
        "deployment spk-ingress-a/f5-tmm: rolled out",
        "deployment spk-ingress-b/f5-tmm: rolled out",
        "daemonset bnk-tmm/tmm: rolled out",
    ] {
        assert!(targets.iter().any(|m| m.starts_with(t)), "{t}: {r:#}");
    }
}

/// Drift in one TMM namespace is repaired from the stored materials, and only that namespace's
/// target is marked for a restart.
#[test]
fn drift_in_one_tmm_namespace_is_repaired_and_only_its_target_is_marked() {
    let env = multi();
    assert_eq!(env.run(&Multi::fast(&["reconcile", "--no-restart"])).0, 0);
    let mut s = env.secret(INGRESS_B, "dssm-certs-secret").unwrap();
    s["data"]["dssm-cert.crt"] = json!("AAAA");
    env.server.put("", "secrets", INGRESS_B, s);
    // Clear the marks of the first publish, as a finished restart would.
    for (plural, ns, name) in [
        ("deployments", INGRESS_A, "f5-tmm"),
        ("deployments", INGRESS_B, "f5-tmm"),
        ("daemonsets", BNK, "tmm"),
    ] {
        let mut w = env.workload(plural, ns, name);
        w["metadata"]["annotations"] = json!({});
        env.server.put("apps", plural, ns, w);
    }
    let (code, out, err) = env.run(&["reconcile", "--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: repair"), "{out}");
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    let marked = |plural: &str, ns: &str, name: &str| {
        !env.workload(plural, ns, name)["metadata"]["annotations"]
            ["dssm-certs.f5.com/restart-needed"]
            .is_null()
    };
    assert!(marked("deployments", INGRESS_B, "f5-tmm"), "{out}");
    assert!(!marked("deployments", INGRESS_A, "f5-tmm"), "{out}");
    assert!(!marked("daemonsets", BNK, "tmm"), "{out}");
}

/// The seeds' strategy with three targets. The rolling one needs dSSM pods running Redis: it is
/// tested on the Redis bed, under load (tests/rotation_cluster.rs:
/// `rotate_with_three_tmm_targets_rolls_every_target_and_nobody_notices`, its `rotate --ca`
/// twin, and the kill -9 after the first target).
#[test]
fn a_scale_to_zero_ca_rotation_restarts_all_three_targets_with_their_counts_restored() {
    let env = multi();
    assert_eq!(env.run(&Multi::fast(&["reconcile"])).0, 0);
    env.assert_restored("after the first publish");
    let before = env.tmm_pods();
    env.server.clear_requests();
    let args = ["rotate", "--strategy", "scale-to-zero", "--ca"];
    let (code, out, err) = env.run(&Multi::fast(&args));
    assert_eq!(code, 0, "{out}{err}");
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    env.assert_restored("scale-to-zero");
    assert!(
        all_replaced(&before, &env.tmm_pods()),
        "every TMM pod restarted: {out}"
    );
    let writes = env.writes();
    // Both Deployments to zero and back; the DaemonSet stopped and started by patches.
    let scaled: Vec<&String> = writes.iter().filter(|w| w.ends_with("/scale")).collect();
    assert_eq!(scaled.len(), 4, "{scaled:?}");
    for ns in [INGRESS_A, INGRESS_B] {
        assert!(
            out.contains(&format!("scaled deployment {ns}/f5-tmm to 0 (was 2)")),
            "{out}"
        );
    }
    assert!(
        out.contains(&format!("stopped daemonset {BNK}/tmm (was {NODES})")),
        "{out}"
    );
    assert!(
        writes
            .iter()
            .any(|w| w == "PATCH /apis/apps/v1/namespaces/bnk-tmm/daemonsets/tmm"),
        "{writes:?}"
    );
}

/// kill -9 while the targets are stopped (the second Deployment and the DaemonSet included):
/// the next reconcile resumes, restores every target to its recorded count and finishes.
#[test]
fn a_rotation_killed_while_the_targets_are_stopped_is_resumed_and_finished() {
    let env = multi();
    assert_eq!(env.run(&Multi::fast(&["reconcile"])).0, 0);
    env.assert_restored("after the first publish");
    // TMM pods never finish terminating: the kill lands while every target is stopped.
    env.server.with_state(|s| {
        s.stuck_terminating
            .extend(["f5-tmm".to_string(), "tmm".to_string()])
    });
    let mut args = Multi::fast(&["rotate", "--ca", "--strategy", "scale-to-zero"]);
    args.extend(["--wait-timeout", "60s"]);
    let mut child = env
        .cmd(&args, &TARGETS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    env.server
        .wait_until("every target stopped", Duration::from_secs(30), |s| {
            let get = |plural: &str, ns: &str, name: &str| {
                s.get(resource("apps", plural), ns, name).unwrap().clone()
            };
            get("deployments", INGRESS_A, "f5-tmm")["spec"]["replicas"] == 0
                && get("deployments", INGRESS_B, "f5-tmm")["spec"]["replicas"] == 0
                && !get("daemonsets", BNK, "tmm")["spec"]["template"]["spec"]["nodeSelector"]
                    ["dssm-certs.f5.com/stopped"]
                    .is_null()
        });
    child.kill().unwrap();
    child.wait().unwrap();
    let ds = env.workload("daemonsets", BNK, "tmm");
    assert_eq!(
        ds["metadata"]["annotations"]["dssm-certs.f5.com/tmm-replicas"],
        NODES.to_string(),
        "the DaemonSet's record: {ds}"
    );
    env.server.with_state(|s| s.stuck_terminating.clear());
    let (code, out, err) = env.run(&Multi::fast(&["reconcile"]));
    assert_eq!(code, 0, "{out}{err}");
    for (t, n) in [
        ("deployment spk-ingress-a/f5-tmm", 2),
        ("deployment spk-ingress-b/f5-tmm", 2),
        ("daemonset bnk-tmm/tmm", NODES),
    ] {
        let line = format!("resuming an interrupted restart: TMM had {n} replicas ({t})");
        assert!(out.contains(&line), "{line}: {out}");
    }
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    env.assert_restored("after the resumed rotation");
    let store = env.secret(DSSM, "dssm-ca-key-secret").unwrap();
    assert_eq!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/state"],
        "complete"
    );
}

#[test]
fn a_missing_target_namespace_or_workload_is_a_clear_error_before_any_write() {
    let env = multi();
    for (bad, says) in [
        (
            "no-such-ns/deployment/f5-tmm",
            "deployment no-such-ns/f5-tmm not found",
        ),
        (
            "spk-ingress-b/daemonset/f5-tmm",
            "daemonset spk-ingress-b/f5-tmm not found",
        ),
    ] {
        env.server.clear_requests();
        let mut targets = TARGETS.to_vec();
        targets.push(bad);
        let (code, out, err) = env.run_with(&Multi::fast(&["reconcile"]), &targets);
        assert_eq!(code, 4, "{bad}: {out}{err}");
        assert!(
            err.contains(says) && err.contains("nothing was written"),
            "{bad}: {err}"
        );
        // Not even the Lease is taken.
        let writes = env.writes();
        assert!(writes.is_empty(), "{bad}: {writes:?}");
        assert!(env.secret(DSSM, "dssm-certs-secret").is_none());
        // `check` names it, critical.
        // (Nothing is published yet either: critical or cannot tell, never ok.)
        let (code, out, err) = env.run_with(&["check"], &targets);
        assert!(code >= 2, "{bad}: {out}{err}");
        assert!(out.contains(says), "{bad}: {out}");
    }
}

/// A target added later gets the deployed materials at the next reconcile, without a
/// rotation; a rotation in progress (written, restart pending) covers a target added midway.
#[test]
fn a_target_added_later_is_published_to_without_a_rotation_and_a_pending_restart_covers_it() {
    let env = multi();
    let two = &TARGETS[..2];
    let (code, out, err) = env.run_with(&Multi::fast(&["reconcile"]), two);
    assert_eq!(code, 0, "{out}{err}");
    assert!(env.copy(BNK).is_none());
    let store_before = env.secret(DSSM, "dssm-ca-key-secret").unwrap()["data"].clone();
    let dssm_before = env.copy(DSSM).unwrap();

    let (code, out, err) = env.run(&["reconcile", "--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: repair"), "not a rotation: {out}");
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    assert_eq!(
        env.copy(DSSM).unwrap(),
        dssm_before,
        "the materials did not change"
    );
    assert_eq!(
        env.secret(DSSM, "dssm-ca-key-secret").unwrap()["data"],
        store_before
    );
    // Only the new namespace got a copy: only its target waits for a restart.
    assert!(out.contains("marked daemonset bnk-tmm/tmm"), "{out}");
    assert!(!out.contains("marked deployment"), "{out}");

    // A rotation written with two targets, its restart still pending, then a third target
    // added: the next reconcile publishes into it and restarts all three.
    let env = multi();
    assert_eq!(env.run_with(&Multi::fast(&["reconcile"]), two).0, 0);
    let (code, out, err) = env.run_with(&Multi::fast(&["rotate", "--no-restart"]), two);
    assert_eq!(code, 0, "{out}{err}");
    let before = env.tmm_pods();
    let (code, out, err) = env.run(&Multi::fast(&["reconcile"]));
    assert_eq!(code, 0, "{out}{err}");
    env.assert_identical_copies(&[INGRESS_A, INGRESS_B, BNK]);
    env.assert_restored("the pending restart with the added target");
    assert!(
        all_replaced(&before, &env.tmm_pods()),
        "all three restarted: {out}"
    );
}

#[test]
fn the_tmm_flags_parse_their_env_form_and_refuse_mixing_with_the_shorthand() {
    // The env form, comma-separated: `values` prints one snippet per TMM namespace.
    let mut cmd = bin();
    cmd.env(
        "DSSM_CERTS_TMM",
        "spk-ingress-a/deployment/f5-tmm,spk-ingress-b/f5-tmm,bnk-tmm/ds/tmm",
    )
    .args(["values", "--dssm-namespace", DSSM]);
    let (code, out, err) = output(&mut cmd);
    assert_eq!(code, 0, "{err}");
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3, "{out}");
    for (doc, ns) in docs.iter().zip([INGRESS_A, INGRESS_B, BNK]) {
        let env = doc["tmm"]["customEnvVars"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "SESSIONDB_EXTERNAL_SERVICE"
            && e["value"] == "f5-dssm-sentinel.spk-utilities"));
        assert!(out.contains(&format!("# TMM in namespace {ns} (")), "{out}");
    }
    assert!(out.contains("(daemonset/tmm)"), "{out}");

    // Both forms at once: a usage error naming the flags.
    let (code, _, err) = output(bin().args(["check", "--tmm", "a/f5-tmm", "--tmm-namespace", "b"]));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--tmm") && err.contains("--tmm-namespace"),
        "{err}"
    );
    // A bad target names the flag and the input.
    let (code, _, err) = output(bin().args(["check", "--tmm", "ns/statefulset/x"]));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--tmm") && err.contains("neither deployment nor daemonset"),
        "{err}"
    );
}

/// The test cluster's DaemonSet controller honours the pod template's nodeSelector as the real
/// one does: a selector no node carries leaves desiredNumberScheduled 0 and deletes every daemon
/// pod; removing it schedules them again, and `kubectl rollout status` sees the rollout finish.
#[test]
fn a_daemonset_with_a_nodeselector_no_node_carries_runs_no_pod_until_it_is_removed() {
    let env = multi();
    let mut ds = env.workload("daemonsets", BNK, "tmm");
    ds["spec"]["template"]["spec"]["nodeSelector"]["dssm-certs.f5.com/stopped"] = json!("true");
    env.server.put("apps", "daemonsets", BNK, ds);
    env.server
        .wait_until("no daemon pod", Duration::from_secs(10), |s| {
            s.list(resource("", "pods"), Some(BNK)).is_empty()
                && s.get(resource("apps", "daemonsets"), BNK, "tmm").unwrap()["status"]
                    ["desiredNumberScheduled"]
                    == 0
        });
    let mut ds = env.workload("daemonsets", BNK, "tmm");
    ds["spec"]["template"]["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "linux"});
    env.server.put("apps", "daemonsets", BNK, ds);
    let admin = env.dir.path().join("admin");
    std::fs::write(&admin, env.server.kubeconfig(apiserver::ADMIN_TOKEN, BNK)).unwrap();
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", &admin)
        .args(["rollout", "status", "ds/tmm", "-n", BNK, "--timeout=30s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("successfully rolled out"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = env.workload("daemonsets", BNK, "tmm");
    for f in [
        "desiredNumberScheduled",
        "updatedNumberScheduled",
        "numberAvailable",
    ] {
        assert_eq!(ds["status"][f], NODES, "{f}: {}", ds["status"]);
    }
}

/// The RBAC of the multi-instance overlay and of the chart's multi-instance example: every
/// command runs under it for all three targets, and every permission it grants is used.
#[test]
fn each_target_namespace_grants_exactly_what_its_target_uses() {
    let kustomized = apiserver::render_overlay("spk-multi");
    let env = TestEnv::spk_multi(&kustomized);
    exercise_every_command("spk-multi", &env);
    assert_rbac_is_exactly_used("spk-multi", &env, &kustomized);
}

/// The agent (its own read-only account, under the multi-instance RBAC) reports every copy by
/// namespace and every TMM target by namespace and target: ready, and waiting for a restart
/// after materials were written without one.
#[test]
fn the_agent_reports_every_copy_and_every_target() {
    use support::agent::{http_get, start_watching};
    let env = TestEnv::spk_multi(&apiserver::render_overlay("spk-multi"));
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    let agent = start_watching(&env, &env.agent_kubeconfig, &[]);
    let value = |m: &str, name: &str, labels: &[String]| -> Option<f64> {
        m.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let metrics = support::redis::wait_for("the target series", Duration::from_secs(15), || {
        http_get(&agent.addr, "/metrics").filter(|m| m.contains("dssm_tmm_target_ready{"))
    });
    for (ns, target) in [
        (INGRESS_A, "deployment/f5-tmm"),
        (INGRESS_B, "deployment/f5-tmm"),
        (BNK, "daemonset/tmm"),
    ] {
        let labels = [
            format!("namespace=\"{ns}\""),
            format!("target=\"{target}\""),
        ];
        assert_eq!(
            value(&metrics, "dssm_tmm_target_ready", &labels),
            Some(1.0),
            "{ns} {target}:\n{metrics}"
        );
        assert_eq!(
            value(&metrics, "dssm_tmm_restart_pending", &labels),
            Some(1.0),
            "{ns} {target}: written with --no-restart\n{metrics}"
        );
    }
    for ns in env.copy_namespaces() {
        let labels = [
            format!("namespace=\"{ns}\""),
            "key=\"dssm-cert.crt\"".to_string(),
        ];
        assert_eq!(
            value(&metrics, "dssm_certificate_ready", &labels),
            Some(1.0),
            "{ns}:\n{metrics}"
        );
    }
    drop(agent);
}

/// `doctor` reviews the access every target needs (its kind's verbs, in its namespace) and
/// finds the multi-instance Roles grant all of it; a missing target is named.
#[test]
fn doctor_reviews_each_targets_access_and_names_a_missing_target() {
    let env = TestEnv::spk_multi(&apiserver::render_overlay("spk-multi"));
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    let admin = env.dir.path().join("admin-kubeconfig");
    std::fs::write(
        &admin,
        env.server.kubeconfig(apiserver::ADMIN_TOKEN, &env.dssm_ns),
    )
    .unwrap();
    let doctor = |targets: &[String]| {
        let mut cmd = bin();
        cmd.env("KUBECONFIG", &admin)
            .env("HOME", env.dir.path())
            .args(["doctor", "-o", "json", "--dssm-namespace", &env.dssm_ns]);
        for t in targets {
            cmd.args(["--tmm", t]);
        }
        let (_, out, err) = output(&mut cmd);
        let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        r["findings"].as_array().unwrap().clone()
    };
    let findings = doctor(&env.tmm_targets);
    let bad: Vec<&Value> = findings
        .iter()
        .filter(|f| f["check"] == "rbac" || f["check"] == "target")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    for ns in env.copy_namespaces() {
        assert!(
            findings
                .iter()
                .any(|f| f["check"] == "expiry" && f["object"] == format!("namespace/{ns}")),
            "{ns}: {findings:#?}"
        );
    }

    let mut more = env.tmm_targets.clone();
    more.push("spk-ingress-b/daemonset/f5-tmm".into());
    let findings = doctor(&more);
    assert!(
        findings.iter().any(|f| f["check"] == "target"
            && f["status"] == "critical"
            && f["object"] == "spk-ingress-b/daemonset/f5-tmm"),
        "{findings:#?}"
    );
    // The Roles do not cover the new target's daemonsets in spk-ingress-b: named as such.
    assert!(
        findings
            .iter()
            .any(|f| f["check"] == "rbac"
                && f["message"].as_str().unwrap_or("").contains("daemonsets")),
        "{findings:#?}"
    );
}
