//! Watches that outlive a broken stream: kube-runtime's watcher re-lists on 410 Gone and backs
//! off on errors, so only the caller's deadline ends a wait.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::Cluster;

/// Resolves once `cond` holds for the object `name` watched through `api`; `what` names it in
/// the logs.
pub(super) async fn watch_until<K>(api: Api<K>, name: &str, what: &str, cond: impl Fn(&K) -> bool)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(o) if cond(&o) => return,
            Ok(_) => {}
            Err(e) => tracing::debug!(object = %what, error = %e, "watch interrupted; resuming"),
        }
    }
}

/// Watches on Secrets, each sending `true` on every change and `false` when its stream fails
/// (the API server away?). The watches stop when this is dropped.
pub struct SecretChanges {
    pub changes: tokio::sync::mpsc::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SecretChanges {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Cluster {
    /// One watch per Secret `name` of each namespace of `namespaces`.
    pub fn watch_secrets(&self, namespaces: &[String], names: &[&str]) -> SecretChanges {
        let (tx, changes) = tokio::sync::mpsc::channel::<bool>(16);
        let mut tasks = Vec::new();
        for ns in namespaces {
            for name in names {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut stream = watcher(api, cfg).default_backoff().boxed();
                    while let Some(ev) = stream.next().await {
                        let _ = tx.send(ev.is_ok()).await;
                    }
                }));
            }
        }
        SecretChanges { changes, tasks }
    }
}
