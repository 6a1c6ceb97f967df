//! The StatefulSet controller (pkg/controller/statefulset/stateful_set_control.go): pods named
//! `<name>-<ordinal>`, a deleted or failed pod is recreated under the same name, and
//! `podManagementPolicy` decides the pace. `OrderedReady` (the default) creates one pod at a
//! time in ordinal order, the next only once every lower one is Running and Ready, and removes
//! surplus pods from the highest ordinal down, one at a time; `Parallel` does both at once. A
//! template change rolls the pods from the highest ordinal down, one at a time, each Ready
//! before the next (updateStrategy RollingUpdate, the default; OnDelete leaves them).

use serde_json::{json, Value};

use super::*;
use crate::store::{resource, State};

fn ordinal(p: &Value, name: &str) -> Option<usize> {
    name_of(p)
        .strip_prefix(&format!("{name}-"))
        .and_then(|i| i.parse().ok())
}

pub(crate) fn sync(s: &mut State, o: &Value) {
    let ns = ns_of(o);
    let name = name_of(o);
    let want = o["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let min_ready = min_ready(o);
    let parallel = o["spec"]["podManagementPolicy"] == json!("Parallel");
    let revision = format!("{name}-{}", template_hash(&o["spec"]["template"]));
    let sel = selector_of(o);
    let pods: Vec<Value> = pods_of(s, &ns, &sel)
        .into_iter()
        .filter(|p| ordinal(p, &name).is_some())
        .collect();
    let by_ordinal = |i: usize| pods.iter().find(|p| ordinal(p, &name) == Some(i)).cloned();
    let healthy =
        |p: &Value| p["status"]["phase"] == json!("Running") && pod_ready(p) && !terminating(p);
    // Failed and Succeeded pods are deleted, then recreated with the same name.
    for p in pods.iter().filter(|p| terminal(p) && !terminating(p)) {
        mark_terminating(s, &ns, &name_of(p));
    }
    // Create the missing ordinals.
    for i in 0..want {
        match by_ordinal(i) {
            None => {
                let pod = new_pod(
                    o,
                    "StatefulSet",
                    &format!("{name}-{i}"),
                    &[
                        ("controller-revision-hash", &revision),
                        ("statefulset.kubernetes.io/pod-name", &format!("{name}-{i}")),
                    ],
                );
                s.put(resource("", "pods"), &ns, pod);
                if !parallel {
                    break;
                }
            }
            Some(p) if !parallel && !healthy(&p) => break,
            Some(_) => {}
        }
    }
    // Remove the surplus ordinals, highest first.
    let mut surplus: Vec<&Value> = pods
        .iter()
        .filter(|p| ordinal(p, &name).is_some_and(|i| i >= want))
        .collect();
    surplus.sort_by_key(|p| std::cmp::Reverse(ordinal(p, &name)));
    let all_healthy = (0..want).all(|i| by_ordinal(i).is_some_and(|p| healthy(&p)));
    if parallel {
        for p in &surplus {
            mark_terminating(s, &ns, &name_of(p));
        }
    } else if let Some(p) = surplus.first() {
        if all_healthy && !surplus.iter().any(|p| terminating(p)) {
            mark_terminating(s, &ns, &name_of(p));
        }
    }
    // Roll pods of an older revision, highest ordinal first, one at a time.
    let rolling = o["spec"]["updateStrategy"]["type"] != json!("OnDelete");
    if rolling && all_healthy && surplus.is_empty() {
        if let Some(p) = (0..want)
            .rev()
            .filter_map(by_ordinal)
            .find(|p| p["metadata"]["labels"]["controller-revision-hash"] != json!(revision))
        {
            mark_terminating(s, &ns, &name_of(&p));
        }
    }
    let pods: Vec<Value> = pods_of(s, &ns, &sel)
        .into_iter()
        .filter(|p| ordinal(p, &name).is_some() && active(p))
        .collect();
    let updated = pods
        .iter()
        .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == json!(revision))
        .count();
    // currentRevision moves to the update revision once every pod runs it.
    let current_revision = if updated == pods.len() && pods.len() == want {
        revision.clone()
    } else {
        o["status"]["currentRevision"]
            .as_str()
            .unwrap_or(&revision)
            .to_string()
    };
    let current = pods
        .iter()
        .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == json!(current_revision))
        .count();
    let status = json!({
        "observedGeneration": o["metadata"]["generation"],
        "replicas": pods.len(),
        "readyReplicas": pods.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": pods.iter().filter(|p| available(s, p, min_ready)).count(),
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": revision,
        "collisionCount": 0,
    });
    set_status(s, "statefulsets", o, status);
}
