//! The controllers a restart depends on, run under the store's lock every 10 ms after a
//! change (every 50 ms while nothing changes, see `IDLE_PASS`): the kubelet
//! (pods start, become Ready, terminate, fail), Deployments, StatefulSets, DaemonSets, and the
//! PodDisruptionBudget status (`crate::disruption`).

pub mod daemonset;
pub mod deployment;
pub mod kubelet;
pub mod statefulset;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::logic::{labels_match, Req};
use crate::store::{resource, State};
use crate::Shared;

/// How often the controllers look again at a store nothing changed since their last pass:
/// only their timers (pod start, grace, minReadySeconds) can then make them act, and those are
/// hundreds of milliseconds. After any change they run at every tick (10 ms). A real kubelet
/// notices its containers' state once a second (PLEG relist), so this is not kinder.
const IDLE_PASS: Duration = Duration::from_millis(50);

/// The store's resourceVersion after the controllers' last pass, and when that pass ran.
pub(crate) struct LastPass {
    rv: u64,
    at: Instant,
}

impl LastPass {
    pub(crate) fn new() -> LastPass {
        LastPass {
            rv: u64::MAX,
            at: Instant::now(),
        }
    }
}

/// One pass of every controller, unless nothing changed since the last one and it ran less
/// than `IDLE_PASS` ago; wakes the watches when anything changed.
pub(crate) fn run(shared: &Shared, last: &mut LastPass) {
    let changed = {
        let mut s = shared.state.lock().unwrap();
        let before = s.resource_version();
        if before == last.rv && last.at.elapsed() < IDLE_PASS {
            return;
        }
        kubelet::sync(&mut s);
        each(&mut s, "deployments", deployment::sync);
        each(&mut s, "statefulsets", statefulset::sync);
        each(&mut s, "daemonsets", daemonset::sync);
        crate::disruption::sync_all(&mut s);
        let changed = s.resource_version() != before;
        // A pass that changed something is followed by another at the next tick: what one
        // controller wrote (a new pod) is what the next one (the kubelet) must see at once.
        *last = LastPass {
            rv: if changed { u64::MAX } else { before },
            at: Instant::now(),
        };
        changed
    };
    if changed {
        shared.notify.notify_waiters();
    }
}

/// Runs a workload controller's `sync` on every object of `plural` (group apps).
fn each(s: &mut State, plural: &str, sync: fn(&mut State, &Value)) {
    let owners: Vec<Value> = s
        .list(resource("apps", plural), None)
        .into_iter()
        .cloned()
        .collect();
    for o in owners {
        sync(s, &o);
    }
}

/// Deletes up to `n` of `pods` gracefully, in order.
pub(crate) fn terminate_up_to(s: &mut State, pods: &[&Value], n: usize) {
    for p in pods.iter().take(n) {
        mark_terminating(s, &ns_of(p), &name_of(p));
    }
}

pub fn pod_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub fn terminating(p: &Value) -> bool {
    p["metadata"]
        .get("deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Failed or Succeeded: the pod's containers will not run again.
pub fn terminal(p: &Value) -> bool {
    matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded"))
}

/// What the controllers count as a live replica: neither terminal nor being deleted
/// (pkg/controller/controller_utils.go IsPodActive).
pub fn active(p: &Value) -> bool {
    !terminating(p) && !terminal(p)
}

/// Ready for at least `min_ready` (pkg/api/v1/pod/util.go IsPodAvailable; the Ready time is
/// when the simulated kubelet set the condition).
pub fn available(s: &State, p: &Value, min_ready: Duration) -> bool {
    pod_ready(p)
        && p["metadata"]["uid"]
            .as_str()
            .and_then(|uid| s.ready_at.get(uid))
            .is_some_and(|t| Instant::now().duration_since(*t) >= min_ready)
}

/// `spec.minReadySeconds` of a workload.
pub(crate) fn min_ready(o: &Value) -> Duration {
    Duration::from_secs(o["spec"]["minReadySeconds"].as_u64().unwrap_or(0))
}

/// A workload's `spec.selector` (matchLabels and matchExpressions) as label requirements.
pub fn selector_of(o: &Value) -> Vec<Req> {
    label_selector(&o["spec"]["selector"])
}

/// A metav1.LabelSelector as requirements; an empty selector has none (matches everything).
pub fn label_selector(sel: &Value) -> Vec<Req> {
    let mut reqs: Vec<Req> = sel["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| Req::Eq(k.clone(), v.as_str().unwrap_or("").into()))
                .collect()
        })
        .unwrap_or_default();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or("").to_string();
        let values: Vec<String> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        reqs.push(match e["operator"].as_str() {
            Some("In") => Req::In(key, values),
            Some("NotIn") => Req::NotIn(key, values),
            Some("Exists") => Req::Exists(key),
            _ => Req::NotExists(key),
        });
    }
    reqs
}

