//! Pods and PodDisruptionBudgets: list, watch until a condition holds, evict (PDBs respected).
//! Every call names the namespace and selector or pod it touches.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{EvictParams, ListParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};

use super::{call, Cluster, ClusterError};

/// The pods of one namespace: a cheap handle that can move to another task or thread.
#[derive(Clone)]
pub struct PodsIn {
    api: Api<Pod>,
    namespace: String,
}

impl Cluster {
    pub fn pods_in(&self, ns: &str) -> PodsIn {
        PodsIn {
            api: Api::namespaced(self.client.clone(), ns),
            namespace: ns.to_string(),
        }
    }

    /// Every PodDisruptionBudget of `ns`.
    pub async fn pdbs_in(&self, ns: &str) -> Result<Vec<PodDisruptionBudget>, ClusterError> {
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), ns);
        let all = ListParams::default();
        let what = format!("poddisruptionbudgets in {ns}");
        Ok(call("list", &what, || api.list(&all)).await?.items)
    }
}

impl PodsIn {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pods matching `selector`, terminating and ended ones included.
    pub async fn list(&self, selector: &str) -> Result<Vec<Pod>, ClusterError> {
        let lp = ListParams::default().labels(selector);
        let what = format!("pods {} ({selector})", self.namespace);
        Ok(call("list", &what, || self.api.list(&lp)).await?.items)
    }

    /// Lists the pods matching `selector`, then watches them until `done` holds for the current
    /// set, which it returns. An expired or broken watch lists again, and so does a transient
    /// API error (an outage) after a pause; only another error ends it early (the caller bounds
    /// it in time).
    pub async fn watch_until(
        &self,
        selector: &str,
        done: impl Fn(&BTreeMap<String, Pod>) -> bool,
    ) -> Result<BTreeMap<String, Pod>, ClusterError> {
        let what = format!("pods {} ({selector})", self.namespace);
        loop {
            let lp = ListParams::default().labels(selector);
            let list = match call("list", &what, || self.api.list(&lp)).await {
                Err(e) if e.is_transient() => {
                    tracing::warn!(pods = %what, error = %e, "API unavailable; waiting on");
                    tokio::time::sleep(super::WAIT_RETRY).await;
                    continue;
                }
                r => r?,
            };
            let mut pods: BTreeMap<String, Pod> =
                list.items.into_iter().map(|p| (p.name_any(), p)).collect();
            if done(&pods) {
                return Ok(pods);
            }
            let rv = list.metadata.resource_version.unwrap_or_default();
            let wp = WatchParams::default().labels(selector).timeout(60);
            let stream = match call("watch", &what, || self.api.watch(&wp, &rv)).await {
                Err(e) if e.is_transient() => {
                    tracing::warn!(pods = %what, error = %e, "API unavailable; waiting on");
                    tokio::time::sleep(super::WAIT_RETRY).await;
                    continue;
                }
                r => r?,
            };
            let mut stream = stream.boxed();
            while let Ok(Some(ev)) = stream.try_next().await {
                match ev {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                        pods.insert(p.name_any(), p);
                    }
                    WatchEvent::Deleted(p) => {
                        pods.remove(&p.name_any());
                    }
                    WatchEvent::Bookmark(_) => {}
                    WatchEvent::Error(_) => break, // expired: list again
                }
                if done(&pods) {
                    return Ok(pods);
                }
            }
        }
    }

    /// Removes a pod through the Eviction API, so PodDisruptionBudgets are respected: a 429 (no
    /// disruption allowed now) is retried until `deadline`, as `kubectl drain` does, and so is
    /// an API outage. A pod already gone is fine.
    pub async fn evict(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), ClusterError> {
        let ns = &self.namespace;
        let what = format!("pod {ns}/{name} (eviction)");
        let ep = EvictParams::default();
        loop {
            match call("create", &what, || self.api.evict(name, &ep)).await {
                Ok(_) | Err(ClusterError::NotFound { .. }) => return Ok(()),
                Err(ClusterError::Api {
                    code: 429, message, ..
                }) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(pod = %name, %message, "eviction not allowed yet; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                // An API outage (after `call`'s retries) is waited out too, to the same deadline.
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(pod = %name, error = %e, "API unavailable; retrying the eviction");
                    tokio::time::sleep(super::WAIT_RETRY).await;
                }
                Err(ClusterError::Api {
                    code: 429, message, ..
                }) => {
                    return Err(ClusterError::EvictionBlocked {
                        pod: format!("{ns}/{name}"),
                        message,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
}
