//! The shipped manifests: they parse into the Kubernetes types without losing a field, they are
//! locked down, and their Roles allow exactly what the code uses.

mod support;

use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::ServiceAccount;
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
        for want in ["ServiceAccount", "Role", "RoleBinding", "CronJob"] {
            assert!(kinds.contains(&want), "{overlay} lacks a {want}");
        }
        for d in &all {
            match d["kind"].as_str().unwrap() {
                "ServiceAccount" => round_trip::<ServiceAccount>(d),
                "Role" => round_trip::<Role>(d),
                "RoleBinding" => round_trip::<RoleBinding>(d),
                "CronJob" => round_trip::<CronJob>(d),
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
