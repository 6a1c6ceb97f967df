//! Discovery and OpenAPI: the documents kubectl and kube-rs read to map kinds to resources
//! (`/api`, `/apis`, each group version's APIResourceList, `/openapi/v2`, `/openapi/v3`,
//! `/version`). The Prometheus Operator's group is listed only when its CRDs are installed, so
//! kubectl maps its kinds only then.

use bytes::Bytes;
use hyper::Response;
use serde_json::{json, Value};

use super::{full, json_response, Body};
use crate::store::{Resource, PROMETHEUS_OPERATOR_GROUP, RESOURCES};

/// The discovery handler: answers a GET for a discovery or OpenAPI path, or None for any other
/// request.
pub(super) fn serve(method: &str, path: &str, prometheus_operator: bool) -> Option<Response<Body>> {
    if method != "GET" {
        return None;
    }
    // kubectl asks for OpenAPI v2 (protobuf only) when v3 does not know an object's kind and no
    // CRD defines it; then it finds no schema, skips client-side validation, and fails at
    // mapping the kind ("ensure CRDs are installed first"), as against a real API server. An
    // empty body is a valid, empty openapi_v2.Document.
    if path == "/openapi/v2" {
        return Some(
            Response::builder()
                .status(200)
                .header(
                    "content-type",
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                )
                .body(full(Bytes::new()))
                .unwrap(),
        );
    }
    document(path, prometheus_operator).map(|d| json_response(200, &d))
}

/// The document at `path`, if it is a discovery path.
fn document(path: &str, prometheus_operator: bool) -> Option<Value> {
    match path.trim_end_matches('/') {
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/apis" => Some(group_list(prometheus_operator)),
        "/api/v1" => Some(resource_list("", "v1")),
        "/apis/apps/v1" => Some(resource_list("apps", "v1")),
        "/apis/coordination.k8s.io/v1" => Some(resource_list("coordination.k8s.io", "v1")),
        "/apis/events.k8s.io/v1" => Some(resource_list("events.k8s.io", "v1")),
        "/apis/policy/v1" => Some(resource_list("policy", "v1")),
        "/apis/batch/v1" => Some(resource_list("batch", "v1")),
        "/apis/apiextensions.k8s.io/v1" => Some(resource_list("apiextensions.k8s.io", "v1")),
        "/apis/rbac.authorization.k8s.io/v1" => {
            Some(resource_list("rbac.authorization.k8s.io", "v1"))
        }
        "/apis/monitoring.coreos.com/v1" if prometheus_operator => {
            Some(resource_list(PROMETHEUS_OPERATOR_GROUP, "v1"))
        }
        "/openapi/v3" => Some(openapi_v3_root(prometheus_operator)),
        p if p.starts_with("/openapi/v3/") => {
            let gv = &p["/openapi/v3/".len()..];
            let known = openapi_v3_root(prometheus_operator)["paths"]
                .get(gv)
                .is_some();
            known.then(|| openapi_v3_group_version(gv))
        }
        "/version" => Some(
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-dssm-test", "platform": "linux/amd64"}),
        ),
        _ => None,
    }
}

/// `/apis`: the APIGroupList.
fn group_list(prometheus_operator: bool) -> Value {
    let mut names = vec![
        "apiextensions.k8s.io",
        "apps",
        "batch",
        "coordination.k8s.io",
        "events.k8s.io",
        "policy",
        "rbac.authorization.k8s.io",
    ];
    if prometheus_operator {
        names.push(PROMETHEUS_OPERATOR_GROUP);
    }
    let groups: Vec<Value> = names
        .iter()
        .map(|g| {
            json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}],
            "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// A group version's APIResourceList, with the scale and eviction subresources.
fn resource_list(group: &str, version: &str) -> Value {
    let list: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| {
            let mut v = vec![json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": r.verbs, "shortNames": short_names(r)})];
            if r.plural == "pods" {
                v.push(json!({"name": "pods/eviction", "singularName": "", "namespaced": true,
                    "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}));
            }
            if matches!(r.plural, "deployments" | "statefulsets") {
                v.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": true,
                    "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
            }
            v
        })
        .collect();
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
}

/// A resource's short names, as the API server lists them.
fn short_names(r: &Resource) -> &'static [&'static str] {
    match r.plural {
        "deployments" => &["deploy"],
        "statefulsets" => &["sts"],
        "pods" => &["po"],
        "namespaces" => &["ns"],
        "events" => &["ev"],
        "daemonsets" => &["ds"],
        "poddisruptionbudgets" => &["pdb"],
        // pkg/registry/core/{serviceaccount,service,configmap}/storage and
        // pkg/registry/batch/cronjob/storage: ShortNames().
        "serviceaccounts" => &["sa"],
        "services" => &["svc"],
        "configmaps" => &["cm"],
        "cronjobs" => &["cj"],
        "customresourcedefinitions" => &["crd", "crds"],
        // The CRDs' spec.names.shortNames in prometheus-operator's bundle.
        "servicemonitors" => &["smon"],
        "podmonitors" => &["pmon"],
        "prometheusrules" => &["promrule"],
        _ => &[],
    }
}

/// The group versions served, as the OpenAPI v3 discovery root names them (`api/v1`,
/// `apis/apps/v1`), each with the document's URL.
fn openapi_v3_root(prometheus_operator: bool) -> Value {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES {
        if r.group == PROMETHEUS_OPERATOR_GROUP && !prometheus_operator {
            continue;
        }
        let gv = if r.group.is_empty() {
            format!("api/{}", r.version)
        } else {
            format!("apis/{}/{}", r.group, r.version)
        };
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=0")}),
        );
    }
    json!({ "paths": paths })
}

/// A group version's OpenAPI v3 document, reduced to what kubectl reads from it: for each kind,
/// the PATCH operation (tagged with `x-kubernetes-group-version-kind`) and its `fieldValidation`
/// query parameter. kubectl's QueryParamVerifierV3 (k8s.io/cli-runtime/pkg/resource/
/// query_param_verifier_v3.go) finds it, so it leaves validation to the server
/// (`fieldValidation=Strict`) instead of downloading schemas for client-side validation.
fn openapi_v3_group_version(gv: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES {
        let (prefix, group) = if r.group.is_empty() {
            (format!("api/{}", r.version), "")
        } else {
            (format!("apis/{}/{}", r.group, r.version), r.group)
        };
        if prefix != gv {
            continue;
        }
        let ns = if r.namespaced {
            "namespaces/{namespace}/"
        } else {
            ""
        };
        paths.insert(
            format!("/{prefix}/{ns}{}/{{name}}", r.plural),
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": r.version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {}
            }}),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths, "components": {"schemas": {}}})
}
