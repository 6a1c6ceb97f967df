//! What `doctor` reads: the workloads, budgets and pods of the namespaces involved, the Secrets,
//! and SelfSubjectAccessReviews for every call a rotation makes. Nothing is written. A read that
//! is refused becomes a finding ("cannot tell"), never the end of the report.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::{call, Cluster, ClusterError};
use crate::checks::Status;
use crate::doctor::{self, Access, Finding, Role, Workload};
use crate::model::targets::Workload as TargetWorkload;

/// Everything read, and what could not be read.
pub struct DoctorObservation {
    pub workloads: Vec<Workload>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub dssm_pods: Vec<Pod>,
    pub unreadable: Vec<Finding>,
}

fn unreadable(what: String, e: ClusterError) -> Finding {
    Finding {
        check: "read",
        status: Status::Unknown,
        object: what,
        message: format!("{e}: the checks that need it cannot tell"),
    }
}

impl Cluster {
    /// Reads what the doctor's checks need, in every namespace holding copies.
    pub async fn observe_for_doctor(&self) -> DoctorObservation {
        let mut o = DoctorObservation {
            workloads: vec![],
            pdbs: vec![],
            dssm_pods: vec![],
            unreadable: vec![],
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.dssm_ns);
        let lp = ListParams::default().labels(&self.dssm_selector);
        let what = format!("pods {} ({})", self.dssm_ns, self.dssm_selector);
        match call("list", &what, || pods.list(&lp)).await {
            Ok(l) => o.dssm_pods = l.items,
            Err(e) => o.unreadable.push(unreadable(what, e)),
        }
        // The dSSM StatefulSets are the owners of the pods the selector picks.
        let dssm_owners: BTreeSet<String> = o
            .dssm_pods
            .iter()
            .flat_map(|p| p.owner_references().iter())
            .filter(|r| r.kind == "StatefulSet")
            .map(|r| r.name.clone())
            .collect();
        for ns in self.namespaces() {
            let lp = ListParams::default();
            let what = format!("poddisruptionbudgets in {ns}");
            let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), &ns);
            match call("list", &what, || api.list(&lp)).await {
                Ok(l) => o.pdbs.extend(l.items),
                Err(e) => o.unreadable.push(unreadable(what, e)),
            }
            let role = |kind: &str, name: &str| {
                if self.targets.iter().any(|t| {
                    t.namespace == ns
                        && t.kind.as_str().eq_ignore_ascii_case(kind)
                        && t.name == name
                }) {
                    Role::Tmm
                } else if ns == self.dssm_ns && kind == "StatefulSet" && dssm_owners.contains(name)
                {
                    Role::Dssm
                } else {
                    Role::Other
                }
            };
            macro_rules! workloads {
                ($ty:ty, $kind:literal, $plan:expr) => {{
                    let api: Api<$ty> = Api::namespaced(self.client.clone(), &ns);
                    let what = format!("{} in {ns}", <$ty as kube::Resource>::plural(&()));
                    match call("list", &what, || api.list(&lp)).await {
                        Ok(l) => o.workloads.extend(l.items.into_iter().map(|w| {
                            let role = role($kind, &w.name_any());
                            let roll = (role == Role::Tmm).then(|| $plan(&w)).flatten();
                            Workload {
                                kind: $kind,
                                role,
                                template: w.spec.template.clone(),
                                meta: w.metadata,
                                roll,
                            }
                        })),
                        Err(e) => o.unreadable.push(unreadable(what, e)),
                    }
                }};
            }
            workloads!(Deployment, "Deployment", |d: &Deployment| Some(
                TargetWorkload::Deployment(Box::new(d.clone())).roll_plan()
            ));
            workloads!(StatefulSet, "StatefulSet", |_: &StatefulSet| None);
            workloads!(DaemonSet, "DaemonSet", |d: &DaemonSet| Some(
                TargetWorkload::DaemonSet(Box::new(d.clone())).roll_plan()
            ));
        }
        o
    }

    /// Asks the API server, for each permission a rotation needs, whether `as_user` has it
    /// (impersonated: the caller must be allowed to impersonate), or the caller when `None`.
    pub async fn review_access(
        &self,
        as_user: Option<&str>,
        needed: Vec<Access>,
    ) -> Result<Vec<(Access, Result<bool, ClusterError>)>, ClusterError> {
        let client = match as_user {
            None => self.client.clone(),
            Some(user) => impersonating(user).await?,
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(client);
        let mut out = Vec::with_capacity(needed.len());
        for a in needed {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(a.namespace.clone()),
                        verb: Some(a.verb.into()),
                        group: Some(a.group.into()),
                        resource: Some(a.resource.into()),
                        subresource: a.subresource.map(Into::into),
                        name: a.name.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let pp = PostParams::default();
            let answer = call("create", "selfsubjectaccessreview", || {
                api.create(&pp, &review)
            })
            .await
            .map(|r| r.status.is_some_and(|s| s.allowed));
            out.push((a, answer));
        }
        Ok(out)
    }
}

/// A client that acts as `user` (the Impersonate-User header), with the caller's credentials.
async fn impersonating(user: &str) -> Result<Client, ClusterError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    config.default_retry = false;
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).map_err(|e| ClusterError::Config(e.to_string()))
}

/// Every check, over what was read.
pub fn findings(o: &DoctorObservation) -> Vec<Finding> {
    let mut f = o.unreadable.clone();
    for w in &o.workloads {
        f.extend(doctor::sub_path_mounts(w));
        f.extend(doctor::redis_container(w));
        f.extend(doctor::tmm_surge(w));
        f.extend(doctor::untargeted_mounts(w));
        f.extend(doctor::owned_by_operator(w));
        f.extend(doctor::disruption_budgets(w, &o.pdbs));
    }
    f
}
