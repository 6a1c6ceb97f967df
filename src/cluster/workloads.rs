//! The TMM workloads (Deployments and DaemonSets): read, annotate (restart marks and records),
//! stop and start for a scale-to-zero restart, rollout restart, and watch until a condition
//! holds. Every call names the target it touches.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::{Patch, PatchParams};
use kube::Api;

use super::watch::watch_until;
use super::{call, Cluster, ClusterError};
use crate::model::targets::{Kind, TmmTarget, Workload};
use crate::model::tmm_patches;

fn pp() -> PatchParams {
    PatchParams {
        field_manager: Some("dssm-certs".into()),
        ..Default::default()
    }
}

impl Cluster {
    fn deployments_in(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn daemonsets_in(&self, ns: &str) -> Api<DaemonSet> {
        Api::namespaced(self.client.clone(), ns)
    }

    pub async fn get_workload(&self, t: &TmmTarget) -> Result<Option<Workload>, ClusterError> {
        let what = t.to_string();
        Ok(match t.kind {
            Kind::Deployment => {
                let api = self.deployments_in(&t.namespace);
                call("get", &what, || api.get_opt(&t.name))
                    .await?
                    .map(|d| Workload::Deployment(Box::new(d)))
            }
            Kind::DaemonSet => {
                let api = self.daemonsets_in(&t.namespace);
                call("get", &what, || api.get_opt(&t.name))
                    .await?
                    .map(|d| Workload::DaemonSet(Box::new(d)))
            }
        })
    }

    /// The workload, or the error that names it when it (or its namespace) is missing.
    pub async fn require_workload(&self, t: &TmmTarget) -> Result<Workload, ClusterError> {
        self.get_workload(t)
            .await?
            .ok_or_else(|| ClusterError::NoWorkload(t.clone()))
    }

    /// One merge patch of `t`, named `what` in errors.
    async fn patch_target(
        &self,
        t: &TmmTarget,
        what: &str,
        patch: &serde_json::Value,
    ) -> Result<i64, ClusterError> {
        let patch = Patch::Merge(patch);
        let pp = pp();
        Ok(match t.kind {
            Kind::Deployment => {
                let api = self.deployments_in(&t.namespace);
                let d = call("patch", what, || api.patch(&t.name, &pp, &patch)).await?;
                d.metadata.generation.unwrap_or(0)
            }
            Kind::DaemonSet => {
                let api = self.daemonsets_in(&t.namespace);
                let d = call("patch", what, || api.patch(&t.name, &pp, &patch)).await?;
                d.metadata.generation.unwrap_or(0)
            }
        })
    }

    /// Every TMM target's workload, in target order (what the restart's state is read from,
    /// `restart_state::observed`). A missing target is an error naming it.
    pub async fn require_workloads(&self) -> Result<Vec<Workload>, ClusterError> {
        let mut workloads = Vec::new();
        for t in &self.targets {
            workloads.push(self.require_workload(t).await?);
        }
        Ok(workloads)
    }

    /// Sets (Some) or removes (None) annotations of one target in one patch.
    pub async fn annotate_target(
        &self,
        t: &TmmTarget,
        changes: &[(&str, Option<&str>)],
    ) -> Result<(), ClusterError> {
        let patch = tmm_patches::annotate(changes);
        self.patch_target(t, &t.to_string(), &patch).await?;
        Ok(())
    }

    /// `annotate_target` on every target, in order.
    pub async fn annotate_targets(
        &self,
        changes: &[(&str, Option<&str>)],
    ) -> Result<(), ClusterError> {
        for t in &self.targets {
            self.annotate_target(t, changes).await?;
        }
        Ok(())
    }

    /// Stops every pod of `t`: a Deployment is scaled to 0 (the scale subresource); a
    /// DaemonSet, which cannot be scaled, gets a nodeSelector no node carries.
    pub async fn stop_target(&self, t: &TmmTarget) -> Result<(), ClusterError> {
        match t.kind {
            Kind::Deployment => self.scale_deployment(t, 0).await,
            Kind::DaemonSet => {
                let patch = tmm_patches::stop_daemonset();
                self.patch_target(t, &format!("{t} (stop: nodeSelector)"), &patch)
                    .await?;
                Ok(())
            }
        }
    }

    /// Undoes `stop_target`: a Deployment back to `replicas`; a DaemonSet loses our
    /// nodeSelector key (its own selector, if any, was never touched).
    pub async fn start_target(&self, t: &TmmTarget, replicas: i32) -> Result<(), ClusterError> {
        match t.kind {
            Kind::Deployment => self.scale_deployment(t, replicas).await,
            Kind::DaemonSet => {
                let patch = tmm_patches::start_daemonset();
                self.patch_target(t, &format!("{t} (start: nodeSelector)"), &patch)
                    .await?;
                Ok(())
            }
        }
    }

    async fn scale_deployment(&self, t: &TmmTarget, replicas: i32) -> Result<(), ClusterError> {
        let api = self.deployments_in(&t.namespace);
        let patch = tmm_patches::scale(replicas);
        let patch = Patch::Merge(&patch);
        let pp = pp();
        let what = format!("{t} (scale)");
        call("patch", &what, || api.patch_scale(&t.name, &pp, &patch)).await?;
        Ok(())
    }

    /// `kubectl rollout restart`: a pod-template annotation with the time, and in the same
    /// patch `record` on the workload (the roll a resumed run waits for instead of starting
    /// another). Returns the new generation.
    pub async fn rollout_restart_target(
        &self,
        t: &TmmTarget,
        now: &str,
        record: &str,
    ) -> Result<i64, ClusterError> {
        let patch = tmm_patches::rollout_restart(now, record);
        self.patch_target(t, &format!("{t} (rollout restart)"), &patch)
            .await
    }

    /// The API server's clock, read off `t`: one patch sets the roll record to `pending` (a
    /// value no earlier write left, so the patch changes the object and the server stamps our
    /// managedFields entry) and the answer's stamp is returned. None when the server stamped
    /// none. Pods' creationTimestamps come from that clock, whatever this machine's says.
    pub async fn server_time(
        &self,
        t: &TmmTarget,
        pending: &str,
    ) -> Result<Option<k8s_openapi::jiff::Timestamp>, ClusterError> {
        let patch = tmm_patches::roll_record(pending);
        let patch = Patch::Merge(&patch);
        let (pp, what) = (pp(), format!("{t} (roll record)"));
        let meta = match t.kind {
            Kind::Deployment => {
                let api = self.deployments_in(&t.namespace);
                call("patch", &what, || api.patch(&t.name, &pp, &patch))
                    .await?
                    .metadata
            }
            Kind::DaemonSet => {
                let api = self.daemonsets_in(&t.namespace);
                call("patch", &what, || api.patch(&t.name, &pp, &patch))
                    .await?
                    .metadata
            }
        };
        let manager = pp.field_manager.as_deref();
        Ok(meta
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.manager.as_deref() == manager)
            .filter_map(|e| e.time.map(|t| t.0))
            .max())
    }

