//! The Secrets: read one, write one (ours only, optimistic concurrency), and what a read
//! Secret says (its owner, its data and annotations as `SecretObs`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use super::{call, Cluster, ClusterError};
use crate::materials::{annotations, Owner};
pub use crate::model::observation::{owner_of, secret_obs};

impl Cluster {
    pub async fn get_secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, ClusterError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        call("get", &format!("secret {ns}/{name}"), || api.get_opt(name)).await
    }

    /// Creates the Secret, or replaces it if `existing` is given (optimistic concurrency: a
    /// change since it was read is a 409 Conflict). Refuses Secrets managed by someone else.
    pub async fn write_secret(
        &self,
        ns: &str,
        name: &str,
        data: BTreeMap<String, Vec<u8>>,
        annotations: BTreeMap<String, String>,
        existing: Option<&Secret>,
    ) -> Result<Secret, ClusterError> {
        let what = format!("secret {ns}/{name}");
        if let Some(Owner::Other(owner)) = existing.map(owner_of) {
            return Err(ClusterError::NotOurs { what, owner });
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut s = existing.cloned().unwrap_or_default();
        s.metadata.name = Some(name.to_string());
        s.metadata.namespace = Some(ns.to_string());
        s.metadata.managed_fields = None;
        s.labels_mut()
            .insert(annotations::MANAGED_BY.into(), annotations::MANAGER.into());
        let ann = s.annotations_mut();
        ann.retain(|k, _| {
            !k.starts_with(annotations::PREFIX)
                && k != "kubectl.kubernetes.io/last-applied-configuration"
        });
        ann.extend(annotations);
        s.type_ = Some("Opaque".into());
        s.string_data = None;
        s.data = Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect());
        let pp = PostParams {
            field_manager: Some("dssm-certs".into()),
            ..Default::default()
        };
        if existing.is_some() {
            call("update", &what, || api.replace(name, &pp, &s)).await
        } else {
            call("create", &what, || api.create(&pp, &s)).await
        }
    }
}
