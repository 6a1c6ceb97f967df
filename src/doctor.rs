//! `doctor`: what would make a rotation unsafe or slow, found before anything happens. Pure: the
//! cluster is read by `cluster::doctor`, and each check here is a small function from what was
//! read to findings, so each reason has its own test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::checks::Status;
use crate::contract;
use crate::materials::Owner;
use crate::model::pods::selects;

pub const SCHEMA: &str = "dssm-certs.doctor/v1";

/// One thing found, about one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Which check found it (stable: alerting and scripts key on it).
    pub check: &'static str,
    pub status: Status,
    /// `namespace/kind/name` (or `namespace/secret/name`).
    pub object: String,
    pub message: String,
}

/// What a workload is to a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A TMM the rotation restarts.
    Tmm,
    /// A dSSM StatefulSet (its pods match the dSSM selector).
    Dssm,
    /// Neither: a rotation does not touch it.
    Other,
}

/// A Deployment, StatefulSet or DaemonSet as far as the doctor cares.
#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: &'static str,
    pub meta: ObjectMeta,
    pub template: PodTemplateSpec,
    pub role: Role,
    /// For a TMM target: how a rolling restart replaces its pods.
    pub roll: Option<crate::model::targets::RollPlan>,
}

impl Workload {
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.meta.namespace.as_deref().unwrap_or_default(),
            self.kind.to_lowercase(),
            self.meta.name.as_deref().unwrap_or_default()
        )
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.template
            .metadata
            .clone()
            .unwrap_or_default()
            .labels
            .unwrap_or_default()
    }
}

/// The names of the volumes of `template` that carry one of the two Secrets (directly or
/// through a projected volume).
fn secret_volumes(template: &PodTemplateSpec) -> Vec<String> {
    let ours = |n: Option<&String>| {
        n.is_some_and(|n| n == contract::CERTS_SECRET || n == contract::KEYS_SECRET)
    };
    template
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| ours(s.secret_name.as_ref()))
                || v.projected.as_ref().is_some_and(|p| {
                    p.sources
                        .iter()
                        .flatten()
                        .any(|s| s.secret.as_ref().is_some_and(|s| ours(Some(&s.name))))
                })
        })
        .map(|v| v.name.clone())
        .collect()
}

/// dSSM containers that mount the Secrets with `subPath`: kubelet never updates such a file, so
/// a DB cannot reload in place and must be restarted (the primary through a switchover). Only
/// the Redis container counts when it can be told from its sidecars, as in the roll
/// (`mounts_secrets_with_sub_path`): a sidecar's `subPath` mount restarts nothing.
pub fn sub_path_mounts(w: &Workload) -> Vec<Finding> {
    if w.role != Role::Dssm {
        return vec![];
    }
    let volumes = secret_volumes(&w.template);
    let spec = w.template.spec.clone().unwrap_or_default();
    let containers: Vec<&k8s_openapi::api::core::v1::Container> =
        match crate::model::pods::redis_container(&spec) {
            Ok(redis) => vec![redis],
            Err(_) => spec
                .init_containers
                .iter()
                .flatten()
                .chain(&spec.containers)
                .collect(),
        };
    containers
        .into_iter()
        .flat_map(|c| {
            c.volume_mounts.iter().flatten().filter_map(|m| {
                let sub = m.sub_path.as_deref().filter(|s| !s.is_empty())?;
                volumes.contains(&m.name).then(|| Finding {
                    check: "sub-path",
                    status: Status::Warning,
                    object: w.id(),
                    message: format!(
                        "container {} mounts volume {} with subPath {sub} at {}: kubelet never \
                         updates a subPath file, so a rotation restarts each pod instead of \
                         reloading TLS in place (slower; the primary moves by a switchover)",
                        c.name, m.name, m.mount_path
                    ),
                })
            })
        })
        .collect()
}

