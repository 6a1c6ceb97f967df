//! HTTP: paths to resources and verbs, the Status errors the API server writes, authentication,
//! impersonation, RBAC and namespace admission, then one handler per API group (groups.rs: the
//! scale and eviction subresources, SelfSubjectAccessReviews), over the generic store's verbs
//! (generic.rs: get, list, create, update, patch (JSON, merge, strategic merge, apply), delete,
//! deletecollection) and discovery (discovery.rs).
// A handler's early exit is the HTTP response itself, as hyper sends it: boxing it would only
// add noise to every handler.
#![allow(clippy::result_large_err)]

mod discovery;
mod generic;
mod groups;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};

use crate::faults;
use crate::logic::*;
use crate::rbac::authorized;
use crate::refusal::Refusal;
use crate::store::{Recorded, Resource, State, PROMETHEUS_OPERATOR_GROUP, RESOURCES};
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

pub(crate) fn parse_body(body: &[u8], content_type: &str) -> Result<Value, Refusal> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body).map_err(|e| Refusal::BadRequest(e.to_string()))
    } else {
        serde_json::from_slice(body).map_err(|e| Refusal::BadRequest(e.to_string()))
    }
}

/// The Status response of a refusal.
pub(crate) fn refused(r: &Refusal, details: Option<(&str, &str, &str)>) -> Response<Body> {
    status_error(r.code(), r.reason(), r.message(), details)
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

/// The "object has been modified" Conflict of an update whose resourceVersion is stale.
pub(crate) fn modified(r: &Resource, name: &str) -> Response<Body> {
    status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((name, r.group, r.plural)))
}

pub(crate) fn bad_request(message: &str) -> Response<Body> {
    status_error(400, "BadRequest", message, None)
}

/// An HTTP request as read off the wire, before authentication.
struct Raw {
    method: String,
    path: String,
    query: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

/// A resource request, parsed, authorized and admitted: what a group's handler serves.
pub(crate) struct Call<'a> {
    pub(crate) verb: &'static str,
    pub(crate) p: Parsed,
    pub(crate) q: HashMap<String, String>,
    pub(crate) labels: Vec<Req>,
    pub(crate) fields: Vec<(String, bool, String)>,
    pub(crate) content_type: &'a str,
    pub(crate) body: &'a [u8],
    pub(crate) manager: String,
    pub(crate) now: String,
}

impl Call<'_> {
    pub(crate) fn ns(&self) -> String {
        self.p.ns.clone().unwrap_or_default()
    }

    /// The object's name (requests for one object only).
    pub(crate) fn name(&self) -> String {
        self.p.name.clone().unwrap()
    }

    pub(crate) fn is_apply(&self) -> bool {
        self.content_type.starts_with("application/apply-patch")
    }
}

fn header(req: &Request<hyper::body::Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let token = header(&req, "authorization")
        .and_then(|h| h.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default();
    let impersonate = header(&req, "impersonate-user");
    let mut raw = Raw {
        method: req.method().as_str().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or("").to_string(),
        content_type: header(&req, "content-type").unwrap_or_default(),
        user_agent: header(&req, "user-agent").unwrap_or_else(|| "unknown".into()),
        body: Bytes::new(),
    };
    raw.body = req
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
    let (user, refused) = impersonation(user, impersonate);
    // Faults are matched before anything else, as a proxy or an overloaded server would.
    let fault = faults::request_fault(&mut shared.state.lock().unwrap(), &raw.method, &raw.path);
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
        None => route(&shared, &raw, user.as_deref()).await,
    };
    {
        let mut s = shared.state.lock().unwrap();
        let at_rv = s.rv;
        s.requests.push(Recorded {
            method: raw.method,
            path: raw.path,
            query: raw.query,
            user: user.unwrap_or_default(),
            status: resp.status().as_u16(),
            at_rv,
        });
    }
    shared.notify.notify_waiters();
    resp
}

/// Impersonation (k8s.io/apiserver endpoints/filters/impersonation.go): the caller needs
/// `impersonate` on the user (here only the admin has it); the request then runs as them.
/// Returns the user the request runs as, and the refusal if the caller may not impersonate.
fn impersonation(
    user: Option<String>,
    as_user: Option<String>,
) -> (Option<String>, Option<Response<Body>>) {
    match (user, as_user) {
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
    }
}