/// The pods in `ns` that `sel` selects, terminal and terminating ones included.
pub(crate) fn pods_of(s: &State, ns: &str, sel: &[Req]) -> Vec<Value> {
    s.list(resource("", "pods"), Some(ns))
        .into_iter()
        .filter(|p| labels_match(sel, p))
        .cloned()
        .collect()
}

/// Like the pod-template-hash / controller-revision-hash: pods of another template are "old".
pub(crate) fn template_hash(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

/// A new pod from `owner`'s template, Pending and not Ready; the kubelet does the rest.
pub(crate) fn new_pod(
    owner: &Value,
    owner_kind: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Value {
    let template = &owner["spec"]["template"];
    let mut meta = template["metadata"].clone();
    if !meta.is_object() {
        meta = json!({});
    }
    meta["name"] = json!(name);
    for (k, v) in labels {
        meta["labels"][*k] = json!(v);
    }
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": owner_kind,
        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "controller": true,
        "blockOwnerDeletion": true}]);
    json!({"metadata": meta, "spec": template["spec"],
        "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}})
}

pub(crate) fn name_of(o: &Value) -> String {
    o["metadata"]["name"].as_str().unwrap_or("").to_string()
}

pub(crate) fn ns_of(o: &Value) -> String {
    o["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Starts a graceful deletion: the pod stays listed, terminating, until the kubelet is done.
/// The grace period is the pod's own `terminationGracePeriodSeconds` (default 30).
pub fn mark_terminating(s: &mut State, ns: &str, name: &str) {
    mark_terminating_with_grace(s, ns, name, None);
}

/// A deletion with `grace` seconds (DeleteOptions.gracePeriodSeconds; None: the pod's
/// `terminationGracePeriodSeconds`, default 30), as the registry's BeforeDelete sets it:
/// deletionGracePeriodSeconds = grace, deletionTimestamp = now + grace. A grace of 0 removes
/// the pod at once. A deletion already under way is only ever shortened.
pub fn mark_terminating_with_grace(s: &mut State, ns: &str, name: &str, grace: Option<i64>) {
    let pods_res = resource("", "pods");
    let Some(mut p) = s.get(pods_res, ns, name).cloned() else {
        return;
    };
    let grace = grace
        .or_else(|| p["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0);
    if terminating(&p)
        && p["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .is_some_and(|g| g <= grace)
    {
        return;
    }
    if grace == 0 {
        s.remove(pods_res, ns, name);
        return;
    }
    let at = s.now() + time::Duration::seconds(grace);
    p["metadata"]["deletionTimestamp"] = json!(at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap());
    p["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    s.put(pods_res, ns, p);
}

/// The grace period a pod's deletion was given, if it is being deleted.
pub(crate) fn deletion_grace(p: &Value) -> Option<std::time::Duration> {
    p["metadata"]["deletionGracePeriodSeconds"]
        .as_u64()
        .map(std::time::Duration::from_secs)
}

/// Writes `status` into the workload when it changed.
pub(crate) fn set_status(s: &mut State, plural: &str, o: &Value, status: Value) {
    if o["status"] != status {
        let mut o = o.clone();
        o["status"] = status;
        let ns = ns_of(&o);
        s.put(resource("apps", plural), &ns, o);
    }
}

/// An int-or-percent field of `total` (k8s.io/apimachinery/pkg/util/intstr
/// GetScaledValueFromIntOrPercent), rounding up or down.
pub(crate) fn scaled(v: &Value, total: usize, default: &str, round_up: bool) -> usize {
    let v = if v.is_null() {
        json!(default)
    } else {
        v.clone()
    };
    if let Some(n) = v.as_u64() {
        return n as usize;
    }
    let pct: f64 = v
        .as_str()
        .and_then(|s| s.strip_suffix('%'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let x = pct * total as f64 / 100.0;
    (if round_up { x.ceil() } else { x.floor() }) as usize
}
