//! Pods and workloads as the API shows them, judged without the API: readiness, rollout
//! progress, label selectors, and which container of a dSSM pod is Redis. One place for every
//! such predicate.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::contract;
use crate::materials::annotations;
use crate::model::targets::Workload;

/// What a dSSM pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodKind {
    Db,
    Sentinel,
}

pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn terminating(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

/// A pod that ended (phase Failed or Succeeded, e.g. evicted) stays listed but is not live: its
/// controller replaces it.
pub fn ended(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

/// Why TMM's rollout is not complete, if it is not: the Deployment controller has not seen the
/// latest spec, or fewer replicas are updated or available than asked for (what `kubectl rollout
/// status` checks).
pub fn rollout_incomplete(d: &Deployment) -> Option<String> {
    let want = d.spec.replicas.unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let name = format!(
        "deployment {}/{}",
        d.namespace().unwrap_or_default(),
        d.name_any()
    );
    if let (Some(generation), Some(observed)) = (d.metadata.generation, status.observed_generation)
    {
        if observed < generation {
            return Some(format!(
                "{name}: its controller has not observed generation {generation} yet (at {observed})"
            ));
        }
    }
    let updated = status.updated_replicas.unwrap_or(want);
    let available = status.available_replicas.unwrap_or(0);
    if updated < want || available < want {
        return Some(format!(
            "{name}: rollout in progress ({updated} of {want} updated, {available} available)"
        ));
    }
    None
}

/// Why the dSSM pods are not all serving, if they are not: a live pod not Ready, or none at all.
pub fn dssm_not_ready(pods: &[Pod], namespace: &str, selector: &str) -> Option<String> {
    let live: Vec<&Pod> = pods.iter().filter(|p| !ended(p)).collect();
    if live.is_empty() {
        return Some(format!("no dSSM pod matches {selector:?} in {namespace}"));
    }
    let not_ready: Vec<String> = live
        .iter()
        .filter(|p| terminating(p) || !pod_ready(p))
        .map(|p| format!("pod {namespace}/{}", p.name_any()))
        .collect();
    (!not_ready.is_empty()).then(|| format!("{} not Ready", not_ready.join(", ")))
}

/// When a pod was created (None when the API left it out).
pub fn created(p: &Pod) -> Option<Timestamp> {
    p.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// The roll of `token` recorded on a TMM workload (`annotations::TMM_ROLL`): when it began.
pub fn recorded_roll(w: &Workload, token: &str) -> Option<Timestamp> {
    let v = w.annotations().get(annotations::TMM_ROLL)?.clone();
    let (tok, at) = v.rsplit_once('@')?;
    (tok == token).then(|| at.parse().ok()).flatten()
}

/// Why the pods do not prove a roll that began at `since`, if they do not: every live pod is
/// newer, Ready and of one template (`pod-template-hash` or `controller-revision-hash`), and
/// there are at least `want`. Replica counts alone cannot tell an old pod from a new one.
pub fn roll_unproven(pods: &[Pod], since: Timestamp, want: i32) -> Option<String> {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| !terminating(p) && !ended(p))
        .collect();
    if let Some(p) = live.iter().find(|p| created(p).is_none_or(|c| c < since)) {
        return Some(format!("pod {} is older than the roll", p.name_any()));
    }
    if let Some(p) = live.iter().find(|p| !pod_ready(p)) {
        return Some(format!("pod {} is not Ready", p.name_any()));
    }
    let hash = |p: &Pod| {
        let l = p.labels();
        l.get("pod-template-hash")
            .or_else(|| l.get("controller-revision-hash"))
            .cloned()
    };
    let hashes: std::collections::BTreeSet<Option<String>> = live.iter().map(|p| hash(p)).collect();
    if hashes.len() > 1 {
        return Some(format!("its pods run {} templates", hashes.len()));
    }
    (live.len() < usize::try_from(want).unwrap_or(0))
        .then(|| format!("{} of {want} pods", live.len()))
}

/// The StatefulSets that own `pods` (terminating ones included: their owner still wants them).
pub fn statefulset_owners(pods: &[Pod]) -> std::collections::BTreeSet<String> {
    pods.iter()
        .flat_map(|p| p.owner_references())
        .filter(|o| o.kind == "StatefulSet")
        .map(|o| o.name.clone())
        .collect()
}

/// Why the StatefulSets are short of pods, if they are: each of `wanted` (name, replicas)
/// has that many live, Ready pods. With OrderedReady (the API default) an evicted StatefulSet
/// comes back one ordinal at a time, so the pods listed at one instant are not all it wants.
pub fn statefulsets_short(
    pods: &[Pod],
    namespace: &str,
    wanted: &[(String, i32)],
) -> Option<String> {
    let short: Vec<String> = wanted
        .iter()
        .filter_map(|(name, want)| {
            let ready = pods
                .iter()
                .filter(|p| !terminating(p) && !ended(p) && pod_ready(p))
                .filter(|p| {
                    p.owner_references()
                        .iter()
                        .any(|o| o.kind == "StatefulSet" && &o.name == name)
                })
                .count();
            (ready < usize::try_from(*want).unwrap_or(0))
                .then(|| format!("statefulset {namespace}/{name} has {ready} of {want} pods Ready"))
        })
        .collect();
    (!short.is_empty()).then(|| short.join(", "))
}

/// Whether a LabelSelector (matchLabels and matchExpressions, as apimachinery's
/// `LabelSelectorAsSelector`) selects `labels`. An empty selector selects everything.
pub fn selects(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// Validates a label selector as the API server's `labels.Parse` would, and refuses the empty
/// one: `--dssm-selector ''` would select every pod of the namespace, and the dSSM restart
/// deletes what it selects. Returns the selector trimmed.
pub fn parse_selector(s: &str) -> Result<String, InvalidSelector> {
    let invalid = |why: String| InvalidSelector {
        selector: s.to_string(),
        why,
    };
    check_selector(s.trim()).map_err(invalid)
}

/// A label selector the API server would refuse, or the empty one: the selector as given, and
/// what is wrong with it in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct InvalidSelector {
    pub selector: String,
    pub why: String,
}

fn check_selector(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an empty selector selects every pod of the namespace; give one that selects only the dSSM pods, e.g. 'app in (f5-dssm-db, f5-dssm-sentinel)'".into());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in {s:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in {s:?}"));
    }
    parts.push(&s[start..]);
    for part in parts {
        parse_requirement(part.trim()).map_err(|e| format!("{part:?}: {e}"))?;
    }
    Ok(s.to_string())
}

