//! `doctor` on the test cluster: each thing that would make a rotation unsafe or slow is found,
//! named, and ranked; nothing is written. The operator runs it with their own credentials and
//! it judges the tool's ServiceAccount by impersonation, as `kubectl auth can-i --as` does.

use testkit as support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// The operator's kubeconfig (cluster-admin), with `doctor` pointed at the installation.
fn doctor(env: &TestEnv, extra: &[&str]) -> (i32, Value, String) {
    let admin = env.dir.path().join("admin-kubeconfig");
    std::fs::write(
        &admin,
        env.server.kubeconfig(apiserver::ADMIN_TOKEN, &env.dssm_ns),
    )
    .unwrap();
    let mut cmd = bin();
    cmd.env("KUBECONFIG", &admin)
        .env("HOME", env.dir.path())
        .args(["doctor", "-o", "json"])
        .args([
            "--dssm-namespace",
            &env.dssm_ns,
            "--tmm-namespace",
            &env.tmm_ns,
        ])
        .args(extra);
    let (code, out, err) = output(&mut cmd);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(report["schema"], "dssm-certs.doctor/v1");
    assert_eq!(report["exit_code"], code, "{out}");
    (code, report, err)
}

/// (check, status, object) of every finding.
fn found(report: &Value) -> BTreeSet<(String, String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_string(),
                f["status"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn triple(check: &str, status: &str, object: &str) -> (String, String, String) {
    (check.into(), status.into(), object.into())
}

fn message<'a>(report: &'a Value, check: &str, object: &str) -> &'a str {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check && f["object"] == object)
        .and_then(|f| f["message"].as_str())
        .unwrap_or_else(|| panic!("no {check} finding on {object}: {report:#}"))
}

fn published_spk() -> TestEnv {
    let env = TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    env
}

#[test]
fn a_published_spk_install_is_judged_with_the_tools_own_roles_and_lacks_only_budgets() {
    let env = published_spk();
    env.server.clear_requests();
    let (code, report, err) = doctor(&env, &[]);
    // The shipped Roles grant every call a rotation makes: no rbac finding. What is left is
    // the absence of PodDisruptionBudgets and the time each copy has.
    assert_eq!(
        found(&report),
        BTreeSet::from([
            triple(
                "disruption-budget",
                "warning",
                "spk-ingress/deployment/f5-tmm"
            ),
            triple(
                "disruption-budget",
                "warning",
                "spk-utilities/statefulset/f5-dssm-db"
            ),
            triple(
                "disruption-budget",
                "warning",
                "spk-utilities/statefulset/f5-dssm-sentinel"
            ),
            triple("expiry", "ok", "namespace/spk-utilities"),
            triple("expiry", "ok", "namespace/spk-ingress"),
        ]),
        "{report:#}{err}"
    );
    assert_eq!(code, 1);
    assert!(message(&report, "expiry", "namespace/spk-ingress").contains("days left"));
    // Read-only: doctor wrote nothing but its access reviews.
    let writes: Vec<_> = env
        .writes()
        .into_iter()
        .filter(|r| !r.path.contains("selfsubjectaccessreviews"))
        .collect();
    assert!(writes.is_empty(), "doctor wrote: {writes:?}");
}

