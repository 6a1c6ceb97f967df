//! PodDisruptionBudgets (policy/v1) and the pod `eviction` subresource.
//!
//! The status is computed as the disruption controller does (pkg/controller/disruption/
//! disruption.go: getExpectedPodCount, countHealthyPods, buildDisruptedPodMap,
//! updatePdbStatus): with an integer minAvailable the expected count is the number of selected
//! pods; with maxUnavailable or a percentage it is the sum of the owning workloads' replicas.
//! Healthy pods are Ready, not being deleted, and not just evicted.
//!
//! The status is written by the controllers' pass, as the controller writes it after its
//! informers saw the pods: an eviction reads that stored status, so it lags the pods.
//!
//! An eviction follows pkg/registry/core/pod/storage/eviction.go: terminal, Pending or
//! terminating pods are deleted without looking at budgets; more than one budget is a 500; no
//! disruption allowed is 429 TooManyRequests "Cannot evict pod as it would violate the pod's
//! disruption budget." with a DisruptionBudget cause; otherwise the budget is decremented, the
//! pod recorded in `status.disruptedPods`, and the pod deleted gracefully.

use std::time::Duration;

use serde_json::{json, Value};

use crate::controllers::{
    label_selector, mark_terminating_with_grace, name_of, ns_of, pod_ready, scaled, terminal,
    terminating,
};
use crate::logic::labels_match;
use crate::store::{resource, State};

/// How long an evicted pod may take to be deleted before the budget counts it again
/// (disruption.go DeletionTimeout).
const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

fn pdbs() -> &'static crate::store::Resource {
    resource("policy", "poddisruptionbudgets")
}

/// The pods a budget selects: an empty or missing selector selects none (eviction.go
/// getPodDisruptionBudgets).
fn selected(s: &State, pdb: &Value) -> Vec<Value> {
    let sel = label_selector(&pdb["spec"]["selector"]);
    if sel.is_empty() {
        return Vec::new();
    }
    let ns = ns_of(pdb);
    s.list(resource("", "pods"), Some(&ns))
        .into_iter()
        .filter(|p| labels_match(&sel, p))
        .cloned()
        .collect()
}

/// The replicas of the workloads owning `pods` (disruption.go getExpectedScale; our Deployment
/// pods name the Deployment as their ReplicaSet).
fn expected_scale(s: &State, ns: &str, pods: &[Value]) -> usize {
    let mut owners: Vec<(String, String)> = pods
        .iter()
        .filter_map(|p| {
            let r = p["metadata"]["ownerReferences"].get(0)?;
            Some((
                r["kind"].as_str()?.to_string(),
                r["name"].as_str()?.to_string(),
            ))
        })
        .collect();
    owners.sort();
    owners.dedup();
    owners
        .iter()
        .map(|(kind, name)| {
            let plural = match kind.as_str() {
                "ReplicaSet" => "deployments",
                "StatefulSet" => "statefulsets",
                _ => return 0,
            };
            s.get(resource("apps", plural), ns, name)
                .and_then(|o| o["spec"]["replicas"].as_u64())
                .unwrap_or(0) as usize
        })
        .sum()
}

fn seconds_since(now: time::OffsetDateTime, rfc3339: &str) -> Option<Duration> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    let d = now - t;
    Some(Duration::from_secs(d.whole_seconds().max(0) as u64))
}

/// The status the disruption controller would write now.
fn status_of(s: &State, pdb: &Value) -> Value {
    let ns = ns_of(pdb);
    let pods = selected(s, pdb);
    let spec = &pdb["spec"];
    let (expected, desired) = if let Some(n) = spec["minAvailable"].as_u64() {
        (pods.len(), n as usize)
    } else if !spec["minAvailable"].is_null() {
        let e = expected_scale(s, &ns, &pods);
        (e, scaled(&spec["minAvailable"], e, "0", true))
    } else {
        let e = expected_scale(s, &ns, &pods);
        (
            e,
            e.saturating_sub(scaled(&spec["maxUnavailable"], e, "0", true)),
        )
    };
    // Evicted pods still present (not yet terminating) within the timeout stay out of the count.
    let mut disrupted = serde_json::Map::new();
    if let Some(m) = pdb["status"]["disruptedPods"].as_object() {
        for (name, t) in m {
            let live = pods.iter().any(|p| name_of(p) == *name && !terminating(p));
            let fresh = t
                .as_str()
                .and_then(|t| seconds_since(s.now(), t))
                .is_some_and(|d| d < DELETION_TIMEOUT);
            if live && fresh {
                disrupted.insert(name.clone(), t.clone());
            }
        }
    }
    let healthy = pods
        .iter()
        .filter(|p| !terminating(p) && !disrupted.contains_key(&name_of(p)) && pod_ready(p))
        .count();
    let allowed = healthy.saturating_sub(desired);
    let mut status = json!({
        "observedGeneration": pdb["metadata"]["generation"],
        "disruptionsAllowed": allowed,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "conditions": [condition(allowed, pdb, &s.now_rfc3339())],
    });
    if !disrupted.is_empty() {
        status["disruptedPods"] = Value::Object(disrupted);
    }
    status
}

