//! The admission policy (manifests/admission/policy.yaml, the chart's
//! templates/admission-policy.yaml): its CEL, run by cel-python (tests/admission_cel.py, in the
//! project's venv) on old/new objects as the API server hands them over. Every change the tool
//! makes to a TMM workload (the merge patches of src/cluster/workloads.rs, applied here with
//! RFC 7386) passes; what a stolen writer token would do to a privileged data-plane workload is
//! denied; the writer creates only our three Secrets, of type Opaque.

use std::path::Path;
use std::process::{Command, Stdio};

use dssm_certs::materials::annotations;
use serde_json::{json, Value};

const WRITER: &str = "system:serviceaccount:spk-utilities:dssm-certs";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// RFC 7386 JSON merge patch, as a `kubectl patch --type merge` (and kube's `Patch::Merge`).
fn merge(target: &Value, patch: &Value) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = target.as_object().cloned().unwrap_or_default();
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge(out.get(k).unwrap_or(&Value::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

/// A privileged TMM as the data plane runs it: the operator's own annotations, labels,
/// nodeSelector and volumes, which the writer must leave alone.
fn tmm(kind: &str) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": "f5-tmm"}},
        "template": {
            "metadata": {"labels": {"app": "f5-tmm"}, "annotations": {"example.com/team": "dataplane"}},
            "spec": {
                "serviceAccountName": "f5-tmm",
                "nodeSelector": {"example.com/role": "tmm"},
                "containers": [{
                    "name": "f5-tmm",
                    "image": "registry.example.com/f5-tmm:1.0",
                    "securityContext": {"privileged": false},
                    "volumeMounts": [{"name": "dssm-certs", "mountPath": "/etc/ssl/certs"}]
                }],
                "volumes": [{"name": "dssm-certs", "secret": {"secretName": "dssm-certs-secret"}}]
            }
        }
    });
    if kind == "Deployment" {
        spec["replicas"] = json!(2);
        spec["strategy"] = json!({"type": "RollingUpdate"});
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": "f5-tmm", "namespace": "spk-ingress",
            "labels": {"app": "f5-tmm"},
            "annotations": {"example.com/owner": "dataplane"}
        },
        "spec": spec
    })
}

fn request(user: &str, resource: &str, op: &str) -> Value {
    json!({"userInfo": {"username": user}, "resource": {"resource": resource}, "operation": op})
}

/// An UPDATE of `old` by `user` with the merge patch `patch`.
fn update(user: &str, old: &Value, patch: &Value) -> Value {
    let resource = match old["kind"].as_str() {
        Some("DaemonSet") => "daemonsets",
        _ => "deployments",
    };
    json!({"request": request(user, resource, "UPDATE"), "object": merge(old, patch), "oldObject": old})
}

fn create_secret(user: &str, secret: Value) -> Value {
    json!({"request": request(user, "secrets", "CREATE"), "object": secret, "oldObject": null})
}

