//! RBAC as the API server's authorizer applies it to the ServiceAccount, with the rules read
//! from the project's own rendered Roles and RoleBindings.

use std::collections::HashMap;

use serde_json::Value;

use crate::logic::parse_field_selector;
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
