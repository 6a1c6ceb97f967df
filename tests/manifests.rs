//! The shipped manifests: they parse into the Kubernetes types without losing a field, they are
//! locked down, and their Roles allow exactly what the code uses.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::Value;
use support::apiserver::{attributes, rbac_from_manifests, render_overlay};
use support::*;

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
    let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:#}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, v,
        "{} {} lost or changed fields",
        v["kind"], v["metadata"]["name"]
    );
}

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
            "PrometheusRule",
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
                // A CRD: no k8s-openapi type; checked by the PromQL test below.
                "PrometheusRule" => assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1"),
                other => panic!("unexpected kind {other} in {overlay}"),
            }
        }
    }
}

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
/// missing permission fails the run), then checks that every permission was used.
#[test]
fn the_roles_grant_exactly_what_the_code_uses() {
    for (overlay, env) in [("spk", TestEnv::spk()), ("cnf", TestEnv::cnf())] {
        // Pods take a second to be Ready, so the waits cannot be satisfied by their first list.
        env.server
            .with_state(|s| s.timing.pod_start = std::time::Duration::from_secs(1));
        let steps: &[&[&str]] = &[
            &["reconcile", "--dry-run"],
            &[
                "reconcile",
                "--key-algorithm",
                "ecdsa-p256",
                "--dhparam",
                "ffdhe2048",
            ],
            &["reconcile"],
            &["check"],
            &["rotate", "--key-algorithm", "ecdsa-p256"],
            &["rotate", "--ca", "--key-algorithm", "ecdsa-p256"],
            // TMM is still starting when its wait begins: the wait watches the Deployment.
            &["restart", "--order", "dssm-first"],
            &["restart", "--strategy", "rolling"],
        ];
        for step in steps {
            let (code, out, err) = env.run(step);
            assert_eq!(code, 0, "{overlay} {step:?}: {out}{err}");
        }
        // The agent: it lists and watches each Secret by name.
        drop(run_agent_until_it_watched(&env));
        let forbidden: Vec<_> = env
            .server
            .requests()
            .into_iter()
            .filter(|r| r.status == 403)
            .collect();
        assert!(
            forbidden.is_empty(),
            "{overlay}: the Roles are missing {forbidden:?}"
        );

        let used: Vec<_> = env
            .server
            .requests()
            .iter()
            .filter_map(attributes)
            .collect();
        let (_, rbac) = rbac_from_manifests(&render_overlay(overlay));
        for (ns, rules) in &rbac {
            for rule in rules {
                for verb in &rule.verbs {
                    for resource in &rule.resources {
                        let names: Vec<Option<&String>> = if rule.resource_names.is_empty() {
                            vec![None]
                        } else {
                            rule.resource_names.iter().map(Some).collect()
                        };
                        for name in names {
                            let hit = used.iter().any(|(v, g, r, n, obj)| {
                                v == verb
                                    && rule.api_groups.contains(g)
                                    && r == resource
                                    && n == ns
                                    && name.is_none_or(|want| obj.as_ref() == Some(want))
                            });
                            assert!(hit, "{overlay}: {ns} grants {verb} {resource} {name:?} but nothing used it");
                        }
                    }
                }
            }
        }
    }
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `run` and waits until it has listed and watched each of its Secrets.
fn run_agent_until_it_watched(env: &TestEnv) -> (Killed, String) {
    let addr = format!("127.0.0.1:{}", support::redis::free_port());
    let child = bin()
        .env("KUBECONFIG", &env.kubeconfig)
        .args([
            "run",
            "--listen",
            &addr,
            "--interval",
            "1s",
            "--dssm-namespace",
            &env.dssm_ns,
            "--tmm-namespace",
            &env.tmm_ns,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent = Killed(child);
    support::redis::wait_for(
        "the agent's watches",
        std::time::Duration::from_secs(15),
        || {
            let reqs = env.server.requests();
            let watched = |ns: &str, name: &str| {
                reqs.iter().any(|r| {
                    r.path == format!("/api/v1/namespaces/{ns}/secrets")
                        && r.query.contains("watch=true")
                        && r.query.contains(name)
                })
            };
            let mut wanted = vec![(env.dssm_ns.as_str(), "dssm-ca-key-secret")];
            for ns in [env.dssm_ns.as_str(), env.tmm_ns.as_str()] {
                wanted.push((ns, "dssm-certs-secret"));
                wanted.push((ns, "dssm-keys-secret"));
            }
            wanted.iter().all(|(ns, n)| watched(ns, n)).then_some(())
        },
    );
    (agent, addr)
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.contains(" 200 ").then(|| {
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    })
}

fn metric_names(e: &promql_parser::parser::Expr, out: &mut Vec<String>) {
    use promql_parser::parser::Expr;
    match e {
        Expr::VectorSelector(v) => out.extend(v.name.clone()),
        Expr::MatrixSelector(m) => out.extend(m.vs.name.clone()),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Aggregate(a) => metric_names(&a.expr, out),
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        _ => {}
    }
}

#[test]
fn every_alert_parses_as_promql_and_names_only_metrics_the_agent_exports() {
    let all = docs(&render_overlay("spk"));
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
            "DssmCertAgentDown"
        ]
    );

    // The live exposition of a running agent.
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let (_agent, addr) = run_agent_until_it_watched(&env);
    let exposition = support::redis::wait_for(
        "/metrics with certificates",
        std::time::Duration::from_secs(10),
        || {
            http_get(&addr, "/metrics")
                .filter(|m| m.contains("dssm_certificate_not_after_timestamp_seconds{"))
        },
    );
    let exported: Vec<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();

    for r in rules {
        let name = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        let parsed =
            promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{name}: {expr}: {e}"));
        let mut names = Vec::new();
        metric_names(&parsed, &mut names);
        assert!(!names.is_empty(), "{name} uses no metric");
        for n in names {
            // `up` is written by Prometheus for every scrape target, not by the agent.
            if n == "up" {
                continue;
            }
            // Counters are exposed with their _total suffix; rotation failures appear only
            // after the first rotation, so their HELP/TYPE line is what the agent declares.
            let declared =
                exposition.contains(&format!("# TYPE {} ", n.trim_end_matches("_total")));
            assert!(
                exported.contains(&n) || declared,
                "{name} uses {n}, which the agent does not export:\n{exposition}"
            );
        }
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
