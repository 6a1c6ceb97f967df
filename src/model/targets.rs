//! The TMM workloads that talk to dSSM: one or more `NAMESPACE/KIND/NAME` targets (an SPK
//! cluster runs one `f5-tmm` per watched namespace; BIG-IP Next runs TMM as a DaemonSet). Every
//! target gets identical copies of both Secrets in its namespace and is restarted with dSSM.
//!
//! Pure: parsing, and what a fetched workload says about its rollout and its restart record.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::materials::annotations;

/// The workload kinds TMM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Deployment,
    DaemonSet,
}

impl Kind {
    /// As in `kubectl get deployment/NAME`, and in `--tmm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "deployment",
            Kind::DaemonSet => "daemonset",
        }
    }
}

/// One TMM workload: where its copies of the Secrets live and what is restarted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TmmTarget {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
}

impl fmt::Display for TmmTarget {
    /// `deployment spk-ingress/f5-tmm`: how errors and logs name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

impl TmmTarget {
    pub fn deployment(namespace: &str, name: &str) -> Self {
        TmmTarget {
            namespace: namespace.into(),
            kind: Kind::Deployment,
            name: name.into(),
        }
    }

    /// `namespace/kind/name`: how the restart state (a rotation record's `rolled`) names it.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.kind.as_str(), self.name)
    }

    /// `NAMESPACE/KIND/NAME` or `NAMESPACE/NAME` (a Deployment). Kinds are read as kubectl
    /// reads them: `deployment`, `deployments`, `deploy`, `daemonset`, `daemonsets`, `ds`.
    pub fn parse(s: &str) -> Result<Self, InvalidTarget> {
        let value = || s.to_string();
        let parts: Vec<&str> = s.trim().split('/').collect();
        let (ns, kind, name) = match parts.as_slice() {
            [ns, name] => (*ns, "deployment", *name),
            [ns, kind, name] => (*ns, *kind, *name),
            _ => return Err(InvalidTarget::Shape { value: value() }),
        };
        crate::manifest::validate_namespace(ns).map_err(|source| InvalidTarget::Namespace {
            value: value(),
            namespace: ns.to_string(),
            source,
        })?;
        let kind = match kind.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Kind::Deployment,
            "daemonset" | "daemonsets" | "ds" => Kind::DaemonSet,
            other => {
                return Err(InvalidTarget::Kind {
                    value: value(),
                    kind: other.to_string(),
                })
            }
        };
        // A workload name: a DNS subdomain (RFC 1123), at most 253 characters.
        if !dns_subdomain(name) {
            return Err(InvalidTarget::Name {
                value: value(),
                name: name.to_string(),
            });
        }
        Ok(TmmTarget {
            namespace: ns.into(),
            kind,
            name: name.into(),
        })
    }
}

/// A `--tmm` value the command line refuses, quoting it.
#[derive(Debug, thiserror::Error)]
pub enum InvalidTarget {
    #[error("{value:?} is not NAMESPACE/KIND/NAME (e.g. spk-ingress/deployment/f5-tmm) or NAMESPACE/NAME")]
    Shape { value: String },
    #[error("{value:?}: namespace {namespace:?}: {source}")]
    Namespace {
        value: String,
        namespace: String,
        #[source]
        source: crate::manifest::NamespaceError,
    },
    #[error("{value:?}: kind {kind:?} is neither deployment nor daemonset")]
    Kind { value: String, kind: String },
    #[error("{value:?}: name {name:?}: not a valid object name (lowercase letters, digits, '-' and '.', at most 253)")]
    Name { value: String, name: String },
}

/// An RFC 1123 DNS subdomain, as the API server's `IsDNS1123Subdomain`: at most 253
/// characters, dot-separated labels of at most 63 lowercase letters, digits and '-', each
/// starting and ending with a letter or digit. Object names and label-key prefixes are ones.
pub fn dns_subdomain(n: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !n.is_empty() && n.len() <= 253 && n.split('.').all(label_ok)
}

