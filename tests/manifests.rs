//! The shipped manifests: they parse into the Kubernetes types without losing a field, they are
//! locked down, and their Roles allow exactly what the code uses.

use testkit as support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use support::agent::{live_exposition, start_watching, unknown_metrics};
use support::apiserver::{kustomize, render_overlay};
use support::objects::{docs, round_trip};
use support::rbac::{assert_rbac_is_exactly_used, exercise_every_command};
use support::*;

#[test]
fn every_manifest_parses_into_its_type_and_round_trips() {
    for overlay in ["spk", "cnf"] {
        let all = docs(&render_overlay(overlay));
        let kinds: Vec<&str> = all.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for want in [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "CronJob",
            "Deployment",
            "Service",
        ] {
            assert!(kinds.contains(&want), "{overlay} lacks a {want}");
        }
        for d in &all {
            match d["kind"].as_str().unwrap() {
                "ServiceAccount" => round_trip::<ServiceAccount>(d),
                "Role" => round_trip::<Role>(d),
                "RoleBinding" => round_trip::<RoleBinding>(d),
                "CronJob" => round_trip::<CronJob>(d),
                "Deployment" => round_trip::<Deployment>(d),
                "Service" => round_trip::<Service>(d),
                other => panic!("unexpected kind {other} in {overlay}: it would need CRDs"),
            }
        }
    }
    // The Prometheus Operator's objects are apart: a cluster without its CRDs applies the
    // overlays cleanly.
    let kinds: Vec<String> = docs(&render_prometheus_operator())
        .iter()
        .map(|d| {
            assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1");
            assert!(d["metadata"].get("namespace").is_none(), "applied with -n");
            d["kind"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(kinds, ["PrometheusRule", "ServiceMonitor"]);
}

/// `kubectl kustomize manifests/prometheus-operator` (no namespace: applied with -n).
fn render_prometheus_operator() -> String {
    kustomize(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/prometheus-operator"),
    )
}

// Long: a table of settings checked on every CronJob of the overlay, each named in its
// failure message.
#[test]
fn the_cronjobs_never_overlap_and_run_locked_down() {
    let all = docs(&render_overlay("spk"));
    let jobs: Vec<CronJob> = all
        .iter()
        .filter(|d| d["kind"] == "CronJob")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect();
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        let name = job.metadata.name.clone().unwrap();
        let spec = &job.spec;
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"), "{name}");
        let pod = spec
            .job_template
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("dssm-certs"));
        // No automatic repeats of a failed rotation (another outage); time to roll back on
        // SIGTERM.
        assert_eq!(
            spec.job_template.spec.as_ref().unwrap().backoff_limit,
            Some(0),
            "{name}"
        );
        assert!(pod.termination_grace_period_seconds >= Some(60), "{name}");
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example.com/dssm-certs:0.1.0"),
            "kustomize images: applies"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let res = c.resources.as_ref().unwrap();
        assert!(res.requests.is_some() && res.limits.is_some());
        let env: Vec<(String, Option<String>)> = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect();
        assert!(
            env.contains(&(
                "DSSM_CERTS_TMM_NAMESPACE".into(),
                Some("spk-ingress".into())
            )),
            "{env:?}"
        );
        // Unattended runs never take the seeds' traffic-interrupting scale-to-zero.
        assert!(
            env.contains(&("DSSM_CERTS_STRATEGY".into(), Some("rolling".into()))),
            "{name}: {env:?}"
        );
        let args = c.args.clone().unwrap();
        match name.as_str() {
            "dssm-certs-reconcile" => assert_eq!(args[0], "reconcile"),
            "dssm-certs-rotate" => {
                assert_eq!(args[0], "rotate");
                assert_eq!(
                    spec.suspend,
                    Some(true),
                    "the rotation template never runs on its own"
                );
            }
            other => panic!("{other}"),
        }
    }
}

/// Runs every cluster command under the shipped RBAC (which the test cluster enforces, so a
/// missing permission fails the run), then checks that every ServiceAccount used every
/// permission it is granted.
#[test]
fn the_roles_grant_exactly_what_the_code_uses() {
    // Each overlay on a test cluster of its own, side by side.
    side_by_side(vec!["spk", "cnf"], |overlay| {
        let env = if overlay == "spk" {
            TestEnv::spk()
        } else {
            TestEnv::cnf()
        };
        exercise_every_command(overlay, &env);
        assert_rbac_is_exactly_used(overlay, &env, &render_overlay(overlay));
    });
}

/// The regression of the least-privilege split: the agent's account cannot read the CA key, and
/// the agent must still inspect, report and be ready (the 403 means "not available").
#[test]
fn the_agent_without_access_to_the_ca_key_still_reports_every_copy() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let agent = start_watching(&env, &env.agent_kubeconfig, &[]);
    let metrics = support::redis::wait_for("ready", std::time::Duration::from_secs(10), || {
        support::agent::http_get(&agent.addr, "/readyz")?;
        support::agent::http_get(&agent.addr, "/metrics")
    });
    for ns in ["spk-utilities", "spk-ingress"] {
        for key in ["dssm-ca.crt", "dssm-cert.crt"] {
            let line = metrics
                .lines()
                .find(|l| {
                    l.starts_with("dssm_certificate_ready{")
                        && l.contains(&format!("namespace=\"{ns}\""))
                        && l.contains(&format!("key=\"{key}\""))
                })
                .unwrap_or_else(|| panic!("{ns} {key} not reported:\n{metrics}"));
            assert!(line.ends_with(" 1"), "{line}");
        }
    }
    assert!(metrics.contains("dssm_secrets_in_sync 1"), "{metrics}");
    let agent_user = "system:serviceaccount:spk-utilities:dssm-certs-agent";
    let reads: Vec<_> = env
        .server
        .requests()
        .into_iter()
        .filter(|r| r.user == agent_user && r.path.ends_with("/dssm-ca-key-secret"))
        .collect();
    assert!(
        !reads.is_empty() && reads.iter().all(|r| r.status == 403),
        "{reads:?}"
    );
}