/// A dSSM workload whose Redis container cannot be told from its sidecars: the rolling restart
/// would not know where its Redis listens (the same rule `rolling::redis_container` applies).
pub fn redis_container(w: &Workload) -> Option<Finding> {
    if w.role != Role::Dssm {
        return None;
    }
    let spec = w.template.spec.clone().unwrap_or_default();
    let why = crate::model::pods::redis_container(&spec).err()?;
    Some(Finding {
        check: "redis-container",
        status: Status::Critical,
        object: w.id(),
        message: format!(
            "{why}: the rolling restart cannot tell where its Redis listens (name the port \
             redis or sentinel, or pass --redis-endpoint POD=HOST:PORT for each pod)"
        ),
    })
}

/// A TMM target that cannot surge: its own rollout could take every pod down at once, so the
/// tool replaces its pods one at a time (slower); with one pod even that leaves none Ready,
/// and a rolling rotation is refused unless `--allow-tmm-gap`.
pub fn tmm_surge(w: &Workload) -> Option<Finding> {
    use crate::model::targets::RollPlan;
    let (status, message) = match w.roll.as_ref()? {
        RollPlan::Controller => return None,
        RollPlan::OneByOne { why } => (
            Status::Warning,
            format!(
                "{why}: a rotation replaces its pods itself, one at a time through the Eviction \
                 API, each replacement Ready before the next (slower than its own rollout)"
            ),
        ),
        RollPlan::Gap { why } => (
            Status::Critical,
            format!(
                "{why}: replacing its pod leaves no TMM pod Ready until the new one is; a rolling \
                 rotation refuses before writing unless --allow-tmm-gap (or {})",
                crate::model::targets::NO_GAP_HINT
            ),
        ),
    };
    Some(Finding {
        check: "tmm-surge",
        status,
        object: w.id(),
        message,
    })
}

/// Workloads that mount the Secrets but are neither TMM targets nor dSSM: after a rotation they
/// keep the old materials and, after a CA rotation, lose dSSM.
pub fn untargeted_mounts(w: &Workload) -> Option<Finding> {
    (w.role == Role::Other && !secret_volumes(&w.template).is_empty()).then(|| Finding {
        check: "untargeted-mount",
        status: Status::Warning,
        object: w.id(),
        message: format!(
            "mounts {} or {} but is not a TMM target: a rotation never restarts it, so it keeps \
             the old materials (name it with --tmm, or stop it mounting them)",
            contract::CERTS_SECRET,
            contract::KEYS_SECRET
        ),
    })
}

/// TMM or dSSM owned by something (an operator's custom resource): it may revert the scale and
/// annotations a restart writes, or recreate what the rotation is rolling.
pub fn owned_by_operator(w: &Workload) -> Option<Finding> {
    if w.role == Role::Other {
        return None;
    }
    let owners: Vec<String> = w
        .meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| format!("{} {}", o.kind, o.name))
        .collect();
    (!owners.is_empty()).then(|| Finding {
        check: "owner",
        status: Status::Warning,
        object: w.id(),
        message: format!(
            "owned by {}: its operator may revert what a restart changes (replicas, pod-template \
             annotations); pause it for the rotation or let it do the restart",
            owners.join(", ")
        ),
    })
}