/// The targets of a run: `--tmm` (repeatable) or the `--tmm-namespace`/`--tmm-deployment`
/// shorthand for one Deployment, never both. Duplicates are dropped, order kept.
pub fn resolve(
    tmm: &[TmmTarget],
    shorthand_namespace: Option<&str>,
    shorthand_deployment: &str,
    dssm_namespace: &str,
) -> Vec<TmmTarget> {
    let mut out: Vec<TmmTarget> = Vec::new();
    if tmm.is_empty() {
        out.push(TmmTarget::deployment(
            shorthand_namespace.unwrap_or(dssm_namespace),
            shorthand_deployment,
        ));
    }
    for t in tmm {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

/// The distinct TMM namespaces, in target order.
pub fn namespaces(targets: &[TmmTarget]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in targets {
        if !out.contains(&t.namespace) {
            out.push(t.namespace.clone());
        }
    }
    out
}

/// How a TMM workload's pods are replaced by a restart without leaving none Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollPlan {
    /// Its controller keeps pods Ready while it rolls: a pod-template annotation (`kubectl
    /// rollout restart`) and its rollout waited for.
    Controller,
    /// Its controller would take every pod down at once, or never replace one by itself: the
    /// tool evicts the pods one at a time, each replacement Ready before the next.
    OneByOne { why: String },
    /// Even one at a time leaves no Ready pod (one pod, no surge): refused unless the operator
    /// allows the gap (`--allow-tmm-gap`).
    Gap { why: String },
}

/// An int-or-percent of `total`, rounded as the controllers round it (a percentage of a
/// Deployment's maxUnavailable rounds down, every other one up); `default` when unset.
pub fn scaled(v: Option<&IntOrString>, total: i32, round_up: bool, default: i32) -> i32 {
    match v {
        None => default,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            let x = pct * i64::from(total);
            let v = if round_up { (x + 99) / 100 } else { x / 100 };
            v as i32
        }
    }
}

/// What makes a TMM workload's rollout keep a Ready pod, for the messages that refuse a gap: more
/// surge alone does not help while maxUnavailable still resolves to every pod.
pub const NO_GAP_HINT: &str = "let its rollout surge without taking a pod down (a RollingUpdate \
     with maxSurge of at least 1 and maxUnavailable 0), or give it a second replica";

fn deployment_plan(d: &Deployment) -> RollPlan {
    let want = d.spec.replicas.unwrap_or(1);
    let strategy = d.spec.strategy.clone().unwrap_or_default();
    let why = if strategy.type_.as_deref() == Some("Recreate") {
        "strategy Recreate removes every old pod before it makes a new one".to_string()
    } else {
        // deployment/util ResolveFenceposts: surge rounds up, unavailable down, never both 0.
        let ru = strategy.rolling_update.unwrap_or_default();
        let pct = IntOrString::String("25%".into());
        let surge = scaled(Some(ru.max_surge.as_ref().unwrap_or(&pct)), want, true, 0);
        let mut unavailable = scaled(
            Some(ru.max_unavailable.as_ref().unwrap_or(&pct)),
            want,
            false,
            0,
        );
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        if want == 0 || unavailable < want {
            return RollPlan::Controller;
        }
        format!(
            "maxUnavailable resolves to {unavailable} of {want} pods (maxSurge {surge}): its \
             rollout may take every pod down at once"
        )
    };
    match want {
        0 => RollPlan::Controller,
        1 => RollPlan::Gap {
            why: format!("{why}, and it has one replica"),
        },
        _ => RollPlan::OneByOne { why },
    }
}

fn daemonset_plan(d: &DaemonSet) -> RollPlan {
    let want = d.status.as_ref().map_or(0, |s| s.desired_number_scheduled);
    let strategy = d.spec.update_strategy.clone().unwrap_or_default();
    let why = if strategy.type_.as_deref() == Some("OnDelete") {
        "updateStrategy OnDelete never replaces a pod by itself".to_string()
    } else {
        // daemon/util SurgeCount and UnavailableCount: both round up.
        let ru = strategy.rolling_update.unwrap_or_default();
        let surge = scaled(ru.max_surge.as_ref(), want, true, 0);
        let unavailable = scaled(ru.max_unavailable.as_ref(), want, true, 1);
        if want == 0 || surge > 0 || unavailable < want {
            return RollPlan::Controller;
        }
        format!(
            "maxUnavailable resolves to {unavailable} of {want} nodes and maxSurge to 0: its \
             rollout may take every pod down at once"
        )
    };
    match want {
        0 => RollPlan::Controller,
        1 => RollPlan::Gap {
            why: format!("{why}, and it runs on one node"),
        },
        _ => RollPlan::OneByOne { why },
    }
}