#[test]
fn every_alert_parses_as_promql_and_names_only_metrics_the_agent_exports() {
    let all = docs(&render_prometheus_operator());
    let rule = all.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(
        alerts,
        [
            "DssmCertificateExpiringSoon",
            "DssmCertificateExpiryCritical",
            "DssmCertificateInvalid",
            "DssmSecretsOutOfSync",
            "DssmRotationFailed",
            "DssmCertAgentDown",
            "DssmTmmRestartPending",
            "DssmTmmTargetNotReady"
        ]
    );

    let exposition = live_exposition();
    for r in rules {
        let name = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        let unknown = unknown_metrics(expr, &exposition).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            unknown.is_empty(),
            "{name} uses {unknown:?}, which the agent does not export:\n{exposition}"
        );
        for k in ["summary", "description"] {
            assert!(
                r["annotations"][k].as_str().is_some_and(|t| t.len() > 20),
                "{name} lacks a {k}"
            );
        }
        if name.contains("Expir") || name.contains("Rotation") {
            assert!(
                r["annotations"]["description"]
                    .as_str()
                    .unwrap()
                    .contains("kubectl create job --from=cronjob/dssm-certs-rotate"),
                "{name}"
            );
        }
    }
}

#[test]
fn the_agent_deployment_is_probed_on_its_metrics_port() {
    let all = docs(&render_overlay("spk"));
    let d: Deployment = serde_json::from_value(
        all.iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap()
            .clone(),
    )
    .unwrap();
    assert_eq!(d.spec.replicas, Some(1));
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("dssm-certs-agent"),
        "the agent runs as its own read-only account"
    );
    let c = &pod.containers[0];
    assert_eq!(c.args.as_ref().unwrap()[0], "run");
    assert_eq!(
        c.ports.as_ref().unwrap()[0].name.as_deref(),
        Some("metrics")
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone()
    };
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(
        env.contains(&"DSSM_CERTS_TMM_NAMESPACE".to_string()),
        "the spk overlay points the agent at spk-ingress"
    );
    let svc: Service =
        serde_json::from_value(all.iter().find(|d| d["kind"] == "Service").unwrap().clone())
            .unwrap();
    assert_eq!(
        svc.spec.unwrap().ports.unwrap()[0].name.as_deref(),
        Some("metrics")
    );
}
