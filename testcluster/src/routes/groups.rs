//! One handler per API group, as each group's storage provider installs its resources
//! (k8s.io/kubernetes pkg/registry/<group>/rest): the generic store's verbs for every resource
//! (generic.rs), plus the group's own subresources and reviews.

use hyper::Response;
use serde_json::{json, Value};

use super::{generic, json_response, modified, not_found, parse_body, refused, status_error};
use super::{Body, Call};
use crate::logic::{json_patch, merge_patch};
use crate::store::State;

// ---- core/v1: Pods (with the eviction subresource), Secrets, Namespaces, Events,
// ServiceAccounts, Services, ConfigMaps.

pub(super) fn core_v1(s: &mut State, c: &Call) -> Response<Body> {
    match (c.verb, c.p.sub.as_deref()) {
        ("create", Some("eviction")) if c.p.res.plural == "pods" => eviction(s, c),
        _ => generic::serve(s, c),
    }
}

/// pods/eviction: the PodDisruptionBudgets decide (disruption.rs).
fn eviction(s: &mut State, c: &Call) -> Response<Body> {
    let eviction = match parse_body(c.body, c.content_type) {
        Ok(v) => v,
        Err(e) => return refused(&e, None),
    };
    let (code, v) = crate::disruption::evict(s, &c.ns(), &c.name(), &eviction);
    let retry = v["details"]["retryAfterSeconds"].as_u64();
    let mut resp = json_response(code, &v);
    // The response writer sets Retry-After from details.retryAfterSeconds when > 0.
    if let Some(secs) = retry.filter(|s| *s > 0) {
        resp.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    resp
}

// ---- apps/v1: Deployments and StatefulSets (with the scale subresource), DaemonSets.

pub(super) fn apps_v1(s: &mut State, c: &Call) -> Response<Body> {
    match (c.verb, c.p.sub.as_deref()) {
        ("get" | "update" | "patch", Some("scale"))
            if matches!(c.p.res.plural, "deployments" | "statefulsets") =>
        {
            scale(s, c)
        }
        _ => generic::serve(s, c),
    }
}

/// The autoscaling/v1 Scale of a Deployment or StatefulSet.
fn scale_of(o: &Value) -> Value {
    let labels = o["spec"]["selector"]["matchLabels"].as_object().map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(",")
    });
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"], "uid": o["metadata"]["uid"],
                     "resourceVersion": o["metadata"]["resourceVersion"], "creationTimestamp": o["metadata"]["creationTimestamp"]},
        "spec": {"replicas": o["spec"]["replicas"]},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": labels.unwrap_or_default()}})
}

/// get, update and patch of the scale subresource.
fn scale(s: &mut State, c: &Call) -> Response<Body> {
    let (r, ns, name) = (c.p.res, c.ns(), c.name());
    let Some(cur) = s.get(r, &ns, &name).cloned() else {
        return not_found(r, &name);
    };
    if c.verb == "get" {
        return json_response(200, &scale_of(&cur));
    }
    let parsed = match parse_body(c.body, c.content_type) {
        Ok(v) => v,
        Err(e) => return refused(&e, None),
    };
    let mut scale = scale_of(&cur);
    if c.verb == "update" {
        let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !want_rv.is_empty()
            && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
        {
            return modified(r, &name);
        }
        scale = parsed;
    } else if c.content_type.starts_with("application/json-patch+json") {
        if let Err(e) = json_patch(&mut scale, &parsed) {
            return refused(&e, None);
        }
    } else {
        merge_patch(&mut scale, &parsed);
    }
    let Some(n) = scale["spec"]["replicas"].as_i64() else {
        return status_error(
            422,
            "Invalid",
            &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Required value"),
            None,
        );
    };
    if n < 0 {
        return status_error(422, "Invalid", &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {n}: must be greater than or equal to 0"), None);
    }
    let mut o = cur.clone();
    o["spec"]["replicas"] = json!(n);
    let o = if o != cur { s.put(r, &ns, o) } else { cur };
    json_response(200, &scale_of(&o))
}

// ---- The groups the generic store serves alone: no subresources of their own.

/// policy/v1: PodDisruptionBudgets (evictions are core/v1's pods/eviction).
pub(super) fn policy_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// coordination.k8s.io/v1: Leases.
pub(super) fn coordination_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// events.k8s.io/v1: Events.
pub(super) fn events_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// rbac.authorization.k8s.io/v1: Roles and RoleBindings.
pub(super) fn rbac_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// batch/v1: Jobs and CronJobs.
pub(super) fn batch_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// apiextensions.k8s.io/v1: CustomResourceDefinitions.
pub(super) fn apiextensions_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

/// monitoring.coreos.com/v1: the Prometheus Operator's kinds, served once its CRDs are
/// installed.
pub(super) fn monitoring_v1(s: &mut State, c: &Call) -> Response<Body> {
    generic::serve(s, c)
}

// ---- authorization.k8s.io/v1: SelfSubjectAccessReviews (create only, never stored).

pub(super) fn authorization_v1(
    s: &State,
    user: &str,
    body: &[u8],
    content_type: &str,
) -> Response<Body> {
    match crate::rbac::self_subject_access_review(s.rbac.as_ref(), user, body, content_type) {
        Ok(review) => json_response(201, &review),
        Err(e) => refused(&e, None),
    }
}