/// Each TMM/dSSM workload should be covered by a PodDisruptionBudget (a drain during a rotation
/// must not take more than the rotation's one pod at a time), and no dSSM budget may allow zero
/// disruptions now (the rotation's evictions would wait on it, and the pre-flight refuses).
pub fn disruption_budgets(w: &Workload, pdbs: &[PodDisruptionBudget]) -> Vec<Finding> {
    if w.role == Role::Other {
        return vec![];
    }
    let labels = w.labels();
    let ns = w.meta.namespace.clone();
    let covering: Vec<&PodDisruptionBudget> = pdbs
        .iter()
        .filter(|p| p.metadata.namespace == ns)
        .filter(|p| {
            // An empty or missing selector selects nothing (policy/v1).
            p.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .filter(|s| s.match_labels.is_some() || s.match_expressions.is_some())
                .is_some_and(|s| selects(s, &labels))
        })
        .collect();
    if covering.is_empty() {
        return vec![Finding {
            check: "disruption-budget",
            status: Status::Warning,
            object: w.id(),
            message: "no PodDisruptionBudget covers its pods: a node drain during a rotation \
                      could take more of them at once than the rotation's one"
                .into(),
        }];
    }
    covering
        .into_iter()
        .filter(|_| w.role == Role::Dssm)
        .filter_map(|p| {
            let s = p.status.as_ref()?;
            (s.disruptions_allowed.unwrap_or(0) == 0).then(|| Finding {
                check: "disruption-budget",
                status: Status::Critical,
                object: w.id(),
                message: format!(
                    "PodDisruptionBudget {} allows no disruption now ({} healthy, {} desired): \
                     the rotation's evictions would wait for it, and the pre-flight refuses",
                    p.metadata.name.as_deref().unwrap_or_default(),
                    s.current_healthy.unwrap_or(0),
                    s.desired_healthy.unwrap_or(0)
                ),
            })
        })
        .collect()
}

/// dSSM pods not Ready now: a rotation starting now would take away one more.
pub fn pods_not_ready(namespace: &str, pods: &[Pod]) -> Vec<Finding> {
    pods.iter()
        .filter(|p| !ready(p))
        .map(|p| Finding {
            check: "pod-ready",
            status: Status::Critical,
            object: format!(
                "{namespace}/pod/{}",
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            message: "not Ready: a rotation would take away another dSSM pod (the pre-flight \
                      refuses until it is Ready)"
                .into(),
        })
        .collect()
}

fn ready(p: &Pod) -> bool {
    let conditions = p.status.iter().flat_map(|s| s.conditions.iter().flatten());
    p.metadata.deletion_timestamp.is_none()
        && conditions
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// One permission a rotation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub namespace: String,
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub name: Option<String>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let res = match self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.to_string(),
        };
        let res = if self.group.is_empty() {
            res
        } else {
            format!("{res}.{}", self.group)
        };
        match &self.name {
            Some(n) => write!(f, "{} {res} {n} in {}", self.verb, self.namespace),
            None => write!(f, "{} {res} in {}", self.verb, self.namespace),
        }
    }
}

/// Where a permission is needed: in every namespace holding copies, in the dSSM namespace, or
/// in TMM's.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    Copies,
    Dssm,
    Tmm,
}

/// Named object of a permission: the Secrets (each), the CA key, the Lease, the TMM Deployment.
#[derive(Clone, Copy, PartialEq)]
enum Named {
    Any,
    CopySecrets,
    CaKey,
    Lease,
    Tmm,
}

/// (where, verbs, group, resource, subresource, which object).
type Need = (
    Scope,
    &'static [&'static str],
    &'static str,
    &'static str,
    Option<&'static str>,
    Named,
);

/// What the code calls.
const NEEDED: &[Need] = &[
    (
        Scope::Copies,
        &["get", "update"],
        "",
        "secrets",
        None,
        Named::CopySecrets,
    ),
    (Scope::Copies, &["create"], "", "secrets", None, Named::Any),
    (
        Scope::Copies,
        &["create"],
        "events.k8s.io",
        "events",
        None,
        Named::Any,
    ),
    (
        Scope::Copies,
        &["list", "watch"],
        "",
        "pods",
        None,
        Named::Any,
    ),
    (
        Scope::Dssm,
        &["get", "update"],
        "",
        "secrets",
        None,
        Named::CaKey,
    ),
    (
        Scope::Dssm,
        &["get", "update"],
        "coordination.k8s.io",
        "leases",
        None,
        Named::Lease,
    ),
    (
        Scope::Dssm,
        &["create"],
        "coordination.k8s.io",
        "leases",
        None,
        Named::Any,
    ),
    (
        Scope::Copies,
        &["create"],
        "",
        "pods",
        Some("eviction"),
        Named::Any,
    ),
    (
        Scope::Copies,
        &["list"],
        "policy",
        "poddisruptionbudgets",
        None,
        Named::Any,
    ),
    (
        Scope::Dssm,
        &["get"],
        "apps",
        "statefulsets",
        None,
        Named::Any,
    ),
    (
        Scope::Tmm,
        &["get", "patch", "watch"],
        "apps",
        "deployments",
        None,
        Named::Tmm,
    ),
    (
        Scope::Tmm,
        &["patch"],
        "apps",
        "deployments",
        Some("scale"),
        Named::Tmm,
    ),
];

