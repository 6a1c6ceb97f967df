//! The Helm chart (charts/dssm-certs), rendered and linted with Helm's own library through the
//! helm-python-sdk package (scripts/setup-tests installs it in .venv): no helm binary, no cluster.
//! A missing .venv fails these tests; it never skips them.

use testkit as support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::{json, Value};
use support::apiserver::{kustomize, rbac_from_manifests, render_overlay, SA_TOKEN};
use support::objects::{docs, merge, round_trip};
use support::rbac::{assert_rbac_is_exactly_used, exercise_every_command};
use support::{side_by_side, TestEnv};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/dssm-certs")
}

/// `tests/helm_chart.py CMD CHART VALUES [NAME NAMESPACE]` in the project's venv: stdout, or
/// Helm's message when it refuses.
fn helm(cmd: &str, values: &Value, release: &[&str]) -> Result<String, String> {
    let out = helm_chart_py(cmd, |c| c.arg(values.to_string()).args(release));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm` for each of `calls` (command, values, release), in one Python process: loading Helm's
/// library is most of the time a call takes.
fn helm_batch(calls: &[(&str, Value, &[&str])]) -> Vec<Result<String, String>> {
    let input: Vec<Value> = calls
        .iter()
        .map(|(cmd, values, release)| {
            let mut call = vec![json!(cmd), values.clone()];
            call.extend(release.iter().map(|r| json!(r)));
            Value::Array(call)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calls.json");
    std::fs::write(&file, Value::Array(input).to_string()).unwrap();
    let out = helm_chart_py("batch", |c| c.stdin(std::fs::File::open(&file).unwrap()));
    assert!(
        out.status.success(),
        "helm_chart.py batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers.len(), calls.len());
    answers
        .into_iter()
        .map(|a| match a["err"].as_str() {
            Some(err) => Err(err.to_string()),
            None => Ok(a["ok"].to_string()),
        })
        .collect()
}

/// `tests/helm_chart.py CMD CHART ...` in the project's venv, `more` adding the rest.
fn helm_chart_py(
    cmd: &str,
    more: impl FnOnce(&mut Command) -> &mut Command,
) -> std::process::Output {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-tests (it creates .venv with helm-python-sdk)",
        python.display()
    );
    let mut c = Command::new(&python);
    c.arg(repo().join("tests/helm_chart.py"))
        .arg(cmd)
        .arg(chart_dir());
    let out = more(&mut c)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "helm-python-sdk is not installed: run scripts/setup-tests\n{stderr}"
    );
    out
}

/// An example value file of the chart (charts/dssm-certs/examples/NAME.yaml), with `extra`
/// merged over it.
fn example(name: &str, extra: Value) -> Value {
    let path = chart_dir().join(format!("examples/{name}.yaml"));
    let mut v: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    merge(&mut v, extra);
    v
}

/// Every rendered template, as `helm template` prints them: path -> text.
fn render_files(values: &Value, namespace: &str) -> serde_json::Map<String, Value> {
    let out = helm("render", values, &["dssm-certs", namespace]).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap()
}

/// The rendered objects (NOTES.txt and empty documents left out).
fn render(values: &Value, namespace: &str) -> Vec<Value> {
    render_files(values, namespace)
        .into_iter()
        .filter(|(path, _)| !path.ends_with("NOTES.txt"))
        .flat_map(|(_, text)| docs(text.as_str().unwrap()))
        .collect()
}

fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn all_on() -> Value {
    json!({
        "serviceMonitor": {"enabled": true},
        "podMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true},
        "dashboard": {"enabled": true},
    })
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {}", to_yaml(objects)))
}

#[test]
fn the_spk_and_cnf_value_sets_render_objects_that_parse_into_their_types() {
    for (set, dssm, tmm) in [
        ("spk", "spk-utilities", "spk-ingress"),
        ("cnf", "cnf-gateway", "cnf-gateway"),
    ] {
        let objects = render(&example(set, all_on()), dssm);
        for o in &objects {
            let kind = o["kind"].as_str().unwrap();
            let ns = o["metadata"]["namespace"].as_str();
            let name = o["metadata"]["name"].as_str().unwrap();
            let tmm_side = name.ends_with("-tmm");
            assert_eq!(
                ns,
                Some(if tmm_side { tmm } else { dssm }),
                "{set}: {kind} {name}: every object names its namespace"
            );
            match kind {
                "ServiceAccount" => round_trip::<ServiceAccount>(o),
                "Role" => round_trip::<Role>(o),
                "RoleBinding" => round_trip::<RoleBinding>(o),
                "CronJob" => round_trip::<CronJob>(o),
                "Deployment" => round_trip::<Deployment>(o),
                "Service" => round_trip::<Service>(o),
                "ConfigMap" => round_trip::<ConfigMap>(o),
                "PrometheusRule" | "ServiceMonitor" | "PodMonitor" => {
                    assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1", "{name}")
                }
                other => panic!("{set}: unexpected kind {other}"),
            }
        }
        let mut kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(
            kinds,
            [
                "ConfigMap",
                "CronJob",
                "Deployment",
                "PodMonitor",
                "PrometheusRule",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
                "ServiceMonitor"
            ],
            "{set}"
        );
        // The TMM namespace gets one Role per ServiceAccount.
        for role in ["dssm-certs-tmm", "dssm-certs-agent-tmm"] {
            assert_eq!(find(&objects, "Role", role)["metadata"]["namespace"], tmm);
        }
    }
}

#[test]
fn the_prometheus_operator_objects_and_the_dashboard_are_off_by_default() {
    let objects = render(&example("spk", json!({})), "spk-utilities");
    for o in &objects {
        assert!(
            ![
                "PrometheusRule",
                "ServiceMonitor",
                "PodMonitor",
                "ConfigMap"
            ]
            .contains(&o["kind"].as_str().unwrap()),
            "{o:#}"
        );
    }
    let on = render(&example("spk", all_on()), "spk-utilities");
    let pm = find(&on, "PodMonitor", "dssm-certs-agent");
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0],
        json!({"action": "replace", "targetLabel": "job", "replacement": "dssm-certs-agent"}),
        "the job label DssmCertAgentDown expects"
    );
    let sm = find(&on, "ServiceMonitor", "dssm-certs-agent");
    let svc = find(&on, "Service", "dssm-certs-agent");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"]
    );
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    let cm = find(&on, "ConfigMap", "dssm-certs-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped = std::fs::read_to_string(chart_dir().join("dashboards/dssm-certs.json")).unwrap();
    assert_eq!(
        cm["data"]["dssm-certs.json"].as_str().unwrap(),
        shipped.trim_end()
    );
}

#[test]
fn the_chart_passes_strict_lint() {
    for values in [
        json!({}),
        example("spk", all_on()),
        example("cnf", all_on()),
    ] {
        let out = helm("lint", &values, &[]).unwrap_or_else(|e| panic!("{e}"));
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["errors"], json!([]), "{values}: {report:#}");
        // Severity 2 is a warning (strict makes it fatal), 3 an error; 1 is information.
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap() >= 2)
            .collect();
        assert!(serious.is_empty(), "{values}: {serious:#?}");
        assert_eq!(report["total_charts_linted"], 1);
    }
}

/// The RBAC check of tests/manifests.rs, on the chart's Roles: every command runs under them in
/// the test cluster, and every permission they grant is used.
#[test]
fn the_chart_roles_grant_exactly_what_the_code_uses() {
    // Each values set on a test cluster of its own, side by side.
    side_by_side(
        vec![
            ("spk", "spk-utilities", "spk-ingress"),
            ("cnf", "cnf-gateway", "cnf-gateway"),
            // Several TMM instances (two Deployments, one DaemonSet): a Role per namespace.
            ("spk-multi", "spk-utilities", ""),
        ],
        |(set, dssm, tmm)| {
            let rendered = to_yaml(&render(&example(set, json!({})), dssm));
            let env = if set == "spk-multi" {
                TestEnv::spk_multi(&rendered)
            } else {
                let env = TestEnv::new(dssm, tmm, SA_TOKEN);
                env.server
                    .with_state(|s| s.rbac = Some(rbac_from_manifests(&rendered)));
                env
            };
            exercise_every_command(&format!("chart {set}"), &env);
            assert_rbac_is_exactly_used(&format!("chart {set}"), &env, &rendered);
        },
    );
}

#[test]
fn bad_values_are_refused_by_the_schema_with_a_message_naming_them() {
    let target = |ns: &str, kind: &str| json!({"tmm": {"targets": [{"namespace": ns, "kind": kind, "name": "f5-tmm"}]}});
    let cases = [
        (json!({"restartStrategy": "fast"}), "/restartStrategy"),
        (
            json!({"restartStrategy": "scale_to_zero"}),
            "'rolling', 'scale-to-zero'",
        ),
        (
            target("Spk_Ingress", "Deployment"),
            "/tmm/targets/0/namespace",
        ),
        (target("spk-ingress", "StatefulSet"), "/tmm/targets/0/kind"),
        (json!({"tmm": {"targets": []}}), "/tmm/targets"),
        (json!({"dssmNamespace": "-utilities"}), "/dssmNamespace"),
        (json!({"image": {"repository": ""}}), "/image/repository"),
        (json!({"image": null}), "image"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (json!({"schedule": "weekly"}), "/schedule"),
        (
            json!({"agent": {"maintenanceWindow": "sundays"}}),
            "/agent/maintenanceWindow",
        ),
        (
            json!({"podSecurityContext": {"runAsNonRoot": false}}),
            "/podSecurityContext/runAsNonRoot",
        ),
    ];
    // Each case validated, then installed (refused the same way), then the good sets: one batch.
    let release: &[&str] = &["dssm-certs", "spk-utilities"];
    let mut calls = Vec::new();
    for (bad, _) in &cases {
        calls.push(("validate", example("spk", bad.clone()), &[][..]));
        calls.push(("render", example("spk", bad.clone()), release));
    }
    for good in ["spk", "cnf"] {
        calls.push(("validate", example(good, all_on()), &[][..]));
    }
    let mut answers = helm_batch(&calls).into_iter();
    for (bad, names) in cases {
        let err = answers.next().unwrap().expect_err(&bad.to_string());
        assert!(
            err.contains(names),
            "{bad}: the message must name {names}: {err}"
        );
        let err = answers.next().unwrap().expect_err(&bad.to_string());
        assert!(err.contains(names), "{bad}: {err}");
    }
    for good in ["spk", "cnf"] {
        answers
            .next()
            .unwrap()
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

fn container_env(o: &Value) -> Vec<(String, Value)> {
    let spec = if o["kind"] == "CronJob" {
        &o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &o["spec"]["template"]["spec"]
    };
    spec["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
        .collect()
}

fn workloads(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "CronJob" || o["kind"] == "Deployment")
        .collect()
}

#[test]
fn scale_to_zero_must_be_asked_for_and_says_it_interrupts_traffic() {
    let rolling = render_files(&example("spk", json!({})), "spk-utilities");
    let objects = render(&example("spk", json!({})), "spk-utilities");
    assert_eq!(workloads(&objects).len(), 3);
    for w in workloads(&objects) {
        assert!(
            container_env(w).contains(&("DSSM_CERTS_STRATEGY".into(), json!("rolling"))),
            "{}",
            w["metadata"]["name"]
        );
    }
    let notes = |files: &serde_json::Map<String, Value>| {
        files["dssm-certs/templates/NOTES.txt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(!notes(&rolling).contains("INTERRUPTS TRAFFIC"));

    let asked = json!({"restartStrategy": "scale-to-zero"});
    let files = render_files(&example("spk", asked.clone()), "spk-utilities");
    assert!(
        notes(&files).contains("INTERRUPTS TRAFFIC"),
        "{}",
        notes(&files)
    );
    for w in workloads(&render(&example("spk", asked), "spk-utilities")) {
        assert!(container_env(w).contains(&("DSSM_CERTS_STRATEGY".into(), json!("scale-to-zero"))));
    }
}

#[test]
fn the_placeholder_image_and_a_left_out_admission_policy_are_said_in_the_notes() {
    let notes = |values: Value| {
        render_files(&example("spk", values), "spk-utilities")["dssm-certs/templates/NOTES.txt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let placeholder = notes(json!({}));
    assert!(
        placeholder.contains("WARNING: image.repository is still the placeholder"),
        "{placeholder}"
    );
    // No discovery here (as with `helm template`): the policy is left out, and the notes say so.
    assert!(
        placeholder.contains("the admission policy that limits the writer account was left out"),
        "{placeholder}"
    );
    let objects = render(&example("spk", json!({})), "spk-utilities");
    assert!(!objects
        .iter()
        .any(|o| o["kind"] == "ValidatingAdmissionPolicy"));

    let set = notes(
        json!({"image": {"repository": "registry.internal/f5/dssm-certs"},
                           "admissionPolicy": {"skipApiCheck": true}}),
    );
    assert!(!set.contains("WARNING"), "{set}");
    assert!(!set.contains("left out"), "{set}");
    let objects = render(
        &example("spk", json!({"admissionPolicy": {"skipApiCheck": true}})),
        "spk-utilities",
    );
    find(&objects, "ValidatingAdmissionPolicy", "dssm-certs-writer");
    find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "dssm-certs-writer",
    );
    let off = notes(json!({"admissionPolicy": {"enabled": false, "skipApiCheck": true}}));
    assert!(off.contains("admissionPolicy.enabled=false"), "{off}");
}

#[test]
fn the_agent_is_read_only_unless_given_a_maintenance_window() {
    let sa = |values: Value| {
        let objects = render(&example("cnf", values), "cnf-gateway");
        let d = find(&objects, "Deployment", "dssm-certs-agent").clone();
        (
            d["spec"]["template"]["spec"]["serviceAccountName"].clone(),
            container_env(&d),
        )
    };
    let (account, env) = sa(json!({}));
    assert_eq!(account, "dssm-certs-agent");
    assert!(!env
        .iter()
        .any(|(n, _)| n == "DSSM_CERTS_MAINTENANCE_WINDOW"));
    let (account, env) = sa(json!({"agent": {"maintenanceWindow": "0 3 * * SUN 2h"}}));
    assert_eq!(
        account, "dssm-certs",
        "the window writes: the writer account"
    );
    assert!(env.contains(&(
        "DSSM_CERTS_MAINTENANCE_WINDOW".into(),
        json!("0 3 * * SUN 2h")
    )));
}

#[test]
fn a_digest_pins_the_image_and_wins_over_the_tag() {
    let image = |values: Value| -> Vec<String> {
        render(&example("spk", values), "spk-utilities")
            .iter()
            .filter(|o| o["kind"] == "CronJob" || o["kind"] == "Deployment")
            .map(|o| {
                let spec = if o["kind"] == "CronJob" {
                    &o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                } else {
                    &o["spec"]["template"]["spec"]
                };
                spec["containers"][0]["image"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert!(image(json!({}))
        .iter()
        .all(|i| i == "registry.example.com/dssm-certs:0.1.0"));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let pinned = image(json!({"image": {"tag": "9.9.9", "digest": digest}}));
    assert!(
        pinned
            .iter()
            .all(|i| *i == format!("registry.example.com/dssm-certs@{digest}")),
        "{pinned:?}"
    );
}

#[test]
fn every_target_is_passed_and_each_namespace_gets_roles_for_its_own_workloads() {
    let two = json!({"tmm": {"targets": [
        {"namespace": "spk-ingress", "kind": "Deployment", "name": "f5-tmm"},
        {"namespace": "spk-egress", "kind": "DaemonSet", "name": "f5-tmm-ds"},
    ]}});
    let objects = render(&example("spk", two), "spk-utilities");
    let role = find(
        &objects
            .iter()
            .filter(|o| o["metadata"]["namespace"] == "spk-egress")
            .cloned()
            .collect::<Vec<_>>(),
        "Role",
        "dssm-certs-tmm",
    )
    .clone();
    let rules = role["rules"].as_array().unwrap();
    assert!(rules
        .iter()
        .any(|r| r["resources"] == json!(["daemonsets"])
            && r["resourceNames"] == json!(["f5-tmm-ds"])));
    assert!(!rules
        .iter()
        .any(|r| r["resources"] == json!(["deployments"])));
    for w in workloads(&objects) {
        let env = container_env(w);
        assert!(
            env.contains(&(
                "DSSM_CERTS_TMM".into(),
                json!("spk-ingress/deployment/f5-tmm,spk-egress/daemonset/f5-tmm-ds")
            )),
            "{env:?}"
        );
        assert!(!env.iter().any(|(k, _)| k == "DSSM_CERTS_TMM_NAMESPACE"));
    }

    // A lone DaemonSet is passed in full too (the shorthand names a Deployment).
    let ds = json!({"tmm": {"targets": [{"namespace": "spk-ingress", "kind": "DaemonSet", "name": "f5-tmm"}]}});
    for w in workloads(&render(&example("spk", ds), "spk-utilities")) {
        assert!(container_env(w).contains(&(
            "DSSM_CERTS_TMM".into(),
            json!("spk-ingress/daemonset/f5-tmm")
        )));
    }
}

/// Labels only Helm adds (its bookkeeping); everything else must be identical.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
];

fn normalised(mut o: Value) -> Value {
    if let Some(labels) = o["metadata"]["labels"].as_object_mut() {
        for l in HELM_LABELS {
            labels.remove(l);
        }
    }
    o
}

fn keyed(objects: Vec<Value>) -> std::collections::BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|o| {
            let key = format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap()
            );
            (key, normalised(o))
        })
        .collect()
}

/// `kubectl kustomize manifests/prometheus-operator`, applied to `namespace` as `-n` would.
fn kustomize_prometheus_operator(namespace: &str) -> Vec<Value> {
    docs(&kustomize(&repo().join("manifests/prometheus-operator")))
        .into_iter()
        .map(|mut o| {
            o["metadata"]["namespace"] = json!(namespace);
            o
        })
        .collect()
}

/// Same settings, same objects: every object the kustomize overlay (plus
/// manifests/prometheus-operator) ships is rendered by the chart identically, Helm's own
/// labels (HELM_LABELS) aside. The chart ships more only behind its toggles (PodMonitor,
/// dashboard).
#[test]
fn the_kustomize_overlays_and_the_chart_render_the_same_objects() {
    for (set, dssm) in [
        ("spk", "spk-utilities"),
        ("cnf", "cnf-gateway"),
        ("spk-multi", "spk-utilities"),
    ] {
        let mut kustomized = docs(&render_overlay(set));
        kustomized.extend(kustomize_prometheus_operator(dssm));
        kustomized.extend(docs(&kustomize(&repo().join("manifests/admission"))));
        let kustomized = keyed(kustomized);
        // The admission policy as a cluster that serves its API gets it (the library renders
        // as `helm template` does, with no API discovery).
        let values = example(
            set,
            json!({"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
                   "admissionPolicy": {"skipApiCheck": true}}),
        );
        let charted = keyed(render(&values, dssm));
        assert_eq!(
            kustomized.keys().collect::<Vec<_>>(),
            charted.keys().collect::<Vec<_>>(),
            "{set}: the same objects"
        );
        for (key, k) in &kustomized {
            assert_eq!(
                serde_json::to_string_pretty(k).unwrap(),
                serde_json::to_string_pretty(&charted[key]).unwrap(),
                "{set}: {key} differs between kustomize (left) and the chart (right)"
            );
        }
    }
}

/// One source for the alert rules: the plain rules file is what the chart's PrometheusRule and
/// the kustomize one carry.
#[test]
fn the_prometheus_rules_are_the_plain_rules_file_everywhere() {
    let plain: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("files/rules.yaml")).unwrap(),
    )
    .unwrap();
    assert!(plain["groups"][0]["rules"].as_array().unwrap().len() >= 6);
    let charted = render(&example("spk", all_on()), "spk-utilities");
    assert_eq!(
        find(&charted, "PrometheusRule", "dssm-certs")["spec"]["groups"],
        plain["groups"]
    );
    let kustomized = kustomize_prometheus_operator("spk-utilities");
    assert_eq!(
        find(&kustomized, "PrometheusRule", "dssm-certs")["spec"]["groups"],
        plain["groups"],
        "manifests/prometheus-operator/prometheusrule.yaml is stale: run scripts/sync-rules"
    );
}