/// Per case: None when the policy does not apply (a matchCondition is false), else the
/// messages of the failed validations.
fn evaluate(cases: &[Value]) -> Vec<Option<Vec<String>>> {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-tests (it installs cel-python into .venv)",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(repo().join("tests/admission_cel.py"))
        .arg(repo().join("manifests/admission/policy.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(cases).unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &input).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "admission_cel.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    answers
        .into_iter()
        .map(|a| {
            a.as_array()
                .map(|l| l.iter().map(|m| m.as_str().unwrap().to_string()).collect())
        })
        .collect()
}

#[test]
fn the_chart_ships_the_same_policy_file() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
    assert!(
        read("manifests/admission/policy.yaml")
            == read("charts/dssm-certs/files/admission-policy.yaml"),
        "charts/dssm-certs/files/admission-policy.yaml must be a copy of manifests/admission/policy.yaml"
    );
}

/// Every patch comes from `dssm_certs::model::tmm_patches`, the builders the cluster layer sends:
/// a patch the tool starts to send and the policy refuses fails here, not in a rotation.
#[test]
fn every_change_the_tool_makes_to_a_tmm_workload_is_allowed() {
    use dssm_certs::model::tmm_patches;
    let deployment = tmm("Deployment");
    let daemonset = tmm("DaemonSet");
    let ours = |k: &str, v: Option<&str>| tmm_patches::annotate(&[(k, v)]);
    let stopped = merge(&daemonset, &tmm_patches::stop_daemonset());
    let mut bare = tmm("DaemonSet");
    bare["spec"]["template"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeSelector");
    let bare_stopped = merge(&bare, &tmm_patches::stop_daemonset());
    let mut bare_started = bare_stopped.clone();
    // The API server drops the emptied map.
    bare_started["spec"]["template"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeSelector");
    let marked = merge(&deployment, &ours(annotations::RESTART_NEEDED, Some("3")));
    let restart = tmm_patches::rollout_restart("2026-12-07T04:00:00Z", "3:1");
    let cases = [
        // The restart marks and records: set, then removed, several in one patch.
        update(
            WRITER,
            &deployment,
            &ours(annotations::RESTART_NEEDED, Some("3")),
        ),
        update(WRITER, &marked, &ours(annotations::RESTART_NEEDED, None)),
        update(
            WRITER,
            &deployment,
            &ours(annotations::TMM_REPLICAS, Some("2")),
        ),
        update(
            WRITER,
            &daemonset,
            &ours(annotations::TMM_RESTARTED, Some("3")),
        ),
        update(
            WRITER,
            &marked,
            &tmm_patches::annotate(&[
                (annotations::RESTART_NEEDED, None),
                (annotations::TMM_ROLL, None),
            ]),
        ),
        // Scale to zero and back (a patch of the Deployment; the scale subresource carries
        // nothing but replicas and is not matched).
        update(WRITER, &deployment, &tmm_patches::scale(0)),
        update(WRITER, &deployment, &tmm_patches::scale(2)),
        // `rollout restart` with the roll record in the same patch, and the record alone (the
        // server's clock read off its stamp).
        update(WRITER, &deployment, &restart),
        update(WRITER, &daemonset, &restart),
        update(WRITER, &deployment, &tmm_patches::roll_record("pending")),
        // A DaemonSet stopped and started by its nodeSelector key, with and without the
        // operator's own nodeSelector.
        update(WRITER, &daemonset, &tmm_patches::stop_daemonset()),
        update(WRITER, &stopped, &tmm_patches::start_daemonset()),
        update(WRITER, &bare, &tmm_patches::stop_daemonset()),
        json!({"request": request(WRITER, "daemonsets", "UPDATE"), "object": bare_started, "oldObject": bare_stopped}),
    ];
    for (case, answer) in cases.iter().zip(evaluate(&cases)) {
        assert_eq!(answer, Some(vec![]), "{}", case["object"]);
    }
}

#[test]
fn a_stolen_writer_token_cannot_take_over_a_tmm_pod_template() {
    let d = tmm("Deployment");
    let pod = |spec: Value| json!({"spec": {"template": {"spec": spec}}});
    let container = |c: Value| {
        let mut c0 = d["spec"]["template"]["spec"]["containers"][0].clone();
        for (k, v) in c.as_object().unwrap() {
            c0[k] = v.clone();
        }
        pod(json!({"containers": [c0]}))
    };
    let denied = [
        (
            "image",
            container(json!({"image": "evil.example.com/tmm:latest"})),
        ),
        (
            "securityContext",
            container(json!({"securityContext": {"privileged": true}})),
        ),
        (
            "a hostPath volume",
            pod(
                json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "dssm-certs", "secret": {"secretName": "dssm-certs-secret"}}]}),
            ),
        ),
        (
            "serviceAccountName",
            pod(json!({"serviceAccountName": "admin"})),
        ),
        ("hostNetwork", pod(json!({"hostNetwork": true}))),
        (
            "the operator's nodeSelector",
            pod(json!({"nodeSelector": {"example.com/role": "anything"}})),
        ),
        (
            "another pod template annotation",
            json!({"spec": {"template": {"metadata": {"annotations": {"example.com/team": "x"}}}}}),
        ),
        (
            "pod template labels",
            json!({"spec": {"template": {"metadata": {"labels": {"app": "other"}}}}}),
        ),
        (
            "the strategy",
            json!({"spec": {"strategy": {"type": "Recreate"}}}),
        ),
        (
            "the selector",
            json!({"spec": {"selector": {"matchLabels": {"app": "x"}}}}),
        ),
        (
            "another annotation of the workload",
            json!({"metadata": {"annotations": {"example.com/owner": null}}}),
        ),
        (
            "the workload's labels",
            json!({"metadata": {"labels": {"app": "x"}}}),
        ),
        (
            "an ownerReference",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1"}]}}),
        ),
    ];
    let cases: Vec<Value> = denied.iter().map(|(_, p)| update(WRITER, &d, p)).collect();
    for ((what, _), answer) in denied.iter().zip(evaluate(&cases)) {
        let answer = answer.unwrap_or_else(|| panic!("{what}: the policy did not apply"));
        assert!(!answer.is_empty(), "{what} was allowed");
        assert!(
            answer.iter().all(|m| m.starts_with("dssm-certs may")),
            "{what}: {answer:?}"
        );
    }
}

#[test]
fn the_writer_creates_only_our_three_secrets_of_type_opaque() {
    let secret = |name: &str, ty: Option<&str>| {
        let mut s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "spk-utilities"}});
        if let Some(t) = ty {
            s["type"] = json!(t);
        }
        create_secret(WRITER, s)
    };
    let cases = [
        secret("dssm-certs-secret", Some("Opaque")),
        secret("dssm-keys-secret", Some("Opaque")),
        secret("dssm-ca-key-secret", None),
        secret(
            "dssm-certs-secret",
            Some("kubernetes.io/service-account-token"),
        ),
        secret("stolen-token", Some("kubernetes.io/service-account-token")),
        secret("something-else", Some("Opaque")),
    ];
    let answers = evaluate(&cases);
    for a in &answers[..3] {
        assert_eq!(a, &Some(vec![]));
    }
    assert_eq!(
        answers[3],
        Some(vec![
            "dssm-certs may create only Secrets of type Opaque".to_string()
        ])
    );
    assert_eq!(answers[4].as_ref().map(Vec::len), Some(2));
    assert_eq!(
        answers[5],
        Some(vec!["dssm-certs may create only the Secrets dssm-certs-secret, dssm-keys-secret and dssm-ca-key-secret".to_string()])
    );
}

#[test]
fn the_policy_applies_only_to_the_writer_account() {
    let d = tmm("Deployment");
    let image =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "f5-tmm", "image": "x"}]}}}});
    let cases = [
        update("admin", &d, &image),
        update(
            "system:serviceaccount:spk-utilities:dssm-certs-agent",
            &d,
            &image,
        ),
        update(
            "system:serviceaccount:kube-system:deployment-controller",
            &d,
            &image,
        ),
        update("system:serviceaccount:cnf-gateway:dssm-certs", &d, &image),
    ];
    let answers = evaluate(&cases);
    assert_eq!(answers[..3], [None, None, None]);
    assert!(answers[3].as_ref().is_some_and(|a| !a.is_empty()));
}
