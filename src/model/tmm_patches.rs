//! The merge patches the tool sends to a TMM workload, built in one place: the cluster layer
//! sends them, and the admission policy's test (`tests/admission.rs`) runs these very patches
//! through the policy's CEL, so that a patch the tool starts to send and the policy refuses
//! fails a test instead of a rotation.

use serde_json::{json, Map, Value};

use crate::materials::annotations::{STOP_NODE_SELECTOR, TMM_ROLL};

/// Sets (Some) or removes (None) annotations of the workload.
pub fn annotate(changes: &[(&str, Option<&str>)]) -> Value {
    let ann: Map<String, Value> = changes
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"metadata": {"annotations": ann}})
}

/// A DaemonSet stopped: a nodeSelector key no node carries.
pub fn stop_daemonset() -> Value {
    json!({"spec": {"template": {"spec": {"nodeSelector": {STOP_NODE_SELECTOR: "true"}}}}})
}

/// A DaemonSet started again: our nodeSelector key removed (its own ones are never touched).
pub fn start_daemonset() -> Value {
    json!({"spec": {"template": {"spec": {"nodeSelector": {STOP_NODE_SELECTOR: null}}}}})
}

/// A Deployment's replicas (sent to the scale subresource).
pub fn scale(replicas: i32) -> Value {
    json!({"spec": {"replicas": replicas}})
}

/// `kubectl rollout restart` (the pod-template annotation with the time) and, in the same
/// patch, the roll record on the workload.
pub fn rollout_restart(now: &str, record: &str) -> Value {
    json!({
        "metadata": {"annotations": {TMM_ROLL: record}},
        "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}
    })
}

/// The roll record alone (set to `pending` to read the API server's clock off its stamp).
pub fn roll_record(pending: &str) -> Value {
    json!({"metadata": {"annotations": {TMM_ROLL: pending}}})
}
