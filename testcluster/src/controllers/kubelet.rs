//! The simulated kubelet: a new pod is Running and Ready after `Timing::pod_start`, a deleted
//! one goes away after `Timing::pod_grace`, and a failed one stays listed, phase Failed, until
//! someone deletes it (pod garbage collection only starts at 12,500 terminated pods:
//! --terminated-pod-gc-threshold, pkg/controller/podgc/gc_controller.go).

use std::time::Instant;

use serde_json::{json, Value};

use super::{pod_ready, terminal, terminating};
use crate::store::{now_rfc3339, resource, State};

pub(crate) fn sync(s: &mut State) {
    let pods_res = resource("", "pods");
    let now = Instant::now();
    let pods: Vec<Value> = s.list(pods_res, None).into_iter().cloned().collect();
    for p in pods {
        let ns = p["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = p["metadata"]["name"].as_str().unwrap().to_string();
        let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
        if terminating(&p) {
            if s.stuck_terminating
                .iter()
                .any(|x| name.starts_with(x.as_str()))
            {
                continue;
            }
            let since = *s
                .pod_timers
                .entry((uid.clone(), "del".into()))
                .or_insert(now);
            // A terminal pod has no containers left to stop; the others stop within
            // `pod_grace`, and are killed when their grace period runs out.
            let grace =
                super::deletion_grace(&p).map_or(s.timing.pod_grace, |g| g.min(s.timing.pod_grace));
            if terminal(&p) || now.duration_since(since) >= grace {
                s.remove(pods_res, &ns, &name);
            }
        } else if !pod_ready(&p) && !terminal(&p) {
            let since = *s
                .pod_timers
                .entry((uid.clone(), String::new()))
                .or_insert(now);
            if now.duration_since(since) >= s.timing.pod_start
                && !s.never_ready.iter().any(|x| name.starts_with(x.as_str()))
            {
                let mut p = p.clone();
                let t = now_rfc3339();
                p["status"] = json!({"phase": "Running", "startTime": t, "conditions": [
                    {"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": t}, {"type": "PodScheduled", "status": "True"}]});
                s.ready_at.insert(uid.clone(), now);
                s.put(pods_res, &ns, p);
            }
        }
    }
}

/// Fails a pod as node-pressure eviction does (pkg/kubelet/eviction/eviction_manager.go
/// evictPod: phase Failed, reason Evicted, the message names the resource).
pub(crate) fn fail(s: &mut State, ns: &str, name: &str, reason: &str) {
    let pods_res = resource("", "pods");
    let Some(mut p) = s.get(pods_res, ns, name).cloned() else {
        panic!("fail_pod: no pod {ns}/{name}");
    };
    let t = now_rfc3339();
    p["status"]["phase"] = json!("Failed");
    p["status"]["reason"] = json!(reason);
    p["status"]["message"] = json!(format!("The node was low on resource: memory. ({reason})"));
    p["status"]["conditions"] = json!([
        {"type": "Ready", "status": "False", "reason": "PodFailed", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": "False", "reason": "PodFailed"},
        {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "lastTransitionTime": t}]);
    if let Some(uid) = p["metadata"]["uid"].as_str() {
        s.ready_at.remove(uid);
    }
    s.put(pods_res, ns, p);
}