/// Everything `reconcile`/`rotate` (with a restart) calls: the Roles shipped in manifests/ and
/// the chart grant exactly these (tests/doctor.rs checks a published install has them all).
/// The TMM rows of `NEEDED` name a Deployment; a DaemonSet target needs the same verbs on
/// `daemonsets`, and no scale subresource (it is stopped by a patch of its template).
pub fn required_access(dssm_ns: &str, targets: &[crate::model::targets::TmmTarget]) -> Vec<Access> {
    use crate::model::targets::Kind;
    let mut copies = vec![dssm_ns.to_string()];
    copies.extend(crate::model::targets::namespaces(targets));
    let mut v: Vec<Access> = Vec::new();
    for &(scope, verbs, group, resource, subresource, named) in NEEDED {
        // (namespace, resource, name) of each object the row is about.
        let objects: Vec<(&str, &'static str, Option<&str>)> = match (scope, named) {
            (Scope::Tmm, _) => targets
                .iter()
                .filter_map(|t| match t.kind {
                    Kind::Deployment => {
                        Some((t.namespace.as_str(), resource, Some(t.name.as_str())))
                    }
                    Kind::DaemonSet if subresource.is_none() => {
                        Some((t.namespace.as_str(), "daemonsets", Some(t.name.as_str())))
                    }
                    Kind::DaemonSet => None,
                })
                .collect(),
            (scope, named) => {
                let namespaces: Vec<&str> = match scope {
                    Scope::Dssm => vec![dssm_ns],
                    _ => copies.iter().map(String::as_str).collect(),
                };
                let names: Vec<Option<&str>> = match named {
                    Named::CopySecrets => {
                        vec![Some(contract::CERTS_SECRET), Some(contract::KEYS_SECRET)]
                    }
                    Named::CaKey => vec![Some(contract::CA_KEY_SECRET)],
                    Named::Lease => vec![Some(crate::contract::LEASE_NAME)],
                    Named::Any | Named::Tmm => vec![None],
                };
                namespaces
                    .iter()
                    .flat_map(|ns| names.iter().map(move |n| (*ns, resource, *n)))
                    .collect()
            }
        };
        for (namespace, resource, name) in objects {
            for &verb in verbs {
                {
                    let a = Access {
                        namespace: namespace.to_string(),
                        verb,
                        group,
                        resource,
                        subresource,
                        name: name.map(str::to_string),
                    };
                    // One namespace for both (CNF): each permission once.
                    if !v.contains(&a) {
                        v.push(a);
                    }
                }
            }
        }
    }
    v
}

/// What the SelfSubjectAccessReviews answered. `who` names the identity judged.
pub fn missing_access<E: std::fmt::Display>(
    who: &str,
    answers: &[(Access, Result<bool, E>)],
) -> Vec<Finding> {
    answers
        .iter()
        .filter_map(|(a, allowed)| match allowed {
            Ok(true) => None,
            Ok(false) => Some(Finding {
                check: "rbac",
                status: Status::Critical,
                object: format!("{}/access", a.namespace),
                message: format!("{who} may not {a}: a rotation would stop at that call"),
            }),
            Err(e) => Some(Finding {
                check: "rbac",
                status: Status::Unknown,
                object: format!("{}/access", a.namespace),
                message: format!("cannot tell whether {who} may {a}: {e}"),
            }),
        })
        .collect()
}

