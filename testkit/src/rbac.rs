//! The RBAC check shared by the kustomize and Helm chart tests: run every cluster command under
//! the rendered Roles (the test cluster enforces them), then prove each ServiceAccount used every
//! permission it is granted.

use super::agent::start_watching;
use super::apiserver::{attributes, rbac_from_manifests};
use super::TestEnv;

/// Every cluster command as the writer account, then the agent: with a (closed) maintenance
/// window as the writer, and without one as its own read-only account, with thresholds that
/// make it publish Events.
pub fn exercise_every_command(what: &str, env: &TestEnv) {
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
        // `--strategy rolling` needs Redis behind the pods: tests/rotation_cluster.rs runs it
        // (rotate, rotate --ca, reconcile) under the spk overlay's Roles with real processes.
    ];
    for step in steps {
        let (code, out, err) = env.run(step);
        assert_eq!(code, 0, "{what} {step:?}: {out}{err}");
    }
    if env.tmm_ns != env.dssm_ns {
        rotate_a_tmm_that_cannot_surge(what, env);
    }
    drop(start_watching(
        env,
        &env.kubeconfig,
        &["--maintenance-window", "0 3 29 2 * 1m"],
    ));
    // Every certificate "expiring": two Events on each copy's Secret, the second one counted
    // into the first (a patch).
    let agent = start_watching(env, &env.agent_kubeconfig, &["--warn", "5000d"]);
    super::redis::wait_for(
        "the agent's Events",
        std::time::Duration::from_secs(15),
        || {
            let patched = |ns: &str| {
                env.server.requests().iter().any(|r| {
                    r.method == "PATCH"
                        && r.path
                            .starts_with(&format!("/apis/events.k8s.io/v1/namespaces/{ns}/events/"))
                })
            };
            env.copy_namespaces()
                .iter()
                .all(|ns| patched(ns))
                .then_some(())
        },
    );
    drop(agent);
}

/// No request was refused but the agent's read of the CA key (it must be refused), and each
/// account used every (verb, resource, name) its Roles grant in each namespace.
pub fn assert_rbac_is_exactly_used(what: &str, env: &TestEnv, rendered: &str) {
    let agent_user = format!("system:serviceaccount:{}:dssm-certs-agent", env.dssm_ns);
    let requests = env.server.requests();
    let (ca_key_refused, forbidden): (Vec<_>, Vec<_>) =
        requests.iter().filter(|r| r.status == 403).partition(|r| {
            r.user == agent_user
                && r.method == "GET"
                && r.path
                    == format!(
                        "/api/v1/namespaces/{}/secrets/dssm-ca-key-secret",
                        env.dssm_ns
                    )
        });
    assert!(
        forbidden.is_empty(),
        "{what}: the Roles are missing {forbidden:?}"
    );
    // The key Secret authenticates as dSSM and as every TMM: the agent never asks for it.
    let key_reads: Vec<_> = requests
        .iter()
        .filter(|r| r.user == agent_user)
        .filter(|r| {
            attributes(r).is_some_and(|(_, _, res, _, name)| {
                res == "secrets" && name.as_deref() == Some("dssm-keys-secret")
            })
        })
        .collect();
    assert!(
        key_reads.is_empty(),
        "{what}: the agent read dssm-keys-secret: {key_reads:?}"
    );
    assert!(
        !ca_key_refused.is_empty(),
        "{what}: the agent tried to read the CA key and must have been refused"
    );

    for (user, by_ns) in &rbac_from_manifests(rendered) {
        let used: Vec<_> = requests
            .iter()
            .filter(|r| &r.user == user && r.status != 403)
            .filter_map(attributes)
            .collect();
        for (ns, rules) in by_ns {
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
                            assert!(hit, "{what}: {ns} grants {user} {verb} {resource} {name:?} but nothing used it");
                        }
                    }
                }
            }
        }
    }
}

/// A TMM that cannot surge (a `Recreate` Deployment, an `OnDelete` DaemonSet) is replaced by
/// the tool pod by pod through the Eviction API in its own namespace: a rolling `rotate` of
/// every target, with real Redis behind the dSSM pods (the bed).
fn rotate_a_tmm_that_cannot_surge(what: &str, env: &TestEnv) {
    let targets = if env.tmm_targets.is_empty() {
        vec![format!("{}/deployment/f5-tmm", env.tmm_ns)]
    } else {
        env.tmm_targets.clone()
    };
    for t in &targets {
        let [ns, kind, name] = <[&str; 3]>::try_from(t.split('/').collect::<Vec<_>>()).unwrap();
        let plural = format!("{kind}s");
        let mut w = env.server.get("apps", &plural, ns, name).unwrap();
        if kind == "deployment" {
            w["spec"]["strategy"] = serde_json::json!({"type": "Recreate"});
        } else {
            w["spec"]["updateStrategy"] = serde_json::json!({"type": "OnDelete"});
        }
        env.server.put("apps", &plural, ns, w);
    }
    let load = super::load::LoadConfig {
        clients: targets.len().max(2),
        ..Default::default()
    };
    let (bed, load) = super::dssm_pods::Bed::start(env, load);
    let args = super::dssm_pods::rotate_args(false, None);
    let (code, out, err) = super::dssm_pods::run(env, &bed, &args);
    drop(super::dssm_pods::finish(bed, load));
    assert_eq!(
        code, 0,
        "{what} {args:?} (TMM that cannot surge): {out}{err}"
    );
    assert_eq!(
        out.matches("replaced one at a time").count(),
        targets.len(),
        "{what}: {out}"
    );
}