/// The DisruptionAllowed condition (k8s.io/component-helpers/apps/poddisruptionbudget
/// UpdateDisruptionAllowedCondition: SufficientPods / InsufficientPods). Its transition time
/// is kept while the status holds, so an unchanged budget is not rewritten.
fn condition(allowed: usize, pdb: &Value, now: &str) -> Value {
    let (status, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let old = pdb["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"))
        .filter(|c| c["status"] == status);
    let since = old
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or_else(|| json!(now));
    json!({"type": "DisruptionAllowed", "status": status, "reason": reason, "message": "",
        "observedGeneration": pdb["metadata"]["generation"], "lastTransitionTime": since})
}

pub(crate) fn sync_all(s: &mut State) {
    let all: Vec<Value> = s.list(pdbs(), None).into_iter().cloned().collect();
    for pdb in all {
        let status = status_of(s, &pdb);
        if pdb["status"] != status {
            let mut o = pdb.clone();
            o["status"] = status;
            let ns = ns_of(&o);
            s.put(pdbs(), &ns, o);
        }
    }
}

/// A Status as the API server writes it, with `details`.
fn failure(code: u16, reason: &str, message: &str, details: Value) -> (u16, Value) {
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        v["details"] = details;
    }
    (code, v)
}

fn too_many_requests(cause: String, retry_after: u64) -> (u16, Value) {
    let mut details = json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]});
    if retry_after > 0 {
        details["retryAfterSeconds"] = json!(retry_after);
    }
    failure(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
        details,
    )
}

/// POST pods/NAME/eviction: (HTTP status, body). Success is a Status with code 201, as the
/// create handler fills in (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/create.go).
pub(crate) fn evict(s: &mut State, ns: &str, name: &str, eviction: &Value) -> (u16, Value) {
    if eviction["metadata"]["name"].as_str() != Some(name) {
        return failure(
            400,
            "BadRequest",
            "name in URL does not match name in Eviction object",
            Value::Null,
        );
    }
    let dry_run = eviction["deleteOptions"]["dryRun"]
        .as_array()
        .is_some_and(|d| !d.is_empty());
    let Some(pod) = s.get(resource("", "pods"), ns, name).cloned() else {
        return failure(
            404,
            "NotFound",
            &format!("pods \"{name}\" not found"),
            json!({"name": name, "kind": "pods"}),
        );
    };
    let success = (
        201,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    );
    let grace = eviction["deleteOptions"]["gracePeriodSeconds"].as_i64();
    let delete = |s: &mut State| {
        if !dry_run {
            mark_terminating_with_grace(s, ns, name, grace);
        }
    };
    // eviction.go canIgnorePDB: the pod already is no disruption.
    if terminal(&pod) || terminating(&pod) || pod["status"]["phase"] == json!("Pending") {
        delete(s);
        return success;
    }
    let matching: Vec<Value> = s
        .list(pdbs(), Some(ns))
        .into_iter()
        .filter(|pdb| {
            let sel = label_selector(&pdb["spec"]["selector"]);
            !sel.is_empty() && labels_match(&sel, &pod)
        })
        .cloned()
        .collect();
    if matching.len() > 1 {
        return failure(
            500,
            "InternalError",
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            Value::Null,
        );
    }
    let Some(mut pdb) = matching.into_iter().next() else {
        delete(s);
        return success;
    };
    // The eviction trusts the status the disruption controller last wrote (eviction.go
    // checkAndDecrement reads pdb.Status), not a fresh count: it lags the pods by a controller
    // pass. A budget the controller has not seen yet cannot be trusted.
    let st = pdb["status"].clone();
    let observed = pdb["status"]["observedGeneration"].as_i64().unwrap_or(0);
    if observed < pdb["metadata"]["generation"].as_i64().unwrap_or(0) {
        let pdb_name = name_of(&pdb);
        return too_many_requests(
            format!("The disruption budget {pdb_name} is still being processed by the server."),
            10,
        );
    }
    let desired = st["desiredHealthy"].as_u64().unwrap_or(0);
    let healthy = st["currentHealthy"].as_u64().unwrap_or(0);
    // An unready pod does not count as healthy: evicting it costs nothing.
    if !pod_ready(&pod) && healthy >= desired && desired > 0 {
        delete(s);
        return success;
    }
    if st["disruptionsAllowed"].as_u64().unwrap_or(0) == 0 {
        let pdb_name = name_of(&pdb);
        return too_many_requests(
            format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently"),
            0,
        );
    }
    if dry_run {
        return success;
    }
    let mut status = st;
    status["disruptedPods"][name] = json!(s.now_rfc3339());
    status["disruptionsAllowed"] = json!(status["disruptionsAllowed"].as_u64().unwrap_or(1) - 1);
    pdb["status"] = status;
    s.put(pdbs(), ns, pdb);
    delete(s);
    success
}