/// Dispatches an authenticated request: discovery, SelfSubjectAccessReviews, watches, then the
/// handler of the resource's API group.
async fn route(shared: &Arc<Shared>, raw: &Raw, user: Option<&str>) -> Response<Body> {
    let Some(user) = user else {
        return status_error(401, "Unauthorized", "Unauthorized", None);
    };
    let prometheus_operator = shared.state.lock().unwrap().prometheus_operator_crds;
    if let Some(resp) = discovery::serve(&raw.method, &raw.path, prometheus_operator) {
        return resp;
    }
    if raw.method == "POST" && raw.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
    {
        let s = shared.state.lock().unwrap();
        return groups::authorization_v1(&s, user, &raw.body, &raw.content_type);
    }
    let call = match admit(shared, raw, user, prometheus_operator) {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    if call.verb == "watch" {
        let fault = faults::watch_fault(&mut shared.state.lock().unwrap(), &raw.path);
        let Call {
            p,
            q,
            labels,
            fields,
            ..
        } = call;
        return crate::watch::watch(shared.clone(), &p, &q, labels, fields, fault);
    }
    let handler: fn(&mut State, &Call) -> Response<Body> = match call.p.res.group {
        "" => groups::core_v1,
        "apps" => groups::apps_v1,
        "policy" => groups::policy_v1,
        "coordination.k8s.io" => groups::coordination_v1,
        "events.k8s.io" => groups::events_v1,
        "rbac.authorization.k8s.io" => groups::rbac_v1,
        "batch" => groups::batch_v1,
        "apiextensions.k8s.io" => groups::apiextensions_v1,
        PROMETHEUS_OPERATOR_GROUP => groups::monitoring_v1,
        _ => {
            return status_error(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            )
        }
    };
    let mut s = shared.state.lock().unwrap();
    handler(&mut s, &call)
}

/// Parses a resource request (path, verb, selectors) and admits it: RBAC for service accounts,
/// then the namespace lifecycle. Err is the answer that refuses it.
fn admit<'a>(
    shared: &Shared,
    raw: &'a Raw,
    user: &str,
    prometheus_operator: bool,
) -> Result<Call<'a>, Response<Body>> {
    let q = query_map(&raw.query);
    let Some(p) = parse_path(&raw.path)
        .filter(|p| prometheus_operator || p.res.group != PROMETHEUS_OPERATOR_GROUP)
    else {
        return Err(status_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ));
    };
    let verb = verb_of(&raw.method, &p, &q);
    let fields = q
        .get("fieldSelector")
        .map(|f| parse_field_selector(f))
        .transpose()
        .map_err(|e| refused(&e, None))?
        .unwrap_or_default();
    let labels = q
        .get("labelSelector")
        .map(|l| parse_label_selector(l))
        .transpose()
        .map_err(|e| refused(&e, None))?
        .unwrap_or_default();
    let call = Call {
        verb,
        manager: manager_name(&q, &raw.user_agent),
        now: shared.state.lock().unwrap().now_rfc3339(),
        p,
        q,
        labels,
        fields,
        content_type: &raw.content_type,
        body: &raw.body,
    };
    let s = shared.state.lock().unwrap();
    if let Some(refused) = forbidden(&s, user, &call) {
        return Err(refused);
    }
    // Like the NamespaceLifecycle admission plugin: only what creates an object needs the
    // namespace to exist; reads in a missing namespace answer NotFound for the object.
    let creates = verb == "create" || (verb == "patch" && call.is_apply());
    if let Some(ns) = &call.p.ns {
        if creates && !s.namespace_exists(ns) && call.p.res.namespaced {
            return Err(status_error(
                404,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
                Some((ns, "", "namespaces")),
            ));
        }
    }
    drop(s);
    Ok(call)
}

/// RBAC for the service account: the 403 the API server answers when its rules do not allow
/// the request.
fn forbidden(s: &State, user: &str, c: &Call) -> Option<Response<Body>> {
    let (Some(rbac), true) = (&s.rbac, user.starts_with("system:serviceaccount:")) else {
        return None;
    };
    let p = &c.p;
    let field_name = c
        .fields
        .iter()
        .find(|(k, eq, _)| k == "metadata.name" && *eq)
        .map(|(_, _, v)| v.as_str());
    let ns = c.ns();
    let rules = rbac
        .get(user)
        .and_then(|by_ns| by_ns.get(&ns))
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if authorized(rules, c.verb, p, field_name) {
        return None;
    }
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
        "{subject}: User \"{user}\" cannot {} resource \"{resource}\" in API group \"{}\"{scope}",
        c.verb, p.res.group
    );
    Some(status_error(
        403,
        "Forbidden",
        &msg,
        Some((p.name.as_deref().unwrap_or(""), p.res.group, p.res.plural)),
    ))
}
