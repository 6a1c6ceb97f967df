//! HTTP: paths to resources and verbs, the Status errors the API server writes, discovery, and
//! the routes for get, list, create, update, patch (JSON, merge, strategic merge, apply),
//! delete, deletecollection and the scale and eviction subresources.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};

use crate::controllers::{mark_terminating, mark_terminating_with_grace};
use crate::faults;
use crate::logic::*;
use crate::rbac::authorized;
use crate::store::{now_rfc3339, Recorded, Resource, PROMETHEUS_OPERATOR_GROUP, RESOURCES};
use crate::{Shared, ADMIN_TOKEN, AGENT_TOKEN, SA_TOKEN};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn full(v: impl Into<Bytes>) -> Body {
    Full::new(v.into()).boxed()
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

pub(crate) fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// A `Status` failure as the API server writes it.
pub fn status_error(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<(&str, &str, &str)>,
) -> Response<Body> {
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    if let Some((name, group, kind)) = details {
        let mut d = json!({"name": name, "kind": kind});
        if !group.is_empty() {
            d["group"] = json!(group);
        }
        v["details"] = d;
    }
    let mut resp = json_response(code, &v);
    if code == 429 {
        v["details"] = json!({"retryAfterSeconds": 1});
        resp = json_response(code, &v);
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    resp
}

pub(crate) fn not_found(r: &Resource, name: &str) -> Response<Body> {
    status_error(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", r.qualified()),
        Some((name, r.group, r.plural)),
    )
}

pub(crate) struct Parsed {
    pub(crate) res: &'static Resource,
    pub(crate) ns: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) sub: Option<String>,
}

pub(crate) fn parse_path(path: &str) -> Option<Parsed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, r, more @ ..] if !r.is_empty() => {
            (Some(ns.to_string()), [&[*r][..], more].concat())
        }
        other => (None, other.to_vec()),
    };
    let plural = rest.first()?;
    let res = RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == *plural)?;
    Some(Parsed {
        res,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

pub(crate) fn query_map(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 2;
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn verb_of(method: &str, p: &Parsed, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    match (method, p.name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let token = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let impersonate = req
        .headers()
        .get("impersonate-user")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();

    let user = {
        let s = shared.state.lock().unwrap();
        match token.as_str() {
            ADMIN_TOKEN => Some("kubernetes-admin".to_string()),
            SA_TOKEN => Some(s.sa_user.clone()),
            AGENT_TOKEN => Some(format!("{}-agent", s.sa_user)),
            _ => None,
        }
    };
    // Impersonation (k8s.io/apiserver endpoints/filters/impersonation.go): the caller needs
    // `impersonate` on the user (here only the admin has it); the request then runs as them.
    let (user, refused) = match (user, impersonate) {
        (Some(u), Some(as_user)) if u == "kubernetes-admin" => (Some(as_user), None),
        (Some(u), Some(as_user)) => {
            let (resource, name, scope) = match as_user.strip_prefix("system:serviceaccount:") {
                Some(sa) => {
                    let (ns, n) = sa.split_once(':').unwrap_or((sa, ""));
                    (
                        "serviceaccounts",
                        n.to_string(),
                        format!(" in the namespace \"{ns}\""),
                    )
                }
                None => (
                    "users",
                    as_user.clone(),
                    " at the cluster scope".to_string(),
                ),
            };
            let msg = format!("{resource} \"{name}\" is forbidden: User \"{u}\" cannot impersonate resource \"{resource}\" in API group \"\"{scope}");
            (
                Some(u),
                Some(status_error(
                    403,
                    "Forbidden",
                    &msg,
                    Some((&name, "", resource)),
                )),
            )
        }
        (u, _) => (u, None),
    };
    // Faults are matched before anything else, as a proxy or an overloaded server would.
    let fault = faults::request_fault(&mut shared.state.lock().unwrap(), &method, &path);
    // A delay fault holds the request, then serves it; a status fault answers instead.
    let injected = match fault {
        Some((status, delay)) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            status.map(|code| status_error(code, reason_of(code), &faults::message_of(code), None))
        }
        None => None,
    };
    let resp = match injected.or(refused) {
        Some(r) => r,
        None => {
            route(
                &shared,
                &method,
                &path,
                &query,
                &content_type,
                &user_agent,
                user.as_deref(),
                &body,
            )
            .await
        }
    };
    {
        let mut s = shared.state.lock().unwrap();
        let at_rv = s.rv;
        s.requests.push(Recorded {
            method,
            path,
            query,
            user: user.unwrap_or_default(),
            status: resp.status().as_u16(),
            at_rv,
        });
    }
    shared.notify.notify_waiters();
    resp
}

/// Discovery documents. The Prometheus Operator's group is listed only when its CRDs are
/// installed (`prometheus_operator`), so kubectl maps its kinds only then.
fn discovery(path: &str, prometheus_operator: bool) -> Option<Value> {
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let short: &[&str] = match r.plural {
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
                };
                let mut v = vec![json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": r.verbs, "shortNames": short})];
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
    };
    match path.trim_end_matches('/') {
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/apis" => {
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
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}],
                    "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        "/api/v1" => Some(resources("", "v1")),
        "/apis/apps/v1" => Some(resources("apps", "v1")),
        "/apis/coordination.k8s.io/v1" => Some(resources("coordination.k8s.io", "v1")),
        "/apis/events.k8s.io/v1" => Some(resources("events.k8s.io", "v1")),
        "/apis/policy/v1" => Some(resources("policy", "v1")),
        "/apis/batch/v1" => Some(resources("batch", "v1")),
        "/apis/apiextensions.k8s.io/v1" => Some(resources("apiextensions.k8s.io", "v1")),
        "/apis/rbac.authorization.k8s.io/v1" => Some(resources("rbac.authorization.k8s.io", "v1")),
        "/apis/monitoring.coreos.com/v1" if prometheus_operator => {
            Some(resources(PROMETHEUS_OPERATOR_GROUP, "v1"))
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

pub(crate) fn parse_body(body: &[u8], content_type: &str) -> Result<Value, String> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// Checks what the API server validates for our kinds; returns the 422 message.
fn validate(r: &Resource, obj: &Value) -> Result<(), String> {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let kind = r.kind;
    if name.is_empty() {
        return Err(format!("{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"));
    }
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !dns(name) {
        return Err(format!("{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    if r.kind == "Secret" {
        if let Some(data) = obj["data"].as_object() {
            for (k, v) in data {
                if k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(format!("Secret \"{name}\" is invalid: data[{k}]: Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                }
                if !v.is_string()
                    || base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .is_err()
                {
                    return Err(format!(
                        "Secret \"{name}\" is invalid: data[{k}]: illegal base64 data"
                    ));
                }
            }
        }
    }
    if (r.kind == "Deployment" || r.kind == "StatefulSet")
        && obj["spec"]["replicas"].as_i64().is_some_and(|n| n < 0)
    {
        {
            return Err(format!("{kind}.apps \"{name}\" is invalid: spec.replicas: Invalid value: {}: must be greater than or equal to 0", obj["spec"]["replicas"]));
        }
    }
    Ok(())
}

/// stringData is write-only: merged into data, as the API server does.
fn normalize_secret(obj: &mut Value) {
    if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
        if let Some(sd) = sd.as_object() {
            for (k, v) in sd {
                obj["data"][k] = json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or("").as_bytes()));
            }
        }
    }
    if obj.get("type").is_none_or(Value::is_null) {
        obj["type"] = json!("Opaque");
    }
}

fn manager_name(q: &HashMap<String, String>, user_agent: &str) -> String {
    q.get("fieldManager").cloned().unwrap_or_else(|| {
        user_agent
            .split('/')
            .next()
            .unwrap_or("unknown")
            .to_string()
    })
}

#[allow(clippy::too_many_arguments)]
async fn route(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: &str,
    content_type: &str,
    user_agent: &str,
    user: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let Some(user) = user else {
        return status_error(401, "Unauthorized", "Unauthorized", None);
    };
    let prometheus_operator = shared.state.lock().unwrap().prometheus_operator_crds;
    // kubectl asks for OpenAPI v2 (protobuf only) when v3 does not know an object's kind and no
    // CRD defines it; then it finds no schema, skips client-side validation, and fails at
    // mapping the kind ("ensure CRDs are installed first"), as against a real API server. An
    // empty body is a valid, empty openapi_v2.Document.
    if method == "GET" && path == "/openapi/v2" {
        return Response::builder()
            .status(200)
            .header(
                "content-type",
                "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )
            .body(full(Bytes::new()))
            .unwrap();
    }
    if method == "GET" {
        if let Some(d) = discovery(path, prometheus_operator) {
            return json_response(200, &d);
        }
    }
    if method == "POST" && path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
        let s = shared.state.lock().unwrap();
        return match crate::rbac::self_subject_access_review(
            s.rbac.as_ref(),
            user,
            body,
            content_type,
        ) {
            Ok(review) => json_response(201, &review),
            Err(e) => status_error(400, "BadRequest", &e, None),
        };
    }
    let q = query_map(query);
    let Some(p) = parse_path(path)
        .filter(|p| prometheus_operator || p.res.group != PROMETHEUS_OPERATOR_GROUP)
    else {
        return status_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    let verb = verb_of(method, &p, &q);
    let field_sel = match q
        .get("fieldSelector")
        .map(|f| parse_field_selector(f))
        .transpose()
    {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return status_error(400, "BadRequest", &e, None),
    };
    let label_sel = match q
        .get("labelSelector")
        .map(|l| parse_label_selector(l))
        .transpose()
    {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return status_error(400, "BadRequest", &e, None),
    };
    // RBAC for the service account.
    {
        let s = shared.state.lock().unwrap();
        if let (Some(rbac), true) = (&s.rbac, user.starts_with("system:serviceaccount:")) {
            let field_name = field_sel
                .iter()
                .find(|(k, eq, _)| k == "metadata.name" && *eq)
                .map(|(_, _, v)| v.as_str());
            let ns = p.ns.clone().unwrap_or_default();
            let rules = rbac
                .get(user)
                .and_then(|by_ns| by_ns.get(&ns))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if !authorized(rules, verb, &p, field_name) {
                let resource = match &p.sub {
                    Some(sub) => format!("{}/{sub}", p.res.plural),
                    None => p.res.plural.to_string(),
                };
                let subject = match &p.name {
                    Some(n) => format!("{} \"{n}\" is forbidden", p.res.qualified()),
                    None => format!("{} is forbidden", p.res.qualified()),
                };
                let scope = if p.ns.is_some() {
                    format!(" in the namespace \"{ns}\"")
                } else {
                    " at the cluster scope".into()
                };
                let msg = format!(
                    "{subject}: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\"{scope}",
                    p.res.group
                );
                return status_error(
                    403,
                    "Forbidden",
                    &msg,
                    Some((p.name.as_deref().unwrap_or(""), p.res.group, p.res.plural)),
                );
            }
        }
    }
    // Like the NamespaceLifecycle admission plugin: only what creates an object needs the
    // namespace to exist; reads in a missing namespace answer NotFound for the object.
    let creates = verb == "create"
        || (verb == "patch" && content_type.starts_with("application/apply-patch"));
    if let Some(ns) = &p.ns {
        let exists = shared.state.lock().unwrap().namespace_exists(ns);
        if creates && !exists && p.res.namespaced {
            return status_error(
                404,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
                Some((ns, "", "namespaces")),
            );
        }
    }
    if verb == "watch" {
        let fault = faults::watch_fault(&mut shared.state.lock().unwrap(), path);
        return crate::watch::watch(shared.clone(), &p, &q, label_sel, field_sel, fault);
    }
    let mut s = shared.state.lock().unwrap();
    let ns = p.ns.clone().unwrap_or_default();
    let r = p.res;
    let manager = manager_name(&q, user_agent);
    let now = now_rfc3339();
    match (verb, p.sub.as_deref()) {
        ("get", None) => match s.get(r, &ns, p.name.as_deref().unwrap()) {
            Some(o) => json_response(200, o),
            None => not_found(r, p.name.as_deref().unwrap()),
        },
        ("list", None) => {
            let items: Vec<Value> = s
                .list(r, p.ns.as_deref())
                .into_iter()
                .filter(|o| labels_match(&label_sel, o) && fields_match(&field_sel, o))
                .map(|o| {
                    let mut o = o.clone();
                    let m = o.as_object_mut().unwrap();
                    m.remove("apiVersion");
                    m.remove("kind");
                    o
                })
                .collect();
            json_response(
                200,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ("create", None) => {
            let protobuf = content_type.starts_with("application/vnd.kubernetes.protobuf");
            let parsed = match protobuf
                .then(|| crate::protobuf::object(body, r.kind, &r.api_version()))
                .flatten()
            {
                Some(decoded) => decoded,
                None => parse_body(body, content_type),
            };
            let mut obj = match parsed {
                Ok(v) if v.is_object() => v,
                Ok(_) => {
                    return status_error(
                        400,
                        "BadRequest",
                        "the body of the request was in an unknown format",
                        None,
                    )
                }
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            if let Some(gen) = obj["metadata"]["generateName"]
                .as_str()
                .filter(|_| obj["metadata"]["name"].is_null())
            {
                let id = s.next_rv();
                obj["metadata"]["name"] = json!(format!("{gen}{id:05x}"));
            }
            if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
                if body_ns != ns {
                    return status_error(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request", None);
                }
            }
            if r.kind == "Secret" {
                normalize_secret(&mut obj);
            }
            if let Err(m) = validate(r, &obj) {
                return status_error(
                    422,
                    "Invalid",
                    &m,
                    Some((
                        obj["metadata"]["name"].as_str().unwrap_or(""),
                        r.group,
                        r.kind,
                    )),
                );
            }
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            if s.get(r, &ns, &name).is_some() {
                return status_error(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", r.qualified()),
                    Some((&name, r.group, r.plural)),
                );
            }
            for k in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "generation",
            ] {
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove(k);
                }
            }
            if q.contains_key("dryRun") {
                return json_response(201, &obj);
            }
            record_update(None, &mut obj, &manager, &r.api_version(), &now);
            let stored = s.put(r, &ns, obj);
            json_response(201, &stored)
        }
        ("update", None) | ("patch", None) => {
            let name = p.name.clone().unwrap();
            let current = s.get(r, &ns, &name).cloned();
            let is_apply = content_type.starts_with("application/apply-patch");
            let parsed = match parse_body(body, content_type) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            let mut obj = match (verb, current.as_ref()) {
                ("update", None) => return not_found(r, &name),
                ("update", Some(cur)) => {
                    let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
                    if !want_rv.is_empty()
                        && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                    {
                        return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                    }
                    let mut o = parsed.clone();
                    for k in ["uid", "creationTimestamp"] {
                        o["metadata"][k] = cur["metadata"][k].clone();
                    }
                    o["metadata"]["managedFields"] = cur["metadata"]["managedFields"].clone();
                    if o.get("status").is_none_or(Value::is_null) {
                        o["status"] = cur["status"].clone();
                    }
                    o
                }
                (_, None) if is_apply => {
                    if !q.contains_key("fieldManager") {
                        return status_error(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", None);
                    }
                    match apply(
                        None,
                        &parsed,
                        &manager,
                        q.get("force").is_some_and(|f| f == "true"),
                        &r.api_version(),
                        &now,
                    ) {
                        Ok(mut o) => {
                            o["metadata"]["name"] = json!(name);
                            o
                        }
                        Err(m) => return status_error(409, "Conflict", &m, None),
                    }
                }
                (_, None) => return not_found(r, &name),
                (_, Some(cur)) => {
                    if let Some(rv) = parsed
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        if !is_apply
                            && rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                        {
                            return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                        }
                    }
                    let mut o = cur.clone();
                    if is_apply {
                        if !q.contains_key("fieldManager") {
                            return status_error(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", None);
                        }
                        match apply(
                            Some(cur),
                            &parsed,
                            &manager,
                            q.get("force").is_some_and(|f| f == "true"),
                            &r.api_version(),
                            &now,
                        ) {
                            Ok(x) => o = x,
                            Err(m) => return status_error(409, "Conflict", &m, None),
                        }
                    } else if content_type.starts_with("application/json-patch+json") {
                        if let Err(e) = json_patch(&mut o, &parsed) {
                            return status_error(422, "Invalid", &e, None);
                        }
                    } else if content_type.starts_with("application/merge-patch+json") {
                        merge_patch(&mut o, &parsed);
                    } else if content_type.starts_with("application/strategic-merge-patch+json") {
                        strategic_merge_patch(&mut o, &parsed);
                    } else {
                        return status_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml", None);
                    }
                    o
                }
            };
            if r.kind == "Secret" {
                normalize_secret(&mut obj);
            }
            obj["metadata"]["name"] = json!(name);
            if let Err(m) = validate(r, &obj) {
                return status_error(422, "Invalid", &m, Some((&name, r.group, r.kind)));
            }
            if q.contains_key("dryRun") {
                return json_response(200, &obj);
            }
            if !is_apply {
                record_update(current.as_ref(), &mut obj, &manager, &r.api_version(), &now);
            }
            // A write that changes nothing keeps the resourceVersion, as the API server does.
            if let Some(cur) = &current {
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(m) = v["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                        m.remove("managedFields");
                    }
                    v["apiVersion"] = json!(r.api_version());
                    v["kind"] = json!(r.kind);
                    v
                };
                if strip(cur) == strip(&obj) {
                    return json_response(200, cur);
                }
            }
            let created = current.is_none();
            let stored = s.put(r, &ns, obj);
            json_response(if created { 201 } else { 200 }, &stored)
        }
        ("create", Some("eviction")) if r.plural == "pods" => {
            let name = p.name.clone().unwrap();
            let eviction = match parse_body(body, content_type) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            let (code, v) = crate::disruption::evict(&mut s, &ns, &name, &eviction);
            let retry = v["details"]["retryAfterSeconds"].as_u64();
            let mut resp = json_response(code, &v);
            // The response writer sets Retry-After from details.retryAfterSeconds when > 0.
            if let Some(secs) = retry.filter(|s| *s > 0) {
                resp.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            resp
        }
        ("get", Some("scale")) | ("update", Some("scale")) | ("patch", Some("scale"))
            if matches!(r.plural, "deployments" | "statefulsets") =>
        {
            let name = p.name.clone().unwrap();
            let Some(cur) = s.get(r, &ns, &name).cloned() else {
                return not_found(r, &name);
            };
            let scale_of = |o: &Value| {
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
            };
            if verb == "get" {
                return json_response(200, &scale_of(&cur));
            }
            let parsed = match parse_body(body, content_type) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            let mut scale = scale_of(&cur);
            if verb == "update" {
                let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !want_rv.is_empty()
                    && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                {
                    return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                }
                scale = parsed;
            } else if content_type.starts_with("application/json-patch+json") {
                if let Err(e) = json_patch(&mut scale, &parsed) {
                    return status_error(422, "Invalid", &e, None);
                }
            } else {
                merge_patch(&mut scale, &parsed);
            }
            let Some(n) = scale["spec"]["replicas"].as_i64() else {
                return status_error(
                    422,
                    "Invalid",
                    &format!(
                        "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Required value"
                    ),
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
        ("delete", None) => {
            let name = p.name.clone().unwrap();
            let Some(cur) = s.get(r, &ns, &name).cloned() else {
                return not_found(r, &name);
            };
            let options = parse_body(body, content_type).ok();
            // DeleteOptions.gracePeriodSeconds, in the body or as a query parameter.
            let grace = options
                .as_ref()
                .and_then(|b| b["gracePeriodSeconds"].as_i64())
                .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            if let Some(pre) = options.as_ref().and_then(|b| {
                b.pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            }) {
                if Some(pre.as_str()) != cur["metadata"]["resourceVersion"].as_str() {
                    return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the ResourceVersion in the precondition ({pre}) does not match the ResourceVersion in record ({}). The object might have been modified", r.qualified(), cur["metadata"]["resourceVersion"].as_str().unwrap_or("")), Some((&name, r.group, r.plural)));
                }
            }
            if r.kind == "Pod" {
                mark_terminating_with_grace(&mut s, &ns, &name, grace);
                // Removed at once (grace 0): the response is the object as it was last.
                let o = s.get(r, &ns, &name).cloned().unwrap_or(cur);
                return json_response(200, &o);
            }
            s.remove(r, &ns, &name);
            json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": r.group, "kind": r.plural, "uid": cur["metadata"]["uid"]}}),
            )
        }
        ("deletecollection", None) => {
            let victims: Vec<Value> = s
                .list(r, p.ns.as_deref())
                .into_iter()
                .filter(|o| labels_match(&label_sel, o) && fields_match(&field_sel, o))
                .cloned()
                .collect();
            let mut out = Vec::new();
            for v in victims {
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                if r.kind == "Pod" {
                    mark_terminating(&mut s, &ns, &name);
                    out.push(s.get(r, &ns, &name).cloned().unwrap());
                } else if let Some(o) = s.remove(r, &ns, &name) {
                    out.push(o);
                }
            }
            json_response(
                200,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": out}),
            )
        }
        _ => status_error(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        ),
    }
}
