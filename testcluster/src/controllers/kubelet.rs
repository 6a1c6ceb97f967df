//! The simulated kubelet: a new pod is Running and Ready after `Timing::pod_start`, a deleted
//! one goes away after `Timing::pod_grace`, and a failed one stays listed, phase Failed, until
//! someone deletes it (pod garbage collection only starts at 12,500 terminated pods:
//! --terminated-pod-gc-threshold, pkg/controller/podgc/gc_controller.go).
//!
//! A pod whose volumes name a Secret (or a key of one) that does not exist, and not as
//! `optional: true`, waits as a real kubelet keeps it: kubelet's syncPod writes the pod's status
//! (generateAPIPodStatus: phase Pending, each container waiting with reason ContainerCreating,
//! Ready False) and then blocks in the volume manager's WaitForAttachAndMount, before the
//! sandbox exists, so the pod has a hostIP but no podIP yet. The volume manager retries the
//! failed mount with exponential backoff (pkg/util/goroutinemap/exponentialbackoff: 500 ms,
//! doubled on each failure, capped at 2 min 2 s; `Timing::mount_retry`, scaled down): the mount
//! succeeds at the first retry after the Secret appears, so a pod that waited long starts
//! noticeably later than the Secret appears, and `Timing::pod_start` after that mount. A started
//! pod gets its own
//! loopback address (127.0.0.0/8 only: tests connect to pod IPs), a new one on every new pod.

use std::time::Instant;

use serde_json::{json, Value};

use super::{pod_ready, terminal, terminating};
use crate::store::{resource, State};

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
            if mount_fails(s, &uid, &ns, &p, now) {
                // The start delay counts from when the mount succeeds.
                s.pod_timers.remove(&(uid.clone(), String::new()));
                let status = waiting_status(&p, &s.now_rfc3339());
                if p["status"] != status {
                    let mut p = p.clone();
                    p["status"] = status;
                    s.put(pods_res, &ns, p);
                }
                continue;
            }
            let since = *s
                .pod_timers
                .entry((uid.clone(), String::new()))
                .or_insert(now);
            if now.duration_since(since) >= s.timing.pod_start
                && !s.never_ready.iter().any(|x| name.starts_with(x.as_str()))
            {
                let mut p = p.clone();
                let t = s.now_rfc3339();
                let ip = next_pod_ip(s);
                p["status"] = json!({"phase": "Running", "startTime": t, "conditions": [
                    {"type": "PodReadyToStartContainers", "status": "True"},
                    {"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": t}, {"type": "PodScheduled", "status": "True"}],
                    "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": ip, "podIPs": [{"ip": ip}],
                    "containerStatuses": container_statuses(&p, json!({"running": {"startedAt": t}}), true)});
                s.ready_at.insert(uid.clone(), now);
                s.put(pods_res, &ns, p);
            }
        }
    }
}

/// Whether the pod's volumes are still not mounted at `now`: before the next retry the backoff
/// allows, the last failure stands; at a retry, a missing Secret fails it again and doubles the
/// wait before the next (nestedpendingoperations keeps one backoff per volume operation; one per
/// pod here).
fn mount_fails(s: &mut State, uid: &str, ns: &str, pod: &Value, now: Instant) -> bool {
    let last = (uid.to_string(), "mount-failed".to_string());
    let next = (uid.to_string(), "mount-retry".to_string());
    if s.pod_timers.get(&next).is_some_and(|n| now < *n) {
        return true;
    }
    if missing_secret(s, ns, pod).is_none() {
        return false;
    }
    let wait = match (s.pod_timers.get(&last), s.pod_timers.get(&next)) {
        (Some(l), Some(n)) => (n.duration_since(*l) * 2).min(s.timing.mount_retry_max),
        _ => s.timing.mount_retry,
    };
    s.pod_timers.insert(last, now);
    s.pod_timers.insert(next, now + wait);
    true
}

