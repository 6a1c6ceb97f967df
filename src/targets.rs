//! The TMM workloads that talk to dSSM: one or more `NAMESPACE/KIND/NAME` targets (an SPK
//! cluster runs one `f5-tmm` per watched namespace; BIG-IP Next runs TMM as a DaemonSet). Every
//! target gets identical copies of both Secrets in its namespace and is restarted with dSSM.
//!
//! Pure: parsing, and what a fetched workload says about its rollout and its restart record.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

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
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let (ns, kind, name) = match parts.as_slice() {
            [ns, name] => (*ns, "deployment", *name),
            [ns, kind, name] => (*ns, *kind, *name),
            _ => {
                return Err(format!(
                    "{s:?} is not NAMESPACE/KIND/NAME (e.g. spk-ingress/deployment/f5-tmm) or NAMESPACE/NAME"
                ))
            }
        };
        crate::manifest::validate_namespace(ns)
            .map_err(|e| format!("{s:?}: namespace {ns:?}: {e}"))?;
        let kind = match kind.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Kind::Deployment,
            "daemonset" | "daemonsets" | "ds" => Kind::DaemonSet,
            other => {
                return Err(format!(
                    "{s:?}: kind {other:?} is neither deployment nor daemonset"
                ))
            }
        };
        validate_name(name).map_err(|e| format!("{s:?}: name {name:?}: {e}"))?;
        Ok(TmmTarget {
            namespace: ns.into(),
            kind,
            name: name.into(),
        })
    }
}

/// A workload name: a DNS subdomain (RFC 1123), at most 253 characters.
fn validate_name(n: &str) -> Result<(), String> {
    if !dns_subdomain(n) {
        return Err(
            "not a valid object name (lowercase letters, digits, '-' and '.', at most 253)".into(),
        );
    }
    Ok(())
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
            Workload::Deployment(d) => crate::restart::rollout_incomplete(d),
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

    /// Rolled out at or after `generation` with `replicas` pods updated and available (and, for
    /// a Deployment, no old pod left).
    pub fn rolled_out(&self, generation: i64, replicas: i32) -> bool {
        match self {
            Workload::Deployment(d) => {
                let s = d.status.clone().unwrap_or_default();
                s.observed_generation.unwrap_or(0) >= generation
                    && s.updated_replicas.unwrap_or(0) >= replicas
                    && s.available_replicas.unwrap_or(0) >= replicas
                    && s.replicas.unwrap_or(0) == replicas
            }
            Workload::DaemonSet(d) => {
                let s = d.status.clone().unwrap_or_default();
                s.observed_generation.unwrap_or(0) >= generation
                    && s.updated_number_scheduled.unwrap_or(0) >= s.desired_number_scheduled
                    && s.number_available.unwrap_or(0) >= s.desired_number_scheduled
                    && s.desired_number_scheduled >= replicas
            }
        }
    }

    pub fn generation(&self) -> i64 {
        match self {
            Workload::Deployment(d) => d.metadata.generation.unwrap_or(0),
            Workload::DaemonSet(d) => d.metadata.generation.unwrap_or(0),
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
            let e = TmmTarget::parse(bad).unwrap_err();
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
        assert!(validate_name("Bad_Name").is_err());
        assert!(crate::restart::parse_selector("Bad_Prefix/app=x").is_err());
        assert!(crate::restart::parse_selector("app.kubernetes.io/name=x").is_ok());
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
}