/// The PodDisruptionBudgets in `ns` that would refuse every eviction of `pods` now: each selects
/// one of them and its status allows no disruption. An empty or missing selector selects no
/// pod, as the eviction subresource reads it (registry/core/pod/storage/eviction.go). Named as
/// errors name them: `poddisruptionbudget NS/NAME allows no disruption now (…)`.
pub fn blocking_budgets(
    ns: &str,
    pdbs: &[k8s_openapi::api::policy::v1::PodDisruptionBudget],
    pods: &[k8s_openapi::api::core::v1::Pod],
) -> Vec<String> {
    pdbs.iter()
        .filter_map(|b| {
            let sel = b.spec.as_ref()?.selector.as_ref()?;
            let empty = sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && sel.match_expressions.as_ref().is_none_or(Vec::is_empty);
            let labels = |p: &k8s_openapi::api::core::v1::Pod| p.metadata.labels.clone();
            let picks = pods
                .iter()
                .any(|p| crate::model::pods::selects(sel, &labels(p).unwrap_or_default()));
            let st = b.status.clone().unwrap_or_default();
            (!empty && picks && st.disruptions_allowed.unwrap_or(0) == 0).then(|| {
                format!(
                    "poddisruptionbudget {ns}/{} allows no disruption now ({} of {} pods \
                     healthy, {} wanted)",
                    b.metadata.name.as_deref().unwrap_or_default(),
                    st.current_healthy.unwrap_or(0),
                    st.expected_pods.unwrap_or(0),
                    st.desired_healthy.unwrap_or(0)
                )
            })
        })
        .collect()
}

/// A fetched TMM workload.
#[derive(Debug, Clone)]
pub enum Workload {
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
}

