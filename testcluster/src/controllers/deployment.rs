//! The Deployment controller, with its ReplicaSets folded in: pods carry the pod-template-hash of
//! the template they were made from. A template change (e.g. the
//! `kubectl.kubernetes.io/restartedAt` annotation `kubectl rollout restart` sets) rolls the pods
//! within maxSurge / maxUnavailable, as pkg/controller/deployment/rolling.go does
//! (reconcileNewReplicaSet, reconcileOldReplicaSets, cleanupUnhealthyReplicas,
//! scaleDownOldReplicaSetsForRollingUpdate); `Recreate` removes every old pod first
//! (recreate.go). Status as sync.go calculateStatus computes it.

use serde_json::{json, Value};

use super::*;
use crate::store::{resource, State};

/// maxSurge and maxUnavailable resolved against `want` (default 25% each; surge rounds up,
/// unavailable down; both 0 means unavailable 1): deployment/util ResolveFenceposts.
fn fenceposts(o: &Value, want: usize) -> (usize, usize) {
    let ru = &o["spec"]["strategy"]["rollingUpdate"];
    let surge = scaled(&ru["maxSurge"], want, "25%", true);
    let unavailable = scaled(&ru["maxUnavailable"], want, "25%", false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

pub(crate) fn sync(s: &mut State, o: &Value) {
    let ns = ns_of(o);
    let name = name_of(o);
    let want = o["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let min_ready = min_ready(o);
    let hash = template_hash(&o["spec"]["template"]);
    let sel = selector_of(o);
    let is_new = |p: &Value| p["metadata"]["labels"]["pod-template-hash"] == json!(hash);
    let make = |s: &mut State| {
        let id = s.next_rv();
        let pod = new_pod(
            o,
            "ReplicaSet",
            &format!("{name}-{hash}-{id:05x}"),
            &[("pod-template-hash", &hash)],
        );
        s.put(resource("", "pods"), &ns, pod);
    };
    let pods: Vec<Value> = pods_of(s, &ns, &sel).into_iter().filter(active).collect();
    let (new, old): (Vec<&Value>, Vec<&Value>) = pods.iter().partition(|p| is_new(p));
    let recreate = o["spec"]["strategy"]["type"] == json!("Recreate");
    if want == 0 {
        for p in &pods {
            mark_terminating(s, &ns, &name_of(p));
        }
    } else if recreate && !old.is_empty() {
        for p in &old {
            mark_terminating(s, &ns, &name_of(p));
        }
    } else if recreate
        && pods_of(s, &ns, &sel)
            .iter()
            .any(|p| terminating(p) && !is_new(p))
    {
        // Recreate waits until the old pods are gone before making new ones.
    } else {
        let (surge, max_unavailable) = fenceposts(o, want);
        // Scale the new pods up, within want + maxSurge in total.
        if new.len() < want {
            let room = (want + surge).saturating_sub(pods.len());
            for _ in 0..room.min(want - new.len()) {
                make(s);
            }
        } else if new.len() > want {
            for p in &new[want..] {
                mark_terminating(s, &ns, &name_of(p));
            }
        }
        // Scale the old pods down without going under want - maxUnavailable available.
        if !old.is_empty() {
            let min_available = want.saturating_sub(max_unavailable);
            let new_unavailable = new.iter().filter(|p| !available(s, p, min_ready)).count();
            let budget = pods.len().saturating_sub(min_available + new_unavailable);
            let (healthy, unhealthy): (Vec<&Value>, Vec<&Value>) =
                old.iter().partition(|p| available(s, p, min_ready));
            let cleaned = unhealthy.len().min(budget);
            terminate_up_to(s, &unhealthy[..cleaned], cleaned);
            let available_now =
                new.iter().filter(|p| available(s, p, min_ready)).count() + healthy.len();
            terminate_up_to(s, &healthy, available_now.saturating_sub(min_available));
        }
    }
    let pods: Vec<Value> = pods_of(s, &ns, &sel).into_iter().filter(active).collect();
    let ready = pods.iter().filter(|p| pod_ready(p)).count();
    let avail = pods.iter().filter(|p| available(s, p, min_ready)).count();
    let updated = pods.iter().filter(|p| is_new(p)).count();
    let (_, max_unavailable) = fenceposts(o, want);
    let min_ok = avail >= want.saturating_sub(max_unavailable);
    let complete = updated == want && pods.len() == want && avail == want;
    let status = json!({
        "observedGeneration": o["metadata"]["generation"],
        "replicas": pods.len(),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "unavailableReplicas": want.saturating_sub(avail),
        "conditions": [
            {"type": "Available", "status": if min_ok {"True"} else {"False"},
             "reason": if min_ok {"MinimumReplicasAvailable"} else {"MinimumReplicasUnavailable"},
             "message": if min_ok {"Deployment has minimum availability."} else {"Deployment does not have minimum availability."}},
            {"type": "Progressing", "status": "True",
             "reason": if complete {"NewReplicaSetAvailable"} else {"ReplicaSetUpdated"},
             "message": format!("ReplicaSet \"{name}-{hash}\" {}", if complete {"has successfully progressed."} else {"is progressing."})},
        ],
    });
    set_status(s, "deployments", o, status);
}