/// A Secret made by hand is adopted (labelled) by the next reconcile; one another manager owns
/// is never written, so a rotation would stop at it.
pub fn secret_owner(namespace: &str, name: &str, owner: &Owner) -> Option<Finding> {
    let object = format!("{namespace}/secret/{name}");
    match owner {
        Owner::Us => None,
        Owner::Nobody => Some(Finding {
            check: "managed-by",
            status: Status::Warning,
            object,
            message: format!(
                "has no app.kubernetes.io/managed-by={} label (made by hand): the next reconcile \
                 adopts it",
                crate::materials::annotations::MANAGER
            ),
        }),
        Owner::Other(by) => Some(Finding {
            check: "managed-by",
            status: Status::Critical,
            object,
            message: format!(
                "is managed by {by}: dssm-certs refuses to write it, so a rotation cannot \
                 replace it"
            ),
        }),
    }
}

/// The whole report: findings worst first, the verdict, and the exit code (as `check`'s).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub status: Status,
    pub exit_code: i32,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(mut findings: Vec<Finding>) -> Report {
        findings.sort_by(|a, b| b.status.cmp(&a.status).then(a.object.cmp(&b.object)));
        let status = findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Ok);
        Report {
            schema: SCHEMA,
            status,
            exit_code: status.exit_code(),
            findings,
        }
    }
}

pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    for f in &r.findings {
        out.push_str(&format!(
            "{:<8}  {:<18}  {}  {}\n",
            f.status.to_string(),
            f.check,
            crate::checks::printable(&f.object),
            crate::checks::printable(&f.message)
        ));
    }
    out.push_str(&format!(
        "doctor: {} ({} finding{})\n",
        r.status,
        r.findings.len(),
        if r.findings.len() == 1 { "" } else { "s" }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_list_names_each_permission_once_in_one_or_two_namespaces() {
        use crate::model::targets::TmmTarget;
        let spk = required_access(
            "spk-utilities",
            &[TmmTarget::deployment("spk-ingress", "f5-tmm")],
        );
        assert_eq!(spk.len(), 30);
        let cnf = required_access(
            "cnf-gateway",
            &[TmmTarget::deployment("cnf-gateway", "f5-tmm")],
        );
        assert_eq!(
            cnf.len(),
            20,
            "the copies' permissions once when TMM shares dSSM's namespace"
        );
        let shown: Vec<String> = spk.iter().map(ToString::to_string).collect();
        for expected in [
            "create pods/eviction in spk-utilities",
            "create pods/eviction in spk-ingress",
            "patch deployments/scale.apps f5-tmm in spk-ingress",
            "update secrets dssm-ca-key-secret in spk-utilities",
            "get leases.coordination.k8s.io dssm-certs in spk-utilities",
        ] {
            assert!(
                shown.iter().any(|s| s == expected),
                "{expected}: {shown:#?}"
            );
        }
        assert!(!shown
            .iter()
            .any(|s| s.contains("dssm-ca-key-secret in spk-ingress")));
    }

    #[test]
    fn each_target_needs_its_kinds_verbs_in_its_own_namespace() {
        use crate::model::targets::TmmTarget;
        let targets = [
            TmmTarget::deployment("spk-ingress-a", "f5-tmm"),
            TmmTarget::parse("bnk-tmm/daemonset/tmm").unwrap(),
        ];
        let shown: Vec<String> = required_access("spk-utilities", &targets)
            .iter()
            .map(ToString::to_string)
            .collect();
        for expected in [
            "patch deployments/scale.apps f5-tmm in spk-ingress-a",
            "patch daemonsets.apps tmm in bnk-tmm",
            "watch daemonsets.apps tmm in bnk-tmm",
            "update secrets dssm-certs-secret in bnk-tmm",
            "list pods in bnk-tmm",
        ] {
            assert!(
                shown.iter().any(|s| s == expected),
                "{expected}: {shown:#?}"
            );
        }
        // A DaemonSet has no scale subresource, and nothing of a Deployment is asked there.
        assert!(!shown
            .iter()
            .any(|s| s.contains("in bnk-tmm") && s.contains("deployments")));
    }
}