// Long: one cluster holds every finding at once, to prove each is named beside the others
// and ranked among them.
#[test]
fn subpath_mounts_operator_owners_untargeted_mounts_and_a_blocking_budget_are_each_named() {
    let env = published_spk();
    let s = &env.server;
    // The DB mounts the Secret with subPath (no hot reload).
    let mut db = s
        .get("apps", "statefulsets", "spk-utilities", "f5-dssm-db")
        .unwrap();
    db["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "certs", "secret": {"secretName": "dssm-certs-secret"}}]);
    db["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = json!([
        {"name": "certs", "mountPath": "/etc/ssl/certs/dssm-ca.crt", "subPath": "dssm-ca.crt"}
    ]);
    s.put("apps", "statefulsets", "spk-utilities", db);
    // TMM belongs to an operator's custom resource.
    let mut tmm = s
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    tmm["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "k8s.f5net.com/v1", "kind": "F5SPKIngress", "name": "ingress",
        "uid": "1", "controller": true
    }]);
    s.put("apps", "deployments", "spk-ingress", tmm);
    // Another workload mounts the Secret but is not a target.
    s.put("apps", "deployments", "spk-ingress", json!({
        "metadata": {"name": "debug-client", "labels": {"app": "debug-client"}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "debug-client"}},
                 "template": {"metadata": {"labels": {"app": "debug-client"}}, "spec": {
                     "containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "k", "projected": {"sources": [{"secret": {"name": "dssm-keys-secret"}}]}}]}}},
    }));
    // The sentinels' budget allows no disruption; the DBs' allows one.
    let budget = |name: &str, limit: &str, count: u32| {
        s.put(
            "policy",
            "poddisruptionbudgets",
            "spk-utilities",
            json!({
                "metadata": {"name": name},
                "spec": {limit: count, "selector": {"matchLabels": {"app": format!("f5-dssm-{name}")}}},
            }),
        );
    };
    budget("sentinel", "minAvailable", 3);
    budget("db", "maxUnavailable", 1);
    // The template change rolls the DB pods (as the StatefulSet controller does): a budget's
    // verdict and pod readiness are judged once they are back.
    s.wait_until(
        "the DB pods rolled and Ready",
        Duration::from_secs(30),
        |st| {
            let pods = st.list(apiserver::resource("", "pods"), Some("spk-utilities"));
            let dbs: Vec<_> = pods
                .iter()
                .filter(|p| p["metadata"]["labels"]["app"] == "f5-dssm-db")
                .collect();
            dbs.len() == 3
                && dbs.iter().all(|p| {
                    p["spec"]["containers"][0]["volumeMounts"][0]["subPath"] == "dssm-ca.crt"
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
        },
    );
    s.wait_until("the budgets' status", Duration::from_secs(10), |st| {
        st.list(
            apiserver::resource("policy", "poddisruptionbudgets"),
            Some("spk-utilities"),
        )
        .iter()
        .all(|p| p["status"]["disruptionsAllowed"].is_i64())
    });

    let (code, report, err) = doctor(&env, &[]);
    let f = found(&report);
    for expected in [
        triple(
            "sub-path",
            "warning",
            "spk-utilities/statefulset/f5-dssm-db",
        ),
        triple("owner", "warning", "spk-ingress/deployment/f5-tmm"),
        triple(
            "untargeted-mount",
            "warning",
            "spk-ingress/deployment/debug-client",
        ),
        triple(
            "disruption-budget",
            "critical",
            "spk-utilities/statefulset/f5-dssm-sentinel",
        ),
    ] {
        assert!(
            f.contains(&expected),
            "missing {expected:?} in {report:#}{err}"
        );
    }
    // The DBs are covered by a budget that allows a disruption: nothing to say about them.
    assert!(
        !f.iter()
            .any(|(c, _, o)| c == "disruption-budget" && o.ends_with("f5-dssm-db")),
        "{report:#}"
    );
    assert_eq!(code, 2, "a blocking budget is critical");
    assert!(
        message(&report, "sub-path", "spk-utilities/statefulset/f5-dssm-db")
            .contains("subPath dssm-ca.crt")
    );
    assert!(
        message(&report, "owner", "spk-ingress/deployment/f5-tmm").contains("F5SPKIngress ingress")
    );
    // Worst first.
    assert_eq!(report["findings"][0]["status"], "critical", "{report:#}");
}

/// Issue 22: doctor judged a sidecar's `subPath` mount as the DB's and warned that a rotation
/// restarts each pod, while the roll (which looks at the Redis container only) reloads in place.
#[test]
fn a_sidecars_sub_path_mount_is_not_a_redis_sub_path_warning() {
    let env = published_spk();
    // An exporter listed first mounts the CA with subPath; the Redis container mounts the
    // Secrets as directories.
    support::objects::dssm_sidecar_first(&env.server, &env.dssm_ns);
    let (_, report, err) = doctor(&env, &[]);
    let f = found(&report);
    assert!(
        !f.iter().any(|(c, _, _)| c == "sub-path"),
        "a sidecar's subPath mount was judged as Redis's: {report:#}{err}"
    );
    assert!(
        !f.iter().any(|(c, _, _)| c == "redis-container"),
        "the Redis container was not told from the sidecar: {report:#}{err}"
    );
}

#[test]
fn each_permission_the_tools_service_account_lacks_is_named_and_critical() {
    let env = published_spk();
    // Take the eviction rule away from the tool's Role, as a hand-edited Role would.
    let user = "system:serviceaccount:spk-utilities:dssm-certs";
    env.server.with_state(|s| {
        let rules = s
            .rbac
            .as_mut()
            .unwrap()
            .get_mut(user)
            .unwrap()
            .get_mut("spk-utilities")
            .unwrap();
        rules.retain(|r| !r.resources.iter().any(|x| x == "pods/eviction"));
    });
    let (code, report, _) = doctor(&env, &[]);
    let rbac: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "rbac")
        .collect();
    assert_eq!(rbac.len(), 1, "{report:#}");
    assert_eq!(rbac[0]["status"], "critical");
    assert_eq!(
        rbac[0]["message"],
        "ServiceAccount spk-utilities/dssm-certs may not create pods/eviction in spk-utilities: a rotation would stop at that call"
    );
    assert_eq!(code, 2);

    // A ServiceAccount bound to nothing lacks everything.
    let (_, report, _) = doctor(&env, &["--service-account", "spk-utilities/nobody"]);
    let missing = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "rbac" && f["status"] == "critical")
        .count();
    assert!(missing >= 20, "{report:#}");
}

