//! RBAC as the API server's authorizer applies it to the ServiceAccount, with the rules read
//! from the project's own rendered Roles and RoleBindings.

use std::collections::HashMap;

use serde_json::Value;

use crate::logic::parse_field_selector;
use crate::refusal::Refusal;
use crate::routes::{parse_path, query_map, verb_of, Parsed};
use crate::store::Recorded;

/// A Role rule, as rbac/v1 PolicyRule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

/// rbac/v1 semantics: a rule matches the verb, the group, `resource` or `resource/sub`, and,
/// when it lists resourceNames, the request's name (list/watch only with a metadata.name field
/// selector; never create or deletecollection).
pub(crate) fn authorized(rules: &[Rule], verb: &str, p: &Parsed, field_name: Option<&str>) -> bool {
    let resource = match &p.sub {
        Some(s) => format!("{}/{s}", p.res.plural),
        None => p.res.plural.to_string(),
    };
    let name = p.name.as_deref().or(if matches!(verb, "list" | "watch") {
        field_name
    } else {
        None
    });
    rules.iter().any(|r| {
        (r.verbs.iter().any(|v| v == "*" || v == verb))
            && r.api_groups.iter().any(|g| g == "*" || g == p.res.group)
            && r.resources.iter().any(|x| x == "*" || *x == resource)
            && (r.resource_names.is_empty()
                || name.is_some_and(|n| r.resource_names.iter().any(|x| x == n)))
    })
}

/// What the authorizer sees of a recorded request: (verb, group, resource[/sub], namespace, name).
pub fn attributes(rec: &Recorded) -> Option<(String, String, String, String, Option<String>)> {
    let p = parse_path(&rec.path)?;
    let q = query_map(&rec.query);
    let verb = verb_of(&rec.method, &p, &q).to_string();
    let resource = match &p.sub {
        Some(s) => format!("{}/{s}", p.res.plural),
        None => p.res.plural.to_string(),
    };
    // list/watch name their object through a metadata.name field selector, as RBAC sees it.
    let name = p.name.clone().or_else(|| {
        if !matches!(verb.as_str(), "list" | "watch") {
            return None;
        }
        let sel = parse_field_selector(q.get("fieldSelector")?).ok()?;
        sel.into_iter()
            .find(|(k, eq, _)| k == "metadata.name" && *eq)
            .map(|(_, _, v)| v)
    });
    Some((
        verb,
        p.res.group.to_string(),
        resource,
        p.ns.clone().unwrap_or_default(),
        name,
    ))
}

/// The Roles and RoleBindings of rendered manifests (kustomize or the Helm chart), as the RBAC
/// the test cluster enforces for each ServiceAccount: user -> namespace -> rules.
pub fn rbac_from_manifests(yaml: &str) -> HashMap<String, HashMap<String, Vec<Rule>>> {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let mut roles: HashMap<(String, String), Role> = HashMap::new();
    let mut bindings = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Role") => {
                let r: Role = serde_json::from_value(v).unwrap();
                roles.insert(
                    (
                        r.metadata.namespace.clone().unwrap(),
                        r.metadata.name.clone().unwrap(),
                    ),
                    r,
                );
            }
            Some("RoleBinding") => bindings.push(serde_json::from_value::<RoleBinding>(v).unwrap()),
            _ => {}
        }
    }
    let mut out: HashMap<String, HashMap<String, Vec<Rule>>> = HashMap::new();
    for b in bindings {
        let ns = b.metadata.namespace.clone().unwrap();
        for s in b.subjects.unwrap_or_default() {
            if s.kind != "ServiceAccount" {
                continue;
            }
            let user = format!(
                "system:serviceaccount:{}:{}",
                s.namespace.clone().unwrap_or(ns.clone()),
                s.name
            );
            let role = &roles[&(ns.clone(), b.role_ref.name.clone())];
            for r in role.rules.clone().unwrap_or_default() {
                out.entry(user.clone())
                    .or_default()
                    .entry(ns.clone())
                    .or_default()
                    .push(Rule {
                        api_groups: r.api_groups.unwrap_or_default(),
                        resources: r.resources.unwrap_or_default(),
                        verbs: r.verbs,
                        resource_names: r.resource_names.unwrap_or_default(),
                    });
            }
        }
    }
    out
}

/// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`, as the API server answers it:
/// the request's resourceAttributes judged by the same authorizer, for the caller. Every
/// authenticated user may create one (the `system:basic-user` ClusterRole), so no RBAC gates it.
pub(crate) fn self_subject_access_review(
    rbac: Option<&HashMap<String, HashMap<String, Vec<Rule>>>>,
    user: &str,
    body: &[u8],
    content_type: &str,
) -> Result<Value, Refusal> {
    let mut review: Value = if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        review_from_protobuf(body)?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| Refusal::BadRequest(format!("invalid SelfSubjectAccessReview: {e}")))?
    };
    let attrs = review["spec"]["resourceAttributes"].clone();
    let field = |k: &str| attrs[k].as_str().unwrap_or("").to_string();
    let (verb, group, plural) = (field("verb"), field("group"), field("resource"));
    let allowed = match rbac {
        // Only the ServiceAccounts are bound by the rendered Roles; the admin may do anything.
        Some(rbac) if user.starts_with("system:serviceaccount:") => {
            let ns = field("namespace");
            let rules = rbac
                .get(user)
                .and_then(|by_ns| by_ns.get(&ns))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            crate::store::RESOURCES
                .iter()
                .find(|r| r.group == group && r.plural == plural)
                .is_some_and(|res| {
                    let p = Parsed {
                        res,
                        ns: (!ns.is_empty()).then_some(ns.clone()),
                        name: Some(field("name")).filter(|n| !n.is_empty()),
                        sub: Some(field("subresource")).filter(|s| !s.is_empty()),
                    };
                    authorized(rules, &verb, &p, None)
                })
        }
        _ => true,
    };
    review["status"] = if allowed {
        serde_json::json!({"allowed": true, "reason": "RBAC: allowed"})
    } else {
        serde_json::json!({"allowed": false})
    };
    review["metadata"] = serde_json::json!({"creationTimestamp": null});
    Ok(review)
}

/// kubectl's typed clients send built-in kinds as protobuf: the `k8s\0` envelope around a
/// runtime.Unknown whose `raw` is the SelfSubjectAccessReview (generated.proto field numbers:
/// spec=2, resourceAttributes=1, then namespace..name = 1..7).
fn review_from_protobuf(body: &[u8]) -> Result<Value, Refusal> {
    let bad = || Refusal::BadRequest("invalid SelfSubjectAccessReview (protobuf)".to_string());
    let unknown = body.strip_prefix(b"k8s\0").ok_or_else(bad)?;
    let raw = field(unknown, 2).ok_or_else(bad)?;
    let spec = field(raw, 2).ok_or_else(bad)?;
    let attrs = field(spec, 1).unwrap_or_default();
    let text = |n: u64| {
        field(attrs, n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let keys = [
        "namespace",
        "verb",
        "group",
        "version",
        "resource",
        "subresource",
        "name",
    ];
    let attributes: serde_json::Map<String, Value> = keys
        .iter()
        .zip(1..)
        .map(|(k, n)| (k.to_string(), Value::String(text(n))))
        .collect();
    Ok(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }))
}

/// The first length-delimited field `number` of a protobuf message.
fn field(msg: &[u8], number: u64) -> Option<&[u8]> {
    crate::protobuf::bytes_field(msg, number)
}