fn parse_requirement(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("an empty requirement (a stray comma?)".into());
    }
    if let Some(key) = p.strip_prefix('!') {
        return label_key(key.trim());
    }
    for op in ["!=", "==", "="] {
        if let Some((k, v)) = p.split_once(op) {
            label_key(k.trim())?;
            return label_value(v.trim());
        }
    }
    let key_end = p.find(|c: char| c.is_whitespace()).unwrap_or(p.len());
    let (key, rest) = (&p[..key_end], p[key_end..].trim_start());
    label_key(key)?;
    if rest.is_empty() {
        return Ok(()); // `key`: the label exists
    }
    let set = rest
        .strip_prefix("notin")
        .or_else(|| rest.strip_prefix("in"))
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.strip_suffix(')'))
        .ok_or("expected `=`, `==`, `!=`, `in (...)` or `notin (...)` after the key")?;
    let values: Vec<&str> = set.split(',').map(str::trim).collect();
    if values.iter().all(|v| v.is_empty()) {
        return Err("`in` and `notin` need at least one value".into());
    }
    values.into_iter().try_for_each(label_value)
}

/// `[prefix/]name`: prefix a DNS subdomain, name a label name.
fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if !crate::model::targets::dns_subdomain(p) {
            return Err(format!(
                "{p:?} is not a valid label key prefix (a DNS subdomain)"
            ));
        }
    }
    if name.is_empty() {
        return Err("a label key is missing".into());
    }
    label_name(name).map_err(|e| format!("label key {k:?}: {e}"))
}

fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    label_name(v).map_err(|e| format!("label value {v:?}: {e}"))
}

/// At most 63 characters, alphanumeric at both ends, `-`, `_` or `.` inside.
fn label_name(n: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if n.len() > 63 {
        return Err("longer than 63 characters".into());
    }
    if !n.starts_with(alnum) || !n.ends_with(alnum) {
        return Err("must start and end with a letter or digit".into());
    }
    if !n.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.')) {
        return Err("only letters, digits, '-', '_' and '.' are allowed".into());
    }
    Ok(())
}

/// A workload's LabelSelector as the `labelSelector` query string: matchLabels and
/// matchExpressions (ignoring the expressions would select pods of other workloads).
pub fn selector_of(d: &Deployment) -> String {
    selector_query(&d.spec.selector)
}

/// A LabelSelector as the `labelSelector` query string.
pub fn selector_query(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let labels = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"));
    let expressions = sel.match_expressions.iter().flatten().map(|e| {
        let values = e.values.clone().unwrap_or_default().join(",");
        match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "DoesNotExist" => format!("!{}", e.key),
            _ => e.key.clone(), // Exists
        }
    });
    labels.chain(expressions).collect::<Vec<_>>().join(",")
}

/// Redis's port when a DB container declares none.
pub const DB_PORT: u16 = 6379;