/// Every simulated node's address: a loopback one, as every address the test cluster hands out.
const HOST_IP: &str = "127.0.0.1";

/// The next pod IP: 127.100.0.1, 127.100.0.2, … (never 127.0.0.1, the host's; never reused, as
/// a new sandbox gets a new address from the node's pod CIDR).
fn next_pod_ip(s: &mut State) -> String {
    s.pod_ips += 1;
    let n = s.pod_ips;
    format!(
        "127.{}.{}.{}",
        100 + (n >> 16) % 150,
        (n >> 8) & 0xff,
        n & 0xff
    )
}

/// The first Secret the pod's volumes need that is missing, as kubelet's mount error names it:
/// a `secret` volume or a projected volume's `secret` source, not `optional: true`, whose
/// Secret does not exist or lacks a key listed in `items` (pkg/volume/secret/secret.go SetUpAt,
/// pkg/volume/projected/projected.go).
fn missing_secret(s: &State, ns: &str, pod: &Value) -> Option<String> {
    let volumes = pod["spec"]["volumes"].as_array()?;
    let sources = volumes.iter().flat_map(|v| {
        let projected = v["projected"]["sources"].as_array().into_iter().flatten();
        std::iter::once(&v["secret"])
            .chain(projected.map(|src| &src["secret"]))
            .filter(|src| src.is_object())
            .map(move |src| (v["name"].as_str().unwrap_or(""), src))
    });
    for (volume, src) in sources {
        if src["optional"] == json!(true) {
            continue;
        }
        let name = src["secretName"]
            .as_str()
            .or_else(|| src["name"].as_str())
            .unwrap_or("");
        let Some(secret) = s.get(resource("", "secrets"), ns, name) else {
            return Some(format!(
                "MountVolume.SetUp failed for volume \"{volume}\" : secret \"{name}\" not found"
            ));
        };
        for item in src["items"].as_array().into_iter().flatten() {
            let key = item["key"].as_str().unwrap_or("");
            let has = |field: &str| secret[field].get(key).is_some();
            if !has("data") && !has("stringData") {
                return Some(format!(
                    "MountVolume.SetUp failed for volume \"{volume}\" : references non-existent secret key: {key}"
                ));
            }
        }
    }
    None
}

/// What a pod waiting for its volumes shows (pkg/kubelet/kubelet_pods.go
/// generateAPIPodStatus): Pending, scheduled and initialized, containers waiting in
/// ContainerCreating, not Ready, a host IP and no pod IP. The mount error itself is in no field
/// (kubelet reports it as a FailedMount Event).
fn waiting_status(pod: &Value, now: &str) -> Value {
    let names: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let not_ready = format!("containers with unready status: [{}]", names.join(" "));
    let start = pod["status"]["startTime"].clone();
    let start = if start.is_string() { start } else { json!(now) };
    json!({"phase": "Pending", "startTime": start, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "False"},
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": not_ready},
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "message": not_ready},
            {"type": "PodScheduled", "status": "True"}],
        "containerStatuses": container_statuses(pod, json!({"waiting": {"reason": "ContainerCreating"}}), false)})
}

/// One status per container of the spec, all in `state`.
fn container_statuses(pod: &Value, state: Value, ready: bool) -> Value {
    let statuses: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready,
                "restartCount": 0, "started": ready, "state": state})
        })
        .collect();
    json!(statuses)
}

/// Fails a pod as node-pressure eviction does (pkg/kubelet/eviction/eviction_manager.go
/// evictPod: phase Failed, reason Evicted, the message names the resource).
pub(crate) fn fail(s: &mut State, ns: &str, name: &str, reason: &str) {
    let pods_res = resource("", "pods");
    let Some(mut p) = s.get(pods_res, ns, name).cloned() else {
        panic!("fail_pod: no pod {ns}/{name}");
    };
    let t = s.now_rfc3339();
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
