//! The DaemonSet controller (pkg/controller/daemon/daemon_controller.go, update.go): one pod on
//! each simulated node (`State::nodes`), failed daemon pods deleted and replaced, and a template
//! change rolled node by node within `maxUnavailable` (default 1, maxSurge 0): an old pod is
//! deleted only while fewer than maxUnavailable nodes lack an available pod, and the node gets
//! its new pod at once. `OnDelete` leaves old pods alone. A pod-template nodeSelector limits the
//! nodes (each simulated node carries `kubernetes.io/hostname` and `kubernetes.io/os=linux`).

use serde_json::{json, Value};

use super::*;
use crate::store::{resource, State};

/// The labels a simulated node carries (the kubelet's well-known ones).
pub fn node_labels(node: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("kubernetes.io/hostname".into(), json!(node));
    m.insert("kubernetes.io/os".into(), json!("linux"));
    m
}

/// The nodes the DaemonSet should run on: those whose labels carry every pair of the pod
/// template's nodeSelector (daemon_controller.go `NodeShouldRunDaemonPod` via the scheduler's
/// node-selector predicate). A daemon pod on any other node is deleted, outside the rolling
/// update's maxUnavailable budget, and desiredNumberScheduled counts only these nodes.
fn eligible_nodes(s: &State, o: &Value) -> Vec<String> {
    let selector = o["spec"]["template"]["spec"]["nodeSelector"].as_object();
    s.nodes
        .iter()
        .filter(|n| {
            let labels = node_labels(n);
            selector
                .into_iter()
                .flatten()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .cloned()
        .collect()
}

fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"].as_str().unwrap_or("").to_string()
}

pub(crate) fn sync(s: &mut State, o: &Value) {
    let ns = ns_of(o);
    let name = name_of(o);
    let min_ready = min_ready(o);
    let hash = template_hash(&o["spec"]["template"]);
    let generation = o["metadata"]["generation"]
        .as_i64()
        .unwrap_or(1)
        .to_string();
    let sel = selector_of(o);
    let nodes = eligible_nodes(s, o);
    let is_new = |p: &Value| p["metadata"]["labels"]["controller-revision-hash"] == json!(hash);
    let pods = pods_of(s, &ns, &sel);
    for p in &pods {
        let misplaced = !nodes.contains(&node_of(p));
        if (terminal(p) || misplaced) && !terminating(p) {
            mark_terminating(s, &ns, &name_of(p));
        }
    }
    let pods: Vec<Value> = pods_of(s, &ns, &sel).into_iter().filter(active).collect();
    for node in &nodes {
        let mut on_node: Vec<&Value> = pods.iter().filter(|p| node_of(p) == *node).collect();
        if on_node.is_empty() {
            let id = s.next_rv();
            let mut pod = new_pod(
                o,
                "DaemonSet",
                &format!("{name}-{:05x}", id),
                &[
                    ("controller-revision-hash", &hash),
                    ("pod-template-generation", &generation),
                ],
            );
            pod["spec"]["nodeName"] = json!(node);
            s.put(resource("", "pods"), &ns, pod);
        }
        // One per node: extras go, the oldest stays.
        on_node.sort_by_key(|p| {
            p["metadata"]["creationTimestamp"]
                .as_str()
                .map(String::from)
        });
        for p in on_node.iter().skip(1) {
            mark_terminating(s, &ns, &name_of(p));
        }
    }
    let rolling = o["spec"]["updateStrategy"]["type"] != json!("OnDelete");
    if rolling {
        let max_unavailable = scaled(
            &o["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            nodes.len(),
            "1",
            true,
        )
        .max(1);
        let pods: Vec<Value> = pods_of(s, &ns, &sel).into_iter().filter(active).collect();
        let unavailable = nodes
            .iter()
            .filter(|n| {
                !pods
                    .iter()
                    .any(|p| node_of(p) == **n && available(s, p, min_ready))
            })
            .count();
        let budget = max_unavailable.saturating_sub(unavailable);
        let (old_unhealthy, old_healthy): (Vec<&Value>, Vec<&Value>) = pods
            .iter()
            .filter(|p| !is_new(p))
            .partition(|p| !available(s, p, min_ready));
        // Old pods that are not available anyway go first, whatever the budget.
        for p in old_unhealthy {
            mark_terminating(s, &ns, &name_of(p));
        }
        terminate_up_to(s, &old_healthy, budget);
    }
    let pods: Vec<Value> = pods_of(s, &ns, &sel).into_iter().filter(active).collect();
    let scheduled = nodes
        .iter()
        .filter(|n| pods.iter().any(|p| node_of(p) == **n))
        .count();
    let avail = pods.iter().filter(|p| available(s, p, min_ready)).count();
    let status = json!({
        "observedGeneration": o["metadata"]["generation"],
        "desiredNumberScheduled": nodes.len(),
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": 0,
        "numberReady": pods.iter().filter(|p| pod_ready(p)).count(),
        "updatedNumberScheduled": pods.iter().filter(|p| is_new(p)).count(),
        "numberAvailable": avail,
        "numberUnavailable": nodes.len().saturating_sub(avail),
    });
    set_status(s, "daemonsets", o, status);
}