    /// How many pods each StatefulSet named in `names` (in `ns`) asks for; one that is gone
    /// asks for none.
    pub async fn statefulset_replicas(
        &self,
        ns: &str,
        names: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<(String, i32)>, ClusterError> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), ns);
        let mut v = Vec::new();
        for name in names {
            let what = format!("statefulset {ns}/{name}");
            let s = call("get", &what, || api.get_opt(name)).await?;
            let replicas = s.map(|s| s.spec.replicas.unwrap_or(1));
            v.push((name.clone(), replicas.unwrap_or(0)));
        }
        Ok(v)
    }

    /// Resolves once `cond` holds for the workload of `t`. kube-runtime's watcher re-lists on
    /// 410 Gone and backs off on errors, so a broken stream never ends the wait early (the
    /// caller's deadline does).
    pub async fn watch_target(
        &self,
        t: &TmmTarget,
        cond: impl Fn(&Workload) -> bool + Send + Sync,
    ) {
        match t.kind {
            Kind::Deployment => {
                let api = self.deployments_in(&t.namespace);
                let what = t.to_string();
                watch_until(api, &t.name, &what, |d| {
                    cond(&Workload::Deployment(Box::new(d.clone())))
                })
                .await
            }
            Kind::DaemonSet => {
                let api = self.daemonsets_in(&t.namespace);
                let what = t.to_string();
                watch_until(api, &t.name, &what, |d| {
                    cond(&Workload::DaemonSet(Box::new(d.clone())))
                })
                .await
            }
        }
    }
}