/// What a declared port says about the Redis behind it: named `redis`/`sentinel`, or Redis's
/// and Sentinel's own numbers.
pub fn port_role(port: &ContainerPort) -> Option<PodKind> {
    match (port.name.as_deref(), port.container_port) {
        (Some("sentinel"), _) => Some(PodKind::Sentinel),
        (Some("redis"), _) => Some(PodKind::Db),
        (_, p) if p == i32::from(contract::SENTINEL_PORT) => Some(PodKind::Sentinel),
        (_, p) if p == i32::from(DB_PORT) => Some(PodKind::Db),
        _ => None,
    }
}

/// The volumes of `spec` that carry one of our two Secrets, directly or projected.
fn secret_volumes(spec: &PodSpec) -> Vec<&str> {
    let is_ours = |n: &str| n == contract::CERTS_SECRET || n == contract::KEYS_SECRET;
    spec.volumes
        .iter()
        .flatten()
        .filter(|v| {
            let direct = v.secret.as_ref().and_then(|s| s.secret_name.as_deref());
            let projected = v.projected.as_ref().and_then(|pr| pr.sources.as_ref());
            direct.is_some_and(is_ours)
                || projected.into_iter().flatten().any(|src| {
                    src.secret
                        .as_ref()
                        .is_some_and(|s| is_ours(s.name.as_str()))
                })
        })
        .map(|v| v.name.as_str())
        .collect()
}

fn mounts_secrets(c: &Container, volumes: &[&str]) -> bool {
    c.volume_mounts
        .iter()
        .flatten()
        .any(|m| volumes.contains(&m.name.as_str()))
}

/// The Redis (or Sentinel) container of a dSSM pod, found by what it is, never by its place:
/// a port named `redis`/`sentinel`, else a port 6379/26379, else the one container that mounts
/// our Secrets, else the pod's only container. A sidecar listed first is passed over.
pub fn redis_container(spec: &PodSpec) -> Result<&Container, NoRedisContainer> {
    let cs = &spec.containers;
    let named = |c: &&Container| {
        c.ports
            .iter()
            .flatten()
            .any(|p| matches!(p.name.as_deref(), Some("redis" | "sentinel")))
    };
    let numbered = |c: &&Container| c.ports.iter().flatten().any(|p| port_role(p).is_some());
    let volumes = secret_volumes(spec);
    let mounting: Vec<&Container> = cs.iter().filter(|c| mounts_secrets(c, &volumes)).collect();
    cs.iter()
        .find(named)
        .or_else(|| cs.iter().find(numbered))
        .or_else(|| (mounting.len() == 1).then(|| mounting[0]))
        .or_else(|| (cs.len() == 1).then(|| &cs[0]))
        .ok_or_else(|| NoRedisContainer {
            containers: cs.iter().map(|c| c.name.clone()).collect(),
        })
}

/// A dSSM pod none of whose containers is recognisably Redis (named by their names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "none of its containers ({}) is recognisably Redis: none declares a port named redis or \
     sentinel, or port {DB_PORT} or {}, and not exactly one mounts {} or {}",
    containers.join(", "),
    contract::SENTINEL_PORT,
    contract::CERTS_SECRET,
    contract::KEYS_SECRET
)]
pub struct NoRedisContainer {
    pub containers: Vec<String>,
}

/// The port Redis listens on in its container: the port named `redis`/`sentinel`, else
/// 6379/26379, else the container's only port, else the default for its kind.
pub fn redis_port(c: &Container, kind: PodKind) -> u16 {
    let ports: Vec<&ContainerPort> = c.ports.iter().flatten().collect();
    let named = ports
        .iter()
        .find(|p| matches!(p.name.as_deref(), Some("redis" | "sentinel")));
    let known = ports.iter().find(|p| port_role(p).is_some());
    let only = (ports.len() == 1).then(|| &ports[0]);
    named
        .or(known)
        .or(only)
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(match kind {
            PodKind::Db => DB_PORT,
            PodKind::Sentinel => contract::SENTINEL_PORT,
        })
}

/// Whether the Redis container mounts one of the dSSM Secrets with `subPath`: kubelet never
/// updates such a file, so only a restart brings the new materials. (A sidecar's mounts do not
/// decide how Redis reloads; a pod whose Redis container is unknown counts every container.)
pub fn mounts_secrets_with_sub_path(p: &Pod) -> bool {
    let Some(spec) = &p.spec else { return false };
    let volumes = secret_volumes(spec);
    let sub_path = |c: &Container| {
        c.volume_mounts.iter().flatten().any(|m| {
            volumes.contains(&m.name.as_str())
                && m.sub_path.as_deref().is_some_and(|s| !s.is_empty())
        })
    };
    match redis_container(spec) {
        Ok(c) => sub_path(c),
        Err(_) => spec.containers.iter().any(sub_path),
    }
}
