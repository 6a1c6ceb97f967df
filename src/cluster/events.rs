//! The one event reporter: Events about a Secret, a TMM workload or every target, best effort
//! (a failure is logged, never fatal). Each Event's `reason` is a `Reason`, its type kube's
//! `EventType` (Normal or Warning).

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::Event;
pub use kube::runtime::events::EventType;
use kube::Resource;

use super::{describe, Cluster};
use crate::model::targets::Workload;

/// Why an Event is published: its `reason` field, one name per kind of thing that happened
/// (what `kubectl get events --field-selector reason=…` and the alerts' runbooks select on).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The Secrets were published where none were (a first publication).
    Published,
    /// A new leaf under the same CA.
    Renewed,
    /// A new CA (in one step, or materials replaced because they were unusable).
    CaRotated,
    /// A drifted or broken copy rewritten from the valid one.
    Repaired,
    /// A pass that wrote, for any other action.
    Reconciled,
    /// Phase 1 of 3 of a CA rotation reached every consumer: both CAs trusted.
    CaRotationTrusted,
    /// Phase 2 of 3: the new leaf, signed by the new CA, everywhere.
    CaRotationSwitched,
    /// Phase 3 of 3: the old CA dropped.
    CaRotationDropped,
    /// A certificate is inside the `--warn` window.
    CertificateExpiringSoon,
    /// A copy cannot be used as it is (broken chain, key mismatch, bad DH params, …).
    InvalidMaterials,
    /// The copies in the dSSM and TMM namespaces differ.
    CopiesOutOfSync,
    /// The pre-flight refused a restart (a dSSM pod not Ready, TMM mid-rollout).
    RestartRefused,
    /// `--force` restarted in spite of the pre-flight.
    PreflightOverridden,
    /// A restart failed (TMM was given back its replicas).
    RestartFailed,
    /// The restart finished and was verified.
    Restarted,
    /// A `reconcile`/`rotate` that writes (a renewal, a CA rotation or its next phase, the
    /// restart after them) failed; the note is its error.
    RotationFailed,
    /// A reason given as a string that is none of the above (kept as given).
    Other(String),
}

impl Reason {
    /// Every named reason, for tests and documentation.
    pub const ALL: [Reason; 16] = [
        Reason::Published,
        Reason::Renewed,
        Reason::CaRotated,
        Reason::Repaired,
        Reason::Reconciled,
        Reason::CaRotationTrusted,
        Reason::CaRotationSwitched,
        Reason::CaRotationDropped,
        Reason::CertificateExpiringSoon,
        Reason::InvalidMaterials,
        Reason::CopiesOutOfSync,
        Reason::RestartRefused,
        Reason::PreflightOverridden,
        Reason::RestartFailed,
        Reason::Restarted,
        Reason::RotationFailed,
    ];

    /// The Event's `reason` field (UpperCamelCase, as Kubernetes reasons are).
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Published => "Published",
            Reason::Renewed => "Renewed",
            Reason::CaRotated => "CARotated",
            Reason::Repaired => "Repaired",
            Reason::Reconciled => "Reconciled",
            Reason::CaRotationTrusted => "CARotationTrusted",
            Reason::CaRotationSwitched => "CARotationSwitched",
            Reason::CaRotationDropped => "CARotationDropped",
            Reason::CertificateExpiringSoon => "CertificateExpiringSoon",
            Reason::InvalidMaterials => "InvalidMaterials",
            Reason::CopiesOutOfSync => "CopiesOutOfSync",
            Reason::RestartRefused => "RestartRefused",
            Reason::PreflightOverridden => "PreflightOverridden",
            Reason::RestartFailed => "RestartFailed",
            Reason::Restarted => "Restarted",
            Reason::RotationFailed => "RotationFailed",
            Reason::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For the callers that still name a reason by its string (src/restart.rs, src/rotation.rs,
/// src/first_publication.rs): a known name becomes its variant.
impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or_else(|| Reason::Other(s.to_string()))
    }
}

/// An Event's type: kube's `EventType`.
pub trait IntoEventType {
    fn into_event_type(self) -> EventType;
}

impl IntoEventType for EventType {
    fn into_event_type(self) -> EventType {
        self
    }
}

impl Cluster {
    /// Publishes an Event about `secret` (best effort: a failure is logged, never fatal).
    pub async fn event(
        &self,
        secret: &Secret,
        type_: impl IntoEventType,
        reason: impl Into<Reason>,
        note: String,
    ) {
        self.event_on(secret, type_, reason, note).await
    }

    /// Publishes an Event about any object (best effort).
    pub async fn event_on<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: impl IntoEventType,
        reason: impl Into<Reason>,
        note: String,
    ) {
        let reason = reason.into();
        let ev = Event {
            type_: type_.into_event_type(),
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            let error = describe(&e);
            tracing::warn!(%reason, error, "could not publish an Event");
        }
    }

    /// Publishes an Event about a TMM workload (best effort).
    pub async fn event_on_workload(
        &self,
        w: &Workload,
        type_: impl IntoEventType,
        reason: impl Into<Reason>,
        note: String,
    ) {
        match w {
            Workload::Deployment(d) => self.event_on(d.as_ref(), type_, reason, note).await,
            Workload::DaemonSet(d) => self.event_on(d.as_ref(), type_, reason, note).await,
        }
    }

    /// An Event on every target that still exists (best effort).
    pub async fn event_on_targets(
        &self,
        type_: impl IntoEventType + Copy,
        reason: impl Into<Reason>,
        note: &str,
    ) {
        let reason = reason.into();
        for t in &self.targets {
            if let Ok(Some(w)) = self.get_workload(t).await {
                self.event_on_workload(&w, type_, reason.clone(), note.to_string())
                    .await;
            }
        }
    }

    /// A Warning Event `RotationFailed` with `error`, on the dSSM namespace's certificate
    /// Secret (on the TMM targets where it is missing): what `kubectl get events
    /// --field-selector reason=RotationFailed` and the DssmRotationFailed alert point to.
    /// Best effort, as every Event.
    pub async fn rotation_failed(&self, error: &str) {
        let ns = self.dssm_ns.clone();
        match self.get_secret(&ns, crate::contract::CERTS_SECRET).await {
            Ok(Some(secret)) => {
                self.event(
                    &secret,
                    EventType::Warning,
                    Reason::RotationFailed,
                    error.into(),
                )
                .await
            }
            _ => {
                self.event_on_targets(EventType::Warning, Reason::RotationFailed, error)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string reason that names a variant becomes it (so the callers not converted yet emit
    /// the same reasons), and every variant's name is distinct.
    #[test]
    fn each_reason_name_maps_back_to_its_variant() {
        for r in Reason::ALL {
            assert_eq!(Reason::from(r.as_str()), r);
        }
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(Reason::as_str).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        assert_eq!(
            Reason::from("SomethingNew"),
            Reason::Other("SomethingNew".into())
        );
    }
}