#[test]
fn run_as_the_tool_itself_doctor_says_what_it_cannot_read_instead_of_failing() {
    let env = published_spk();
    // The tool's own Role may not list workloads: those checks cannot tell, the rest still run.
    let (code, out, err) = env.run(&["doctor", "-o", "json", "--service-account", "self"]);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let f = found(&report);
    assert!(
        f.contains(&triple("read", "unknown", "deployments in spk-ingress")),
        "{report:#}"
    );
    assert!(
        f.contains(&triple("expiry", "ok", "namespace/spk-ingress")),
        "{report:#}"
    );
    assert!(!f.iter().any(|(c, _, _)| c == "rbac"), "{report:#}");
    assert_eq!(code, 3, "cannot tell ranks above a warning");
    // Impersonating needs a right the tool does not have: said, not hidden.
    let (_, out, _) = env.run(&["doctor", "-o", "json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let rbac = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "rbac")
        .expect("an rbac finding");
    assert_eq!(rbac["status"], "unknown");
    assert!(
        rbac["message"]
            .as_str()
            .unwrap()
            .contains("cannot impersonate"),
        "{rbac}"
    );
}

#[test]
fn secrets_made_by_hand_are_adopted_and_secrets_of_another_manager_are_refused() {
    let env = published_spk();
    // A hand-made copy (the seeds' kubectl apply) and one Helm owns.
    let mut certs = env.secret("spk-ingress", "dssm-certs-secret").unwrap();
    certs["metadata"]["labels"] = json!({});
    env.server.put("", "secrets", "spk-ingress", certs);
    let mut keys = env.secret("spk-ingress", "dssm-keys-secret").unwrap();
    keys["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "Helm"});
    env.server.put("", "secrets", "spk-ingress", keys);
    let (code, report, _) = doctor(&env, &[]);
    let f = found(&report);
    assert!(
        f.contains(&triple(
            "managed-by",
            "warning",
            "spk-ingress/secret/dssm-certs-secret"
        )),
        "{report:#}"
    );
    assert!(
        f.contains(&triple(
            "managed-by",
            "critical",
            "spk-ingress/secret/dssm-keys-secret"
        )),
        "{report:#}"
    );
    assert!(message(&report, "managed-by", "spk-ingress/secret/dssm-keys-secret").contains("Helm"));
    assert_eq!(code, 2);
}

#[test]
fn a_missing_tmm_deployment_and_a_dssm_pod_not_ready_are_critical_in_the_table_too() {
    let env = published_spk();
    env.server
        .fail_pod("spk-utilities", "f5-dssm-sentinel-1", "Evicted");
    let admin = env.dir.path().join("admin-kubeconfig");
    std::fs::write(
        &admin,
        env.server
            .kubeconfig(apiserver::ADMIN_TOKEN, "spk-utilities"),
    )
    .unwrap();
    let mut cmd = bin();
    cmd.env("KUBECONFIG", &admin).args([
        "doctor",
        "--dssm-namespace",
        "spk-utilities",
        "--tmm-namespace",
        "spk-ingress",
        "--tmm-deployment",
        "f5-tmm-typo",
    ]);
    let (code, out, err) = output(&mut cmd);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("CRITICAL  target") && out.contains("spk-ingress/deployment/f5-tmm-typo"),
        "{out}"
    );
    assert!(
        out.contains("CRITICAL  pod-ready") && out.contains("spk-utilities/pod/f5-dssm-sentinel-1"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with(")"),
        "a summary line closes the table: {out}"
    );
    assert!(out.contains("doctor: CRITICAL"), "{out}");
}

#[test]
fn the_test_cluster_answers_access_reviews_and_impersonation_as_kubectl_expects() {
    let env = TestEnv::spk();
    let admin = env.dir.path().join("admin-kubeconfig");
    std::fs::write(
        &admin,
        env.server
            .kubeconfig(apiserver::ADMIN_TOKEN, "spk-utilities"),
    )
    .unwrap();
    let can_i = |args: &[&str]| {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.env("KUBECONFIG", &admin)
            .arg("auth")
            .arg("can-i")
            .args(args);
        output(&mut cmd)
    };
    let sa = "--as=system:serviceaccount:spk-utilities:dssm-certs";
    let (code, out, err) = can_i(&[
        "create",
        "pods",
        "--subresource=eviction",
        "-n",
        "spk-utilities",
        sa,
    ]);
    assert_eq!((code, out.trim()), (0, "yes"), "{err}");
    // `pods/eviction` is kubectl's resource/name form: a pod named "eviction", which the tool
    // may not create.
    let (code, out, _) = can_i(&["create", "pods/eviction", "-n", "spk-utilities", sa]);
    assert_eq!((code, out.trim()), (1, "no"));
    let (code, out, _) = can_i(&["delete", "pods", "-n", "spk-utilities", sa]);
    assert_eq!((code, out.trim()), (1, "no"));
    let (code, out, _) = can_i(&["patch", "deployments/f5-tmm", "-n", "spk-ingress", sa]);
    assert_eq!((code, out.trim()), (0, "yes"));
    let (code, out, _) = can_i(&["patch", "deployments/other", "-n", "spk-ingress", sa]);
    assert_eq!((code, out.trim()), (1, "no"));
    // Only who may impersonate can ask as another.
    let sa_config = env.dir.path().join("kubeconfig");
    let mut cmd = std::process::Command::new("kubectl");
    cmd.env("KUBECONFIG", &sa_config)
        .args(["auth", "can-i", "list", "pods", "-n", "spk-utilities"])
        .arg("--as=system:serviceaccount:spk-utilities:dssm-certs-agent");
    let (code, _, err) = output(&mut cmd);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot impersonate resource \"serviceaccounts\""),
        "{err}"
    );
}

/// dSSM pods are 2/2 (Redis and a sidecar) in the SPK procedure: a sidecar listed first is
/// passed over, and only a pod whose Redis container cannot be told from the rest is named.
#[test]
fn a_dssm_sidecar_listed_first_is_passed_over_and_an_unrecognisable_redis_is_critical() {
    let env = published_spk();
    let s = &env.server;
    let set = |name: &str, containers: Value| {
        let mut w = s
            .get("apps", "statefulsets", "spk-utilities", name)
            .unwrap();
        w["spec"]["template"]["spec"]["containers"] = containers;
        s.put("apps", "statefulsets", "spk-utilities", w);
    };
    set(
        "f5-dssm-sentinel",
        json!([{"name": "exporter", "image": "x", "ports": [{"name": "metrics", "containerPort": 9121}]},
               {"name": "sentinel", "image": "x", "ports": [{"name": "sentinel", "containerPort": 26379}]}]),
    );
    set(
        "f5-dssm-db",
        json!([{"name": "exporter", "image": "x", "ports": [{"containerPort": 9121}]},
               {"name": "store", "image": "x"}]),
    );
    let (_, report, err) = doctor(&env, &[]);
    let f = found(&report);
    assert!(
        f.contains(&triple(
            "redis-container",
            "critical",
            "spk-utilities/statefulset/f5-dssm-db"
        )),
        "{report:#}{err}"
    );
    assert!(
        !f.iter()
            .any(|(check, _, object)| check == "redis-container"
                && object.ends_with("f5-dssm-sentinel")),
        "{report:#}"
    );
    let m = message(
        &report,
        "redis-container",
        "spk-utilities/statefulset/f5-dssm-db",
    );
    assert!(
        m.contains("exporter, store") && m.contains("--redis-endpoint"),
        "{m}"
    );
}

/// A TMM that cannot surge is named: with several pods the rotation replaces them itself (a
/// warning); with one pod and no surge no Ready pod would remain (critical, the rotation
/// refuses without --allow-tmm-gap).
#[test]
fn a_tmm_that_cannot_surge_is_a_warning_and_one_pod_without_surge_is_critical() {
    let env = published_spk();
    let s = &env.server;
    let object = "spk-ingress/deployment/f5-tmm";
    let with = |replicas: i64, strategy: Value| {
        let mut d = s
            .get("apps", "deployments", "spk-ingress", "f5-tmm")
            .unwrap();
        d["spec"]["replicas"] = json!(replicas);
        d["spec"]["strategy"] = strategy;
        s.put("apps", "deployments", "spk-ingress", d);
        let (_, report, err) = doctor(&env, &[]);
        let f = found(&report);
        (report, f, err)
    };
    let (report, f, err) = with(3, json!({"type": "Recreate"}));
    assert!(
        f.contains(&triple("tmm-surge", "warning", object)),
        "{report:#}{err}"
    );
    assert!(message(&report, "tmm-surge", object).contains("one at a time"));
    let (report, f, err) = with(
        1,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
    );
    assert!(
        f.contains(&triple("tmm-surge", "critical", object)),
        "{report:#}{err}"
    );
    assert!(message(&report, "tmm-surge", object).contains("--allow-tmm-gap"));
    let (report, f, _) = with(3, json!({"type": "RollingUpdate"}));
    assert!(!f.iter().any(|t| t.0 == "tmm-surge"), "{report:#}");
}