impl Workload {
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let m = match self {
            Workload::Deployment(d) => &d.metadata,
            Workload::DaemonSet(d) => &d.metadata,
        };
        m.annotations.clone().unwrap_or_default()
    }

    pub fn selector(&self) -> &LabelSelector {
        match self {
            Workload::Deployment(d) => &d.spec.selector,
            Workload::DaemonSet(d) => &d.spec.selector,
        }
    }

    /// The count the workload runs now: a Deployment's spec.replicas, a DaemonSet's
    /// desiredNumberScheduled.
    pub fn replicas(&self) -> i32 {
        match self {
            Workload::Deployment(d) => d.spec.replicas.unwrap_or(1),
            Workload::DaemonSet(d) => d
                .status
                .as_ref()
                .map(|s| s.desired_number_scheduled)
                .unwrap_or(0),
        }
    }

    /// The count recorded by a scale-to-zero restart in progress.
    pub fn recorded(&self) -> Option<i32> {
        self.annotations()
            .get(annotations::TMM_REPLICAS)
            .and_then(|v| v.parse().ok())
    }

    /// Whether this workload is stopped by us (scaled to 0, or the stop nodeSelector set).
    pub fn stopped(&self) -> bool {
        match self {
            Workload::Deployment(d) => d.spec.replicas == Some(0),
            Workload::DaemonSet(d) => d
                .spec
                .template
                .spec
                .as_ref()
                .and_then(|s| s.node_selector.as_ref())
                .is_some_and(|n| n.contains_key(annotations::STOP_NODE_SELECTOR)),
        }
    }

    /// Why the rollout is not complete, if it is not: what `kubectl rollout status` checks.
    /// Deployment: observedGeneration, updated and available replicas. DaemonSet:
    /// observedGeneration, updatedNumberScheduled and numberAvailable against
    /// desiredNumberScheduled (kubectl's `DaemonSetStatusViewer`).
    pub fn rollout_incomplete(&self, t: &TmmTarget) -> Option<String> {
        match self {
            Workload::Deployment(d) => crate::model::pods::rollout_incomplete(d),
            Workload::DaemonSet(d) => {
                let status = d.status.clone().unwrap_or_default();
                if let (Some(g), Some(o)) = (d.metadata.generation, status.observed_generation) {
                    if o < g {
                        return Some(format!(
                            "{t}: its controller has not observed generation {g} yet (at {o})"
                        ));
                    }
                }
                let want = status.desired_number_scheduled;
                let updated = status.updated_number_scheduled.unwrap_or(0);
                let available = status.number_available.unwrap_or(0);
                (updated < want || available < want).then(|| {
                    format!(
                        "{t}: rollout in progress ({updated} of {want} updated, {available} available)"
                    )
                })
            }
        }
    }

    /// How a restart replaces its pods without leaving none Ready (see `RollPlan`).
    pub fn roll_plan(&self) -> RollPlan {
        match self {
            Workload::Deployment(d) => deployment_plan(d),
            Workload::DaemonSet(d) => daemonset_plan(d),
        }
    }

    /// Available pods now.
    pub fn available(&self) -> i32 {
        match self {
            Workload::Deployment(d) => d
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0),
            Workload::DaemonSet(d) => d
                .status
                .as_ref()
                .and_then(|s| s.number_available)
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_a_kind_and_bad_ones_name_the_problem() {
        let t = TmmTarget::parse("spk-ingress/deployment/f5-tmm").unwrap();
        assert_eq!(t, TmmTarget::deployment("spk-ingress", "f5-tmm"));
        assert_eq!(
            TmmTarget::parse("spk-ingress/f5-tmm").unwrap(),
            TmmTarget::deployment("spk-ingress", "f5-tmm")
        );
        let ds = TmmTarget::parse("bnk/ds/tmm").unwrap();
        assert_eq!(ds.kind, Kind::DaemonSet);
        assert_eq!(ds.to_string(), "daemonset bnk/tmm");
        assert_eq!(
            TmmTarget::parse("bnk/DaemonSet/tmm").unwrap().kind,
            Kind::DaemonSet
        );
        for (bad, says) in [
            ("f5-tmm", "NAMESPACE/KIND/NAME"),
            ("a/b/c/d", "NAMESPACE/KIND/NAME"),
            ("ns/statefulset/tmm", "neither deployment nor daemonset"),
            ("Bad_NS/deployment/tmm", "namespace"),
            ("ns/deployment/", "name \"\""),
            ("ns/deployment/F5_TMM", "not a valid object name"),
        ] {
            let e = TmmTarget::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains(bad), "the error quotes the input: {e}");
        }
    }

    #[test]
    fn dns_subdomains_are_judged_like_the_api_server() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let long_name = vec!["a".repeat(63); 4].join("."); // 255
        for good in [
            "f5-tmm",
            "a",
            "0",
            "app.kubernetes.io",
            "a-b.c-d",
            long_label.as_str(),
        ] {
            assert!(dns_subdomain(good), "{good} refused");
        }
        for bad in [
            "",
            "F5-tmm",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            too_long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!dns_subdomain(bad), "{bad:?} accepted");
        }
        // Both users: an object name and a label-key prefix.
        assert!(TmmTarget::parse("ns/Bad_Name").is_err());
        assert!(crate::model::pods::parse_selector("Bad_Prefix/app=x").is_err());
        assert!(crate::model::pods::parse_selector("app.kubernetes.io/name=x").is_ok());
    }

    #[test]
    fn the_shorthand_is_one_deployment_and_duplicates_collapse() {
        assert_eq!(
            resolve(&[], None, "f5-tmm", "cnf-gateway"),
            vec![TmmTarget::deployment("cnf-gateway", "f5-tmm")]
        );
        assert_eq!(
            resolve(&[], Some("spk-ingress"), "tmm", "spk-utilities"),
            vec![TmmTarget::deployment("spk-ingress", "tmm")]
        );
        let a = TmmTarget::deployment("a", "f5-tmm");
        let b = TmmTarget::parse("b/ds/tmm").unwrap();
        let c = TmmTarget::deployment("a", "other");
        let got = resolve(
            &[a.clone(), b.clone(), a.clone(), c.clone()],
            None,
            "f5-tmm",
            "x",
        );
        assert_eq!(got, vec![a, b, c]);
        assert_eq!(namespaces(&got), vec!["a".to_string(), "b".to_string()]);
    }

    fn deployment(spec: serde_json::Value) -> Workload {
        let d = serde_json::json!({"metadata": {"name": "f5-tmm"}, "spec": spec});
        Workload::Deployment(Box::new(serde_json::from_value(d).unwrap()))
    }

    fn daemonset(strategy: serde_json::Value, nodes: i32) -> Workload {
        let d = serde_json::json!({"metadata": {"name": "tmm"},
            "spec": {"selector": {}, "template": {}, "updateStrategy": strategy},
            "status": {"desiredNumberScheduled": nodes, "currentNumberScheduled": nodes,
                       "numberMisscheduled": 0, "numberReady": nodes}});
        Workload::DaemonSet(Box::new(serde_json::from_value(d).unwrap()))
    }

    fn rolling(replicas: i32, ru: serde_json::Value) -> Workload {
        deployment(
            serde_json::json!({"replicas": replicas, "selector": {}, "template": {},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": ru}}),
        )
    }

    fn recreate(replicas: i32) -> Workload {
        deployment(
            serde_json::json!({"replicas": replicas, "selector": {}, "template": {},
            "strategy": {"type": "Recreate"}}),
        )
    }

    /// TMM layouts and how each is rolled.
    fn layouts() -> Vec<(Workload, &'static str)> {
        let ds_rolling = |ru: serde_json::Value, nodes: i32| {
            daemonset(
                serde_json::json!({"type": "RollingUpdate", "rollingUpdate": ru}),
                nodes,
            )
        };
        vec![
            (rolling(2, serde_json::json!({})), "controller"), // 25%: surge 1, unavailable 0
            (rolling(1, serde_json::json!({})), "controller"),
            (recreate(2), "one-by-one"),
            (recreate(1), "gap"),
            (
                rolling(
                    2,
                    serde_json::json!({"maxSurge": 0, "maxUnavailable": "100%"}),
                ),
                "one-by-one",
            ),
            (
                rolling(3, serde_json::json!({"maxUnavailable": "100%"})),
                "one-by-one",
            ),
            // 99% of 3 rounds down to 2: one pod stays.
            (
                rolling(3, serde_json::json!({"maxUnavailable": "99%"})),
                "controller",
            ),
            (
                rolling(2, serde_json::json!({"maxUnavailable": 2})),
                "one-by-one",
            ),
            (rolling(1, serde_json::json!({"maxSurge": 0})), "gap"), // 0 and 0: unavailable 1
            // Surge does not help while maxUnavailable takes the one pod down (the refusal's
            // hint once said "give it maxSurge"; it names maxUnavailable 0 now).
            (
                rolling(1, serde_json::json!({"maxSurge": 1, "maxUnavailable": 1})),
                "gap",
            ),
            (
                rolling(
                    1,
                    serde_json::json!({"maxSurge": "0%", "maxUnavailable": "0%"}),
                ),
                "gap",
            ),
            (
                rolling(0, serde_json::json!({"maxUnavailable": "100%"})),
                "controller",
            ),
            (daemonset(serde_json::json!({}), 3), "controller"),
            (daemonset(serde_json::json!({}), 1), "gap"),
            (
                daemonset(serde_json::json!({"type": "OnDelete"}), 3),
                "one-by-one",
            ),
            (daemonset(serde_json::json!({"type": "OnDelete"}), 1), "gap"),
            (
                ds_rolling(serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}), 1),
                "controller",
            ),
            // 34% of 3 rounds up to 2 (a DaemonSet rounds up): one node keeps its pod.
            (
                ds_rolling(serde_json::json!({"maxUnavailable": "34%"}), 3),
                "controller",
            ),
            (
                ds_rolling(serde_json::json!({"maxUnavailable": "67%"}), 3),
                "one-by-one",
            ),
        ]
    }

    /// Which TMM layouts its own controller can roll with a Ready pod left, rounded as the
    /// controllers round (Deployment: maxSurge up, maxUnavailable down, never both 0;
    /// DaemonSet: both up).
    #[test]
    fn a_tmm_that_cannot_surge_is_rolled_one_by_one_and_one_pod_without_surge_is_a_gap() {
        use RollPlan::*;
        let plan = |w: Workload| match w.roll_plan() {
            Controller => "controller",
            OneByOne { .. } => "one-by-one",
            Gap { .. } => "gap",
        };
        let cases = layouts();
        for (i, (w, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(w), want, "case {i}");
        }
        match recreate(1).roll_plan() {
            Gap { why } => assert!(
                why.contains("Recreate") && why.contains("one replica"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
