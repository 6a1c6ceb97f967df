//! The one event reporter: Events about a Secret, a TMM workload or every target, best effort
//! (a failure is logged, never fatal).

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Event, EventType};
use kube::Resource;

use super::{describe, Cluster};
use crate::targets::Workload;

impl Cluster {
    /// Publishes an Event about `secret` (best effort: a failure is logged, never fatal).
    pub async fn event(&self, secret: &Secret, warning: bool, reason: &str, note: String) {
        self.event_on(secret, warning, reason, note).await
    }

    /// Publishes an Event about any object (best effort).
    pub async fn event_on<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            let error = describe(&e);
            tracing::warn!(reason, error, "could not publish an Event");
        }
    }

    /// Publishes an Event about a TMM workload (best effort).
    pub async fn event_on_workload(&self, w: &Workload, warning: bool, reason: &str, note: String) {
        match w {
            Workload::Deployment(d) => self.event_on(d.as_ref(), warning, reason, note).await,
            Workload::DaemonSet(d) => self.event_on(d.as_ref(), warning, reason, note).await,
        }
    }

    /// An Event on every target that still exists (best effort).
    pub async fn event_on_targets(&self, warning: bool, reason: &str, note: &str) {
        for t in &self.targets {
            if let Ok(Some(w)) = self.get_workload(t).await {
                self.event_on_workload(&w, warning, reason, note.to_string())
                    .await;
            }
        }
    }
}
